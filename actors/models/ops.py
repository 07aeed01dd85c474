"""Fused elementwise ops: FlashInfer kernels on GPU, plain torch elsewhere; and which
backend, Triton (the model's own kernels) or torch, a kernel call takes.

The torch versions are the reference (and the CPU path); each FlashInfer kernel
replaces a chain of 4-8 small kernels, which is what a decode step is made of.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@functools.cache
def _optional_module(name: str, without_it: str):
    """The module, or None with one warning saying what runs without it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        log.warning("%s is not importable (%s): %s", name, e, without_it)
        return None


def _flashinfer():
    return _optional_module("flashinfer", "fused norm/rotary/activation kernels off; pip install 'raymoe[gpu]'")


def triton_available() -> bool:
    return (
        _optional_module(
            "triton",
            "the MoE dispatch, experts and combine, one-row projections and the q/k norm + rotary run on torch kernels",
        )
        is not None
    )


def choose_backend(requested: str | None, *, op: str, on_cuda: bool, fits: bool) -> str:
    """The kernel backend of one ``op`` call: ``requested`` ("triton" or "torch", else a
    ValueError naming ``op``) when given; else "triton" where the inputs are on a GPU, the
    Triton kernel takes them (``fits``) and Triton is importable, "torch" otherwise."""
    if requested is None:
        return "triton" if on_cuda and fits and triton_available() else "torch"
    if requested not in ("triton", "torch"):
        raise ValueError(f"{op} backend must be 'triton' or 'torch', not {requested!r}")
    return requested


def block_dividing(dim: int, want: int, least: int = 16) -> int | None:
    """A Triton block size for a dimension: the largest power of two in [least, want]
    dividing dim, or None where none does."""
    block = want
    while block > least and dim % block:
        block //= 2
    return None if dim % block else block


def _fused(x: torch.Tensor):
    """FlashInfer's fused kernels where they take x (CUDA, float16 or bfloat16), else None."""
    return _flashinfer() if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (2-D or 3-D) -> weight * x / rms(x); statistics in float32."""
    fi = _fused(x)
    if fi is not None:
        return fi.norm.rmsnorm(x, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual + x -> (rms_norm of the sum, the sum). x, residual [T, D].

    The GPU kernel works in place: the sum lands in ``residual``, the normalised
    value in ``x``; callers must not use the inputs afterwards.
    """
    fi = _fused(x)
    if fi is not None:
        fi.norm.fused_add_rmsnorm(x, residual, weight, eps)
        return x, residual
    total = residual + x
    return rms_norm(total, weight, eps), total


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = [gate, up] -> silu(gate) * up [..., I]."""
    fi = _fused(x)
    if fi is not None:
        return fi.activation.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, Hk, D] by position (rotate-half layout); in place on GPU.

    cos_sin [max_position, R] float32: cos of the R/2 frequencies, then their sin; the
    first R <= D dims of each head rotate, the rest pass through (partial rotary).
    """
    fi = _fused(q)
    if fi is not None and flashinfer_rotary_fits(q.shape[-1], cos_sin.shape[-1], q.dtype):
        fi.rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, q.shape[-1], cos_sin, is_neox=True)
        return q, k
    half = cos_sin.shape[-1] // 2
    cos = cos_sin[positions, :half].repeat(1, 2).unsqueeze(1).to(q.dtype)
    sin = cos_sin[positions, half:].repeat(1, 2).unsqueeze(1).to(q.dtype)
    if 2 * half < q.shape[-1]:  # partial rotary: the rest of each head passes through
        rot = 2 * half
        return (
            torch.cat((q[..., :rot] * cos + _rotate_half(q[..., :rot]) * sin, q[..., rot:]), dim=-1),
            torch.cat((k[..., :rot] * cos + _rotate_half(k[..., :rot]) * sin, k[..., rot:]), dim=-1),
        )
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def flashinfer_rotary_fits(head_dim: int, rotary_dim: int, dtype: torch.dtype) -> bool:
    """Whether FlashInfer's rotary kernel takes these widths: its own head dims, with each
    rotated half a whole number of its 16-byte vectors (HEAD_DIM / 32 elements past 256).
    Elsewhere it reads misaligned vectors, and the GPU faults."""
    vector = max(16 // dtype.itemsize, head_dim // 32)
    return head_dim in (64, 128, 256, 512) and rotary_dim <= head_dim and (rotary_dim // 2) % vector == 0


def qk_norm_rotary_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos_sin: torch.Tensor,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary_(positions, rms_norm(q, q_weight), rms_norm(k, k_weight)): Qwen3's per-head
    norms then the rotary embedding; on GPU one Triton kernel, in place."""
    dim = q.shape[-1]
    fits = dim % 2 == 0 and _power_of_two(dim // 2) and q.stride(-1) == 1 and k.stride(-1) == 1
    fits = fits and cos_sin.shape[-1] == dim and cos_sin.is_contiguous()
    if choose_backend(backend, op="qk_norm_rotary_", on_cuda=q.is_cuda, fits=fits) == "torch":
        return rotary_(positions, rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos_sin)
    from raymoe.actors.models.qk_norm_rope_triton import qk_norm_rope_

    qk_norm_rope_(positions, q, k, q_weight=q_weight, k_weight=k_weight, eps=eps, cos_sin=cos_sin)
    return q, k


def latent_norm_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    latent: torch.Tensor,
    *,
    norm_weight: torch.Tensor,
    eps: float,
    cos_sin: torch.Tensor,
    nope_dim: int,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLA's inputs to its attention: q [T, heads, nope_dim + R] and latent [T, L + R] (views
    of the projections' outputs) -> (q's rotary part rotated [T, heads, R], rms_norm of the
    latent's first L dims [T, L], the rotary key rotated [T, R]); on GPU one Triton kernel."""
    rope_dim = q.shape[-1] - nope_dim
    latent_dim = latent.shape[-1] - rope_dim
    fits = _power_of_two(latent_dim) and rope_dim % 2 == 0 and _power_of_two(rope_dim // 2)
    fits = fits and q.stride(-1) == 1 and latent.stride(-1) == 1 and cos_sin.shape[-1] == rope_dim
    if choose_backend(backend, op="latent_norm_rotary", on_cuda=q.is_cuda, fits=fits) == "torch":
        normed = rms_norm(latent[:, :latent_dim].contiguous(), norm_weight, eps)
        q_rope, k_rope = rotary_(
            positions, q[..., nope_dim:].contiguous(), latent[:, None, latent_dim:].contiguous(), cos_sin
        )
        return q_rope, normed, k_rope[:, 0]
    from raymoe.actors.models.latent_norm_rope_triton import latent_norm_rope

    return latent_norm_rope(
        positions, q, latent, norm_weight=norm_weight, eps=eps, cos_sin=cos_sin.contiguous(), nope_dim=nope_dim
    )


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
