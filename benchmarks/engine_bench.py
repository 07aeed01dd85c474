"""Engine speed against the memory roofline and against Hugging Face transformers.

Builds a random-weight model of a real shape (``--model``: Qwen3-30B-A3B,
DeepSeek-V2-Lite, DeepSeek-V3 with ``--layers`` few enough to fit) on the GPU(s) (no
checkpoint files), through the real product path (controller + rank actors), and measures
in one run:

* copy bandwidth and bf16 matmul rate of the GPU (the two ceilings);
* decode step time at several batch sizes with a given context (CUDA graphs on
  unless --no-graphs), pipelined as the engine runs it on GPUs (the next step
  launched before this one is collected) and one step at a time, against the
  roofline floor: bytes of weights actually touched (experts counted from the
  step's real routing) plus KV read (the latent cache's bytes for MLA), over the
  measured copy bandwidth;
* prefill throughput (e.g. 64 x 512 and 8 x 4096 tokens) against the matmul rate
  on active parameters;
* the step loop through Ray actor calls (driver -> every rank -> driver), one step
  at a time and pipelined, against the rank's own time for the step;
* transformers `generate` on the same config and batch (properly initialised
  random weights), after raymoe has released the GPU.

    python benchmarks/engine_bench.py --layers 24 --batches 1,16,64 --out bench.md
    python benchmarks/engine_bench.py --model deepseek-v2-lite --no-hf
    python benchmarks/engine_bench.py --model deepseek-v3 --layers 5 --no-hf
    python benchmarks/engine_bench.py --layers 16 --dtype bf16,fp8 --no-hf
    python benchmarks/engine_bench.py --layers 48 --dtype bf16,fp8,fp8+kv8 --batches 1,64 --no-hf
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import io
import pstats
import statistics
import time
from typing import NamedTuple

import ray
import torch

from raymoe.actors.models.builtin import DEEPSEEK_V2_LITE, QWEN3_30B_A3B

# deepseek-ai/DeepSeek-V3's config.json (the fields raymoe and transformers read); 61 layers, of
# which the first 3 dense: --layers 5 (3 dense, 2 MoE) fits one H200
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "routed_scaling_factor": 2.5,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "n_group": 8,
    "topk_group": 4,
    "norm_topk_prob": True,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 163840,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
}
MODELS = {"qwen3-30b-a3b": QWEN3_30B_A3B, "deepseek-v2-lite": DEEPSEEK_V2_LITE, "deepseek-v3": DEEPSEEK_V3}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b", help="the shape to build")
    p.add_argument("--layers", type=int, help="shrink the model when memory or time is short (default: all)")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument(
        "--prefill",
        default="64x512,8x4096",
        help="comma list of SEQSxTOKENS[@CACHED] (CACHED: tokens already in the KV cache, its full blocks shared "
        "by the sequences, as a prefix-cache hit)",
    )
    p.add_argument("--block-size", type=int, default=16, help="engine.block_size: tokens per KV-cache block")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--dtype",
        default="bf16",
        help="bf16, fp8 (random FP8 weights with 128 x 128 block scales), either with +kv8 (an FP8 KV "
        "cache: engine.kv_cache_dtype fp8), or several (bf16,fp8,fp8+kv8: one after the other in one run, "
        "with each later one's ratio to the first in every case)",
    )
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--hf-batches", default="1,64")
    p.add_argument("--hf-steps", type=int, default=8)
    p.add_argument(
        "--profile",
        default="",
        metavar="CASES",
        help="print the top kernels of one eager step per case: a comma list of decode batches and "
        "SEQSxTOKENS[@CACHED] prefills (e.g. 1,64,2x4096)",
    )
    p.add_argument("--out", default=None, help="also append the tables (markdown) here")
    return p.parse_args()


def hf_config(model: str, layers: int | None) -> dict:
    return dict(MODELS[model], num_hidden_layers=layers or MODELS[model]["num_hidden_layers"])


# ---- on every rank -----------------------------------------------------------------


def _chunk(rid: str, tokens: list[int], start: int, blocks: tuple[int, ...]):
    from raymoe.actors.engine.request import SamplingParams
    from raymoe.actors.engine.scheduler import ScheduledChunk

    return ScheduledChunk(
        request_id=rid,
        token_ids=tuple(tokens),
        start_pos=start,
        block_ids=blocks,
        sample=True,
        sampling=SamplingParams(temperature=0.0),
        seed=0,
        num_output_tokens=0,
    )


def _timed(fn, iters: int) -> list[float]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def ceilings(ctx) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s of this GPU."""
    dev = ctx.device
    src = torch.randn(2**30, dtype=torch.bfloat16, device=dev)  # 2 GiB
    dst = torch.empty_like(src)
    copy = statistics.median(_timed(functools.partial(dst.copy_, src), 10))
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    mm = statistics.median(_timed(lambda: a @ b, 10))
    return {"copy_bw": 2 * 2**31 / copy, "matmul_flops": 2 * 8192**3 / mm, "gpu": torch.cuda.get_device_name(dev)}


