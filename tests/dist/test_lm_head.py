"""The vocab-parallel LM head on real gloo groups (tp=3, a vocabulary of 10 split 4/4/2
with two padding rows): greedy tokens from the shards, without gathering the logits,
equal the argmax of the full logits computed here in one piece, ties and padding
included; the gathered logits equal the full ones."""
from __future__ import annotations

import datetime

import torch
import torch.nn.functional as F

from raymoe.actors.models.layers import ParallelLMHead, VocabParallelEmbedding
from raymoe.cluster.layout import RankLayout
from raymoe.comm.groups import build_groups, destroy_distributed, init_distributed

VOCAB, HIDDEN, TP = 10, 6, 3


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(VOCAB, HIDDEN, generator=g)
    x = torch.randn(7, HIDDEN, generator=g)
    tied = w.clone()
    tied[5] = tied[3]  # ids 3 and 5 (other shards) tie: the lowest id wins
    tie_x = tied[3:4].repeat(2, 1)  # rows where ids 3 and 5 are the best
    negative = -w.abs()
    positive_x = x.abs()  # every real logit < 0, the padding rows' logits are 0
    return [("random", w, x), ("tie", tied, tie_x), ("padding", negative, positive_x), ("no rows", w, x[:0])]


def _worker(rank: int, world: int, init_methods: list[str]) -> None:
    torch.set_num_threads(1)
    init_distributed(rank, world, init_methods[0], torch.device("cpu"), timeout=datetime.timedelta(seconds=60))
    try:
        tp = build_groups(RankLayout(tp=TP), rank, torch.device("cpu")).tp
        embed = VocabParallelEmbedding(VOCAB, HIDDEN, tp, dtype=torch.float, device=torch.device("cpu"))
        head = ParallelLMHead(embed, True, torch.float, torch.device("cpu"))
        for name, w, x in _cases():
            embed.weight.zero_()
            embed.weight[: embed.stop - embed.start] = w[embed.start : embed.stop]
            full = F.linear(x, w)
            shard = head(x)
            got = head.greedy(shard)
            assert got.dtype == torch.long and torch.equal(got, full.argmax(-1)), (name, rank, got, full.argmax(-1))
            torch.testing.assert_close(head.gather(shard), full, msg=name)
        if rank == 0:
            _, tied, tie_x = _cases()[1]
            assert F.linear(tie_x, tied).argmax(-1).tolist() == [3, 3]  # the case tests what it claims
    finally:
        destroy_distributed()


def test_greedy_from_shards_equals_argmax_of_full_logits(run_world):
    run_world(_worker, TP)
