"""Building an engine from a Config: the model it serves, its schedulers and EngineCore.

One recipe for the controller (steps on rank actors) and the in-process engine (steps
on a local runner): open the model, size the KV cache on the ranks, then build the
EngineCore over ``num_blocks`` blocks per DP replica. No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.core import EngineCore, Executor
from raymoe.actors.engine.grammar import GrammarCompiler
from raymoe.actors.engine.messages import ModelInfo
from raymoe.actors.engine.scheduler import Scheduler
from raymoe.actors.engine.tokenizer import Tokenizer
from raymoe.actors.models.builtin import resolve_model_path
from raymoe.actors.models.spec import ModelSpec, load_spec
from raymoe.cluster.config import Config


@dataclass(frozen=True)
class EngineModel:
    """The model an engine serves: its checkpoint directory, spec, tokenizer and context."""

    path: str
    spec: ModelSpec
    tokenizer: Tokenizer
    max_model_len: int

    def info(self, num_blocks: int, block_size: int, load_s: float) -> ModelInfo:
        return ModelInfo(
            model=self.path,
            architecture=self.spec.architecture,
            vocab_size=self.spec.vocab_size,
            max_model_len=self.max_model_len,
            kv_blocks_per_replica=num_blocks,
            block_size=block_size,
            load_s=load_s,
        )


def open_model(config: Config) -> EngineModel:
    """Resolve ``model.path`` (writing a built-in checkpoint where it is missing) and read
    its config.json and tokenizer."""
    path = str(resolve_model_path(config.model.path))
    spec = load_spec(path)
    return EngineModel(
        path=path,
        spec=spec,
        tokenizer=Tokenizer.from_dir(path),
        max_model_len=spec.max_model_len(config.model.max_model_len),
    )


def build_engine_core(
    config: Config,
    model: EngineModel,
    num_blocks: int,
    *,
    executor: Optional[Executor] = None,
    collect_logits: bool = False,
) -> EngineCore:
    """An EngineCore with one Scheduler per DP replica, each over ``num_blocks`` KV blocks.
    ``executor``: runs its steps (None: the caller drives them, as AsyncEngine does)."""
    eng = config.engine
    schedulers = [
        Scheduler(
            BlockManager(num_blocks, eng.block_size, prefix_caching=eng.prefix_caching),
            eng.max_num_seqs,
            eng.max_num_batched_tokens,
            model.max_model_len,
        )
        for _ in range(config.parallel.dp)
    ]
    return EngineCore(
        schedulers,
        eos_token_ids=model.tokenizer.eos_token_ids,
        executor=executor,
        seed=config.model.seed,
        collect_logits=collect_logits,
        vocab_size=model.spec.vocab_size,
        grammars=GrammarCompiler(model.tokenizer, model.spec.vocab_size, model.tokenizer.eos_token_ids),
    )
