"""The cheap vocabulary-wide passes: exp/logsumexp in powers of two, and top-p from the row's top tokens only."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from gemma_mlx import fast_exp
from gemma_mlx.config import GenerationSettings as G
from gemma_mlx.generate import make_row_sampler, nucleus


def normalised(logits) -> mx.array:
    logits = mx.array(np.asarray(logits, dtype=np.float32))
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_exp_and_logsumexp_match_mlx_to_float32_rounding(monkeypatch):
    monkeypatch.delenv(fast_exp.PLAIN_ENV, raising=False)
    assert fast_exp.rewritten()  # the tests run on the CPU backend
    x = mx.array(np.random.default_rng(0).normal(0, 8, (6, 3000)).astype(np.float32))
    x[2] = -mx.inf  # a row with nothing left (every token masked)
    x[3, :1500] = -mx.inf
    np.testing.assert_allclose(np.array(fast_exp.exp(x)), np.array(mx.exp(x)), rtol=3e-7, atol=0)
    for keepdims in (False, True):
        ours, theirs = fast_exp.logsumexp(x, axis=-1, keepdims=keepdims), mx.logsumexp(x, axis=-1, keepdims=keepdims)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-6)
    assert float(fast_exp.logsumexp(x, axis=-1)[2]) == -np.inf
    monkeypatch.setenv(fast_exp.PLAIN_ENV, "1")
    assert not fast_exp.rewritten()


def kept_by_mlx_lm(logprobs, top_p, top_k=0) -> set[int]:
    masked = apply_top_p(logprobs, top_p)
    if top_k:
        masked = apply_top_k(masked, top_k)
    return set(np.flatnonzero(np.isfinite(np.array(masked[0]))).tolist())


@pytest.mark.parametrize("top_k", [0, 3, 40])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_nucleus_keeps_the_tokens_mlx_lms_top_p_keeps(top_p, top_k):
    rng = np.random.default_rng(int(top_p * 100) + top_k)
    found = 0
    for spread in (4.0, 8.0, 16.0):  # from a flat row (wide nucleus) to a peaked one (a few tokens)
        for _ in range(4):
            row = normalised(rng.normal(0, spread, (1, 5000)))
            kept = nucleus(row, top_p, top_k, candidates=64)
            if kept is None:  # only when the nucleus really is wider than the 64 candidates
                assert len(kept_by_mlx_lm(row, top_p)) > 64
                continue
            ids, values = kept
            assert set(np.array(ids[0]).tolist()) == kept_by_mlx_lm(row, top_p, top_k)
            np.testing.assert_array_equal(np.array(values[0]), np.array(row[0])[np.array(ids[0])])
            found += 1
    assert found >= 4  # the fast path really ran


def test_nucleus_with_ties_and_a_small_vocabulary():
    row = normalised([[2.0, 2.0, 2.0, 0.0, -1.0, -5.0]])
    ids, _ = nucleus(row, 0.5, candidates=1024)  # the whole vocabulary is the candidates: never None
    assert set(np.array(ids[0]).tolist()) == kept_by_mlx_lm(row, 0.5) == {0, 1, 2}
    ids, _ = nucleus(row, 1.0, top_k=2)  # top-k alone
    assert len(np.array(ids[0])) == 2 and set(np.array(ids[0]).tolist()) <= {0, 1, 2}


def test_a_sampled_row_draws_only_from_the_nucleus_and_in_its_proportions():
    row = normalised([[3.0, 2.5, 2.0, -4.0] + [-9.0] * 2000])
    allowed = kept_by_mlx_lm(row, 0.9)
    sampler = make_row_sampler(G(temperature=1.0, top_p=0.9, seed=3))
    draws = [int(sampler(row)[0]) for _ in range(600)]
    assert set(draws) <= allowed and set(draws) == allowed
    probs = np.exp(np.array(row[0])[sorted(allowed)])
    expected = probs / probs.sum()
    seen = np.bincount(draws, minlength=max(allowed) + 1)[sorted(allowed)] / len(draws)
    np.testing.assert_allclose(seen, expected, atol=0.06)
    again = make_row_sampler(G(temperature=1.0, top_p=0.9, seed=3))
    assert [int(again(row)[0]) for _ in range(600)] == draws  # same seed, same draws
