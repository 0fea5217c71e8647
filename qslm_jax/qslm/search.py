"""The QSLM tiered search (qslm.md section 3) over a batched evaluator, plus the sensitivity analysis (section
1).

``evaluate(plans) -> metrics`` is any callable (in practice the vmap-batched model evaluator); memory comes
from ``hierarchy.memory_bytes(plan)``. ``ok(c)``: accuracy drop ``A_0 - A_c <= const_a``
(``higher_is_better``) or perplexity increase ``P_c - P_0 <= const_a``; ``feasible(c)``: ``ok(c)`` and
``memory(c) <= const_m`` (MB = 10^6 B).

Phases (levels Q descending, 32 = fp32 excluded after the baseline):

1. baseline: the fp32 plan;
2. global: every block at q for all q in Q in ONE batched call; ``q_g`` = the last level of the passing
   prefix;
3. block: from every block at ``q_g``, for each block in ``order``, all levels below its current one in one
   call; the block keeps the lowest level of the passing prefix (it and every level above it passed ``ok``);
4. module: for each block with modules (in ``order``), for each module, the same below its block's level.

Because each unit stops at its first failing level, evaluating all levels of a unit together and taking the
passing prefix gives exactly the result of the sequential per-level loop, in one call per unit. The levels the
sequential loop would not have reached (after a unit's first failure) are recorded too, marked ``after_stop``,
and are not selectable, so the candidate pool is the sequential one as well.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qslm_jax.errors import ConfigError
from qslm_jax.qslm.journal import Journal
from qslm_jax.quant.memory import MB
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import FP32, Level, check_level

if TYPE_CHECKING:
    from qslm_jax.quant.hierarchy import Hierarchy

MODEL_UNIT = "model"  # the unit name of baseline and global candidates
Evaluate = Callable[[list[QuantPlan]], Sequence[float]]


@dataclass(frozen=True)
class Candidate:
    """One evaluated plan: which ``unit`` was set to which ``level`` in which ``phase``, and the outcome."""

    plan: QuantPlan
    phase: str  # "baseline", "global", "block", "module"
    unit: str  # "model", a block name or a qualified module name
    level: Level
    metric: float
    memory_bytes: int
    memory_fraction: float  # M_q / M_0
    ok: bool
    feasible: bool
    after_stop: bool = False  # evaluated only because the unit's levels were batched (see module docstring)

    @property
    def selectable(self) -> bool:
        """Feasible and reached by the (sequential) search: a candidate for the selection."""
        return self.feasible and not self.after_stop

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON/CSV reports (``plan`` as its dict)."""
        return {"phase": self.phase, "unit": self.unit, "level": self.level, "metric": self.metric,
                "memory_bytes": self.memory_bytes, "memory_mb": self.memory_bytes / MB,
                "memory_fraction": self.memory_fraction, "ok": self.ok, "feasible": self.feasible,
                "after_stop": self.after_stop, "plan": self.plan.to_dict()}


