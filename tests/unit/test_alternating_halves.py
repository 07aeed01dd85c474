"""The double-buffer bookkeeping of the fused sum + add + norm (comm/symm_all_reduce.py),
on CPU with a counting stand-in for the signal-pad barrier."""

from __future__ import annotations

import pytest
import torch

from raymoe.comm.symm_all_reduce import AlternatingHalves


class Barriers:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _halves(half_numel: int = 8) -> tuple[AlternatingHalves, torch.Tensor, Barriers]:
    buffer, barriers = torch.zeros(2 * half_numel), Barriers()
    return AlternatingHalves(buffer, barriers), buffer, barriers


def test_calls_alternate_halves_each_with_one_barrier():
    halves, buffer, barriers = _halves()
    like = torch.empty(2, 3)
    xs = [torch.full((2, 3), float(i + 1)) for i in range(3)]
    assert halves.publish(xs[0], like) == 0 and barriers.count == 1
    assert torch.equal(buffer[:6], xs[0].flatten())
    assert halves.publish(xs[1], like) == 8 and barriers.count == 2
    assert torch.equal(buffer[8:14], xs[1].flatten())
    assert torch.equal(buffer[:6], xs[0].flatten()), "the other half is left as the peers may still read it"
    assert halves.publish(xs[2], like) == 0 and barriers.count == 3
    assert torch.equal(buffer[:6], xs[2].flatten())


def test_a_partial_written_in_place_is_where_the_call_reads_it():
    halves, buffer, barriers = _halves()
    like = torch.empty(4)
    halves.publish(torch.ones(4), like)
    mine = halves.next_partial(like)
    assert mine.data_ptr() == buffer[8:].data_ptr(), "the next call's half: the second"
    mine.copy_(torch.arange(4.0))
    assert halves.publish(mine, like) == 8 and barriers.count == 2
    assert torch.equal(buffer[8:12], torch.arange(4.0))


def test_every_pass_starts_on_half_0_and_uses_an_even_number_of_barriers():
    halves, _, barriers = _halves()
    like = torch.empty(8)
    for _ in range(3):
        halves.publish(torch.ones(8), like)
    halves.finish_pass()
    assert barriers.count == 4, "an odd pass gets one more barrier"
    assert halves.publish(torch.ones(8), like) == 0
    halves.publish(torch.ones(8), like)
    halves.finish_pass()
    assert barriers.count == 6, "an even pass gets none"
    assert halves.next_partial(like).data_ptr() == halves.halves.data_ptr()


def test_a_partial_larger_than_a_half_is_refused():
    halves, _, barriers = _halves()
    with pytest.raises(AssertionError):
        halves.publish(torch.ones(9), torch.empty(9))
    assert barriers.count == 0
