"""Bootstrap intervals of a metric and of its change vs the fp32 baseline, from per-example statistics.

The evaluator returns, with every metric, the additive statistics of each example (:class:`Evaluation`;
:meth:`qslm_jax.qslm.metrics.Metric.example_stats`): ``correct`` and ``examples`` per sentence for accuracy,
``nll`` and ``tokens`` per window for perplexity. A bootstrap resample ``r`` draws the ``n`` examples with
replacement (``c_ri`` = how often example ``i`` is drawn, multinomial with ``sum_i c_ri = n``) and the metric of
the resample is the metric's own ``finalize`` of the resampled sums ``S_r = sum_i c_ri s_i``: ``100 correct* /
examples*`` for accuracy, ``exp(sum nll* / sum tokens*)`` for perplexity (QSLM paper Eq. 2 on the resample,
never a mean of per-window perplexities). ``c_ri = 1`` gives back the metric itself.

* ``metric_ci``: the percentile interval ``[q_(1-level)/2, q_(1+level)/2]`` of the resampled metrics (Efron &
  Tibshirani 1993, section 13.3);
* ``delta_ci``: the paired interval of ``metric(candidate) - metric(baseline)``, both computed on the same
  resamples of the same examples, so the example-to-example variation they share cancels (an identical
  candidate gets exactly ``[0, 0]``).

Resampling units: the sentence for classification; for perplexity the evaluation window of ``ctx_len`` tokens.
Windows, not documents, because the WikiText-2 test halves hold few documents of very uneven length (a resample
of a few documents mostly measures which long article was drawn), and windows are the unit the evaluation
itself scores. Adjacent windows of one article are correlated, which the bootstrap ignores: the perplexity
intervals are slightly too narrow.

Reproducible: the resamples depend only on ``n``, :data:`RESAMPLES` and :data:`SEED` (numpy's PCG64), so a
report, a rerun and a resumed run (the journal stores the per-example statistics) give identical intervals.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qslm_jax.errors import ConfigError, DataError

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95  # the reported intervals' level without --confidence
MEMO = 512  # resampled-metric arrays a Bootstrap remembers (16 kB each at 2000 resamples)
Examples = Mapping[str, np.ndarray]  # statistic -> (n,) per-example values
Finalize = Callable[[Mapping[str, Any]], Any]  # totals -> metric, elementwise over arrays of totals


@dataclass(frozen=True)
class Evaluation:
    """One plan's metric and the per-example statistics it was computed from (``float()`` gives the
    metric)."""

    metric: float
    examples: Examples

    def __float__(self) -> float:
        return float(self.metric)


def check_examples(examples: Any, where: str) -> dict[str, np.ndarray]:
    """``examples`` as ``{statistic: float64 (n,)}``, refused (:class:`DataError`) unless it maps names to
    equally long, non-empty 1-D arrays of numbers (nan and inf are kept: a broken candidate's NLL may be
    non-finite, and its intervals are then nan)."""
    if not isinstance(examples, Mapping) or not examples:
        raise DataError(f"{where}: per-example statistics must map statistic names to arrays, found "
                        f"{str(examples)[:200]}")
    arrays = {}
    for key, values in examples.items():
        try:
            array = np.asarray(values, dtype=np.float64) if isinstance(values, list | tuple | np.ndarray) else None
        except (TypeError, ValueError):
            array = None
        if not isinstance(key, str) or array is None or array.ndim != 1:
            raise DataError(f"{where}: statistic {key!r} must be a list of numbers, found "
                            f"{str(values)[:200]}")
        arrays[key] = array
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise DataError(f"{where}: every per-example statistic needs the same non-zero length, found {lengths}")
    return arrays


@functools.cache
def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``(resamples, n)`` draw counts ``c_ri`` of a bootstrap of ``n`` examples: each row multinomial with
    ``n`` draws, equal probabilities (read-only; cached, depends only on the arguments)."""
    if n < 1 or resamples < 1:
        raise ConfigError(f"a bootstrap needs n >= 1 examples and >= 1 resamples, found n={n}, {resamples}")
    counts = np.random.Generator(np.random.PCG64(seed)).multinomial(n, np.full(n, 1.0 / n), size=resamples)
    counts = counts.astype(np.float64)  # exact (counts <= n); the float matrix product is the fast one
    counts.setflags(write=False)
    return counts


