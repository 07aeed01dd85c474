"""Ranks that hang are found within the configured bounds: a rank group's bring-up call
(loading the model) fails once ranks have not answered within engine.load_timeout_s, and a
group's first steps wait no longer than their warm-up timeout (GPU ranks' for compiling
kernels is longer than CPU ranks'). Stand-in rank actors that sleep play the hung ranks."""

from __future__ import annotations

import asyncio
import pickle
import sys
import time

import pytest
import ray

from raymoe.actors.engine.failures import StepTimeoutError
from raymoe.actors.rank_group import RankGroup
from raymoe.actors.step_executor import WARMUP_TIMEOUT_S, RayStepExecutor
from raymoe.cluster.config import config_from_dict
from raymoe.cluster.layout import RankLayout

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LAYOUT = RankLayout.from_config(config_from_dict({"parallel": {"dp": 2}}).parallel)


@ray.remote(num_cpus=0)
class SlowRank:
    """A rank whose calls take ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def load_model(self) -> int:
        time.sleep(self.delay_s)
        return 7

    def run_step(self, step, keep=0, late_grammar=None) -> bytes:
        time.sleep(self.delay_s)
        return pickle.dumps([])


@pytest.fixture
def ranks(ray_cluster):
    actors = [SlowRank.remote(0.0), SlowRank.remote(60.0)]  # rank 1 hangs
    yield actors
    for a in actors:
        ray.kill(a)


def test_a_bring_up_call_names_the_ranks_that_do_not_answer_in_time(ranks):
    group = RankGroup(layout=LAYOUT, device="cpu", placement_group=None, actors=ranks, infos=[])
    assert group.call("load_model", ranks=[0], timeout_s=30) == [7]
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"load_model: 1 of 2 ranks did not answer within 1 s"):
        group.call("load_model", timeout_s=1)
    assert time.monotonic() - t0 < 30  # long before rank 1 answers


def test_gpu_ranks_warm_up_longer_than_cpu_ranks():
    assert WARMUP_TIMEOUT_S["cuda"] >= 600 > WARMUP_TIMEOUT_S["cpu"]


@pytest.mark.parametrize("warmup_timeout_s", [1.0, 30.0])
def test_a_first_step_waits_its_warm_up_timeout_then_a_step_the_step_timeout(ray_cluster, warmup_timeout_s):
    actors = [SlowRank.remote(2.0), SlowRank.remote(2.0)]  # each step: 4 x the step timeout
    executor = RayStepExecutor(LAYOUT, actors, step_timeout_s=0.5, warmup_timeout_s=warmup_timeout_s)
    try:
        if warmup_timeout_s < 2.0:
            with pytest.raises(StepTimeoutError, match="longer than 1 s"):
                asyncio.run(executor.run_step_async([None, None]))  # no new step: still a call to every rank
        else:
            assert asyncio.run(executor.run_step_async([None, None])) == []
            executor.num_calls = 10  # past the warm-up steps
            with pytest.raises(StepTimeoutError, match="engine.step_timeout_s"):
                asyncio.run(executor.run_step_async([None, None]))
    finally:
        for a in actors:
            ray.kill(a)
