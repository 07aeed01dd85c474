"""The outputs of launched steps on their way to the host: each step's copy is queued right
behind the work that produces it, and collected oldest first."""

from __future__ import annotations

import collections
import time
from typing import Any, Optional

import torch

from raymoe.actors.engine.logprobs import LogprobColumns
from raymoe.actors.engine.step import StepOutput


class PendingOutputs:
    def __init__(self) -> None:
        # per launched step: (host copies, the event of their landing), or None where this
        # rank does not report
        self._queue: collections.deque = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, out: Optional[dict[str, Any]]) -> None:
        """A launched step's outputs (name -> a tensor or a dict of them; ``tokens`` always),
        or None on a rank that does not report."""
        self._queue.append(None if out is None else _copy_to_host(out))

    def collect(self, keep: int) -> list[Optional[StepOutput]]:
        """Wait for the queued steps but the ``keep`` newest, oldest first."""
        outputs: list[Optional[StepOutput]] = []
        while len(self._queue) > keep:
            entry = self._queue.popleft()
            if entry is None:
                outputs.append(None)
                continue
            host, done = entry
            t0 = time.perf_counter()
            if done is not None:
                done.synchronize()
            outputs.append(
                StepOutput(
                    tokens=host["tokens"].numpy(),
                    logits=host.get("logits"),
                    logprobs=LogprobColumns.from_host(host["sampled"]) if "sampled" in host else None,
                    prompt_logprobs=LogprobColumns.from_host(host["prompt"]) if "prompt" in host else None,
                    device_wait_s=time.perf_counter() - t0,
                )
            )
        return outputs


def _copy_to_host(tensors: dict[str, Any]) -> tuple[dict[str, Any], Optional[Any]]:
    """Host copies of ``tensors``, queued right behind the work that produces them, and an
    event marking when they have landed. (A plain ``.cpu()`` at collect time would queue
    behind the next step too, which is launched by then, and wait for it as well.)"""
    device = tensors["tokens"].device
    if device.type != "cuda":
        return tensors, None

    def copy(t: Any) -> Any:
        if isinstance(t, dict):
            return {k: copy(v) for k, v in t.items()}
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

    host = copy(tensors)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    return host, done
