"""Compile every Triton kernel for the H100/H200 (sm_90) on a machine without a GPU:
``python triton_sm90_compiled.py <results file>``. Run by test_triton_sm90.py in a fresh
process, because it replaces Triton's driver for the whole process.

The model's own entry points are called with CPU tensors of the served models' shapes, so
each launch takes the block sizes the GPU would (the config pickers', by row count). A
stand-in driver reports an sm_90 target, and every launch compiles (Triton's bundled
ptxas, down to the cubin) without running. This catches what the CPU interpreter cannot:
code the compiler refuses (a global that is not a constexpr, an FP8 dot narrower than 32)
and a kernel that asks for more shared memory than an H100/H200 gives one block. One
JSON line per case goes to the results file: [name, None, kernels compiled] when every
launch compiled within the limits, [name, traceback, []] otherwise."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import jit
from triton.runtime.driver import driver

from raymoe.actors.engine import decode_attention_triton, kv_write_triton
from raymoe.actors.models import fp8_widen_triton, ops
from raymoe.actors.models.expert_mlp import expert_mlp
from raymoe.actors.models.fp8 import FP8
from raymoe.actors.models.linear import linear
from raymoe.actors.models.moe_combine import combine, combine_add_rms_norm
from raymoe.actors.models.moe_dispatch import busy_slots, dispatch
from raymoe.actors.models.spec import GroupedTopK
from raymoe.cluster.expert_slots import replica_tables
from raymoe.comm.gather_rows_triton import gather_rows
from raymoe.comm.reduce_add_rms_norm_triton import reduce_add_rms_norm_, reduce_add_rms_norm_gather_

SM90_SHARED_MEMORY = 232448  # bytes one block may use on an H100/H200 (cudaDevAttrMaxSharedMemoryPerBlockOptin)
BF16 = torch.bfloat16


class Sm90Driver(DriverBase):
    """Just enough of a CUDA driver for Triton to compile launches for sm_90."""

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


compiled: list[str] = []
_run = jit.JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    shared = kernel.metadata.shared
    assert shared <= SM90_SHARED_MEMORY, f"{self.fn.__name__} asks for {shared} bytes of shared memory"
    compiled.append(self.fn.__name__)
    return kernel


def _weights(*shape: int, fp8: bool) -> torch.Tensor:
    return torch.empty(*shape, dtype=FP8 if fp8 else BF16)  # never read: compiling needs shapes alone


def linear_case(rows: int, n: int, k: int, fp8: bool, split_k: int = 1) -> None:
    """A dense projection (bf16 through the one-row kernel; FP8 at every size, its GEMM with K
    split over split_k programs when that is more than 1)."""
    x = torch.randn(rows, k, dtype=BF16)
    w = _weights(n, k, fp8=fp8)
    block = (128, 128)
    scale = torch.ones(-(-n // block[0]), -(-k // block[1])) if fp8 else None
    if split_k > 1:
        from raymoe.actors.models import fp8_linear_triton

        config = dict(fp8_linear_triton.pick_config(rows), SPLIT_K=split_k)
        fp8_linear_triton.fp8_linear(x, w, scale, block=block, config=config)
        return
    linear(x, w, scale=scale, block=block if fp8 else None, backend="triton")


def moe_case(
    tokens: int, experts: int, top_k: int, hidden: int, inter: int, fp8: bool, dispatched: bool = True
) -> None:
    """One MoE layer as the decoder runs it: dispatch (not past the batch one Triton program
    holds: torch's there), the grouped experts, combine."""
    logits = torch.randn(tokens, experts)
    l2p, counts = replica_tables(torch.arange(experts).view(1, -1), experts)
    where = dict(logical_to_physical=l2p[0], replica_count=counts[0], num_physical=experts)
    d = (
        dispatch(logits, top_k, norm_topk_prob=True, slot_start=0, slots=experts, **where, backend="triton")
        if dispatched
        else None
    )
    # a real grouping (the compile-only dispatch computed nothing): rows spread over the experts
    rows = torch.arange(tokens * top_k) // top_k
    ends = torch.linspace(0, tokens * top_k, experts + 1)[1:].round().to(torch.int32)
    x = torch.randn(tokens, hidden, dtype=BF16)
    block = (128, 128)
    w13, w2 = _weights(experts, 2 * inter, hidden, fp8=fp8), _weights(experts, hidden, inter, fp8=fp8)
    scales = {}
    if fp8:
        scales = dict(
            w13_scale=torch.ones(experts, 2 * inter // block[0], hidden // block[1]),
            w2_scale=torch.ones(experts, hidden // block[0], -(-inter // block[1])),
            fp8_block=block,
        )
    groups = busy_slots(ends, tokens * top_k)
    y = expert_mlp(x, rows, ends, w13=w13, w2=w2, groups=groups, **scales, backend="triton")
    sorted_row = torch.arange(tokens * top_k).view(tokens, top_k)
    weights = d.weights if d is not None and d.weights.shape == (tokens, top_k) else torch.rand(tokens, top_k)
    combine(y, sorted_row, weights.to(BF16), ends, backend="triton")
    residual, norm = torch.randn(tokens, hidden, dtype=BF16), torch.ones(hidden, dtype=BF16)
    for shared in (None, torch.randn(tokens, hidden, dtype=BF16)):  # with shared experts' output, and without
        combine_add_rms_norm(
            y,
            sorted_row,
            weights.to(BF16),
            ends,
            residual=residual,
            weight=norm,
            eps=1e-6,
            shared=shared,
            backend="triton",
        )


def widen_case(slots: int, n: int, k: int) -> None:
    """FP8 expert weights widened to bf16 (large prefill steps' experts)."""
    scale = torch.ones(slots, n // 128, k // 128)
    fp8_widen_triton.widen_blocks(_weights(slots, n, k, fp8=True), scale, (128, 128), BF16)


def grouped_dispatch_case(tokens: int, experts: int, top_k: int, **rule) -> None:
    """The dispatch under a group-limited rule (GroupedTopK's fields), float32 logits."""
    l2p, counts = replica_tables(torch.arange(experts).view(1, -1), experts)
    where = dict(logical_to_physical=l2p[0], replica_count=counts[0], num_physical=experts)
    grouped = GroupedTopK(**rule)
    bias = torch.zeros(experts) if grouped.scoring == "sigmoid" else None
    routing = dict(norm_topk_prob=True, grouped=grouped, correction_bias=bias)
    dispatch(torch.randn(tokens, experts), top_k, **routing, slot_start=0, slots=experts, **where, backend="triton")


def qk_norm_rope_case(tokens: int, heads: int, kv_heads: int, dim: int) -> None:
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=BF16)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    norm_rope = dict(q_weight=torch.ones(dim, dtype=BF16), k_weight=torch.ones(dim, dtype=BF16), eps=1e-6)
    positions = torch.arange(tokens)
    ops.qk_norm_rotary_(positions, q, k, **norm_rope, cos_sin=torch.randn(4096, dim), backend="triton")


def kv_write_case(tokens: int, heads: int, kv_heads: int, dim: int, fp8: bool) -> None:
    """k/v from the qkv row into a paged cache, bf16 or FP8."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=BF16)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    cache = torch.zeros(8, 2, 16, kv_heads, dim, dtype=FP8 if fp8 else BF16)
    slots = torch.zeros(tokens, dtype=torch.int32)
    kv_write_triton.write_kv(cache, slots, slots, k=k, v=v)


def decode_attention_case(batch: int, heads: int, kv_heads: int, fp8: bool) -> None:
    """Paged decode attention over a bf16 or FP8 cache, as the engine's graphs of this batch run it."""
    pages = 4
    cache = torch.zeros(batch * pages, 2, 16, kv_heads, 128, dtype=FP8 if fp8 else BF16)
    indptr = torch.arange(batch + 1, dtype=torch.int32) * pages
    decode = decode_attention_triton.TritonDecode(batch, batch * pages, kv_heads, torch.device("cpu"))
    decode.plan(indptr, indptr[1:], torch.full((batch,), 64, dtype=torch.int32))
    decode.run(torch.randn(batch, heads, 128, dtype=BF16), cache)


def latent_norm_rope_case(tokens: int, heads: int, q_lora: int) -> None:
    """MLA's norm + rotary at DeepSeek's widths (nope 128, latent 512, rope 64)."""
    q_width, latent_width = heads * 192, 576
    proj = torch.randn(tokens, (q_lora or q_width) + latent_width, dtype=BF16)
    q = (torch.randn(tokens, q_width, dtype=BF16) if q_lora else proj[:, :q_width]).view(tokens, heads, 192)
    args = dict(norm_weight=torch.ones(512, dtype=BF16), eps=1e-6, cos_sin=torch.randn(4096, 64), nope_dim=128)
    ops.latent_norm_rotary(torch.arange(tokens), q, proj[:, -latent_width:], **args, backend="triton")


def collectives_case(ranks: int, tokens: int, width: int) -> None:
    """The symmetric-memory kernels: sum + add + norm, the one-shot gather, and both fused for
    data-parallel attention (addresses are never read when compiling)."""
    addresses = torch.zeros(ranks, dtype=torch.int64)
    residual, weight = torch.randn(tokens, width, dtype=BF16), torch.ones(width, dtype=BF16)
    reduce_add_rms_norm_(addresses, 0, residual, weight, eps=1e-6)
    gather_rows(addresses, 0, residual)
    table = torch.zeros(ranks, 2, dtype=torch.int64)
    reduce_add_rms_norm_gather_(table, 0, residual, weight, mine=0, rows=tokens, eps=1e-6)


QWEN3_30B = dict(experts=128, top_k=8, hidden=2048, inter=768)
DEEPSEEK_V3 = dict(experts=32, top_k=8, hidden=7168, inter=2048)  # one rank's 32 slots of 256 at ep 8
CASES = {
    "linear-bf16-1-row": (linear_case, dict(rows=1, n=5120, k=2048, fp8=False)),
    # FP8 GEMM: decode (quantising x inside), 64 rows, and prefill (x quantised in its own pass)
    **{f"linear-fp8-{m}-rows": (linear_case, dict(rows=m, n=5120, k=2048, fp8=True)) for m in (1, 64, 4096)},
    "linear-fp8-64-rows-split-k": (linear_case, dict(rows=64, n=2048, k=4096, fp8=True, split_k=4)),
    # expert kernels at each block-size choice (rows per slot 1, ~16, ~32) and past them (torch)
    **{f"moe-bf16-{t}-tokens": (moe_case, dict(tokens=t, **QWEN3_30B, fp8=False)) for t in (1, 256, 512)},
    **{f"moe-fp8-{t}-tokens": (moe_case, dict(tokens=t, **QWEN3_30B, fp8=True)) for t in (1, 256, 512)},
    # x and h quantised once, h by the first kernel: decode at batch 64 (the decode blocks) and prefill
    "moe-fp8-64-tokens": (moe_case, dict(tokens=64, **QWEN3_30B, fp8=True)),
    "moe-fp8-2048-tokens": (moe_case, dict(tokens=2048, **QWEN3_30B, fp8=True, dispatched=False)),
    "moe-fp8-deepseek-v3-ep8": (moe_case, dict(tokens=64, **DEEPSEEK_V3, fp8=True)),
    "fp8-widen-qwen3-w13": (widen_case, dict(slots=4, n=1536, k=2048)),
    # DeepSeek-V3's router (fused, and in two launches past one block of tokens); V2-Lite's
    **{
        f"dispatch-deepseek-v3-{t}-tokens": (
            grouped_dispatch_case,
            dict(tokens=t, experts=256, top_k=8, num_groups=8, topk_groups=4, routed_scaling_factor=2.5),
        )
        for t in (16, 64)
    },
    "dispatch-deepseek-v2-lite": (
        grouped_dispatch_case,
        dict(tokens=64, experts=64, top_k=6, num_groups=1, topk_groups=1, routed_scaling_factor=1.0, scoring="softmax"),
    ),
    "qk-norm-rope-qwen3": (qk_norm_rope_case, dict(tokens=64, heads=32, kv_heads=4, dim=128)),
    **{
        f"kv-write-qwen3-{c}": (kv_write_case, dict(tokens=64, heads=32, kv_heads=4, dim=128, fp8=c == "fp8"))
        for c in ("bf16", "fp8")
    },
    # Llama-70B's 8 KV heads: the kernel's wider variant
    "kv-write-8-heads-fp8": (kv_write_case, dict(tokens=64, heads=64, kv_heads=8, dim=128, fp8=True)),
    # one sequence (a small batch's config: parts merged) and a batch that fills the GPU (the large one's)
    **{
        f"decode-attention-qwen3-{c}-batch-{b}": (
            decode_attention_case,
            dict(batch=b, heads=32, kv_heads=4, fp8=c == "fp8"),
        )
        for c in ("bf16", "fp8")
        for b in (1, 64)
    },
    "latent-norm-rope-deepseek-v2-lite": (latent_norm_rope_case, dict(tokens=64, heads=16, q_lora=0)),
    "latent-norm-rope-deepseek-v3": (latent_norm_rope_case, dict(tokens=64, heads=128, q_lora=1536)),
    "collectives-2-ranks-2048": (collectives_case, dict(ranks=2, tokens=8, width=2048)),
    "collectives-8-ranks-7168": (collectives_case, dict(ranks=8, tokens=8, width=7168)),
}

if __name__ == "__main__":
    driver.set_active(Sm90Driver())
    jit.JITFunction.run = _compile_only
    results = Path(sys.argv[1])
    for name, (function, arguments) in CASES.items():
        compiled.clear()
        try:
            function(**arguments)
            line = [name, None, sorted(set(compiled))]
        except Exception:
            line = [name, traceback.format_exc(), []]
        with results.open("a") as f:
            f.write(json.dumps(line) + "\n")
