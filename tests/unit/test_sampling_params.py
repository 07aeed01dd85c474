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
    assert repr(value) in message  # says what it got


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