def resampled_metrics(finalize: Finalize, examples: Examples, counts: np.ndarray) -> np.ndarray:
    """``finalize(S_r)`` for every row ``r`` of ``counts``, ``S_r[k] = sum_i counts_ri examples[k]_i``, in one
    call on the arrays ``S[k]`` (all nan when a statistic is not finite)."""
    keys = list(examples)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 draws: nan, as intended
        stacked = counts @ np.stack([np.asarray(examples[k], np.float64) for k in keys], axis=1)
    sums = {k: stacked[:, j] for j, k in enumerate(keys)}
    if not all(np.isfinite(s).all() for s in sums.values()):
        return np.full(len(counts), np.nan)
    return np.asarray(finalize(sums), np.float64)  # elementwise over the resamples (Metric.finalize)


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """``[q_(1-level)/2, q_(1+level)/2]`` of ``values`` (numpy's linear percentiles); (nan, nan) when a value
    is not finite."""
    if not np.isfinite(values).all():
        return math.nan, math.nan
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


@dataclass(frozen=True)
class Bootstrap:
    """Percentile bootstrap of a metric (``finalize``) at ``level`` over :func:`resample_counts`."""

    finalize: Finalize
    level: float = LEVEL
    resamples: int = RESAMPLES
    seed: int = SEED
    _memo: dict = field(default_factory=dict, compare=False, repr=False)  # content digest -> resampled metrics

    def __post_init__(self):
        if not 0 < self.level < 1:
            raise ConfigError(f"an interval level must lie in (0, 1), found {self.level}")

    def _resampled(self, examples: Examples) -> np.ndarray:
        """:func:`resampled_metrics` of ``examples``, computed once per content (the baseline is paired with
        every candidate; at most :data:`MEMO` remembered)."""
        digest = hashlib.sha256()
        for key in sorted(examples):
            digest.update(key.encode() + np.ascontiguousarray(examples[key], np.float64).tobytes())
        key = digest.hexdigest()
        if key not in self._memo:
            if len(self._memo) >= MEMO:
                self._memo.pop(next(iter(self._memo)))
            n = len(next(iter(examples.values())))
            self._memo[key] = resampled_metrics(self.finalize, examples, resample_counts(n, self.resamples,
                                                                                         self.seed))
        return self._memo[key]

    def metric_ci(self, examples: Examples) -> tuple[float, float]:
        """The percentile interval of the metric on ``examples``."""
        return percentile_interval(self._resampled(examples), self.level)

    def delta_ci(self, examples: Examples, baseline: Examples) -> tuple[float, float]:
        """The paired percentile interval of ``metric(examples) - metric(baseline)`` (same examples, same
        resamples)."""
        sizes = {len(next(iter(e.values()))) for e in (examples, baseline)}
        if len(sizes) != 1 or set(examples) != set(baseline):
            raise DataError(f"a paired interval needs the same examples: candidate has {sorted(examples)} over "
                            f"{len(next(iter(examples.values())))}, baseline {sorted(baseline)} over "
                            f"{len(next(iter(baseline.values())))}")
        return percentile_interval(self._resampled(examples) - self._resampled(baseline), self.level)

    def worst_degradation(self, examples: Examples, baseline: Examples, higher_is_better: bool) -> float:
        """The end of ``delta_ci`` furthest on the worse side, as a degradation: ``-low`` (accuracy drop) or
        ``high`` (perplexity increase); nan when the interval is not finite."""
        low, high = self.delta_ci(examples, baseline)
        return -low if higher_is_better else high


def intervals(bootstrap: Bootstrap, examples: Examples, baseline: Examples) -> dict[str, list[float]]:
    """A report's ``{"metric_ci": [low, high], "delta_ci": [low, high]}`` of one candidate (``delta_ci``:
    its metric minus the baseline's, paired)."""
    return {"metric_ci": list(bootstrap.metric_ci(examples)), "delta_ci": list(bootstrap.delta_ci(examples, baseline))}


def describe(bootstrap: Bootstrap, unit: str) -> dict[str, Any]:
    """How a report's intervals were computed (``unit``: what one resampled example is)."""
    return {"method": "percentile bootstrap; delta_ci paired with the fp32 baseline on the same resamples",
            "level": bootstrap.level, "resamples": bootstrap.resamples, "seed": bootstrap.seed, "unit": unit}
