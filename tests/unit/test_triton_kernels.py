"""The Triton kernels (MoE dispatch, expert MLP, combine; one-row linear; FP8 linear and
expert MLP; q/k norm + rotary; the KV cache write; the fused sum + add + norm; the one-shot gather) in Triton's
CPU interpreter against the torch paths, one case per test. The cases run in one fresh
process (TRITON_INTERPRET=1 must be set before Triton is first imported; one process
imports torch and Triton once, where a process per case took ~15 times as long).
tests/gpu runs the compiled kernels."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("triton_interpreted.py")


def _triton_version() -> tuple[int, ...]:
    if importlib.util.find_spec("triton") is None:
        return ()
    return tuple(int(p) for p in version("triton").split(".")[:2])


# Triton 3.6's interpreter cannot loop up to a bound loaded from memory (3.7's can)
pytestmark = pytest.mark.skipif(_triton_version() < (3, 7), reason="needs Triton >= 3.7 (its CPU interpreter)")

_V3_LIKE = dict(num_groups=8, topk_groups=3, routed_scaling_factor=2.5, scoring="sigmoid")


def _softmax_rule_case(*, tokens, experts, top_k, groups, topk_groups, scale) -> tuple[str, dict]:
    """A dispatch under DeepSeek-V2's rule (softmax scores, groups by their best, no renormalising)."""
    rule = dict(num_groups=groups, topk_groups=topk_groups, routed_scaling_factor=scale, scoring="softmax")
    case = dict(tokens=tokens, experts=experts, physical=experts, top_k=top_k, norm=False, grouped=rule)
    return "dispatch_case", case


