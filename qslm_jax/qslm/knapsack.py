"""A second search strategy (``--strategy knapsack``): per-unit levels from a knapsack over measured
sensitivities, then real evaluation and repair.

Units are the module-less blocks (``input``, ``output``) and every module. Each unit alone at each level (the
rest fp32) is measured once, all in one batched call: its degradation ``d_u(q)`` (the accuracy drop or
perplexity increase; improvements count as 0, a non-finite metric rules the level out) and, exactly because
memory is a sum over tensors, its memory ``m_u(q)``. The predicted degradation of a plan is additive,
``D(plan) = sum_u d_u(q_u)``, and the plan of a degradation budget ``B`` solves the multiple-choice knapsack

    minimise  sum_u m_u(q_u)   subject to   sum_u d_u(q_u) <= B,   q_u in {32} + Q,

by dynamic programming over ``B`` cut into :data:`RESOLUTION` steps (costs rounded up, so a solution never
exceeds ``B``). The first call evaluates the solutions for ``B = f * const_a`` at the :data:`FRACTIONS` (one
plan per slot; the additive prediction is optimistic when damages compound, so the tighter budgets are the
hedge). If none is feasible, the repair starts from the evaluated plan within the memory budget closest to
``ok``: every unit below fp32 raised one level, ranked by the damage that raise removes (``d_u(q) - d_u(q up)``:
the unit that hurts most first), the first ``batch_size`` of them evaluated in one call; a feasible one ends
the search, else the one with the smallest measured degradation is the next start. Every evaluation goes
through :class:`~qslm_jax.qslm.search.CachedEvaluator` and the journal, and the schedule is a deterministic
function of the metrics, so a rerun on the journal resumes with 0 evaluations.

Every metric this strategy computes is used (the table sets the knapsack, every evaluated plan is a
candidate), so its slots are all useful as long as the batches fill the evaluator's compiled sizes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from qslm_jax.errors import ConfigError
from qslm_jax.qslm.journal import Journal
from qslm_jax.qslm.search import (
    MODEL_UNIT,
    CachedEvaluator,
    Candidate,
    Evaluate,
    Judge,
    SearchResult,
    check_baseline,
    check_constraints,
    interval_rule,
    search_levels,
)
from qslm_jax.qslm.uncertainty import Bootstrap
from qslm_jax.quant.memory import MB, memory_bytes
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import FP32, Level

if TYPE_CHECKING:
    from qslm_jax.quant.hierarchy import Hierarchy

RESOLUTION = 2000
FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
Options = Mapping[str, Mapping[Level, tuple[float, float]]]  # unit -> level -> (degradation cost, memory bytes)


def knapsack_units(hierarchy: Hierarchy) -> tuple[str, ...]:
    """The units a knapsack plan sets: every module, and the blocks without modules (hierarchy order)."""
    return tuple(unit for block in hierarchy.blocks for unit in (hierarchy.modules_of(block) or (block,)))


def unit_plan(unit: str, level: Level, plan: QuantPlan | None = None) -> QuantPlan:
    """``plan`` (default: fp32) with the block or qualified module ``unit`` at ``level``."""
    plan = plan or QuantPlan()
    return plan.with_module(unit, level) if "/" in unit else plan.with_block(unit, level)


def unit_level(plan: QuantPlan, unit: str) -> Level:
    """The level of block or module ``unit`` under ``plan``."""
    return plan.module_bits(unit) if "/" in unit else plan.block_bits(unit)


def unit_sensitivity_plans(hierarchy: Hierarchy, levels: Sequence[Level]) -> list[QuantPlan]:
    """Every knapsack unit alone at every level below fp32 (the rest fp32), unit-major."""
    return [unit_plan(unit, q) for unit in knapsack_units(hierarchy) for q in search_levels(levels)]


def unit_options(hierarchy: Hierarchy, table: Mapping[str, Mapping[Level, float]], judge: Judge) -> dict:
    """``{unit: {level: (cost, memory bytes)}}`` from a table of metrics ``{unit: {level: metric}}``: cost
    ``max(0, degradation)`` (non-finite metrics left out), memory of the unit's tensors at that level."""
    fp32_bytes = hierarchy.fp32_bytes
    options = {}
    for unit in knapsack_units(hierarchy):
        row = {FP32: (0.0, float(memory_bytes(hierarchy, QuantPlan()) - fp32_bytes))}
        for q, metric in table[unit].items():
            cost = judge.degradation(metric)
            if math.isfinite(cost):
                row[q] = (max(0.0, cost), float(memory_bytes(hierarchy, unit_plan(unit, q)) - fp32_bytes))
        options[unit] = row
    return options


def solve_knapsack(options: Options, budget: float, resolution: int = RESOLUTION) -> dict[str, Level]:
    """The level per unit minimising the summed memory with summed cost at most ``budget`` (module
    docstring); fp32 (cost 0) keeps every budget >= 0 solvable."""
    if budget < 0 or resolution < 1:
        raise ConfigError(f"expected budget >= 0 and resolution >= 1, found {budget} and {resolution}")
    units = list(options)
    best = np.zeros(resolution + 1)  # least memory using at most r budget steps, over the units so far
    choices, weights = [], []
    for unit in units:
        levels = list(options[unit])
        cost = np.array([options[unit][q][0] for q in levels])
        memory = np.array([options[unit][q][1] for q in levels])
        if budget > 0:
            weight = np.ceil(cost / budget * resolution - 1e-9).astype(int)
        else:
            weight = np.where(cost <= 0, 0, resolution + 1)
        table = np.full((len(levels), resolution + 1), np.inf)
        for i, w in enumerate(weight):
            if w <= resolution:
                table[i, w:] = best[:resolution + 1 - w] + memory[i]
        choice = np.argmin(table, axis=0)
        best = table[choice, np.arange(resolution + 1)]
        choices.append((levels, choice))
        weights.append(weight)
    plan, r = {}, resolution
    for unit, (levels, choice), weight in zip(reversed(units), reversed(choices), reversed(weights), strict=True):
        i = int(choice[r])
        plan[unit] = levels[i]
        r -= int(weight[i])
    return {unit: plan[unit] for unit in units}


