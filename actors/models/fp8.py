"""Block-quantised FP8 weights: the maths every path shares.

A weight [..., N, K] is kept as float8_e4m3fn values ``q`` with one float32 scale per
[block_n, block_k] block (the Hub's ``weight_scale_inv``: w = q * scale, the last blocks
of a row or column possibly partial). Activations are quantised on the fly, one scale
per row and ``block_k`` columns (DeepSeek's 1 x 128 groups), inside the GPU kernels;
``quantize_groups`` is their reference. On CPU an FP8 weight is dequantised to the
compute dtype at each use, so its loading, slicing and moves are exercised there too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
# the block raymoe quantises a bf16 checkpoint with (model.quantization: fp8), the Hub's
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale"  # a weight parameter X's block scales are X_scale


def scale_shape(shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    """The block scales' shape of a weight of ``shape`` [..., N, K]."""
    *lead, n, k = shape
    return (*lead, -(-n // block[0]), -(-k // block[1]))


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (FP8 values, float32 scales [..., ceil(N/bn), ceil(K/bk)]): each
    block scaled so its largest magnitude becomes FP8_MAX."""
    *lead, n, k = w.shape
    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    padded = w.new_zeros(*lead, rows * bn, cols * bk, dtype=torch.float32)
    padded[..., :n, :k] = w.float()
    blocks = padded.view(*lead, rows, bn, cols, bk)
    scale = (blocks.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[..., :, None, :, None]).view_as(padded)[..., :n, :k].to(FP8)
    return q.contiguous(), scale


def dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The inverse of quantize_blocks: q [..., N, K] times its blocks' scales, in ``dtype``."""
    n, k = q.shape[-2:]
    full = scale.repeat_interleave(block[0], -2)[..., :n, :].repeat_interleave(block[1], -1)[..., :k]
    return (q.float() * full).to(dtype)


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantisation: x [M, K] -> (FP8 values, float32 scales [M,
    ceil(K/group)]), one scale per row and ``group`` columns (the GPU kernels' reference)."""
    m, k = x.shape
    groups = -(-k // group)
    padded = x.new_zeros(m, groups * group, dtype=torch.float32)
    padded[:, :k] = x.float()
    parts = padded.view(m, groups, group)
    scale = (parts.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
    return (parts / scale[..., None]).view_as(padded)[:, :k].to(FP8), scale


def kernel_block(block: tuple[int, int]) -> bool:
    """Whether the Triton FP8 kernels take ``block``: powers of two, rows >= 16 and columns
    >= 32 (an FP8 tl.dot's least K)."""
    return all(b & (b - 1) == 0 for b in block) and block[0] >= 16 and block[1] >= 32


def fp8_params(shape: Sequence[int], block: tuple[int, int], device) -> tuple[nn.Parameter, nn.Parameter]:
    """An FP8 weight of ``shape`` and its block scales, as frozen parameters."""
    weight = nn.Parameter(torch.zeros(*shape, dtype=FP8, device=device), requires_grad=False)
    scale = nn.Parameter(torch.ones(scale_shape(shape, block), device=device), requires_grad=False)
    return weight, scale


def weight_params(
    shape: Sequence[int], *, dtype: torch.dtype, device, fp8_block: Optional[tuple[int, int]]
) -> tuple[nn.Parameter, Optional[nn.Parameter]]:
    """A projection weight of ``shape``: FP8 with its block scales when ``fp8_block`` is
    set, else ``dtype`` with no scales."""
    if fp8_block is not None:
        return fp8_params(shape, fp8_block, device)
    return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device), requires_grad=False), None


@dataclass(frozen=True)
class WeightSlice:
    """A rank's slice of a checkpoint weight: ``data`` as stored (bf16, float32), or FP8 with
    its block ``scale`` as an FP8 checkpoint ships it (a slice on block boundaries)."""

    data: torch.Tensor
    scale: Optional[torch.Tensor] = None
    block: Optional[tuple[int, int]] = None

    @staticmethod
    def cat(parts: Sequence["WeightSlice"], dim: int, what: str = "") -> "WeightSlice":
        """Slices side by side along ``dim`` (0: rows, 1: columns). FP8 parts keep their
        blocks, so every part but the last must fill whole ones."""
        if any(p.scale is None for p in parts):
            return WeightSlice(torch.cat([p.dequantized() for p in parts], dim))
        block = parts[0].block
        for p in parts[:-1]:
            if p.data.shape[dim] % block[dim]:
                raise ValueError(
                    f"{what}: a part of {p.data.shape[dim]} {('rows', 'columns')[dim]} does not fill whole FP8 "
                    f"blocks of {block[dim]}; set model.quantization: none to run dequantised weights"
                )
        return WeightSlice(torch.cat([p.data for p in parts], dim), torch.cat([p.scale for p in parts], dim), block)

    def dequantized(self) -> torch.Tensor:
        return self.data if self.scale is None else dequantize_blocks(self.data, self.scale, self.block)

    def reorder_rows(self, order: torch.Tensor, what: str = "") -> "WeightSlice":
        """The rows in ``order``; with FP8 every row must stay within its block (the scales
        stay where they are). ``what``: the weight, named in errors."""
        if self.scale is None:
            return WeightSlice(self.data[order])
        rows = torch.arange(order.shape[0])
        if not torch.equal(order // self.block[0], rows // self.block[0]):
            raise ValueError(
                f"{what}: its rotary rows would move across FP8 blocks of {self.block[0]} (raymoe reorders "
                "them); set model.quantization: none to run dequantised weights"
            )
        return WeightSlice(self.data.view(torch.uint8)[order].view(FP8), self.scale, self.block)

    def store(self, weight: torch.Tensor, scale: Optional[torch.Tensor], fp8_block: Optional[tuple[int, int]]) -> None:
        """Copy into a weight parameter: FP8 with its ``scale`` when built with ``fp8_block``
        (a slice that is not FP8 yet is quantised here, in blocks from the weight's first row
        and column), else in the weight's dtype."""
        if scale is None:
            weight.copy_(self.dequantized())
            return
        data, block_scale = (self.data, self.scale) if self.scale is not None else quantize_blocks(self.data, fp8_block)
        assert self.block in (None, tuple(fp8_block)), f"FP8 blocks {self.block}, not {fp8_block}"
        weight.copy_(data)
        scale.copy_(block_scale)


def resolve_fp8_block(
    quantization: str, checkpoint_block: Optional[tuple[int, int]], on_cuda: bool, unconverted: Sequence[str] = ()
) -> Optional[tuple[int, int]]:
    """The block the model keeps its projection weights in FP8 with, or None for weights in
    the compute dtype (``model.quantization``: see cluster/config.py). On a GPU, FP8 needs a
    block the Triton kernels take: under auto another one is dequantised at load, and fp8
    refuses it. ``unconverted``: the modules an FP8 checkpoint ships unquantised; FP8 refuses
    a projection among them (it would be quantised, unlike the checkpoint's own)."""
    block = _resolved(quantization, checkpoint_block, on_cuda)
    kept = [m for m in unconverted if not _NOT_PROJECTIONS.search(m)]
    if block is not None and checkpoint_block is not None and kept:
        raise ValueError(
            f"config.json: quantization_config.modules_to_not_convert names {kept}, which raymoe would keep in "
            "FP8 with every other projection; set model.quantization: none to run the checkpoint as shipped"
        )
    return block


# modules raymoe never keeps in FP8: embeddings, LM head, norms, routers and gates, MLA's kv_b_proj
# (split into the absorbed per-head weights)
_NOT_PROJECTIONS = re.compile(r"(embed_tokens|lm_head|norm|(^|\.)gate|shared_expert_gate|router|kv_b_proj)$")


def _resolved(quantization: str, checkpoint_block: Optional[tuple[int, int]], on_cuda: bool):
    if quantization == "fp8":
        block = tuple(checkpoint_block) if checkpoint_block is not None else DEFAULT_BLOCK
        if on_cuda and not kernel_block(block):
            raise ValueError(
                "model.quantization: fp8 on GPUs needs FP8 blocks of powers of two, rows >= 16 and columns "
                f">= 32 (the Triton kernels'), and this checkpoint's are {list(block)}; set model.quantization: none"
            )
        return block
    if quantization == "auto" and checkpoint_block is not None and on_cuda and kernel_block(checkpoint_block):
        return tuple(checkpoint_block)
    return None
