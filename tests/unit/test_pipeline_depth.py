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


def test_auto_takes_one_step_only_after_a_full_window_of_slack():
    depth = PipelineDepth("auto", window=4, min_slack_s=1e-3)
    assert depth.steps == 2  # nothing reported yet
    for _ in range(3):
        depth.observe(5e-3)
        assert depth.steps == 2
    depth.observe(5e-3)
    assert depth.steps == 1


def test_auto_goes_back_to_two_on_one_short_step_and_waits_a_window_to_return():
    depth = PipelineDepth("auto", window=4, min_slack_s=1e-3)
    for _ in range(4):
        depth.observe(5e-3)
    depth.observe(0.5e-3)  # the turnaround nearly outlasted this step
    assert depth.steps == 2
    for _ in range(3):
        depth.observe(5e-3)
        assert depth.steps == 2, "the short step is still in the window"
    depth.observe(5e-3)
    assert depth.steps == 1


def test_auto_stays_at_two_when_the_slack_is_just_under_the_margin():
    depth = PipelineDepth("auto", window=4, min_slack_s=1e-3)
    for _ in range(10):
        depth.observe(0.99e-3)
    assert depth.steps == 2
