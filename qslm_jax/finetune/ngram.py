"""Count-based reference language models, so a trained SpikeGPT's perplexity can be judged.

* unigram with add-one (Laplace) smoothing over the full vocabulary:
  ``p(x) = (c(x) + 1) / (N + V)``;
* bigram interpolated with that unigram (Jelinek-Mercer):
  ``p(x | y) = lam * c(y, x) / c(y) + (1 - lam) * p_uni(x)``, where ``lam = 0`` for unseen histories;
  ``lam`` is chosen on the training text itself by the held-out half (see :func:`fit_bigram_lambda`);
* interpolated Kneser-Ney trigram (:func:`kneser_ney_trigram_log_probs`), the classic strong count model.

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
    """Unigram, interpolated-bigram and Kneser-Ney-trigram perplexities on ``test[1:]``, all estimated from
    ``train`` only (the trigram's first target has a one-token history: its missing left token is id 0)."""
    train, test = np.asarray(train, np.int64), np.asarray(test, np.int64)
    uni = unigram_log_probs(train, vocab_size)[test[1:]]
    lam = fit_bigram_lambda(train, vocab_size)
    bi = _bigram_log_probs(train, vocab_size, lam, test[:-1], test[1:])
    context = np.stack([np.concatenate([[0], test[:-2]]), test[:-1]], axis=1)
    tri = kneser_ney_trigram_log_probs(train, vocab_size, context, test[1:])
    return {"unigram": float(np.exp(-uni.mean())), "bigram": float(np.exp(-bi.mean())), "bigram_lambda": lam,
            "kneser_ney_trigram": float(np.exp(-tri.mean()))}

def _codes(tokens: np.ndarray, order: int, vocab_size: int) -> np.ndarray:
    """Each ``order``-gram of ``tokens`` as one int64 code (base ``vocab_size``)."""
    code = np.zeros(len(tokens) - order + 1, np.int64)
    for i in range(order):
        code = code * vocab_size + tokens[i:len(tokens) - order + 1 + i]
    return code


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``values`` at the position of each ``query`` in the sorted ``keys``; 0 where it is absent."""
    if len(keys) == 0:
        return np.zeros(len(query), values.dtype)
    pos = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
    return np.where(keys[pos] == query, values[pos], 0)


def _discount(counts: np.ndarray) -> float:
    """Ney's absolute discount ``D = n1 / (n1 + 2 n2)`` from the counts-of-counts (0.75 if undefined)."""
    n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
    return float(n1 / (n1 + 2 * n2)) if n1 + n2 else 0.75


def kneser_ney_trigram_log_probs(train: np.ndarray, vocab_size: int, context: np.ndarray, target: np.ndarray
                                 ) -> np.ndarray:
    """Interpolated Kneser-Ney trigram log-probabilities of ``target`` after the two tokens ``context (n, 2)``
    (Chen & Goodman 1998, Eq. 26, one discount per order):

    ``p3(w|u,v) = max(c(uvw) - D3, 0) / c(uv.) + D3 N1+(uv.) / c(uv.) * p2(w|v)`` (``p2`` if ``c(uv.) = 0``),
    ``p2(w|v) = max(N1+(.vw) - D2, 0) / N1+(.v.) + D2 N1+(v.) / N1+(.v.) * p1(w)`` with continuation counts
    ``N1+(.vw)`` = distinct left neighbours of ``vw`` (``p1`` if ``v`` never has one),
    ``p1(w) = max(N1+(.w) - D1, 0) / N1+(..) + D1 N1+(.) / N1+(..) / V`` (uniform floor for unseen words).
    """
    train = np.asarray(train, np.int64)
    u, v, w = (np.asarray(a, np.int64) for a in (context[:, 0], context[:, 1], target))
    tri, tri_count = np.unique(_codes(train, 3, vocab_size), return_counts=True)
    # continuation counts: each distinct trigram uvw adds one left neighbour to the bigram vw
    bi_cont, bi_n = np.unique(tri % (vocab_size * vocab_size), return_counts=True)
    uni_cont, uni_n = np.unique(bi_cont % vocab_size, return_counts=True)  # N1+(.w) over distinct vw
    d3, d2, d1 = _discount(tri_count), _discount(bi_n), _discount(uni_n)

    total1 = uni_n.sum()
    p1 = (np.maximum(_lookup(uni_cont, uni_n, w) - d1, 0) + d1 * len(uni_cont) / vocab_size) / total1

    hist2 = bi_cont // vocab_size  # v of each distinct continuation bigram vw
    v_keys, v_first = np.unique(hist2, return_index=True)
    v_total = np.add.reduceat(bi_n, v_first)  # N1+(.v.)
    v_types = np.diff(np.append(v_first, len(hist2)))  # N1+(v.)
    n_v = _lookup(v_keys, v_total, v).astype(np.float64)
    types_v = _lookup(v_keys, v_types, v)
    c_vw = _lookup(bi_cont, bi_n, v * vocab_size + w)
    p2 = np.where(n_v > 0, (np.maximum(c_vw - d2, 0) + d2 * types_v * p1) / np.maximum(n_v, 1), p1)

    hist3 = tri // vocab_size  # uv of each distinct trigram
    uv_keys, uv_first = np.unique(hist3, return_index=True)
    uv_total = np.add.reduceat(tri_count, uv_first)  # c(uv.)
    uv_types = np.diff(np.append(uv_first, len(hist3)))  # N1+(uv.)
    uv = u * vocab_size + v
    n_uv = _lookup(uv_keys, uv_total, uv).astype(np.float64)
    types_uv = _lookup(uv_keys, uv_types, uv)
    c_uvw = _lookup(tri, tri_count, uv * vocab_size + w)
    p3 = np.where(n_uv > 0, (np.maximum(c_uvw - d3, 0) + d3 * types_uv * p2) / np.maximum(n_uv, 1), p2)
    return np.log(p3)