def plan_of(levels: Mapping[str, Level]) -> QuantPlan:
    """The plan setting each unit of ``levels`` (fp32 units left out)."""
    plan = QuantPlan()
    for unit, q in levels.items():
        if q != FP32:
            plan = unit_plan(unit, q, plan)
    return plan


def _lowest(plan: QuantPlan, units: Sequence[str]) -> Level:
    return min(unit_level(plan, u) for u in units)


def knapsack_search(
    hierarchy: Hierarchy,
    evaluate: Evaluate,
    *,
    levels: Sequence[Level],
    const_a: float,
    const_m: float,
    higher_is_better: bool,
    journal: Journal | None = None,
    batch_size: int = 8,
    fractions: Sequence[float] = FRACTIONS,
    on_evaluated: Callable[[Sequence[Candidate]], None] | None = None,
    confidence: Bootstrap | None = None,
) -> SearchResult:
    """The knapsack strategy of the module docstring; ``const_m`` in MB. ``batch_size``: plans per call of
    the knapsack and repair rounds (the evaluator's largest compiled size); ``fractions``: the budgets of the
    first call as fractions of ``const_a`` (at most ``batch_size`` of them are used). ``confidence``: a
    candidate is ``ok`` only if its whole paired ``delta_ci`` is within ``const_a`` too
    (:func:`~qslm_jax.qslm.search.tiered_search`; the knapsack's costs stay the measured point
    degradations)."""
    check_constraints(const_a, const_m)
    if batch_size < 1:
        raise ConfigError(f"expected batch_size >= 1 (plans per call), found {batch_size}")
    q_levels = search_levels(levels)
    units = knapsack_units(hierarchy)
    evaluator = CachedEvaluator(evaluate, hierarchy, journal)
    seconds = dict.fromkeys(("baseline", "sensitivity", "knapsack", "repair"), 0.0)

    tic = time.perf_counter()
    baseline_metric = check_baseline(evaluator([QuantPlan()])[0])
    interval = interval_rule(confidence, evaluator, higher_is_better) if confidence is not None else None
    judge = Judge(hierarchy, baseline_metric, const_a, const_m, higher_is_better, interval)
    baseline = judge.candidate(QuantPlan(), "baseline", MODEL_UNIT, FP32, baseline_metric)
    seconds["baseline"] = time.perf_counter() - tic

    tic = time.perf_counter()
    metrics = iter(evaluator(unit_sensitivity_plans(hierarchy, q_levels)))
    table = {unit: {q: next(metrics) for q in q_levels} for unit in units}
    options = unit_options(hierarchy, table, judge)
    seconds["sensitivity"] = time.perf_counter() - tic

    candidates: list[Candidate] = [baseline]

    def evaluate_round(entries: list[tuple[QuantPlan, str, str, Level]]) -> list[Candidate]:
        made = [judge.candidate(plan, phase, unit, q, metric) for (plan, phase, unit, q), metric
                in zip(entries, evaluator([e[0] for e in entries]), strict=True)]
        candidates.extend(made)
        if on_evaluated is not None:
            on_evaluated(made)
        return made

    tic = time.perf_counter()
    solutions = {}
    for fraction in list(fractions)[:batch_size]:
        plan = plan_of(solve_knapsack(options, fraction * const_a))
        solutions.setdefault(plan.key(), plan)
    made = evaluate_round([(p, "knapsack", MODEL_UNIT, _lowest(p, units)) for p in solutions.values()])
    seconds["knapsack"] = time.perf_counter() - tic

    tic = time.perf_counter()
    ladder = (*q_levels[::-1], FP32)  # ascending: the level a unit is raised to is the next one up
    while not any(c.feasible for c in made):
        within = [c for c in made if c.memory_bytes <= const_m * MB]
        if not within:  # raising a level only adds memory: nothing reachable from here is feasible
            break
        start = min(within, key=lambda c: (judge.degradation(c.metric), c.memory_bytes)).plan
        raises = []
        for unit in units:
            q = unit_level(start, unit)
            if q == FP32:
                continue
            up = ladder[ladder.index(q) + 1]
            cost, cost_up = (options[unit].get(level, (math.inf, 0.0))[0] for level in (q, up))
            gain = cost - cost_up if math.isfinite(cost_up) else -math.inf  # into a ruled-out level: last
            raised = unit_plan(unit, up, start)
            if memory_bytes(hierarchy, raised) <= const_m * MB:
                raises.append((-gain, memory_bytes(hierarchy, raised), unit, up, raised))
        if not raises:
            break
        raises.sort(key=lambda r: r[:3])
        made = evaluate_round([(raised, "repair", unit, up) for *_, unit, up, raised in raises[:batch_size]])
    seconds["repair"] = time.perf_counter() - tic

    feasible = [c for c in candidates if c.feasible]
    final = min(feasible, key=lambda c: c.memory_bytes).plan if feasible else candidates[-1].plan
    return SearchResult(baseline, tuple(candidates), final, FP32, q_levels, tuple(hierarchy.blocks), const_a,
                        const_m, higher_is_better, evaluator.evaluations, evaluator.calls, evaluator.journal_hits,
                        seconds, used=evaluator.evaluations, strategy="knapsack")
