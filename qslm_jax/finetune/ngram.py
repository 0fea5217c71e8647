"""Count-based reference language models, so a trained SpikeGPT's perplexity can be judged.

* unigram with add-one (Laplace) smoothing over the full vocabulary:
  ``p(x) = (c(x) + 1) / (N + V)``;
* bigram interpolated with that unigram (Jelinek-Mercer):
  ``p(x | y) = lam * c(y, x) / c(y) + (1 - lam) * p_uni(x)``, where ``lam = 0`` for unseen histories;
  ``lam`` is chosen on the training text itself by the held-out half (see :func:`fit_bigram_lambda`).

Perplexity ``exp(-mean log p)`` over the same scored targets as the model (every test token but the first).
"""

from __future__ import annotations

import numpy as np


def unigram_log_probs(train: np.ndarray, vocab_size: int) -> np.ndarray:
    """Add-one smoothed unigram log-probabilities ``(V,)`` from the training token ids."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    return np.log((counts + 1.0) / (counts.sum() + vocab_size))


def _bigram_log_probs(train: np.ndarray, vocab_size: int, lam: float, history: np.ndarray, target: np.ndarray
                      ) -> np.ndarray:
    uni = np.exp(unigram_log_probs(train, vocab_size))
    pair_codes = train[:-1].astype(np.int64) * vocab_size + train[1:]
    codes, pair_counts = np.unique(pair_codes, return_counts=True)
    history_counts = np.bincount(train[:-1], minlength=vocab_size).astype(np.float64)
    query = history.astype(np.int64) * vocab_size + target
    pos = np.clip(np.searchsorted(codes, query), 0, len(codes) - 1)
    c_pair = np.where(codes[pos] == query, pair_counts[pos], 0).astype(np.float64)
    c_hist = history_counts[history]
    weight = np.where(c_hist > 0, lam, 0.0)
    p_ml = np.divide(c_pair, c_hist, out=np.zeros_like(c_pair), where=c_hist > 0)
    return np.log(weight * p_ml + (1.0 - weight) * uni[target])


def fit_bigram_lambda(train: np.ndarray, vocab_size: int, grid: tuple[float, ...] = tuple(np.linspace(0.05, 0.95, 19))
                      ) -> float:
    """The interpolation weight with the best perplexity on the second half of ``train`` when the counts come
    from the first half (no test data is used)."""
    half = len(train) // 2
    fit, held = train[:half], train[half:]
    scores = [_bigram_log_probs(fit, vocab_size, lam, held[:-1], held[1:]).mean() for lam in grid]
    return float(grid[int(np.argmax(scores))])


def baseline_perplexities(train: np.ndarray, test: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Unigram and interpolated-bigram perplexities on ``test[1:]``, both estimated from ``train`` only."""
    train, test = np.asarray(train, np.int64), np.asarray(test, np.int64)
    uni = unigram_log_probs(train, vocab_size)[test[1:]]
    lam = fit_bigram_lambda(train, vocab_size)
    bi = _bigram_log_probs(train, vocab_size, lam, test[:-1], test[1:])
    return {"unigram": float(np.exp(-uni.mean())), "bigram": float(np.exp(-bi.mean())), "bigram_lambda": lam}
