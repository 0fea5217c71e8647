"""Selecting the setting among the search's candidates (qslm.md section 3.4), the alpha ablation and the
Pareto front.

Trade-off score (this project's choice; the paper's Eq. 1 is not public), with ``A``/``P`` the metric and
``M`` the weight memory, index 0 the fp32 baseline:

* higher is better (classification accuracy): ``S = A_q / A_0 - alpha * M_q / M_0``, maximised;
* lower is better (perplexity): ``S = P_q / P_0 + alpha * M_q / M_0``, minimised.

alpha = 0 picks the best metric; a larger alpha favours smaller models. Ties go to the smaller memory, then to
the earlier candidate. When nothing is feasible, :class:`NoFeasibleCandidate` carries the closest candidates,
ranked by the normalised violation ``max(0, d - const_a) / |metric_0| + max(0, M - const_m) / M_0`` (``d`` =
the accuracy drop or perplexity increase): both excesses as fractions of the baseline's metric and memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qslm_jax.errors import ConfigError, ConstraintError
from qslm_jax.qslm.search import Candidate, SearchResult, degradation
from qslm_jax.quant.memory import MB

ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0)


def trade_off_score(metric: float, memory_bytes: float, *, baseline_metric: float, baseline_bytes: float,
                    alpha: float, higher_is_better: bool) -> float:
    """``A_q/A_0 - alpha M_q/M_0`` (higher is better) or ``P_q/P_0 + alpha M_q/M_0`` (lower is better)."""
    if baseline_metric == 0 or not math.isfinite(baseline_metric) or baseline_bytes <= 0:
        raise ConfigError(f"the trade-off score needs a finite non-zero baseline metric and positive "
                          f"baseline memory, found metric {baseline_metric} and {baseline_bytes} bytes")
    ratio, memory = metric / baseline_metric, alpha * memory_bytes / baseline_bytes
    return ratio - memory if higher_is_better else ratio + memory


def scores(result: SearchResult, alpha: float) -> list[float]:
    """The trade-off score of every candidate of ``result`` (in its order)."""
    base = result.baseline
    return [trade_off_score(c.metric, c.memory_bytes, baseline_metric=base.metric,
                            baseline_bytes=base.memory_bytes, alpha=alpha,
                            higher_is_better=result.higher_is_better) for c in result.candidates]


def scored_candidates(result: SearchResult, alpha: float) -> list[dict[str, Any]]:
    """Every candidate as a report row (:meth:`Candidate.to_dict`) with its ``score`` at ``alpha``."""
    rows = zip(result.candidates, scores(result, alpha), strict=True)
    return [{**c.to_dict(), "score": score} for c, score in rows]


@dataclass(frozen=True)
class Selection:
    """The chosen candidate at one ``alpha``, its score, and every feasible candidate ranked best first."""

    alpha: float
    candidate: Candidate
    score: float
    ranking: tuple[tuple[Candidate, float], ...]

    def to_dict(self) -> dict[str, Any]:
        """Report row: the candidate's fields plus ``alpha`` and ``score``."""
        return {**self.candidate.to_dict(), "alpha": self.alpha, "score": self.score}


class NoFeasibleCandidate(ConstraintError):
    """No candidate meets both constraints; ``closest`` holds ``(candidate, violation)`` pairs, closest
    first."""

    def __init__(self, message: str, closest: Sequence[tuple[Candidate, float]]):
        super().__init__(message)
        self.closest = tuple(closest)


def violation(candidate: Candidate, result: SearchResult) -> float:
    """Normalised constraint violation (0 for a feasible candidate; see the module docstring)."""
    base = result.baseline
    excess = degradation(candidate.metric, base.metric, result.higher_is_better) - result.const_a
    memory_excess = candidate.memory_bytes - result.const_m_bytes
    return max(0.0, excess) / abs(base.metric) + max(0.0, memory_excess) / base.memory_bytes


def closest_candidates(result: SearchResult, k: int = 5) -> list[tuple[Candidate, float]]:
    """The ``k`` candidates the search reached with the smallest :func:`violation` (ties: smaller memory
    first)."""
    reached = (c for c in result.candidates if not c.after_stop)
    ranked = sorted(((c, violation(c, result)) for c in reached),
                    key=lambda cv: (cv[1], cv[0].memory_bytes))
    return ranked[:k]


def select(result: SearchResult, alpha: float) -> Selection:
    """The feasible candidate with the best trade-off score at ``alpha``; :class:`NoFeasibleCandidate` if
    none."""
    feasible = [(c, s) for c, s in zip(result.candidates, scores(result, alpha), strict=True) if c.selectable]
    if not feasible:
        closest = closest_candidates(result)
        lines = "; ".join(f"{c.phase} {c.unit}@{c.level}: metric {c.metric:.4g}, "
                          f"{c.memory_bytes / MB:.4g} MB, violation {v:.3g}" for c, v in closest)
        raise NoFeasibleCandidate(
            f"no candidate meets both constraints (performance: change <= {result.const_a} vs baseline "
            f"{result.baseline.metric:.4g}; memory <= {result.const_m} MB) among {len(result.candidates)} "
            f"evaluated. Closest: {lines}. Relax const_a or const_m, or add lower precision levels.", closest)
    sign = -1.0 if result.higher_is_better else 1.0  # sort ascending on sign * score: best first
    ranking = tuple(sorted(feasible, key=lambda cs: (sign * cs[1], cs[0].memory_bytes)))
    best, score = ranking[0]
    return Selection(alpha, best, score, ranking)


def alpha_ablation(result: SearchResult, alphas: Sequence[float] = ALPHAS) -> dict[float, Selection]:
    """The selection at each alpha (the ablation that is part of the experiment output)."""
    return {float(alpha): select(result, alpha) for alpha in alphas}


def pareto_front(candidates: Sequence[Candidate], *, higher_is_better: bool) -> list[Candidate]:
    """Candidates no other candidate beats on both memory (smaller) and metric, by increasing memory.

    Of candidates with equal memory and metric only the first is kept; non-finite metrics are left out.
    """
    sign = -1.0 if higher_is_better else 1.0  # sign * metric: smaller is better
    finite = [c for c in candidates if math.isfinite(c.metric)]
    front: list[Candidate] = []
    for cand in sorted(finite, key=lambda c: (c.memory_bytes, sign * c.metric)):
        if not front or sign * cand.metric < sign * front[-1].metric:
            front.append(cand)
    return front
