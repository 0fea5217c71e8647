"""The knapsack strategy (qslm_jax.qslm.knapsack) on synthetic evaluators with known metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_search import WIKITEXT_LEVELS, DamageModel, wikitext_like

from qslm_jax.errors import ConfigError
from qslm_jax.qslm.journal import Journal
from qslm_jax.qslm.knapsack import (
    knapsack_search,
    knapsack_units,
    plan_of,
    solve_knapsack,
    unit_level,
    unit_plan,
    unit_sensitivity_plans,
)
from qslm_jax.qslm.selection import select
from qslm_jax.quant.memory import memory_bytes
from qslm_jax.quant.plan import QuantPlan


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    levels = (32, 8, 4, 2)
    options = {}
    for u in range(4):
        cost = np.sort(rng.uniform(0, 2, 3))  # damage grows as bits fall
        memory = np.sort(rng.uniform(10, 100, 3))[::-1]
        options[f"u{u}"] = {32: (0.0, 400.0)} | {q: (float(c), float(m)) for q, c, m in
                                                  zip(levels[1:], cost, np.sort(memory), strict=True)}
    budget = float(rng.uniform(0.5, 4))
    best = min((combo for combo in itertools.product(levels, repeat=4)
                if sum(options[f"u{i}"][q][0] for i, q in enumerate(combo)) <= budget),
               key=lambda combo: sum(options[f"u{i}"][q][1] for i, q in enumerate(combo)))
    got = solve_knapsack(options, budget, resolution=20000)
    memory = sum(options[u][q][1] for u, q in got.items())
    assert sum(options[u][q][0] for u, q in got.items()) <= budget
    assert memory == pytest.approx(sum(options[f"u{i}"][q][1] for i, q in enumerate(best)))
    assert solve_knapsack(options, 0.0) == dict.fromkeys(options, 32)  # every level costs something
    with pytest.raises(ConfigError, match="budget"):
        solve_knapsack(options, -1.0)


def test_units_and_plans():
    hierarchy, _ = wikitext_like()
    units = knapsack_units(hierarchy)
    assert units[0] == "input" and units[-1] == "output" and len(units) == 2 + 4 * 7
    plans = unit_sensitivity_plans(hierarchy, WIKITEXT_LEVELS)
    assert len(plans) == len(units) * 7 and plans[0] == QuantPlan(blocks={"input": 16})
    assert plan_of({"input": 32, "attention_0/att.key": 4}) == QuantPlan(modules={"attention_0/att.key": 4})


@pytest.mark.parametrize("const_a", [1.0, 4.0])
def test_knapsack_finds_a_feasible_small_plan(const_a):
    hierarchy, model = wikitext_like()
    const_m = 0.5 * hierarchy.fp32_bytes / 1e6
    result = knapsack_search(hierarchy, model, levels=WIKITEXT_LEVELS, const_a=const_a, const_m=const_m,
                             higher_is_better=False)
    best = select(result, 0.5).candidate
    assert best.feasible and model.metric(best.plan) - 26.5 <= const_a
    assert result.strategy == "knapsack" and result.used == result.evaluations
    # sensitivity table: baseline + one call of 30 units x 7 levels; then one knapsack call of at most 8 plans
    assert [len(b) for b in model.batches[:3]][:2] == [1, 30 * 7] and len(model.batches[2]) <= 8
    assert all(c.memory_bytes == memory_bytes(hierarchy, c.plan) for c in result.candidates)


def test_repair_raises_the_unit_that_hurts_most_when_the_prediction_is_wrong():
    hierarchy, _ = wikitext_like()

    class Compounding(DamageModel):  # damages multiply each other: the additive prediction is far too low
        def metric(self, plan):
            total = super().metric(plan) - self.base
            return self.base + total * (1 + 2.0 * total)

    _, reference = wikitext_like()
    model = Compounding(hierarchy, {u: tuple(row[q] for q in WIKITEXT_LEVELS[1:]) for u, row in
                                    reference.table.items()}, base=26.5, higher_is_better=False,
                        levels=WIKITEXT_LEVELS[1:])
    result = knapsack_search(hierarchy, model, levels=WIKITEXT_LEVELS, const_a=1.0, const_m=1e9,
                             higher_is_better=False, fractions=(1.0,))
    first, *_ = [c for c in result.candidates if c.phase == "knapsack"]
    assert not first.ok  # the knapsack optimum breaks the constraint for real
    repairs = [c for c in result.candidates if c.phase == "repair"]
    last_call = len(model.batches[-1])
    assert any(c.feasible for c in repairs[-last_call:])  # the repair stops at the first call with a feasible plan
    assert not any(c.feasible for c in result.candidates[1:-last_call])  # the fp32 baseline aside
    assert result.plan == min((c for c in result.candidates if c.feasible), key=lambda c: c.memory_bytes).plan
    # the first repair call raises units one level each, the largest predicted damage removed first
    assert all(len(b) <= 8 for b in model.batches[2:])
    units = [c.unit for c in repairs[:8]]
    assert len(set(units)) == len(units)

    def gain(unit):  # the damage (alone) that raising the unit one level removes
        q = unit_level(first.plan, unit)
        up = ladder[ladder.index(q) + 1]
        return model.metric(unit_plan(unit, q)) - model.metric(unit_plan(unit, up))

    ladder = sorted(WIKITEXT_LEVELS)
    gains = [gain(u) for u in units]
    others = [gain(u) for u in knapsack_units(hierarchy) if u not in units and unit_level(first.plan, u) != 32]
    assert gains == sorted(gains, reverse=True) and min(gains) >= max(others, default=-np.inf)
    for c in repairs[:8]:
        assert sum(a != b for a, b in ((c.plan.module_bits(m) if "/" in m else c.plan.block_bits(m),
                                        first.plan.module_bits(m) if "/" in m else first.plan.block_bits(m))
                                       for m in knapsack_units(hierarchy))) == 1


def test_knapsack_resumes_from_the_journal_with_no_evaluation(tmp_path):
    hierarchy, model = wikitext_like(seed=2)
    args = dict(levels=WIKITEXT_LEVELS, const_a=2.0, const_m=0.4 * hierarchy.fp32_bytes / 1e6,
                higher_is_better=False)
    first = knapsack_search(hierarchy, model, journal=Journal(tmp_path / "j.jsonl", {"k": 1}), **args)
    calls = model.calls
    second = knapsack_search(hierarchy, model, journal=Journal(tmp_path / "j.jsonl", {"k": 1}), **args)
    assert model.calls == calls and second.evaluations == 0 and second.journal_hits == first.evaluations
    assert [c.to_dict() for c in second.candidates] == [c.to_dict() for c in first.candidates]


def test_unreachable_memory_budget_gives_no_feasible_candidate():
    hierarchy, model = wikitext_like()
    result = knapsack_search(hierarchy, model, levels=WIKITEXT_LEVELS, const_a=1.0, const_m=1e-3,
                             higher_is_better=False)
    assert result.feasible == () and not any(c.phase == "repair" for c in result.candidates)