@dataclass(frozen=True)
class SearchResult:
    """Everything the search evaluated and how it went."""

    baseline: Candidate
    candidates: tuple[Candidate, ...]  # every evaluated candidate in search order, the baseline first
    plan: QuantPlan  # the assignment the search ended with (the last accepted one)
    global_level: Level  # q_g
    levels: tuple[Level, ...]
    order: tuple[str, ...]  # the block order of phases 3 and 4
    const_a: float
    const_m: float  # MB
    higher_is_better: bool
    evaluations: int  # plans passed to ``evaluate`` (journal hits excluded)
    calls: int  # calls of ``evaluate``
    journal_hits: int  # plans whose metric came from the journal
    seconds: Mapping[str, float] = field(default_factory=dict)  # wall time per phase

    @property
    def feasible(self) -> tuple[Candidate, ...]:
        """The selectable candidates: both constraints met, reached by the search (not ``after_stop``)."""
        return tuple(c for c in self.candidates if c.selectable)

    @property
    def const_m_bytes(self) -> float:
        """The memory budget in bytes."""
        return self.const_m * MB

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``report.json``."""
        return {"baseline": self.baseline.to_dict(), "candidates": [c.to_dict() for c in self.candidates],
                "plan": self.plan.to_dict(), "global_level": self.global_level, "levels": list(self.levels),
                "order": list(self.order), "const_a": self.const_a, "const_m_mb": self.const_m,
                "higher_is_better": self.higher_is_better, "evaluations": self.evaluations,
                "calls": self.calls, "journal_hits": self.journal_hits, "seconds": dict(self.seconds)}


def search_levels(levels: Sequence[Level]) -> tuple[Level, ...]:
    """The valid, distinct levels below fp32 in descending order (the order the phases try them)."""
    checked = {check_level(q) for q in levels}
    return tuple(sorted((q for q in checked if q != FP32), reverse=True))


def degradation(metric: float, baseline: float, higher_is_better: bool) -> float:
    """How much worse ``metric`` is than ``baseline``: the accuracy drop or the perplexity increase
    (negative when better; +inf when the metric is not finite)."""
    if not math.isfinite(metric):
        return math.inf
    return baseline - metric if higher_is_better else metric - baseline


class CachedEvaluator:
    """``evaluate`` behind an in-memory cache and an optional journal, counting calls and evaluations.

    Only plans neither cached nor journaled reach ``evaluate``, all of them in one call.
    """

    def __init__(self, evaluate: Evaluate, hierarchy: Hierarchy, journal: Journal | None = None):
        self.evaluate, self.hierarchy, self.journal = evaluate, hierarchy, journal
        self.cache: dict[str, float] = {}
        self.calls = self.evaluations = self.journal_hits = 0

    def __call__(self, plans: Sequence[QuantPlan]) -> list[float]:
        """The metric of every plan (from the cache, the journal, or one batched ``evaluate`` call)."""
        todo: dict[str, QuantPlan] = {}
        for plan in plans:
            key = plan.key()
            if key in self.cache or key in todo:
                continue
            journaled = self.journal.metric(key) if self.journal is not None else None
            if journaled is None:
                todo[key] = plan
            else:
                self.cache[key] = journaled
                self.journal_hits += 1
        if todo:
            batch = list(todo.values())
            metrics = [float(m) for m in self.evaluate(batch)]
            self.calls += 1
            self.evaluations += len(batch)
            if len(metrics) != len(batch):
                raise ConfigError(f"evaluate returned {len(metrics)} metrics for {len(batch)} plans; it must "
                                  f"return one metric per plan, in order")
            for key, plan, metric in zip(todo, batch, metrics, strict=True):
                self.cache[key] = metric
                if self.journal is not None:
                    self.journal.record(plan, metric, self.hierarchy.memory_bytes(plan))
        return [self.cache[plan.key()] for plan in plans]


def _check_order(hierarchy: Hierarchy, order: Sequence[str] | None) -> tuple[str, ...]:
    if order is None:
        return tuple(hierarchy.blocks)
    order = tuple(order)
    missing = [b for b in hierarchy.blocks if b not in order]
    unknown = [b for b in order if b not in hierarchy.blocks]
    if missing or unknown or len(set(order)) != len(order):
        raise ConfigError(f"order must list every block of the hierarchy once: {list(hierarchy.blocks)}; "
                          f"found {list(order)} (missing {missing}, unknown {unknown})")
    return order


def tiered_search(
    hierarchy: Hierarchy,
    evaluate: Evaluate,
    *,
    levels: Sequence[Level],
    const_a: float,
    const_m: float,
    higher_is_better: bool,
    order: Sequence[str] | None = None,
    journal: Journal | None = None,
    on_evaluated: Callable[[Sequence[Candidate]], None] | None = None,
) -> SearchResult:
    """Run the tiered search of qslm.md section 3 (see the module docstring); ``const_m`` in MB.

    ``order``: the block order of the block and module phases (least sensitive first: see
    :func:`sensitivity_order`); default: the hierarchy's order. ``journal``: resume from / record into it.
    ``on_evaluated``: called with the candidates of each unit as they are evaluated (progress reporting).
    """
    if const_a < 0 or const_m <= 0:
        raise ConfigError(f"expected const_a >= 0 and const_m > 0 (MB), found const_a={const_a}, "
                          f"const_m={const_m}")
    q_levels = search_levels(levels)
    order = _check_order(hierarchy, order)
    evaluator = CachedEvaluator(evaluate, hierarchy, journal)
    candidates: list[Candidate] = []
    seconds: dict[str, float] = {}

    tic = time.perf_counter()
    baseline_metric = evaluator([QuantPlan()])[0]
    if not math.isfinite(baseline_metric):
        raise ConfigError(f"the fp32 baseline metric is {baseline_metric}: expected a finite number; check "
                          f"the evaluator and the data before searching")

    def record(plans: list[QuantPlan], phase: str, unit: str, unit_levels: Sequence[Level]
               ) -> list[Candidate]:
        made, stopped = [], False
        for plan, q, metric in zip(plans, unit_levels, evaluator(plans), strict=True):
            memory = hierarchy.memory_bytes(plan)
            ok = degradation(metric, baseline_metric, higher_is_better) <= const_a
            made.append(Candidate(plan, phase, unit, q, metric, memory, memory / hierarchy.fp32_bytes, ok,
                                  ok and memory <= const_m * MB, stopped))
            stopped = stopped or not ok
        candidates.extend(made)
        if on_evaluated is not None:
            on_evaluated(made)
        return made

    def descend(current: QuantPlan, phase: str, unit: str, start: Level,
                set_level: Callable[[QuantPlan, Level], QuantPlan]) -> QuantPlan:
        """Evaluate ``unit`` at every level below ``start`` in one call; keep the end of the passing
        prefix."""
        below = [q for q in q_levels if q < start]
        if not below:
            return current
        for cand in record([set_level(current, q) for q in below], phase, unit, below):
            if not cand.ok:
                break
            current = cand.plan
        return current

    baseline = record([QuantPlan()], "baseline", MODEL_UNIT, [FP32])[0]
    seconds["baseline"] = time.perf_counter() - tic

    tic = time.perf_counter()
    plan = descend(QuantPlan(), "global", MODEL_UNIT, FP32, QuantPlan.with_default)
    global_level = plan.default
    seconds["global"] = time.perf_counter() - tic

    tic = time.perf_counter()
    for block in order:
        plan = descend(plan, "block", block, plan.block_bits(block), lambda p, q, b=block: p.with_block(b, q))
    seconds["block"] = time.perf_counter() - tic

    tic = time.perf_counter()
    for block in order:
        for module in hierarchy.modules_of(block):
            plan = descend(plan, "module", module, plan.module_bits(module),
                           lambda p, q, m=module: p.with_module(m, q))
    seconds["module"] = time.perf_counter() - tic

    return SearchResult(baseline, tuple(candidates), plan, global_level, q_levels, order, const_a, const_m,
                        higher_is_better, evaluator.evaluations, evaluator.calls, evaluator.journal_hits,
                        seconds)


def sensitivity_plans(hierarchy: Hierarchy, levels: Sequence[Level]) -> list[QuantPlan]:
    """Every block alone at every level below fp32 (the rest fp32), block-major in hierarchy order:
    the whole sensitivity analysis (qslm.md section 1) as one batch."""
    return [QuantPlan().with_block(block, q) for block in hierarchy.blocks for q in search_levels(levels)]


def sensitivity_table(hierarchy: Hierarchy, evaluate: Evaluate, levels: Sequence[Level], *,
                      journal: Journal | None = None) -> dict[str, dict[Level, float]]:
    """``{block: {level: metric}}`` of :func:`sensitivity_plans`, evaluated in one batched call
    (journaled)."""
    plans = sensitivity_plans(hierarchy, levels)
    metrics = iter(CachedEvaluator(evaluate, hierarchy, journal)(plans))
    return {block: {q: next(metrics) for q in search_levels(levels)} for block in hierarchy.blocks}


def sensitivity_order(table: Mapping[str, Mapping[Level, float]], baseline_metric: float, *, const_a: float,
                      higher_is_better: bool) -> tuple[str, ...]:
    """Blocks least sensitive first, from a sensitivity table ``{block: {level: metric}}``.

    A block's reach is the lowest level it passes ``ok`` alone at, the prefix rule applied from the highest
    level down (fp32 if even the highest fails). Sort key: reach ascending (a block that tolerates lower
    precision is less sensitive), then the degradation at its reach level (or at the highest level if it
    reaches nothing), then the table's order.
    """
    def key(item: tuple[int, str]) -> tuple[float, float, int]:
        index, block = item
        row = table[block]
        levels = sorted(row, reverse=True)
        if not levels:
            raise ConfigError(f"sensitivity table row of {block!r} is empty: expected a metric per level")
        reach, cost = FP32, degradation(row[levels[0]], baseline_metric, higher_is_better)
        for q in levels:
            d = degradation(row[q], baseline_metric, higher_is_better)
            if d > const_a:
                break
            reach, cost = q, d
        return reach, cost, index

    return tuple(block for _, block in sorted(enumerate(table), key=key))
