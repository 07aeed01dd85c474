"""An in-process engine: EngineCore + LocalExecutor on one rank, no Ray, no torch.distributed.

The same scheduler, runner and sampler as the served path, minus every process hop:
the reference for "engine time" (the TTFT baseline of benchmarks/ttft_overhead.py)
and a quick way to run a world-of-one config in tests and tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from raymoe.actors.engine.builder import build_engine_core, open_model
from raymoe.actors.engine.core import EngineCore
from raymoe.actors.engine.executor import LocalExecutor
from raymoe.actors.engine.messages import ModelInfo
from raymoe.actors.engine.rank_context import RankContext
from raymoe.actors.engine.runner import ModelRunner
from raymoe.actors.engine.tokenizer import Tokenizer
from raymoe.cluster.config import Config
from raymoe.cluster.layout import RankLayout
from raymoe.comm.groups import single_process_groups


@dataclass
class LocalEngine:
    core: EngineCore  # its ``executor`` is a LocalExecutor
    tokenizer: Tokenizer
    info: ModelInfo


def build_local_engine(config: Config, collect_logits: bool = False, num_threads: Optional[int] = None) -> LocalEngine:
    """An EngineCore whose steps run in this process. ``config`` must describe a world of
    one rank (tp = dp = cp = ep = 1); ``num_threads`` sets torch's CPU threads (None: leave).

    The KV cache is sized as the controller sizes it (the runner's ``max_kv_blocks``).
    """
    layout = RankLayout.from_config(config.parallel)
    if layout.world_size != 1:
        raise ValueError(
            f"parallel: an in-process engine runs one rank, but the config describes {layout.describe()}; "
            "set tp, dp, cp and ep to 1 (or serve it with the controller)"
        )
    device = torch.device("cuda", 0) if config.parallel.device == "cuda" else torch.device("cpu")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    model = open_model(config)
    ctx = RankContext(layout=layout, coord=layout.coord(0), device=device, groups=single_process_groups(device))
    runner = ModelRunner(ctx, config, model.spec, max_model_len=model.max_model_len, checkpoint_dir=model.path)
    num_blocks = runner.max_kv_blocks()
    runner.allocate_kv_cache(num_blocks)
    core = build_engine_core(config, model, num_blocks, executor=LocalExecutor(runner), collect_logits=collect_logits)
    return LocalEngine(core, model.tokenizer, model.info(num_blocks, config.engine.block_size, load_s=0.0))
