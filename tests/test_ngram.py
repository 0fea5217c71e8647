"""Count-based baselines: hand-computed probabilities and the expected ordering on real text."""

from __future__ import annotations

import math

import numpy as np

from qslm_jax.finetune.ngram import (
    _bigram_log_probs,
    baseline_perplexities,
    kneser_ney_trigram_log_probs,
    unigram_log_probs,
)


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


def test_kneser_ney_trigram_is_a_distribution_for_seen_and_unseen_histories():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 7, 400)
    for history, vocab in (((1, 2), 7), ((6, 6), 7), ((8, 8), 9)):  # seen; rarely seen; never seen (token 8)
        context = np.tile(history, (vocab, 1))
        total = np.exp(kneser_ney_trigram_log_probs(train, vocab, context, np.arange(vocab))).sum()
        assert abs(total - 1.0) < 1e-12, (history, total)


def test_kneser_ney_trigram_by_hand():
    # train "0 1 2 0 1 2 0 1 3": trigrams 012 x2, 120 x2, 201 x2, 013 x1 -> D3 = n1/(n1+2 n2) = 1/(1+2*3) = 1/7
    train = np.array([0, 1, 2, 0, 1, 2, 0, 1, 3])
    # c(01.) = 3 over 2 types (012: 2, 013: 1); continuation bigrams: 12 (left 0), 20 (1), 01 (2), 13 (0)
    d3 = 1 / 7
    # p2(2|1): N1+(.1.) = 2 (12, 13 each once) -> D2 = n1/(n1+2 n2) with all four N1+ = 1: D2 = 1
    # so p2(2|1) = (1 - 1)/2 + 1 * 2/2 * p1(2); p1(w) = (max(N1+(.w) - D1, 0) + D1 * 4/V) / 4, N1+(.w) = 1 for
    # w in {0, 1, 2, 3} (one distinct left neighbour each): D1 = 1 -> p1 = (0 + 4/V)/4 = 1/V
    vocab = 5
    p1 = 1 / vocab
    p2 = p1
    p3 = (2 - d3) / 3 + d3 * 2 / 3 * p2
    got = np.exp(kneser_ney_trigram_log_probs(train, vocab, np.array([[0, 1]]), np.array([2])))
    np.testing.assert_allclose(got, [p3], rtol=1e-12)


def test_trigram_beats_bigram_on_second_order_text():
    rng = np.random.default_rng(0)
    tokens = [0, 1]
    for _ in range(6000):  # the next token is set by the two before it, with noise
        tokens.append((tokens[-1] + tokens[-2]) % 20 if rng.random() < 0.9 else int(rng.integers(20)))
    tokens = np.array(tokens)
    result = baseline_perplexities(tokens[:5000], tokens[5000:], 20)
    assert result["kneser_ney_trigram"] < 0.5 * result["bigram"]
