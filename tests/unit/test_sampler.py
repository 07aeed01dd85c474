"""The vectorised sampler: top-k / top-p filtering equals a per-row reference written
with numpy, draws follow the filtered softmax, and a row draws the same alone or in any
batch."""

import numpy as np
import pytest
import torch

from raymoe.actors.engine import sampler as S
from raymoe.actors.engine.sampler import filter_logits, sample

VOCAB = 50


def _reference_filter(scores: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The tokens a row keeps: its top_k best, then the smallest most-likely set whose
    probability (renormalised over the top_k) reaches top_p."""
    order = np.argsort(-scores, kind="stable")
    k = top_k if 0 < top_k < len(scores) else len(scores)
    kept = order[:k]
    if top_p >= 1.0:
        return np.sort(kept)
    p = np.exp(scores[kept] - scores[kept].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    return np.sort(kept[(before < top_p) | (np.arange(k) == 0)])


@pytest.mark.parametrize("top_k,top_p", [(-1, 1.0), (5, 1.0), (-1, 0.6), (8, 0.3), (1, 1.0), (-1, 1e-6), (VOCAB, 0.95)])
def test_filter_equals_the_per_row_reference(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k * 7 + int(top_p * 100))
    scores = torch.randn(6, VOCAB, generator=gen) * 3
    ks, ps = torch.full((6,), top_k, dtype=torch.int64), torch.full((6,), top_p, dtype=torch.float32)
    out = filter_logits(scores, top_k=ks, top_p=ps, width=VOCAB)
    if 0 < top_k < VOCAB:  # only the best top_k sorted: the same
        assert torch.equal(filter_logits(scores, top_k=ks, top_p=ps, width=top_k), out)
    for row in range(6):
        kept = np.flatnonzero(torch.isfinite(out[row]).numpy())
        assert kept.tolist() == _reference_filter(scores[row].numpy(), top_k, top_p).tolist()
        assert torch.equal(out[row, kept], scores[row, kept])


def _sample(logits, temperature, top_k, top_p, seeds, steps):
    n = logits.shape[0]
    return sample(
        logits,
        temperature=np.full(n, temperature, dtype=np.float32) if np.isscalar(temperature) else temperature,
        top_k=np.full(n, top_k, dtype=np.int64),
        top_p=np.full(n, top_p, dtype=np.float32),
        seeds=np.asarray(seeds, dtype=np.int64),
        output_index=np.asarray(steps, dtype=np.int64),
    )


@pytest.mark.parametrize("top_k,top_p", [(-1, 1.0), (6, 1.0), (-1, 0.8)])
def test_draws_follow_the_filtered_softmax(top_k, top_p):
    """4,000 draws of one row (different seeds) against the filtered softmax at temperature
    0.7: every drawn token is kept by the filter and the frequencies pass a chi-square test."""
    gen = torch.Generator().manual_seed(1)
    row = torch.randn(VOCAB, generator=gen)
    n = 4000
    tokens = _sample(row.expand(n, VOCAB).clone(), 0.7, top_k, top_p, seeds=range(n), steps=[3] * n).numpy()
    kept = _reference_filter(row.numpy() / 0.7, top_k, top_p)
    assert set(tokens.tolist()) <= set(kept.tolist())
    z = row.numpy()[kept] / 0.7
    p = np.exp(z - z.max())
    p /= p.sum()
    observed = np.array([(tokens == t).sum() for t in kept])
    expected = p * n
    big = expected >= 5  # chi-square over the cells with enough mass, the rest pooled
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = (((obs - exp) ** 2) / exp).sum()
    dof = len(obs) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof) + 10, (chi2, dof)  # far beyond noise if the draws were biased


def test_a_row_draws_the_same_alone_or_in_any_batch():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, VOCAB, generator=gen)
    temperature = np.array([1.0, 0.0, 0.5, 1.3, 0.9], dtype=np.float32)
    seeds, steps = [11, 12, 13, 14, 15], [0, 4, 9, 2, 7]
    batch = _sample(logits, temperature, 10, 0.9, seeds, steps)
    for i in range(5):
        alone = _sample(logits[i : i + 1].clone(), temperature[i : i + 1], 10, 0.9, seeds[i : i + 1], steps[i : i + 1])
        assert alone.item() == batch[i].item()
    assert batch[1].item() == int(logits[1].argmax())  # temperature 0 is greedy
    again = _sample(logits, temperature, 10, 0.9, seeds, steps)
    assert torch.equal(again, batch)
    draws = [_sample(logits, temperature, -1, 1.0, seeds, [s + k for s in steps]) for k in range(20)]
    assert len({tuple(d.tolist()) for d in draws}) > 1  # the output index changes the draw


def test_rows_with_different_top_k_filter_the_same_through_a_narrow_sort():
    scores = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3))
    ks = torch.tensor([3, 7, 5, 7])
    ps = torch.tensor([1.0, 0.5, 0.9, 1.0])
    narrow = filter_logits(scores, top_k=ks, top_p=ps, width=7)
    assert torch.equal(narrow, filter_logits(scores, top_k=ks, top_p=ps, width=VOCAB))
    for row in range(4):
        kept = np.flatnonzero(torch.isfinite(narrow[row]).numpy())
        assert kept.tolist() == _reference_filter(scores[row].numpy(), int(ks[row]), float(ps[row])).tolist()


def test_filtered_tokens_are_never_drawn_on_a_large_vocabulary():
    """top_k 1 at a real vocabulary size, 128 seeds: always the best token, and the noise is
    finite everywhere (noise of +inf would pick a token whatever its score, even -inf)."""
    vocab, n = 151_936, 128
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(5))
    tokens = _sample(logits, 1.0, 1, 1.0, seeds=range(1000, 1000 + n), steps=[7] * n)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    keys = torch.tensor([S._mix(s, 3) for s in range(n)])
    assert torch.isfinite(S.gumbel_noise(keys, vocab)).all()


def test_seeds_at_the_ends_of_int64_draw_their_own_tokens():
    """Seeds that agree modulo 2^63 - 1 (0 and 2^63 - 1; -2^63 and -1) draw different noise:
    each int64 seed is its own stream."""
    vocab = 4096
    for a, b in ((0, 2**63 - 1), (-(2**63), -1), (1, -(2**63) + 2)):
        keys = torch.tensor([S._mix(a, 5), S._mix(b, 5)])
        noise = S.gumbel_noise(keys, vocab)
        assert not torch.equal(noise[0], noise[1]), (a, b)
        assert torch.isfinite(noise).all()
