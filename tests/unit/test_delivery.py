"""OutputRouter: each client's poll returns exactly its own requests' tokens, in step
order, merged over the steps since its last poll; nothing goes out for a request after
it finished or was removed; a poll waits for outputs, times out empty, and returns the
engine's failure; silent clients are found."""

import asyncio
import time

import numpy as np

from raymoe.actors.engine.delivery import OutputRouter, TokenOutput
from raymoe.actors.engine.messages import Finish


def _entries(batch) -> list[tuple[int, list[int], Finish]]:
    return [(e.seq, e.token_ids, e.finish) for e in batch.entries()]


def test_each_client_gets_its_own_outputs_in_order():
    async def main():
        router = OutputRouter()
        a0, a1, b0 = router.add("a", 0), router.add("a", 1), router.add("b", 0)
        router.deliver(
            [TokenOutput(a0, 5, Finish.RUNNING), TokenOutput(b0, 9, Finish.RUNNING), TokenOutput(a1, 7, Finish.RUNNING)]
        )
        router.deliver([TokenOutput(a0, 6, Finish.LENGTH), TokenOutput(b0, 8, Finish.STOP)])
        router.deliver([TokenOutput(a0, 99, Finish.RUNNING)])  # finished already: dropped
        got_a, got_b = await router.poll("a", 1.0), await router.poll("b", 1.0)
        assert _entries(got_a) == [(0, [5], Finish.RUNNING), (1, [7], Finish.RUNNING), (0, [6], Finish.LENGTH)]
        assert _entries(got_b) == [(0, [9], Finish.RUNNING), (0, [8], Finish.STOP)]
        assert got_a.token_ids.dtype == np.int64 and got_a.finish.dtype == np.int8
        assert router.requests_of("a") == [a1] and router.requests_of("b") == []
        router.remove(a1)
        router.deliver([TokenOutput(a1, 3, Finish.RUNNING)])
        assert (await router.poll("a", 0.01)).num_entries == 0
        assert router.num_polls == 3

    asyncio.run(main())


def test_a_poll_waits_for_outputs_and_times_out_empty():
    async def main():
        router = OutputRouter()
        rid = router.add("a", 4)
        t0 = time.monotonic()
        assert (await router.poll("a", 0.05)).num_entries == 0
        assert time.monotonic() - t0 >= 0.04
        waiting = asyncio.create_task(router.poll("a", 5.0))
        await asyncio.sleep(0.02)
        assert not waiting.done()
        router.deliver([TokenOutput(rid, 11, Finish.RUNNING)])
        got = await asyncio.wait_for(waiting, 1.0)
        assert _entries(got) == [(4, [11], Finish.RUNNING)]

    asyncio.run(main())


def test_failure_reaches_every_client():
    async def main():
        router = OutputRouter()
        router.add("a", 0)
        waiting = asyncio.create_task(router.poll("a", 5.0))
        await asyncio.sleep(0.01)
        router.fail("engine failed: rank 1 died")
        assert (await asyncio.wait_for(waiting, 1.0)).error == "engine failed: rank 1 died"
        assert (await router.poll("a", 5.0)).error == "engine failed: rank 1 died"  # at once, every time

    asyncio.run(main())


def test_silent_clients_are_found_and_dropped():
    async def main():
        router = OutputRouter()
        r0, r1 = router.add("gone", 0), router.add("gone", 1)
        router.add("alive", 0)
        polling = asyncio.create_task(router.poll("alive", 5.0))
        await asyncio.sleep(0.05)
        assert router.silent_clients(0.01) == ["gone"]  # "alive" is in a poll right now
        assert router.drop_client("gone") == sorted([r0, r1])
        router.deliver([TokenOutput(r0, 1, Finish.RUNNING)])  # nobody to take it
        assert router.silent_clients(0.01) == [] and router.requests_of("gone") == []
        polling.cancel()

    asyncio.run(main())
