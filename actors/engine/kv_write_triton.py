"""A step's k and v written into one layer's paged KV cache in one Triton kernel, cast to
the cache's dtype on the way (an FP8 cache: saturated to +-448, then rounded; scale 1).

FlashInfer's append kernel reads k/v in the cache's own dtype, so an FP8 cache would need
two cast kernels before it; this kernel reads k/v in place (strided views of the qkv
output) and stores them cast. One program per token: row t goes to (blocks[t], offsets[t])
of the cache [num_blocks, 2 (k, v), block_slots, kv_heads, D] (attention_torch.py's layout).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv(
    cache,
    k,
    v,
    blocks,
    offsets,
    heads,
    dim,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ckv,
    stride_cs,
    stride_ch,
    SATURATE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < dim)
    block = tl.load(blocks + t).to(tl.int64)
    dest = cache + block * stride_cb + tl.load(offsets + t).to(tl.int64) * stride_cs + h * stride_ch + d
    kt = tl.load(k + t * stride_kt + h * stride_kh + d, mask=mask).to(tl.float32)
    vt = tl.load(v + t * stride_vt + h * stride_vh + d, mask=mask).to(tl.float32)
    if SATURATE:
        kt = tl.clamp(kt, -448.0, 448.0)  # fp8.FP8_MAX
        vt = tl.clamp(vt, -448.0, 448.0)
    dtype = cache.dtype.element_ty
    tl.store(dest, kt.to(dtype), mask=mask)
    tl.store(dest + stride_ckv, vt.to(dtype), mask=mask)


def write_kv(
    cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, *, k: torch.Tensor, v: torch.Tensor
) -> None:
    """k/v [T, kv_heads, D] (last dim contiguous) -> cache[blocks[t], 0 / 1, offsets[t]] for
    t < T; ``blocks`` / ``offsets`` int32 or int64 on the device, at least T long."""
    n, heads, dim = k.shape
    assert v.shape == k.shape and k.stride(2) == 1 and v.stride(2) == 1 and cache.shape[-2:] == (heads, dim)
    assert cache.stride(-1) == 1 and blocks.shape[0] >= n and offsets.shape[0] >= n
    if n == 0:  # an idle replica's eager step: nothing to write, and no empty grid to launch
        return
    _write_kv[(n,)](
        cache,
        k,
        v,
        blocks,
        offsets,
        heads,
        dim,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        cache.stride(3),
        SATURATE=cache.dtype == torch.float8_e4m3fn,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(dim),
        num_warps=1 if heads * dim <= 512 else 4,
    )
