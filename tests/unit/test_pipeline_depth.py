"""engine.max_steps_in_flight: auto keeps one step on the ranks only while every recent step
left the slack for it."""

import pytest

from raymoe.actors.engine.pipeline_depth import PipelineDepth


@pytest.mark.parametrize("setting", [1, 2])
def test_a_fixed_setting_ignores_what_the_ranks_report(setting):
    depth = PipelineDepth(setting, window=4, min_slack_s=1e-3)
    for slack in (0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0):
        depth.observe(slack)
        assert depth.steps == setting


def _depths(slacks: list[float]) -> list[int]:
    """The depth auto picks after each reported slack (a window of 4, a 1 ms margin)."""
    depth = PipelineDepth("auto", window=4, min_slack_s=1e-3)
    assert depth.steps == 2  # nothing reported yet
    out = []
    for slack in slacks:
        depth.observe(slack)
        out.append(depth.steps)
    return out


def test_auto_takes_one_step_only_after_a_full_window_of_slack():
    assert _depths([5e-3] * 5) == [2, 2, 2, 1, 1]


def test_auto_goes_back_to_two_on_one_short_step_and_waits_a_window_to_return():
    # the fifth step's turnaround nearly outlasted it: two until it leaves the window
    assert _depths([5e-3] * 4 + [0.5e-3] + [5e-3] * 4) == [2, 2, 2, 1, 2, 2, 2, 2, 1]


def test_auto_stays_at_two_when_the_slack_is_just_under_the_margin():
    assert _depths([0.99e-3] * 10) == [2] * 10
