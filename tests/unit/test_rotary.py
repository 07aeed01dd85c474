"""The rotary embedding: which widths FlashInfer's kernel takes on a GPU (elsewhere it reads
misaligned 16-byte vectors and the GPU faults), and torch's path against transformers'
``apply_rotary_pos_emb`` at those widths, partial rotary included."""

from __future__ import annotations

import pytest
import torch

from raymoe.actors.models import ops


@pytest.mark.parametrize(
    "head_dim,rotary_dim,dtype,fits",
    [
        (128, 128, torch.bfloat16, True),
        (128, 64, torch.bfloat16, True),  # GLM-4.5's partial rotary
        (64, 32, torch.float16, True),
        (256, 256, torch.bfloat16, True),
        (512, 512, torch.bfloat16, True),  # 16-element vectors past 256
        (512, 256, torch.bfloat16, True),
        (512, 16, torch.bfloat16, False),  # a rotated half of 8 < one 16-element vector
        (64, 24, torch.bfloat16, False),  # a rotated half of 12: not whole 8-element vectors
        (12, 12, torch.bfloat16, False),  # below 64: FlashInfer's misaligned fallback kernel
        (20, 20, torch.bfloat16, False),
        (4, 4, torch.bfloat16, False),  # MLA's rotary width in small configs
        (96, 96, torch.bfloat16, False),  # not one of its dispatched head dims
        (192, 64, torch.bfloat16, False),
    ],
)
def test_flashinfer_rotary_fits_its_dispatched_widths(head_dim, rotary_dim, dtype, fits):
    assert ops.flashinfer_rotary_fits(head_dim, rotary_dim, dtype) is fits


@pytest.mark.parametrize("head_dim,rotary_dim", [(12, 12), (12, 4), (64, 24), (128, 64)])
def test_rotary_matches_transformers(head_dim, rotary_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(head_dim)
    q, k = torch.randn(5, 4, head_dim, generator=g), torch.randn(5, 2, head_dim, generator=g)
    positions = torch.tensor([0, 7, 100, 1023, 4095])
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    freqs = torch.arange(4096, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[positions]
    rot = slice(0, rotary_dim)
    want_q, want_k = apply_rotary_pos_emb(q[..., rot], k[..., rot], emb.cos(), emb.sin(), unsqueeze_dim=1)
    got_q, got_k = ops.rotary_(positions, q.clone(), k.clone(), torch.cat((freqs.cos(), freqs.sin()), dim=-1))
    torch.testing.assert_close(got_q, torch.cat((want_q, q[..., rotary_dim:]), dim=-1))
    torch.testing.assert_close(got_k, torch.cat((want_k, k[..., rotary_dim:]), dim=-1))
