"""Spread over training seeds, and whether a claimed improvement holds beyond it.

A student trained with seeds ``s = 1..n`` (``experiments.extreme_kd --seed s``: the initialisation and the
training-batch order) gives metrics ``x_s``. Its summary is the mean ``x_bar = sum_s x_s / n`` and the sample
standard deviation ``sd = sqrt(sum_s (x_s - x_bar)^2 / (n - 1))`` (0 for one seed).

A claim "A scores at least as high as B" (the paper's "1.58-bit >= 1-bit", "KD recovers points") is tested on the
seeds both were trained with, paired: ``d_s = a_s - b_s`` share the seed's data order and initialisation, so what
a seed does to both cancels. The interval of the mean difference is Student's t interval
``d_bar +- t_{(1+level)/2, n-1} sd_d / sqrt(n)`` (Student 1908; exact for normal ``d_s``, the usual reading at a few
seeds). The claim *holds beyond the spread* when the whole interval is above 0, is *contradicted* when it is
below 0, and is *not resolved* otherwise (or with fewer than two shared seeds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from qslm_jax.errors import ConfigError


@dataclass(frozen=True)
class SeedSummary:
    """Mean and sample standard deviation of a metric over ``n`` seeds."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.n > 1 else f"{self.mean:.2f} (one seed)"


def summarize(values: list[float]) -> SeedSummary:
    """:class:`SeedSummary` of ``values`` (one per seed): mean and sample std (``ddof = 1``; 0 for one value)."""
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"a seed summary needs one or more finite values, got {values}")
    array = np.asarray(values, dtype=np.float64)
    return SeedSummary(float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0, len(array))


@dataclass(frozen=True)
class PairedComparison:
    """``A - B`` over the seeds both were trained with: mean difference, its t interval (None for < 2 seeds)
    and the verdict on "A >= B" (``holds``, ``contradicted`` or ``not resolved``)."""

    mean_difference: float
    interval: tuple[float, float] | None
    seeds: tuple[int, ...]
    level: float

    @property
    def verdict(self) -> str:
        """``holds`` (interval above 0), ``contradicted`` (below 0) or ``not resolved``."""
        if self.interval is None:
            return "not resolved"
        low, high = self.interval
        return "holds" if low > 0 else "contradicted" if high < 0 else "not resolved"


def compare_paired(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> PairedComparison:
    """The paired comparison of ``a`` and ``b`` (seed -> metric) on their common seeds (module docstring)."""
    if not 0 < level < 1:
        raise ConfigError(f"the interval level must lie in (0, 1), got {level}")
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ConfigError(f"no seed in common: {sorted(a)} vs {sorted(b)}")
    differences = np.asarray([a[s] - b[s] for s in seeds], dtype=np.float64)
    mean = float(differences.mean())
    if len(seeds) < 2:
        return PairedComparison(mean, None, seeds, level)
    half = stats.t.ppf((1 + level) / 2, len(seeds) - 1) * differences.std(ddof=1) / math.sqrt(len(seeds))
    return PairedComparison(mean, (mean - float(half), mean + float(half)), seeds, level)
