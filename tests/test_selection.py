"""Trade-off selection, alpha ablation, Pareto front and the no-feasible-candidate report (qslm.md 3.4)."""

from __future__ import annotations

import pytest
from test_search import DAMAGE, LEVELS, DamageModel, small_hierarchy

from qslm_jax.errors import ConstraintError
from qslm_jax.qslm.search import Candidate, SearchResult, tiered_search
from qslm_jax.qslm.selection import (
    ALPHAS,
    NoFeasibleCandidate,
    alpha_ablation,
    closest_candidates,
    pareto_front,
    scored_candidates,
    select,
    trade_off_score,
    violation,
)
from qslm_jax.quant.memory import memory_bytes
from qslm_jax.quant.plan import QuantPlan

M0 = 400  # baseline memory (bytes) of the hand-made results


def cand(metric, memory, *, base=90.0, const_a=5.0, const_m=350.0, higher=True, level=8, after_stop=False):
    ok = (base - metric if higher else metric - base) <= const_a
    return Candidate(QuantPlan(level), "block", "b", level, metric, memory, memory / M0, ok,
                     ok and memory <= const_m, after_stop)


def result_of(cands, *, base=90.0, const_a=5.0, const_m=350.0, higher=True):
    baseline = cand(base, M0, base=base, const_a=const_a, const_m=const_m, higher=higher, level=32)
    return SearchResult(baseline, (baseline, *cands), QuantPlan(), 8, LEVELS, ("b",), const_a, const_m / 1e6,
                        higher, 0, 0, 0)


def test_trade_off_score_formulas():
    # classification: 80/90 - 0.5 * 100/400; generation: 22/20 + 0.5 * 100/400
    assert trade_off_score(80, 100, baseline_metric=90, baseline_bytes=400, alpha=0.5,
                           higher_is_better=True) == pytest.approx(80 / 90 - 0.125)
    assert trade_off_score(22, 100, baseline_metric=20, baseline_bytes=400, alpha=0.5,
                           higher_is_better=False) == pytest.approx(1.1 + 0.125)


def test_selection_and_alpha_ablation_by_hand():
    # S = A/90 - alpha M/400 for the feasible c1 (89, 200), c2 (86, 100), c4 (89.5, 300);
    # c3 (84) fails const_a = 5.
    # c1 = 0.98889 - 0.5a, c2 = 0.95556 - 0.25a, c4 = 0.99444 - 0.75a: c4 wins for a < 0.0222, c1 up to
    # a = 0.1333, c2 above. The fp32 baseline (400 B) is over the 350 B budget.
    c1, c2, c3, c4 = cand(89, 200), cand(86, 100), cand(84, 50), cand(89.5, 300)
    result = result_of([c1, c2, c3, c4])
    chosen = {alpha: s.candidate for alpha, s in alpha_ablation(result, (0.0, 0.1, 1.0)).items()}
    assert chosen == {0.0: c4, 0.1: c1, 1.0: c2}
    sel = select(result, 0.1)
    assert sel.score == pytest.approx(89 / 90 - 0.1 * 0.5)
    assert [c for c, _ in sel.ranking] == [c1, c2, c4]
    assert sel.to_dict()["alpha"] == 0.1 and sel.to_dict()["metric"] == 89
    assert set(alpha_ablation(result)) == set(ALPHAS)
    rows = scored_candidates(result, 0.0)
    assert [r["score"] for r in rows] == pytest.approx([1.0, 89 / 90, 86 / 90, 84 / 90, 89.5 / 90])


def test_lower_is_better_selection():
    # S = P/20 + alpha M/400: p1 (20.5, 300), p2 (23, 100) feasible with const_a = 4; p3 (25) is not.
    # alpha 0 picks the lower perplexity p1; alpha 1: p1 = 1.025 + 0.75 > p2 = 1.15 + 0.25.
    p1, p2, p3 = (cand(m, mem, base=20.0, const_a=4.0, higher=False) for m, mem in ((20.5, 300), (23, 100),
                                                                                   (25, 50)))
    result = result_of([p1, p2, p3], base=20.0, const_a=4.0, higher=False)
    assert select(result, 0.0).candidate == p1
    assert select(result, 1.0).candidate == p2
    assert select(result, 1.0).score == pytest.approx(23 / 20 + 0.25)


def test_ties_go_to_smaller_memory_and_after_stop_is_never_selected():
    a, b = cand(88, 300), cand(88, 200)
    late = cand(89.9, 50, after_stop=True)  # better in every way, but the sequential search never reached it
    assert select(result_of([a, b, late]), 0.0).candidate == b


def test_no_feasible_candidate_reports_the_closest():
    # const_a = 5, const_m = 350 B, baseline 90 / 400 B. Violations (drop excess / 90 + memory excess / 400):
    # baseline: 50/400 = 0.125; x (84, 300): 1/90 = 0.0111; y (80, 360): 5/90 + 10/400 = 0.0806.
    x, y = cand(84, 300), cand(80, 360)
    result = result_of([x, y])
    assert violation(x, result) == pytest.approx(1 / 90)
    assert violation(y, result) == pytest.approx(5 / 90 + 10 / 400)
    with pytest.raises(NoFeasibleCandidate) as info:
        select(result, 0.5)
    assert isinstance(info.value, ConstraintError)
    assert [c for c, _ in info.value.closest] == [x, y, result.baseline]
    assert "Closest" in str(info.value) and "const_m" in str(info.value)
    assert [c for c, _ in closest_candidates(result, k=1)] == [x]


def test_pareto_front():
    # (memory, metric): (100, 80) (200, 85) (200, 84: dominated) (300, 83: dominated) (400, 90) (50, 70)
    cs = [cand(80, 100), cand(85, 200), cand(84, 200), cand(83, 300), cand(90, 400), cand(70, 50)]
    front = pareto_front(cs, higher_is_better=True)
    assert [(c.memory_bytes, c.metric) for c in front] == [(50, 70), (100, 80), (200, 85), (400, 90)]
    # lower is better: only falling metrics with growing memory survive
    front = pareto_front(cs, higher_is_better=False)
    assert [(c.memory_bytes, c.metric) for c in front] == [(50, 70)]


def test_selection_on_a_real_search():
    hierarchy = small_hierarchy()
    budget = memory_bytes(hierarchy, QuantPlan(6)) / 1e6
    result = tiered_search(hierarchy, DamageModel(hierarchy, DAMAGE), levels=LEVELS, const_a=2.0,
                           const_m=budget, higher_is_better=True)
    best = select(result, 0.0).candidate
    assert best.metric == max(c.metric for c in result.feasible)
    small = select(result, 2.0).candidate
    assert small.memory_bytes == min(c.memory_bytes for c in result.feasible)  # here also the final plan
    assert small.plan == result.plan
