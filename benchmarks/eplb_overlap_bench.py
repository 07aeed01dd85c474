"""What an EPLB rebalance costs the steps that run while its expert weights move.

Two measurements:

* ``serving`` (CPU or GPUs): the product path. An ``--ep`` rank engine with redundant
  experts and a Zipf router skew (``eplb.router_skew``) serves greedy requests; a
  rebalance from the recorded load is asked for while they run. Reports the step time
  outside moves (median) and during them (median, longest: the EPLB status's step
  times), the layers and bytes moved, and whether every request's tokens are the same
  before, during and after the rebalance.
* ``mechanism`` (one GPU): the overlap itself. A Qwen3-30B-A3B-shaped model with random
  weights and ``--redundant`` spare expert slots per layer; every layer's spare slots
  get other experts while pipelined decode steps run. Reports the decode step time
  without moves, while they travel (the longest: the step that switches them), and how
  long the same moves take with no step running (what moving them between two steps,
  as EPLB did before, would stall one step by).

    python benchmarks/eplb_overlap_bench.py serving --ep 4 --chunk 1
    source .devbundle/install.sh && python3 benchmarks/eplb_overlap_bench.py mechanism --layers 16
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import ray
import torch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("serving")
    s.add_argument("--ep", type=int, default=4)
    s.add_argument("--chunk", type=int, default=1, help="eplb.layers_per_chunk (0: all layers at once)")
    s.add_argument("--skew", type=float, default=1.2, help="eplb.router_skew")
    s.add_argument("--prompts", type=int, default=16)
    s.add_argument("--max-tokens", type=int, default=160)
    s.add_argument("--repeats", type=int, default=3, help="rebalances measured (each on fresh load)")
    m = sub.add_parser("mechanism")
    m.add_argument("--layers", type=int, default=16)
    m.add_argument("--redundant", type=int, default=32, help="spare expert slots per layer")
    m.add_argument("--batch", type=int, default=64)
    m.add_argument("--context", type=int, default=1024)
    m.add_argument("--iters", type=int, default=30)
    return p.parse_args()


# ---- serving ------------------------------------------------------------------------


def serving(args: argparse.Namespace) -> None:
    from raymoe.cluster.config import config_from_dict
    from raymoe.deploy import LLM, SamplingParams

    config = config_from_dict(
        {
            "parallel": {"tp": 1, "dp": args.ep, "ep": args.ep},
            "engine": {"num_kv_blocks": 1024},
            "eplb": {
                "enabled": True,
                "num_redundant_experts": args.ep,
                "rebalance_every_steps": 10**6,
                "layers_per_chunk": args.chunk or None,
                "router_skew": args.skew,
                "min_improvement": 0.0,
            },
        }
    )
    prompts = [f"request {i}: " + "tell me a story " * (1 + i % 4) for i in range(args.prompts)]
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    with LLM(config) as llm:
        controller = llm.controller
        reference = [c.token_ids for c in llm.generate(prompts, greedy)]
        for n in range(1, args.repeats + 1):
            during: list = []
            serving_thread = threading.Thread(target=lambda: during.extend(llm.generate(prompts, greedy)))
            serving_thread.start()
            steps0 = ray.get(controller.stats.remote()).steps
            while ray.get(controller.stats.remote()).steps < steps0 + 20:  # load recorded, steps running
                time.sleep(0.01)
            ray.get(controller.rebalance.remote())
            serving_thread.join()
            status = _wait_rebalances(controller, n)
            after = [c.token_ids for c in llm.generate(prompts, greedy)]
            same = [c.token_ids for c in during] == reference == after
            rows.append((status, same))
    print(f"\nserving: CPU, tiny model, ep={args.ep}, layers_per_chunk={args.chunk or 'all'}, skew {args.skew}")
    print(
        "| rebalance | layers moved | MiB | steps during it | step median (ms) | during it: median | "
        "longest | longest / median | p95 outside rebalances / median | tokens unchanged |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, (s, same) in enumerate(rows, 1):
        print(
            f"| {i} | {s['layers_total']} | {s['bytes_moved'] / 2**20:.2f} | {s.get('rebalance_steps', 0)} | "
            f"{s['step_ms_median']:.2f} | {s.get('rebalance_step_ms_median', float('nan')):.2f} | "
            f"{s.get('rebalance_step_ms_max', float('nan')):.2f} | "
            f"{s.get('rebalance_step_ms_max', float('nan')) / s['step_ms_median']:.2f} | "
            f"{s.get('step_ms_p95', float('nan')) / s['step_ms_median']:.2f} | {same} |"
        )


def _wait_rebalances(controller, n: int) -> dict:
    deadline = time.monotonic() + 120
    status = ray.get(controller.eplb_status.remote())
    while status["rebalances"] < n and time.monotonic() < deadline:
        time.sleep(0.05)
        status = ray.get(controller.eplb_status.remote())
    assert status["rebalances"] == n, status
    return status


# ---- mechanism (on the rank) ----------------------------------------------------------


def rotated_spare_slots(ctx, shift: int) -> torch.Tensor:
    """Every layer's slots with each spare slot (p >= E) holding expert (p + shift) mod E."""
    runner = ctx.state["runner"]
    p2l = runner.expert_map.physical_to_logical_cpu.clone()
    experts = runner.expert_map.num_logical
    spare = torch.arange(experts, p2l.shape[1])
    p2l[:, experts:] = (spare + shift) % experts
    return p2l


