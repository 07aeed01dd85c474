"""The controller actor: owns the rank cluster and drives it.

It reserves the placement group, starts the rank actors, has them build every
process group, and exposes cluster-wide operations (barrier over any group,
health, shutdown). ``Controller`` is a plain class; callers start it with
``ray.remote(Controller)`` (see raymoe.deploy.launch).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

from raymoe.actors.cluster import RankCluster, start_rank_cluster
from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.core import EngineCore, run_to_completion
from raymoe.actors.engine.executor import RayStepExecutor
from raymoe.actors.engine.request import SamplingParams
from raymoe.actors.engine.scheduler import Scheduler
from raymoe.actors.engine.tokenizer import Tokenizer
from raymoe.actors.models.builtin import resolve_model_path
from raymoe.actors.models.spec import ModelSpec, load_spec
from raymoe.cluster.config import Config
from raymoe.cluster.layout import RankLayout

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.layout = RankLayout.from_config(config.parallel)
        self.cluster: Optional[RankCluster] = None
        self.engine: Optional[EngineCore] = None
        self.tokenizer: Optional[Tokenizer] = None
        self.vocab_size = 0

    def start(self) -> dict[str, Any]:
        """Bring up every rank; returns what each rank reported (rank, device, node, GPU)."""
        assert self.cluster is None, "controller already started"
        t0 = time.perf_counter()
        self.cluster = start_rank_cluster(
            self.layout, self.config.parallel.device, self.config.parallel.placement_timeout_s
        )
        return {
            "layout": self.layout.describe(),
            "ranks": self.cluster.infos,
            "startup_s": round(time.perf_counter() - t0, 2),
        }

    def load_model(self, collect_logits: bool = False) -> dict[str, Any]:
        """Load the model on every rank, size the KV cache, and build the engine."""
        cluster = self._cluster()
        t0 = time.perf_counter()
        path = str(resolve_model_path(self.config.model.path))
        if self.config.model.path.startswith("builtin:"):
            # every node needs the files: each rank writes them if its node lacks them
            cluster.call("execute", _resolve_on_rank, self.config.model.path)
        spec = load_spec(path)
        self.tokenizer = Tokenizer.from_dir(path)
        self.vocab_size = spec.vocab_size
        max_model_len = effective_max_model_len(self.config.model.max_model_len, spec)
        num_blocks = min(cluster.call("load_model", self.config, path, max_model_len))
        if num_blocks < 1:
            raise RuntimeError(
                "no memory left for the KV cache after loading the model: raise engine.kv_memory_fraction, "
                "use more GPUs (tp/ep), or a smaller model"
            )
        cluster.call("allocate_kv_cache", num_blocks)
        eng = self.config.engine
        schedulers = [
            Scheduler(BlockManager(num_blocks, eng.block_size), eng.max_num_seqs, eng.max_num_batched_tokens, max_model_len)
            for _ in range(self.layout.dp)
        ]
        executor = RayStepExecutor(self.layout, cluster.actors)
        self.engine = EngineCore(schedulers, self.tokenizer, executor, self.config.model.seed, collect_logits)
        return {
            "model": path,
            "architecture": spec.architecture,
            "max_model_len": max_model_len,
            "kv_blocks_per_replica": num_blocks,
            "load_s": round(time.perf_counter() - t0, 2),
        }

    def tokenize(self, prompt: Any) -> list[int]:
        """A prompt as token ids: ids pass through; text is encoded; a chat (list of
        {"role", "content"} messages) is rendered with the model's chat template."""
        tok, vocab = self.tokenizer, self.vocab_size
        assert tok is not None, "no model loaded"
        if isinstance(prompt, str):
            return tok.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True), add_special_tokens=False)
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        return list(prompt)

    def generate(self, prompts: list[Any], sampling: list[SamplingParams]) -> list[dict[str, Any]]:
        """Offline generation; prompts as accepted by ``tokenize``. One result per prompt, in order."""
        engine = self._engine()
        ids = [f"gen-{engine.num_steps}-{i}" for i in range(len(prompts))]
        for rid, prompt, params in zip(ids, prompts, sampling):
            engine.add_request(rid, self.tokenize(prompt), params)
        results: dict[str, dict[str, Any]] = {
            rid: {"token_ids": [], "text": "", "finish_reason": None, "logits": []} for rid in ids
        }
        for out in run_to_completion(engine):
            r = results[out.request_id]
            r["token_ids"] += out.new_token_ids
            r["text"] += out.new_text
            r["finish_reason"] = out.finish_reason
            r["num_prompt_tokens"] = out.num_prompt_tokens
            if out.logits is not None:
                r["logits"].append(out.logits)
        return [results[rid] for rid in ids]

    def barrier(self, group: str = "world") -> float:
        """Barrier over every group of ``group`` kind (each rank joins its own); returns seconds."""
        t0 = time.perf_counter()
        self._cluster().call("barrier", group)
        return time.perf_counter() - t0

    def execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(ctx, *args, **kwargs)`` on every rank; results in rank order."""
        return self._cluster().call("execute", fn, *args, **kwargs)

    def health(self) -> dict[str, Any]:
        if self.cluster is None:
            return {"status": "starting", "layout": self.layout.describe()}
        try:
            ranks = self.cluster.call("health")
        except Exception as e:  # a dead rank: degraded, with the reason
            return {"status": "degraded", "error": f"{type(e).__name__}: {e}", "layout": self.layout.describe()}
        return {"status": "ok", "layout": self.layout.describe(), "ranks": ranks}

    def shutdown(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None

    def _engine(self) -> EngineCore:
        if self.engine is None:
            raise RuntimeError("no model loaded (load_model)")
        return self.engine

    def _cluster(self) -> RankCluster:
        if self.cluster is None:
            raise RuntimeError("controller not started")
        return self.cluster


def effective_max_model_len(requested: Optional[int], spec: ModelSpec) -> int:
    """The configured length, capped by the model's positions (and sliding window, which the
    engine does not implement: capping keeps results exact)."""
    limit = spec.max_position
    if spec.sliding_window is not None and spec.sliding_window < limit:
        log.info("max_model_len capped at the sliding window (%d): windowed attention is not implemented", spec.sliding_window)
        limit = spec.sliding_window
    if requested is not None and requested > limit:
        raise ValueError(f"model.max_model_len: {requested} exceeds what the model supports ({limit})")
    return requested or limit


def _resolve_on_rank(ctx: Any, path: str) -> str:
    return str(resolve_model_path(path))
