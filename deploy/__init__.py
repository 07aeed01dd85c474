"""What users call: the CLI, the offline Python API, the Ray Serve app and the job entry point."""

from raymoe.actors.engine.request import SamplingParams
from raymoe.deploy.llm import LLM, Completion

__all__ = ["LLM", "Completion", "SamplingParams"]