def time_moves(ctx, step, iters: int, shift: int) -> dict:
    from raymoe.actors.engine.expert_mover import MoveChunk

    runner = ctx.state["runner"]
    mover = runner.expert_mover()
    layers = list(range(runner.expert_map.physical_to_logical_cpu.shape[0]))

    def piped_steps(n: int) -> list[float]:
        """Pipelined decode steps (each launch first switches a chunk that has landed)."""
        times = []
        runner.launch(step)
        for _ in range(n):
            t0 = time.perf_counter()
            runner.launch(step)
            runner.collect(keep=1)
            times.append(time.perf_counter() - t0)
            if n > iters and not mover.busy:
                break
        runner.collect(keep=0)
        return times

    piped_steps(5)  # warm
    base = piped_steps(iters)
    # the moves with no step running: what moving them between two steps stalls one step by
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    mover.start([MoveChunk(layers, rotated_spare_slots(ctx, shift))])
    while mover.busy:
        runner.advance_expert_moves()
        time.sleep(1e-4)
    torch.cuda.synchronize()
    alone = time.perf_counter() - t0
    # as many moves again while steps run; the step that switches them is the longest
    mover.start([MoveChunk(layers, rotated_spare_slots(ctx, shift + 1))])
    moving = piped_steps(10**6)
    after = piped_steps(iters)
    moe = runner.model.layers[runner.spec.moe_layers[0]].mlp
    per_expert = (moe.w13[0].numel() + moe.w2[0].numel()) * moe.w13.element_size()
    moved_bytes = per_expert * len(layers) * (runner.expert_map.num_physical - runner.expert_map.num_logical)
    return {
        "base_ms": 1e3 * statistics.median(base),
        "after_ms": 1e3 * statistics.median(after),
        "moving_ms_median": 1e3 * statistics.median(moving),
        "moving_ms_max": 1e3 * max(moving),
        "moving_steps": len(moving),
        "moves_alone_ms": 1e3 * alone,
        "moved_gib": moved_bytes / 2**30,
    }


def mechanism(args: argparse.Namespace) -> None:
    from engine_bench import build, decode_step, hf_config

    from raymoe.cluster.config import config_from_dict
    from raymoe.deploy.launch import start_controller

    block_size = 16
    num_blocks = -(-args.batch * (args.context + 16) // block_size) + args.batch
    config = config_from_dict(
        {
            "model": {"path": "builtin:none", "dtype": "bfloat16", "load_format": "dummy"},
            "parallel": {"device": "cuda"},
            "engine": {
                "block_size": block_size,
                "num_kv_blocks": num_blocks,
                "max_num_seqs": args.batch,
                "max_num_batched_tokens": 8192,
            },
            "eplb": {"enabled": True, "num_redundant_experts": args.redundant},
        }
    )
    controller = start_controller(config)
    run = lambda fn, *a: ray.get(controller.run_on_ranks.remote(fn, *a))[0]  # noqa: E731
    run(build, config, hf_config(args.layers), num_blocks, args.context + 16)
    step = decode_step(args.batch, args.context, block_size, 0, (args.batch,))
    r = run(time_moves, step, args.iters, 1)
    ray.get(controller.shutdown.remote())
    print(
        f"\nmechanism: 1 GPU, Qwen3-30B-A3B shape, {args.layers} layers, {args.redundant} spare slots per layer "
        f"({r['moved_gib']:.2f} GiB moved per rebalance), decode batch {args.batch} x ctx {args.context}, pipelined"
    )
    print(
        "| decode step, no moves | while moves travel: median | longest | steps | after | "
        "moves alone (the stall between two steps) |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {r['base_ms']:.2f} ms | {r['moving_ms_median']:.2f} ms | {r['moving_ms_max']:.2f} ms | "
        f"{r['moving_steps']} | {r['after_ms']:.2f} ms | {r['moves_alone_ms']:.1f} ms |"
    )


if __name__ == "__main__":
    args = parse()
    serving(args) if args.what == "serving" else mechanism(args)
