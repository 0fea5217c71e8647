"""Tiered search (qslm.md section 3) on synthetic evaluators with hand-computed answers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from qslm_jax.errors import ConfigError
from qslm_jax.qslm.journal import Journal
from qslm_jax.qslm.search import (
    MODEL_UNIT,
    degradation,
    search_levels,
    sensitivity_order,
    sensitivity_plans,
    sensitivity_table,
    tiered_search,
)
from qslm_jax.qslm.selection import select
from qslm_jax.quant.hierarchy import Hierarchy
from qslm_jax.quant.memory import memory_bytes
from qslm_jax.quant.plan import QuantPlan

LEVELS = (8, 6, 4, 2)


def small_hierarchy() -> Hierarchy:
    """input, two attention blocks with two modules each, output; 1-D fp32 vectors in the attention blocks."""
    return Hierarchy.from_spec(
        {"input": 1000, "attention_0": {"att.key": 400, "att.value": 400},
         "attention_1": {"att.key": 400, "att.value": 400}, "output": 1000},
        {"attention_0": 16, "attention_1": 16},
    )


# Damage (metric points lost) of each unit at levels 8, 6, 4, 2; 0 at 32. Units are the modules of attention
# blocks and the module-less blocks input/output.
DAMAGE = {
    "input": (0.1, 0.5, 3.0, 9.0),
    "attention_0/att.key": (0.0, 0.1, 0.2, 1.0),
    "attention_0/att.value": (0.0, 0.1, 0.3, 4.0),
    "attention_1/att.key": (0.0, 0.2, 0.5, 5.0),
    "attention_1/att.value": (0.0, 0.0, 0.15, 0.2),
    "output": (0.2, 0.4, 5.0, 9.0),
}


class DamageModel:
    """A metric that is a known sum over units: ``base -/+ sum_u damage_u(bits_u(plan))``.

    Counts calls and the plans of each call. ``higher_is_better`` picks accuracy-like (minus) or
    perplexity-like (plus) behaviour.
    """

    def __init__(self, hierarchy: Hierarchy, damage: dict, *, base: float = 90.0,
                 higher_is_better: bool = True, levels=LEVELS):
        self.hierarchy, self.base, self.sign = hierarchy, base, -1 if higher_is_better else 1
        self.table = {unit: dict(zip(levels, values, strict=True)) | {32: 0.0}
                      for unit, values in damage.items()}
        self.batches: list[list[QuantPlan]] = []

    def unit_bits(self, plan: QuantPlan, unit: str):
        return plan.module_bits(unit) if "/" in unit else plan.block_bits(unit)

    def metric(self, plan: QuantPlan) -> float:
        return self.base + self.sign * sum(self.table[u][self.unit_bits(plan, u)] for u in self.table)

    def __call__(self, plans):
        self.batches.append(list(plans))
        return [self.metric(p) for p in plans]

    @property
    def calls(self) -> int:
        return len(self.batches)


def sequential_search(hierarchy, evaluate_one, levels, const_a, higher_is_better, stop=True):
    """Reference: the per-level loop of qslm.md section 3 written plainly, one evaluation at a time
    (``stop=False``: no stop at a unit's first failure; the unit keeps its lowest passing level)."""
    base = evaluate_one(QuantPlan())
    ok = lambda m: degradation(m, base, higher_is_better) <= const_a  # noqa: E731
    visited = []
    plan = QuantPlan()
    for q in levels:
        cand = QuantPlan(default=q)
        m = evaluate_one(cand)
        visited.append(("global", MODEL_UNIT, q, cand.key(), m))
        if ok(m):
            plan = cand
        elif stop:
            break
    units = [(b, "block") for b in hierarchy.blocks]
    units += [(m, "module") for b in hierarchy.blocks for m in hierarchy.modules_of(b)]
    for unit, phase in units:
        current = plan.block_bits(unit) if phase == "block" else plan.module_bits(unit)
        kept = plan
        for q in [q for q in levels if q < current]:
            cand = plan.with_block(unit, q) if phase == "block" else plan.with_module(unit, q)
            m = evaluate_one(cand)
            visited.append((phase, unit, q, cand.key(), m))
            if ok(m):
                kept = cand
            elif stop:
                break
        plan = kept
    return plan, visited


def run(model: DamageModel, **kwargs):
    args = dict(levels=LEVELS, const_a=2.0, const_m=1.0, higher_is_better=True) | kwargs
    return tiered_search(model.hierarchy, model, **args)


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_hand_computed_search(higher_is_better):
    # Hand computation with const_a = 2 (damages from DAMAGE):
    # global: 8 -> 0.3 ok, 6 -> 1.3 ok, 4 -> 9.15 fail (2 not reached): q_g = 6.
    # block: input 4 -> 1.3-0.5+3 = 3.8 fail; attention_0 4 -> 1.3-0.2+0.5 = 1.6 ok, 2 -> 6.1 fail: keeps 4;
    #        attention_1 4 -> 1.6-0.2+0.65 = 2.05 fail; output 4 -> 6.2 fail.
    # module: attention_0/att.key 2 -> 1.6-0.2+1.0 = 2.4 fail; attention_0/att.value 2 -> 5.3 fail;
    #         attention_1/att.key 4 -> 1.6-0.2+0.5 = 1.9 ok, 2 -> 6.4 fail;
    #         attention_1/att.value 4 -> 2.05 fail.
    hierarchy = small_hierarchy()
    model = DamageModel(hierarchy, DAMAGE, higher_is_better=higher_is_better)
    result = run(model, higher_is_better=higher_is_better)
    assert result.global_level == 6
    assert result.plan == QuantPlan(6, {"attention_0": 4}, {"attention_1/att.key": 4})
    final = model.metric(result.plan)
    assert final == pytest.approx(90 - 1.9 if higher_is_better else 90 + 1.9)
    # 14 steps: baseline, global 8 6 4, blocks 4 | 4 2 | 4 | 4, modules 2 | 2 | 4 2 | 4. Without a sensitivity
    # table nothing is predicted: the baseline shares a call with the first global plan, the rest go one by one
    assert result.calls == model.calls == 13
    assert [len(b) for b in model.batches] == [2] + [1] * 12
    assert result.evaluations == result.used == 14 == len(result.candidates)
    assert not any(c.after_stop for c in result.candidates)
    assert result.baseline.metric == 90 and result.baseline.phase == "baseline"
    assert set(result.seconds) == {"baseline", "global", "block", "module"}


def test_candidates_record_memory_ok_and_feasibility():
    hierarchy = small_hierarchy()
    model = DamageModel(hierarchy, DAMAGE)
    budget_mb = memory_bytes(hierarchy, QuantPlan(6)) / 1e6  # feasible: ok and at most the all-6-bit memory
    result = run(model, const_m=budget_mb)
    for c in result.candidates:
        assert c.memory_bytes == memory_bytes(hierarchy, c.plan)
        assert c.memory_fraction == pytest.approx(c.memory_bytes / hierarchy.fp32_bytes)
        assert c.metric == pytest.approx(model.metric(c.plan))
        assert c.ok == (90 - c.metric <= 2.0)
        assert c.feasible == (c.ok and c.memory_bytes <= budget_mb * 1e6)
    assert result.baseline.ok and not result.baseline.feasible  # fp32 is over the budget
    feasible_keys = {c.plan.key() for c in result.feasible}
    assert QuantPlan(6).key() in feasible_keys and QuantPlan(8).key() not in feasible_keys
    assert result.to_dict()["candidates"][0]["plan"] == QuantPlan().to_dict()


def test_global_first_level_failing_keeps_fp32_and_blocks_start_at_32():
    hierarchy = Hierarchy.from_spec({"input": 100, "attention_0": {"att.key": 100}, "output": 100})
    damage = {"input": (0.0, 0.0, 0.0, 0.0), "attention_0/att.key": (0.0, 0.5, 3.0, 3.0),
              "output": (5.0, 5.0, 5.0, 5.0)}  # output fails everywhere: so does every global level
    model = DamageModel(hierarchy, damage)
    result = run(model)
    assert result.global_level == 32
    # input goes to the lowest level; attention_0 passes 8 and 6 (0.5), fails 4; output stays fp32;
    # the module phase starts below the block level 6 and fails at 4.
    assert result.plan == QuantPlan(32, {"input": 2, "attention_0": 6})
    global_cands = [c for c in result.candidates if c.phase == "global"]
    assert [c.level for c in global_cands] == [8]  # the first global level fails: no lower one is reached


def test_non_monotone_metric_stop_rule_and_no_stop():
    # Damage 0.3 at 8, 5 at 6, 0.5 at 4, 9 at 2: the 4-bit plan passes `ok` but lies after the first failure.
    hierarchy = Hierarchy.from_spec({"only": 100})
    model = DamageModel(hierarchy, {"only": (0.3, 5.0, 0.5, 9.0)})
    result = run(model)
    assert result.global_level == 8 and result.plan == QuantPlan(8)
    assert all(c.level != 4 for c in result.candidates if not c.after_stop)  # the paper's rule never reaches 4
    assert {c.level for c in result.feasible} == {32, 8}  # fp32 baseline (within 1 MB) and the global 8
    # --no-stop: every level of every unit, the unit keeps the lowest that passed
    no_stop = run(DamageModel(hierarchy, {"only": (0.3, 5.0, 0.5, 9.0)}), stop=False)
    assert no_stop.global_level == 4 and no_stop.plan == QuantPlan(4)
    assert [c.level for c in no_stop.candidates if c.phase == "global"] == [8, 6, 4, 2]
    assert {c.level for c in no_stop.feasible} == {32, 8, 4}
    assert no_stop.strategy == "tiered-no-stop" and not any(c.after_stop for c in no_stop.candidates)


@pytest.mark.parametrize("stop", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_scheduled_search_equals_sequential_loop(seed, stop):
    rng = np.random.default_rng(seed)
    hierarchy = small_hierarchy()
    # random, partly non-monotone damages: cumulative sums with occasional negative steps
    damage = {u: tuple(np.round(np.cumsum(rng.uniform(-0.3, 1.2, len(LEVELS))), 3)) for u in DAMAGE}
    higher = bool(seed % 2)
    const_a = float(rng.uniform(0.5, 4.0))
    one_at_a_time = DamageModel(hierarchy, damage, higher_is_better=higher)
    plan, visited = sequential_search(hierarchy, lambda p: one_at_a_time([p])[0], LEVELS, const_a, higher, stop)
    table = sensitivity_table(hierarchy, DamageModel(hierarchy, damage, higher_is_better=higher), LEVELS)
    for sensitivity in (None, table):  # without and with speculation
        batched_model = DamageModel(hierarchy, damage, higher_is_better=higher)
        result = run(batched_model, const_a=const_a, higher_is_better=higher, stop=stop, sensitivity=sensitivity)
        assert result.plan == plan
        reached = [(c.phase, c.unit, c.level, c.plan.key(), c.metric) for c in result.candidates
                   if c.phase != "baseline" and not c.after_stop]
        assert reached == visited
        assert all(len(b) in (1, 2, 4, 8) for b in batched_model.batches)  # allowed sizes only: no padding
        assert result.used == len(visited) + 1
        assert result.evaluations == sum(map(len, batched_model.batches)) == len(result.candidates)
        assert select(result, 0.5).candidate.plan == select(reference_result(result, visited), 0.5).candidate.plan


def reference_result(result, visited):
    """``result`` with its candidates replaced by the sequential loop's (for comparing selections)."""
    keep = {key for *_, key, _ in visited} | {QuantPlan().key()}
    return dataclasses.replace(result, candidates=tuple(c for c in result.candidates if c.plan.key() in keep))


WIKITEXT_LEVELS = (32, 16, 12, 8, 6, 4, 3, 2)
SPIKEGPT_MODULES = {"att.key": 1, "att.value": 1, "att.receptance": 1, "att.output": 1, "ffn.key": 4,
                    "ffn.value": 4, "ffn.receptance": 1}


def wikitext_like(n_blocks=4, seed=0):
    """A WikiText-like case: input, 4 attention blocks of 7 SpikeGPT modules, output; a perplexity whose damage
    grows fast below 8 bits, with interactions (the damages compound) and a plan-dependent jitter, so the
    additive prediction from the sensitivity table is only approximately right."""
    rng = np.random.default_rng(seed)
    c = 64
    spec = {"input": 50 * c} | {f"attention_{i}": {m: k * c * c for m, k in SPIKEGPT_MODULES.items()}
                                for i in range(n_blocks)} | {"output": 50 * c}
    hierarchy = Hierarchy.from_spec(spec, {f"attention_{i}": 4 * c for i in range(n_blocks)})
    profile = np.array([0.0, 0.01, 0.05, 0.3, 1.0, 2.5, 6.0])  # levels 16 .. 2
    scale = {u: float(rng.uniform(0.02, 0.12)) * (4 if u in ("input", "output") else 1)
             for u in ("input", "output", *hierarchy.modules)}
    damage = {u: tuple(np.round(k * profile * rng.uniform(0.8, 1.2, 7), 4)) for u, k in scale.items()}

    class Jittered(DamageModel):
        def metric(self, plan):
            total = super().metric(plan) - self.base
            jitter = (hash(plan.key()) % 1000) / 1000 - 0.5
            return self.base + total * (1 + 0.15 * total) + 0.03 * jitter

    return hierarchy, Jittered(hierarchy, damage, base=26.5, higher_is_better=False, levels=WIKITEXT_LEVELS[1:])


@pytest.mark.parametrize("const_a", [1.0, 4.0])
@pytest.mark.parametrize("stop", [True, False])
def test_wikitext_like_search_uses_at_least_90_percent_of_its_slots(const_a, stop):
    hierarchy, model = wikitext_like()
    table = sensitivity_table(hierarchy, model, WIKITEXT_LEVELS)
    model.batches.clear()
    result = tiered_search(hierarchy, model, levels=WIKITEXT_LEVELS, const_a=const_a, const_m=1.0,
                           higher_is_better=False, sensitivity=table, stop=stop)
    slots = sum(map(len, model.batches))
    assert result.used / slots >= 0.9
    one_at_a_time = DamageModel(hierarchy, {}, higher_is_better=False)
    one_at_a_time.metric = model.metric
    plan, visited = sequential_search(hierarchy, lambda p: one_at_a_time([p])[0], WIKITEXT_LEVELS[1:], const_a,
                                      False, stop)
    assert result.plan == plan and result.used == len(visited) + 1
    # the former schedule made one call of 8 slots per unit (all its levels, padded): twice the slots or more
    assert slots * 2 <= 8 * (1 + len({(phase, unit) for phase, unit, *_ in visited}))


def test_module_phase_goes_below_block_level_and_module_overrides_block():
    hierarchy = small_hierarchy()
    damage = dict(DAMAGE) | {"attention_0/att.key": (0.0, 0.0, 0.0, 0.1)}
    model = DamageModel(hierarchy, damage)
    result = run(model)
    assert result.plan.block_bits("attention_0") == 4
    assert result.plan.module_bits("attention_0/att.key") == 2  # the module override wins over its block's
    assert result.plan.module_bits("attention_0/att.value") == 4
    module_cands = [c for c in result.candidates if c.phase == "module"]
    assert all(c.level < c.plan.block_bits(c.unit.partition("/")[0]) for c in module_cands)
    assert {c.unit for c in module_cands} <= set(hierarchy.modules)


def test_order_is_followed_and_validated():
    hierarchy = small_hierarchy()
    order = ("output", "attention_1", "attention_0", "input")
    result = run(DamageModel(hierarchy, DAMAGE), order=order)
    blocks_seen = list(dict.fromkeys(c.unit for c in result.candidates if c.phase == "block"))
    assert tuple(blocks_seen) == order
    modules_seen = list(dict.fromkeys(c.unit for c in result.candidates if c.phase == "module"))
    assert modules_seen[0].startswith("attention_1/")
    with pytest.raises(ConfigError, match="missing"):
        run(DamageModel(hierarchy, DAMAGE), order=("input", "output"))


def test_infeasible_memory_budget_still_searches():
    model = DamageModel(small_hierarchy(), DAMAGE)
    result = run(model, const_m=1e-6)  # 1 byte
    assert result.feasible == ()
    assert result.plan == QuantPlan(6, {"attention_0": 4}, {"attention_1/att.key": 4})  # ok-driven as before


def test_bad_evaluator_and_constraints_are_reported():
    hierarchy = small_hierarchy()
    with pytest.raises(ConfigError, match="one metric per plan"):
        tiered_search(hierarchy, lambda plans: [1.0], levels=LEVELS, const_a=1, const_m=1,
                      higher_is_better=True)
    with pytest.raises(ConfigError, match="baseline"):
        tiered_search(hierarchy, lambda plans: [math.nan] * len(plans), levels=LEVELS, const_a=1, const_m=1,
                      higher_is_better=True)
    with pytest.raises(ConfigError, match="const_a"):
        run(DamageModel(hierarchy, DAMAGE), const_a=-1)


def test_search_levels_sorted_without_fp32():
    assert search_levels([2, 32, 8, 4, 8, 1.58]) == (8, 4, 2, 1.58)
    with pytest.raises(ConfigError):
        search_levels([7.5])


def test_sensitivity_plans_and_table_are_one_batch():
    hierarchy = small_hierarchy()
    plans = sensitivity_plans(hierarchy, (32, *LEVELS))
    assert len(plans) == len(hierarchy.blocks) * len(LEVELS)
    assert plans[0] == QuantPlan(blocks={"input": 8}) and plans[-1] == QuantPlan(blocks={"output": 2})
    model = DamageModel(hierarchy, DAMAGE)
    table = sensitivity_table(hierarchy, model, LEVELS)
    assert model.calls == 1
    # attention_0 alone at 4 bits: its two modules lose 0.2 + 0.3
    assert table["attention_0"][4] == pytest.approx(90 - 0.5)
    assert table["input"][2] == pytest.approx(90 - 9.0)


def test_sensitivity_order_least_sensitive_first():
    # const_a = 1. reach (lowest level of the passing prefix): a -> 2, b -> 4 (degradation 0.8 at 4),
    # c -> 4 (0.2 at 4), d -> 32 (fails at 8). Order: a, then c before b (smaller cost at the same reach), d.
    table = {
        "d": {8: 88.0, 6: 80.0, 4: 70.0, 2: 60.0},
        "b": {8: 90.0, 6: 89.9, 4: 89.2, 2: 50.0},
        "c": {8: 90.0, 6: 89.9, 4: 89.8, 2: 80.0},
        "a": {8: 90.0, 6: 90.0, 4: 89.9, 2: 89.5},
    }
    assert sensitivity_order(table, 90.0, const_a=1.0, higher_is_better=True) == ("a", "c", "b", "d")
    # lower is better: the same table mirrored around the baseline gives the same order
    mirrored = {b: {q: 180.0 - m for q, m in row.items()} for b, row in table.items()}
    assert sensitivity_order(mirrored, 90.0, const_a=1.0, higher_is_better=False) == ("a", "c", "b", "d")


@pytest.mark.parametrize("stop", [True, False])
def test_journal_resume_replays_the_schedule_with_no_evaluation(tmp_path, stop):
    hierarchy, model = wikitext_like(seed=1)
    table = sensitivity_table(hierarchy, model, WIKITEXT_LEVELS)
    args = dict(levels=WIKITEXT_LEVELS, const_a=2.0, const_m=1.0, higher_is_better=False, sensitivity=table,
                stop=stop)
    first = tiered_search(hierarchy, model, journal=Journal(tmp_path / "j.jsonl", {"case": 1}), **args)
    calls = model.calls
    second = tiered_search(hierarchy, model, journal=Journal(tmp_path / "j.jsonl", {"case": 1}), **args)
    assert model.calls == calls and second.evaluations == second.calls == second.used == 0
    assert second.journal_hits == first.evaluations > 0
    assert [c.to_dict() for c in second.candidates] == [c.to_dict() for c in first.candidates]
