"""Host time of the scheduler per engine step (schedule, advance, fill), prefix caching on
and off: the block manager's share of a step.

256 running requests decode (no model: made-up tokens), each with a prompt of
``--prompt`` tokens, shared (``--shared``) or unique, for ``--steps`` steps; reports the
median host time per step. Compare with the GPU step at the same batch (BENCHMARKS.md:
7.82 ms at batch 256 on one H200).

    python benchmarks/scheduler_bench.py --running 256 --prompt 512 --steps 300
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.request import Request, SamplingParams
from raymoe.actors.engine.scheduler import Scheduler


def run(running: int, prompt: int, steps: int, *, caching: bool, shared: bool) -> float:
    block = 16
    blocks = running * (-(-(prompt + steps + 2) // block)) + 64
    sched = Scheduler(BlockManager(blocks, block, prefix_caching=caching), running, 1 << 20, prompt + steps + 64)
    rng = random.Random(0)
    common = [rng.randrange(3, 50000) for _ in range(prompt)]
    for i in range(running):
        ids = common[:-1] + [i + 3] if shared else [rng.randrange(3, 50000) for _ in range(prompt)]
        sched.add(Request(f"r{i}", ids, SamplingParams(max_tokens=steps + 1), seed=i, arrival=float(i)))
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        out = sched.schedule()
        pending = sched.advance(out)
        sched.fill(pending, [7] * len(pending))
        if step:  # the first step is the prefill of every prompt
            times.append(time.perf_counter() - t0)
    assert sched.num_running == running
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--running", type=int, default=256)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    print("| prompts | prefix caching | host time per decode step (ms) |")
    print("|---|---|---|")
    for shared in (False, True):
        for caching in (False, True):
            ms = 1e3 * run(args.running, args.prompt, args.steps, caching=caching, shared=shared)
            print(f"| {'shared' if shared else 'unique'} | {'on' if caching else 'off'} | {ms:.3f} |")


if __name__ == "__main__":
    main()
