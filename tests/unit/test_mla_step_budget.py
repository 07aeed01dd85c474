"""The step budget FlashInfer MLA can plan (max_step_tokens' bound itself is checked against
FlashInfer's own work-item count on a GPU: tests/gpu/test_attention_flashinfer_mla.py)."""

from __future__ import annotations

import pytest

from raymoe.actors.engine.attention_flashinfer_mla import StepBudgetError, check_step_budget, max_step_tokens
from raymoe.cluster.config import EngineConfig

H100_SMS = 132


@pytest.mark.parametrize("heads", [16, 32, 64, 128])
def test_a_budget_over_the_limit_is_refused_naming_the_field(heads):
    limit = max_step_tokens(heads, 256, H100_SMS)
    check_step_budget(limit, 256, heads, H100_SMS)
    with pytest.raises(StepBudgetError, match=rf"engine\.max_num_batched_tokens: .* use at most {limit}\b") as e:
        check_step_budget(limit + 1, 256, heads, H100_SMS)
    # a ValueError would make attention_backend: auto fall back to torch attention silently
    assert not isinstance(e.value, ValueError)


def test_the_limit_shrinks_with_heads_and_sequences():
    assert max_step_tokens(16, 256, H100_SMS) > max_step_tokens(128, 256, H100_SMS)
    assert max_step_tokens(128, 1024, H100_SMS) < max_step_tokens(128, 256, H100_SMS)
    assert max_step_tokens(128, 6000, H100_SMS) == 0  # three tiles a sequence alone overflow


def test_the_default_budget_runs_deepseek_v3_at_tp1():
    engine = EngineConfig()
    assert engine.max_num_batched_tokens <= max_step_tokens(128, engine.max_num_seqs, H100_SMS)