# case -> (function in triton_interpreted.py, its arguments)
CASES = {
    "mlp-local": ("expert_mlp_case", dict(slots=4, hidden=64, inter=32, tokens=5, foreign=False)),
    # 16-wide column blocks
    "mlp-foreign-inter48": ("expert_mlp_case", dict(slots=6, hidden=128, inter=48, tokens=9, foreign=True)),
    "mlp-empty-groups": ("expert_mlp_case", dict(slots=40, hidden=32, inter=16, tokens=9, foreign=True)),
    # one slot with most rows: by tiles its 16-row blocks spread over programs
    "mlp-crowded-slot": ("expert_mlp_case", dict(slots=5, hidden=32, inter=16, tokens=30, foreign=True, crowded=0.7)),
    "dispatch-decode": ("dispatch_case", dict(tokens=1, experts=16, physical=16, top_k=4)),
    "dispatch-norm-off": ("dispatch_case", dict(tokens=37, experts=16, physical=16, top_k=4, norm=False)),
    "dispatch-replicas-ep2": ("dispatch_case", dict(tokens=50, experts=16, physical=24, top_k=3, ep=2, ep_rank=1)),
    "dispatch-valid-rows": ("dispatch_case", dict(tokens=20, experts=8, physical=12, top_k=2, ep=2, with_valid=True)),
    "dispatch-4096-choices": ("dispatch_case", dict(tokens=512, experts=32, physical=32, top_k=8)),
    # DeepSeek-V3's rule: sigmoid + bias, 3 of 8 groups by their two best; replicas, another rank's slots
    "dispatch-grouped-sigmoid": (
        "dispatch_case",
        dict(tokens=37, experts=32, physical=40, top_k=6, ep=2, ep_rank=1, grouped=_V3_LIKE),
    ),
    # the same past one block of tokens (routing and grouping in two launches), rows not all valid
    "dispatch-grouped-sigmoid-blocks": (
        "dispatch_case",
        dict(tokens=70, experts=32, physical=32, top_k=4, norm=False, with_valid=True, grouped=_V3_LIKE),
    ),
    # DeepSeek-V2's rule: softmax, 2 of 4 groups by their best; and V2-Lite's: one group (plain top-k)
    "dispatch-grouped-softmax": _softmax_rule_case(tokens=9, experts=16, top_k=3, groups=4, topk_groups=2, scale=16.0),
    # DeepSeek-V2's 160 experts in 8 groups of 20 (padded columns, 16-token blocks at 256 columns)
    "dispatch-grouped-softmax-160": _softmax_rule_case(
        tokens=20, experts=160, top_k=6, groups=8, topk_groups=3, scale=1.0
    ),
    # every group kept, past one block of tokens at 256 experts
    "dispatch-grouped-sigmoid-all-groups": (
        "dispatch_case",
        dict(tokens=40, experts=256, physical=256, top_k=8, grouped=dict(_V3_LIKE, topk_groups=8)),
    ),
    "dispatch-one-group-softmax": _softmax_rule_case(tokens=5, experts=24, top_k=6, groups=1, topk_groups=1, scale=1.0),
    # 40: a partial column block
    "combine-foreign-rows": ("combine_case", dict(tokens=6, top_k=4, hidden=40, mine=17)),
    "combine-all-local": ("combine_case", dict(tokens=3, top_k=2, hidden=16, mine=6)),
    # a masked block
    "combine-add-rms-norm-foreign-rows": ("combine_add_rms_norm_case", dict(tokens=5, top_k=4, hidden=40, mine=13)),
    # with the shared experts' output added (DeepSeek, GLM-4.5, Qwen2-MoE)
    "combine-add-rms-norm-shared": (
        "combine_add_rms_norm_case",
        dict(tokens=5, top_k=4, hidden=40, mine=13, shared=True),
    ),
    "qk-norm-rope": ("qk_norm_rope_case", dict(tokens=3, heads=4, kv_heads=2, dim=16)),
    # 3 KV heads of 24: both padded to the kernel's power-of-two block
    "kv-write-fp8": ("kv_write_case", dict(tokens=5, kv_heads=3, dim=24, dtype="float8_e4m3fn")),
    "kv-write-float32": ("kv_write_case", dict(tokens=4, kv_heads=2, dim=16, dtype="float32")),
    # one part each (a large batch's config): 200 tokens in two steps of 128, pages of 16 (the
    # last one partial); GQA 4 padded to 16 rows
    "decode-attention-fp8": (
        "decode_attention_case",
        dict(
            lens=[200, 1, 33],
            heads=8,
            kv_heads=2,
            dim=32,
            page=16,
            target_programs=1,
            dtype="float8_e4m3fn",
            want_parts=[1, 1, 1],
        ),
    ),
    # parts of 64 tokens, the last one shorter, merged beside a sequence of one part; head_dim not a power of 2
    "decode-attention-parts": (
        "decode_attention_case",
        dict(
            lens=[200, 5], heads=6, kv_heads=3, dim=24, page=8, target_programs=24, dtype="float32", want_parts=[4, 1]
        ),
    ),
    # 18 parts merged 16 at a time, beside a sequence of one part
    "decode-attention-merge-blocks": (
        "decode_attention_case",
        dict(
            lens=[3, 1100],
            heads=16,
            kv_heads=2,
            dim=16,
            page=16,
            target_programs=64,
            dtype="float32",
            want_parts=[1, 18],
        ),
    ),
    # an odd number of query heads (the merge takes two a program), parts merged
    "decode-attention-odd-heads": (
        "decode_attention_case",
        dict(lens=[150, 7], heads=5, kv_heads=1, dim=16, page=8, target_programs=8, dtype="float32", want_parts=[3, 1]),
    ),
    # MLA: V2's query inside the latent's projection row, V3's from a q_b projection of its own
    "latent-norm-rope": ("latent_norm_rope_case", dict(tokens=3, heads=4, nope=8, latent=32, rope=16, q_lora=False)),
    "latent-norm-rope-q-lora": (
        "latent_norm_rope_case",
        dict(tokens=2, heads=2, nope=12, latent=16, rope=8, q_lora=True),
    ),
    "skinny-linear-1-row": ("skinny_linear_case", dict(rows=1, bias=False)),
    "skinny-linear-3-rows-bias": ("skinny_linear_case", dict(rows=3, bias=True)),
    "reduce-add-rms-norm-2-ranks": ("reduce_add_rms_norm_case", dict(ranks=2, tokens=5, width=64)),
    # a masked block
    "reduce-add-rms-norm-3-ranks-width-48": ("reduce_add_rms_norm_case", dict(ranks=3, tokens=2, width=48)),
    # a masked block
    "gather-rows-3-ranks-width-40": ("gather_rows_case", dict(ranks=3, tokens=4, width=40)),
    # data-parallel attention's norm before the MoE: replica 1 of 3 has 3 of 4 rows, a masked block
    "reduce-add-rms-norm-gather": (
        "reduce_add_rms_norm_gather_case",
        dict(replicas=3, attn=2, rows=4, tokens=3, width=40, mine=1),
    ),
    # FP8 weights: partial row and column blocks, K past one block (several activation groups)
    "fp8-linear-decode": ("fp8_linear_case", dict(rows=3, n=40, k=80, block=[16, 32], bias=True)),
    # one row: the matrix-vector kernel (eight 32-column scale blocks in one K step, a partial column block)
    "fp8-linear-one-row": ("fp8_linear_case", dict(rows=1, n=44, k=256, block=[16, 32], bias=True)),
    # 17-64 rows as linear() picks them: x quantised first, K split (5 blocks over 3 programs)
    "fp8-linear-decode-batch": ("fp8_linear_case", dict(rows=40, n=40, k=160, block=[16, 32], bias=True)),
    "fp8-linear-prefill": ("fp8_linear_case", dict(rows=70, n=130, k=96, block=[32, 32], bias=False)),
    # K split in two uneven parts (3 blocks of 32 over 2 programs, the last one partial), with a bias
    "fp8-linear-split-k": ("fp8_linear_case", dict(rows=20, n=40, k=80, block=[16, 32], bias=True, split_k=2)),
    # more parts asked for than K has blocks
    "fp8-linear-split-k-past-blocks": (
        "fp8_linear_case",
        dict(rows=5, n=24, k=64, block=[16, 32], bias=False, split_k=8),
    ),
    # 3 slots of 40 x 80 in 16 x 32 blocks: the last row and column blocks partial, slots past one
    "fp8-widen": ("fp8_widen_case", dict(slots=3, n=40, k=80, block=[16, 32])),
    "fp8-expert-mlp": ("expert_mlp_fp8_case", dict(slots=3, hidden=64, inter=32, tokens=9, block=[16, 32])),
    # past PRE_QUANTIZE_ROWS choices: x quantised in a pass of its own
    "fp8-expert-mlp-prefill": ("expert_mlp_fp8_case", dict(slots=3, hidden=64, inter=32, tokens=140, block=[16, 32])),
    # and column tiles one FP8 group wide: h leaves the first kernel quantised
    "fp8-expert-mlp-prefill-fp8-h": (
        "expert_mlp_fp8_case",
        dict(slots=3, hidden=64, inter=64, tokens=140, block=[16, 32], bn=32),
    ),
}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess]:
    """Every case run in the interpreter: (case -> None if it passed, else its traceback; the process)."""
    results = tmp_path_factory.mktemp("triton") / "results.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, str(SCRIPT), json.dumps(CASES), str(results)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    lines = results.read_text().splitlines() if results.exists() else []
    return dict(json.loads(line) for line in lines), run


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_torch_path_in_the_interpreter(case, interpreted):
    errors, run = interpreted
    assert case in errors, f"the interpreter process ended (exit {run.returncode}) first:\n{run.stderr[-3000:]}"
    assert errors[case] is None, errors[case]