def build(ctx, config, spec_dict: dict, num_blocks: int, max_model_len: int) -> dict:
    from raymoe.actors.engine.runner import ModelRunner
    from raymoe.actors.models.spec import spec_from_hf_config

    spec = spec_from_hf_config(spec_dict)
    t0 = time.perf_counter()
    runner = ModelRunner(ctx, config, spec, max_model_len=max_model_len, checkpoint_dir=None)
    runner.allocate_kv_cache(num_blocks)
    for layer in runner.attention.kv_cache:  # never time on zeros (normal_ has no FP8 kernel)
        layer.copy_(torch.randn(layer.shape, dtype=torch.bfloat16, device=layer.device))
    torch.cuda.synchronize()
    ctx.state["runner"] = runner
    info = {"build_s": time.perf_counter() - t0, "graphs": runner.graphs is not None, **ceilings(ctx)}
    return {**info, "active_params": _active_params(runner)}


def decode_step(batch: int, context: int, block_size: int, replica: int, dp_counts: tuple[int, ...]):
    from raymoe.actors.engine.step import pack_step

    pages = -(-(context + 1) // block_size)
    chunks = tuple(
        _chunk(f"r{replica}-{i}", [17 + i], context, tuple(range(i * pages, (i + 1) * pages))) for i in range(batch)
    )
    return pack_step(chunks, dp_counts, block_size, all_decode=True)


class Prefill(NamedTuple):
    """A prefill case: ``seqs`` sequences of ``tokens`` new tokens each, after ``cached``
    tokens already in the KV cache (a prefix-cache hit: its full blocks shared by all)."""

    seqs: int
    tokens: int
    cached: int = 0

    @staticmethod
    def parse(text: str) -> "Prefill":
        """SEQSxTOKENS[@CACHED], e.g. 8x4096 or 16x64@4000."""
        shape, _, cached = text.partition("@")
        seqs, tokens = (int(x) for x in shape.split("x"))
        return Prefill(seqs, tokens, int(cached or 0))

    def __str__(self) -> str:
        return f"{self.seqs} x {self.tokens}" + (f" after {self.cached} cached" if self.cached else "")

    def blocks(self, block_size: int) -> int:
        shared = self.cached // block_size
        return shared + self.seqs * (-(-(self.cached + self.tokens) // block_size) - shared)


def prefill_step(p: Prefill, block_size: int, dp_counts: tuple[int, ...], vocab_size: int):
    from raymoe.actors.engine.step import pack_step

    shared = p.cached // block_size
    own = -(-(p.cached + p.tokens) // block_size) - shared
    ids = [(7 * i) % (vocab_size - 3) + 3 for i in range(p.cached, p.cached + p.tokens)]
    chunks = tuple(
        _chunk(f"p{i}", ids, p.cached, (*range(shared), *range(shared + i * own, shared + (i + 1) * own)))
        for i in range(p.seqs)
    )
    return pack_step(chunks, dp_counts, block_size)


def time_step(ctx, step, iters: int, pipelined: bool = True) -> dict:
    """Per-step time run one at a time (launched, then collected) and pipelined (the next step
    launched before this one is collected, as the engine runs on GPUs: host work overlaps the
    device's)."""
    runner = ctx.state["runner"]

    def one_at_a_time():
        runner.launch(step)
        runner.collect(keep=0)

    times = _timed(one_at_a_time, iters)
    if not pipelined:
        return {"median_s": statistics.median(times)}
    runner.launch(step)
    piped = []
    for i in range(iters + 3):
        t0 = time.perf_counter()
        runner.launch(step)
        runner.collect(keep=1)
        if i >= 3:
            piped.append(time.perf_counter() - t0)
    runner.collect(keep=0)
    return {"median_s": statistics.median(times), "pipelined_s": statistics.median(piped)}


def touched_bytes(ctx, step) -> dict:
    """Bytes this rank's weights actually read in one eager forward of ``step``, plus KV read."""
    from raymoe.actors.engine.expert_load import ExpertLoadRecorder
    from raymoe.actors.engine.step import build_step_layout
    from raymoe.actors.models.batch import ForwardBatch

    runner = ctx.state["runner"]
    model = runner.model
    rec = ExpertLoadRecorder(len(runner.spec.moe_layers), runner.expert_map.num_physical, ctx.device)
    layout = build_step_layout(step, runner.block_size)
    runner.attention.plan(layout)
    dev = ctx.device
    batch = ForwardBatch(
        layout.input_ids.to(dev),
        layout.positions.to(dev),
        runner.attention,
        dp_pad=step.num_chunks,
        dp_counts=torch.tensor(step.dp_token_counts, device=dev),
        expert_load=rec,
    )
    with torch.inference_mode():
        runner.run_model(batch)
    counts = rec.take()
    moe = model.layers[runner.spec.moe_layers[0]].mlp
    slot_bytes = sum(t[0].numel() * t[0].element_size() for t in moe.expert_tensors())  # FP8: with scales
    local = counts[:, moe.slot_start : moe.slot_start + moe.slots]
    experts = int((local > 0).sum())
    dense = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if ".w13" not in n and ".w2" not in n and "embed" not in n
    )
    kv = int(layout.context_lens.sum()) * runner.kv_block_bytes() // runner.block_size
    return {"weights": dense + experts * slot_bytes, "kv": kv, "experts": experts}


def profile_step(ctx, step) -> str:
    """Kernel time table of one eager forward of ``step`` (the graphs replay the same kernels)."""
    from torch.profiler import ProfilerActivity, profile

    from raymoe.actors.engine.step import build_step_layout

    runner = ctx.state["runner"]
    layout = build_step_layout(step, runner.block_size)
    with torch.inference_mode():
        runner.forward_eager(layout, step.dp_token_counts)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.forward_eager(layout, step.dp_token_counts)
        launched = time.perf_counter() - t0
        torch.cuda.synchronize()
        finished = time.perf_counter() - t0
        host = cProfile.Profile()
        host.enable()
        runner.forward_eager(layout, step.dp_token_counts)
        host.disable()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.forward_eager(layout, step.dp_token_counts)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / 1e3
    head = (
        f"{len(kernels)} kernels, {total:.2f} ms of kernel time (eager); unprofiled, the host took "
        f"{launched * 1e3:.2f} ms to launch them and the step finished after {finished * 1e3:.2f} ms\n"
    )
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    hot = io.StringIO()
    pstats.Stats(host, stream=hot).sort_stats("tottime").print_stats(25)
    return f"{head}{table}\nHost Python of one eager forward (cProfile, by own time):\n{hot.getvalue()}"


# ---- driver ------------------------------------------------------------------------


def main() -> None:
    args = parse()
    measured = {dtype: measure(args, dtype) for dtype in args.dtype.split(",")}
    hf = {} if args.no_hf else hf_generate(args, [int(b) for b in args.hf_batches.split(",")])
    for dtype, (info, rows, overhead) in measured.items():
        print_table(args, dtype, info, rows, overhead, hf)
    first, *later = measured
    for other in later:
        print_ratios(args, first, other, measured)


def measure(args, dtype: str) -> tuple:
    """Build the model with ``dtype`` weights and time every case -> (info, rows, step-loop
    overhead); prints the kernel tables ``--profile`` asks for as it goes."""
    from raymoe.cluster.config import config_from_dict
    from raymoe.deploy.launch import start_controller

    weights, _, kv = dtype.partition("+")
    if weights not in ("bf16", "fp8") or kv not in ("", "kv8"):
        raise SystemExit(f"--dtype: {dtype!r} is not bf16 or fp8, with or without +kv8")
    batches = [int(b) for b in args.batches.split(",")]
    prefills = [Prefill.parse(p) for p in args.prefill.split(",") if p]
    profiled = [c for c in args.profile.split(",") if c]
    # what the runs need, the profiled cases' included
    all_batches = batches + [int(c) for c in profiled if "x" not in c]
    all_prefills = prefills + [Prefill.parse(c) for c in profiled if "x" in c]
    block_size = args.block_size
    decode_blocks = [b * -(-(args.context + 16) // block_size) for b in all_batches]
    num_blocks = max(decode_blocks + [p.blocks(block_size) for p in all_prefills])
    max_model_len = max(args.context + 16, max((p.cached + p.tokens for p in all_prefills), default=0))
    dp = max(1, args.ep // args.tp)
    config = config_from_dict(
        {
            "model": {
                "path": "builtin:none",
                "dtype": "bfloat16",
                "load_format": "dummy",
                "quantization": "fp8" if weights == "fp8" else "none",
            },
            "parallel": {"tp": args.tp, "dp": dp, "ep": args.ep, "device": "cuda"},
            "engine": {
                "block_size": block_size,
                "num_kv_blocks": num_blocks,
                # a prefill of more sequences than the largest decode batch needs their rows too
                "max_num_seqs": max([*all_batches, *(p.seqs for p in all_prefills)]),
                # the largest step it runs (KV is written directly, not prefilled)
                "max_num_batched_tokens": max([*all_batches, *(p.seqs * p.tokens for p in all_prefills), 8192]),
                "cuda_graphs": not args.no_graphs,
                "kv_cache_dtype": "fp8" if kv else "auto",
            },
        }
    )
    controller = start_controller(config)
    run = lambda fn, *a: ray.get(controller.run_on_ranks.remote(fn, *a))  # noqa: E731
    info = run(build, config, hf_config(args.model, args.layers), num_blocks, max_model_len)[0]
    rows = []
    for b in batches:
        steps = [decode_step(b, args.context, block_size, d, (b,) * dp) for d in range(dp)]
        res = run(_per_replica(time_step), steps, args.iters)
        touched = run(_per_replica(touched_bytes), steps)[0]
        floor = (touched["weights"] + touched["kv"]) / info["copy_bw"]
        t = res[0]["pipelined_s"]
        rows.append(
            (
                "decode",
                f"batch {b} x ctx {args.context}",
                t,
                floor,
                b * dp / t,
                f"one at a time {res[0]['median_s'] * 1e3:.2f} ms; {touched['experts']} experts touched",
            )
        )
        print(f"{dtype} decode batch {b}: {t * 1e3:.3f} ms ({t / floor:.2f} x floor)", flush=True)
    vocab = MODELS[args.model]["vocab_size"]
    for p in prefills:
        tokens = p.seqs * p.tokens
        steps = [prefill_step(p, block_size, (tokens,) * dp, vocab) for _ in range(dp)]
        res = run(_per_replica(time_step), steps, max(3, args.iters // 4), False)
        t = res[0]["median_s"]
        util = 2 * info["active_params"] * tokens * dp / t / info["matmul_flops"] / (args.tp * dp)
        rows.append(("prefill", str(p), t, None, tokens * dp / t, f"{util:.0%} of matmul rate (weights only)"))
        print(f"{dtype} prefill {p}: {t * 1e3:.2f} ms", flush=True)
    for case in profiled:
        if "x" in case:
            p = Prefill.parse(case)
            step = [prefill_step(p, block_size, (p.seqs * p.tokens,) * dp, vocab) for _ in range(dp)]
            title = f"{dtype} prefill {p}"
        else:
            step = [decode_step(int(case), args.context, block_size, d, (int(case),) * dp) for d in range(dp)]
            title = f"{dtype} decode batch {case}"
        print(f"{title}: {run(_per_replica(profile_step), step)[0]}", flush=True)
    try:
        overhead = _loop_overhead(controller, config, args, block_size, dp)
    except Exception as e:  # report the rest even if this stage fails
        print(f"step-loop measurement failed: {type(e).__name__}: {e}")
        overhead = None
    ray.get(controller.shutdown.remote())
    ray.kill(controller)
    return info, rows, overhead


def _per_replica(fn):
    """Wrap fn(ctx, step, ...) to pick this rank's DP replica's step from a list."""

    def wrapped(ctx, steps, *a):
        return fn(ctx, steps[ctx.coord.dp], *a)

    return wrapped


def _active_params(runner) -> float:
    """Parameters one token multiplies on this rank: every weight but the embedding and the
    experts, plus top-k experts' worth per MoE layer."""
    model, spec = runner.model, runner.spec
    dense = sum(
        p.numel() for n, p in model.named_parameters() if ".w13" not in n and ".w2" not in n and "embed" not in n
    )
    if not spec.moe_layers:
        return dense
    moe = model.layers[spec.moe_layers[0]].mlp
    return dense + len(spec.moe_layers) * spec.moe.top_k * (moe.w13[0].numel() + moe.w2[0].numel())


def _loop_overhead(controller, config, args, block_size: int, dp: int) -> dict:
    """What the step loop adds at decode batch 64: the same step sent to every rank actor and
    collected as the controller's executor does it, one step at a time (wait) and pipelined
    (one step kept in flight, as the controller runs on GPUs), against the rank's own time."""
    from raymoe.actors.step_executor import RayStepExecutor
    from raymoe.cluster.layout import RankLayout

    b = min(64, config.engine.max_num_seqs)
    steps = [decode_step(b, args.context, block_size, d, (b,) * dp) for d in range(dp)]
    rank = ray.get(controller.run_on_ranks.remote(_per_replica(time_step), steps, args.iters))[0]["median_s"]
    executor = RayStepExecutor(RankLayout.from_config(config.parallel), ray.get(controller.rank_actors.remote()))

    async def loop_times(keep: int) -> list[float]:
        times = []
        for _ in range(args.iters + 5):
            t0 = time.perf_counter()
            await executor.run_step_async(steps, keep)
            times.append(time.perf_counter() - t0)
        await executor.run_step_async(None, 0)  # collect the step left in flight
        return times

    sync = statistics.median(asyncio.run(loop_times(0))[5:])
    pipelined = statistics.median(asyncio.run(loop_times(1))[5:])
    return {"batch": b, "sync_s": sync, "pipelined_s": pipelined, "rank_s": rank}


def hf_generate(args, batches: list[int]) -> dict:
    """transformers generate per-step decode time (greedy, cache on), same config, after raymoe freed the GPU."""
    import transformers

    skip = ("architectures", "model_type", "torch_dtype")
    shape = hf_config(args.model, args.layers)
    cfg = transformers.AutoConfig.for_model(shape["model_type"], **{k: v for k, v in shape.items() if k not in skip})
    with torch.device("cuda"):  # built and initialised (normal, initializer_range) on the GPU, in bf16
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    out = {}
    for b in batches:
        ids = torch.randint(3, shape["vocab_size"], (b, args.context), device="cuda")

        def gen(n, ids=ids, model=model):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        t1 = statistics.median(_timed(functools.partial(gen, 1), 2))
        tn = statistics.median(_timed(functools.partial(gen, 1 + args.hf_steps), 2))
        out[b] = (tn - t1) / args.hf_steps
    del model
    torch.cuda.empty_cache()
    return out


def print_ratios(args, first: str, second: str, measured: dict) -> None:
    """Each case's step time with ``second`` weights over ``first``'s, same run."""
    lines = [f"\n{second} / {first}, same run:", "", f"| case | shape | {first} ms | {second} ms | ratio |"]
    lines.append("|---|---|---|---|---|")
    for (kind, shape, t1, *_), (_, _, t2, *_) in zip(measured[first][1], measured[second][1]):
        lines.append(f"| {kind} | {shape} | {t1 * 1e3:.2f} | {t2 * 1e3:.2f} | {t2 / t1:.2f} |")
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    print(text)


def print_table(args, dtype, info, rows, overhead, hf) -> None:
    lines = [
        f"GPU: {info['gpu']} x{args.tp * max(1, args.ep // args.tp)}; copy {info['copy_bw'] / 1e12:.2f} TB/s; "
        f"bf16 matmul {info['matmul_flops'] / 1e12:.0f} TFLOP/s; {args.model} shape, {args.layers or 'all'} layers, "
        f"{dtype.partition('+')[0]} weights{', FP8 KV cache' if '+kv8' in dtype else ''}; "
        f"tp={args.tp} ep={args.ep}; CUDA graphs {'on' if info['graphs'] else 'off'}",
        "",
        "| case | shape | raymoe ms | floor ms | x floor | tokens/s | transformers ms | speed-up | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, shape, t, floor, tps, note in rows:
        b = int(shape.split()[1]) if kind == "decode" else None
        h = hf.get(b) if b is not None else None
        lines.append(
            f"| {kind} | {shape} | {t * 1e3:.2f} | {'' if floor is None else f'{floor * 1e3:.2f}'} | "
            f"{'' if floor is None else f'{t / floor:.2f}'} | {tps:,.0f} | {'' if h is None else f'{h * 1e3:.1f}'} | "
            f"{'' if h is None else f'{h / t:.1f}x'} | {note} |"
        )
    o = overhead
    if o is None:
        lines.append("\nStep loop: not measured (see the error above)")
    else:
        lines.append(
            f"\nStep loop, decode batch {o['batch']}, through Ray actor calls as the controller makes them: "
            f"{o['rank_s'] * 1e3:.2f} ms on the rank itself; one step at a time {o['sync_s'] * 1e3:.2f} ms per step "
            f"(+{(o['sync_s'] - o['rank_s']) / o['rank_s']:.0%}); pipelined (one step in flight) "
            f"{o['pipelined_s'] * 1e3:.2f} ms per step (+{(o['pipelined_s'] - o['rank_s']) / o['rank_s']:.0%})"
        )
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
