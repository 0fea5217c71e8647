"""Count-based baselines: hand-computed probabilities and the expected ordering on real text."""

from __future__ import annotations

import math

import numpy as np

from qslm_jax.finetune.ngram import _bigram_log_probs, baseline_perplexities, unigram_log_probs


def test_unigram_add_one_by_hand():
    # counts over V=4: [2, 1, 0, 0], N=3 -> p = [3/7, 2/7, 1/7, 1/7]
    np.testing.assert_allclose(np.exp(unigram_log_probs(np.array([0, 0, 1]), 4)), [3 / 7, 2 / 7, 1 / 7, 1 / 7])


def test_bigram_interpolation_by_hand():
    train = np.array([0, 1, 0, 1, 0, 2])  # pairs 01, 10, 01, 10, 02; c(0)=3, c(0,1)=2
    uni_1 = (2 + 1) / (6 + 3)  # add-one unigram of token 1 over V=3
    lam = 0.5
    got = np.exp(_bigram_log_probs(train, 3, lam, np.array([0, 2]), np.array([1, 1])))
    # history 0 seen: 0.5 * 2/3 + 0.5 * uni(1); history 2 never a history: pure unigram
    np.testing.assert_allclose(got, [0.5 * 2 / 3 + 0.5 * uni_1, uni_1])


def test_bigram_beats_unigram_on_structured_text():
    rng = np.random.default_rng(0)
    # a Markov chain where each token mostly follows its predecessor + 1: bigram statistics matter
    tokens = [0]
    for _ in range(4000):
        tokens.append((tokens[-1] + 1) % 50 if rng.random() < 0.8 else int(rng.integers(50)))
    tokens = np.array(tokens)
    result = baseline_perplexities(tokens[:3000], tokens[3000:], 50)
    assert result["bigram"] < 0.5 * result["unigram"]
    assert result["unigram"] <= 50 * 1.05  # near-uniform marginals
    assert math.isfinite(result["bigram"]) and 0 < result["bigram_lambda"] < 1
