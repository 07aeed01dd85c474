"""SamplingParams: validation names the bad field, create() normalises user input."""

import dataclasses
import subprocess
import sys

import pytest

from raymoe.actors.engine.request import Request, RequestStatus, SamplingParams


def test_defaults_are_valid_and_validate_returns_self():
    params = SamplingParams()
    assert params.validate() is params
    assert not params.greedy
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-45).greedy  # float32 division by it would overflow
    assert not SamplingParams(temperature=1e-4).greedy


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 2.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "1"),
        ("top_k", 0),
        ("top_k", -2),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("seed", 1.0),
        ("seed", "7"),
        ("seed", 2**63),  # packed as int64: one past the end
        ("seed", -(2**63) - 1),
        ("top_k", 2**31),
        ("top_k", 2**63),
        ("stop", tuple(f"s{i}" for i in range(65))),
        ("stop", ("x" * 1025,)),
        ("stop_token_ids", tuple(range(1025))),
        ("stop_token_ids", (2**64,)),
        ("stop", ("",)),
        ("stop", ("ok", 3)),
        ("stop", ["x"]),  # the constructor wants tuples; create() converts lists
        ("stop_token_ids", (-1,)),
        ("stop_token_ids", ("a",)),
        ("ignore_eos", 1),
    ],
)
def test_validate_error_names_the_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError) as err:
        params.validate()
    message = str(err.value)
    assert message.startswith(f"{field}:"), message
    assert repr(value) in message or "strings" in message or "ids" in message  # says what it got


def test_validate_error_states_the_valid_range():
    with pytest.raises(ValueError, match=r"max_tokens: .*>= 1.*got 0"):
        SamplingParams(max_tokens=0).validate()
    with pytest.raises(ValueError, match=r"top_p: must be in \(0, 1\]"):
        SamplingParams(top_p=0.0).validate()
    with pytest.raises(ValueError, match=r"top_k: must be -1"):
        SamplingParams(top_k=0).validate()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=1),
        dict(temperature=0.0, top_k=1, top_p=1.0),
        dict(top_k=-1, top_p=1e-6),
        dict(seed=0, stop=("\n",), stop_token_ids=(0, 2), ignore_eos=True),
        dict(seed=2**63 - 1, top_k=2**31 - 1, stop=("x" * 1024,) * 64),
        dict(seed=-(2**63), temperature=1e-45, top_p=1e-50),
    ],
)
def test_edge_values_are_accepted(kwargs):
    assert SamplingParams(**kwargs).validate() == SamplingParams(**kwargs)


def test_create_converts_lists_and_validates():
    params = SamplingParams.create(max_tokens=4, stop=["a", "bc"], stop_token_ids=[5, 6])
    assert params.stop == ("a", "bc") and params.stop_token_ids == (5, 6)
    assert hash(params) == hash(SamplingParams(max_tokens=4, stop=("a", "bc"), stop_token_ids=(5, 6)))
    assert SamplingParams.create(stop="END").stop == ("END",)  # a lone string is one stop string
    with pytest.raises(ValueError, match=r"^stop:"):
        SamplingParams.create(stop=["ok", ""])
    with pytest.raises(ValueError, match=r"^temperature:"):
        SamplingParams.create(temperature=-1)


def test_create_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"^max_new_tokens: unknown sampling parameter"):
        SamplingParams.create(max_new_tokens=3)


def test_sampling_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().max_tokens = 3  # type: ignore[misc]


def test_request_properties_follow_its_tokens():
    req = Request("r", [3, 4, 5], SamplingParams(), seed=9, arrival=1.0, eos_token_ids=[2])
    assert req.status is RequestStatus.WAITING and not req.is_finished
    assert req.eos_token_ids == frozenset({2})
    assert (req.num_prompt_tokens, req.num_tokens, req.all_token_ids) == (3, 3, [3, 4, 5])
    req.output_token_ids += [7, 8]
    assert (req.num_prompt_tokens, req.num_tokens, req.all_token_ids) == (3, 5, [3, 4, 5, 7, 8])
    req.status = RequestStatus.FINISHED
    assert req.is_finished


def test_request_rejects_empty_or_bad_prompts():
    with pytest.raises(ValueError, match=r"^prompt_token_ids:"):
        Request("r", [], SamplingParams(), seed=0, arrival=0.0)
    with pytest.raises(ValueError, match=r"^prompt_token_ids:"):
        Request("r", [1, -2], SamplingParams(), seed=0, arrival=0.0)


def test_policy_modules_import_neither_torch_nor_ray():
    code = (
        "import sys\n"
        "import raymoe.actors.engine.request, raymoe.actors.engine.block_manager, raymoe.actors.engine.scheduler\n"
        "bad = sorted(m for m in ('torch', 'ray') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_any_valid_request_packs_into_a_step_and_samples_a_real_token():
    """The extremes that validation lets through pack into the step's columns and sample a
    token of the vocabulary (no NaN: a float32 temperature or top_p that rounds to zero)."""
    import numpy as np
    import torch

    from raymoe.actors.engine.sampler import sample_step
    from raymoe.actors.engine.scheduler import ScheduledChunk
    from raymoe.actors.engine.step import pack_step

    extremes = [
        SamplingParams(temperature=1e-45, seed=2**63 - 1, top_k=2**31 - 1),
        SamplingParams(temperature=1.0, top_p=1e-50, seed=-(2**63)),
        SamplingParams(temperature=2.0, top_k=1),
        SamplingParams(temperature=1e-5, top_p=1e-6),
    ]
    chunks = [
        ScheduledChunk(
            request_id=f"r{i}",
            token_ids=(5,),
            start_pos=0,
            block_ids=(i,),
            sample=True,
            sampling=p,
            seed=p.seed or 0,
            num_output_tokens=0,
        )
        for i, p in enumerate(extremes)
    ]
    step = pack_step(chunks, (len(chunks),), block_size=16)
    logits = torch.randn(len(chunks), 64)
    tokens = sample_step(logits, step)
    assert tokens.tolist()[0] == int(logits[0].argmax())  # greedy
    assert tokens.tolist()[1] == int(logits[1].argmax())  # top_p ~ 0: the top token alone
    assert tokens.tolist()[2] == int(logits[2].argmax())  # top_k = 1
    assert all(0 <= t < 64 for t in tokens.tolist())
    assert np.isfinite(step.temperature).all() and (step.top_p > 0).all()
