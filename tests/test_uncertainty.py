"""Bootstrap intervals (qslm_jax.qslm.uncertainty) on hand cases, and the --confidence pass rule of both search
strategies on a synthetic evaluator with per-example statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_search import DAMAGE, LEVELS, DamageModel, small_hierarchy

from qslm_jax.errors import ConfigError, DataError
from qslm_jax.qslm.journal import Journal
from qslm_jax.qslm.knapsack import knapsack_search
from qslm_jax.qslm.metrics import Accuracy, Perplexity
from qslm_jax.qslm.search import tiered_search
from qslm_jax.qslm.uncertainty import (
    Bootstrap,
    Evaluation,
    check_examples,
    intervals,
    resample_counts,
    resampled_metrics,
)
from qslm_jax.quant.plan import QuantPlan

ACCURACY = Bootstrap(Accuracy().finalize)
PERPLEXITY = Bootstrap(Perplexity().finalize)


def sentences(correct: list[int]) -> dict[str, np.ndarray]:
    return {"correct": np.array(correct, float), "examples": np.ones(len(correct))}


def windows(seed: int = 0, n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(50, 200, n).astype(float)  # uneven windows, as strided windows' last ones are
    return {"nll": tokens * rng.uniform(2.0, 6.0, n), "tokens": tokens}


def test_resamples_are_multinomial_and_reproducible():
    counts = resample_counts(25)
    assert counts.shape == (2000, 25) and (counts.sum(axis=1) == 25).all()
    assert counts is resample_counts(25) and not counts.flags.writeable
    assert (resample_counts(25, 2000, 0) == np.random.Generator(np.random.PCG64(0)).multinomial(
        25, np.full(25, 1 / 25), size=2000)).all()
    assert not (resample_counts(25, 2000, 1) == counts).all()


def test_all_correct_gives_a_zero_width_interval():
    assert ACCURACY.metric_ci(sentences([1] * 30)) == (100.0, 100.0)
    assert ACCURACY.metric_ci(sentences([0] * 30)) == (0.0, 0.0)


def test_paired_delta_of_identical_candidates_is_exactly_zero():
    mixed = sentences([1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 9)
    assert ACCURACY.delta_ci(mixed, mixed) == (0.0, 0.0)
    assert PERPLEXITY.delta_ci(windows(), windows()) == (0.0, 0.0)
    assert ACCURACY.worst_degradation(mixed, mixed, higher_is_better=True) == 0.0


def test_intervals_cover_the_point_estimate_and_shrink_with_more_examples():
    small = sentences([1, 0, 1, 1] * 25)  # 75% of 100
    large = sentences([1, 0, 1, 1] * 250)  # 75% of 1000
    low, high = ACCURACY.metric_ci(small)
    assert low < 75.0 < high
    # binomial standard error sqrt(.75 .25 / n): the 95% interval is about +-1.96 of it
    assert high - low == pytest.approx(2 * 1.96 * 100 * math.sqrt(0.75 * 0.25 / 100), rel=0.15)
    low_l, high_l = ACCURACY.metric_ci(large)
    assert high_l - low_l < (high - low) / 2.5
    point = Perplexity().finalize({k: v.sum() for k, v in windows().items()})
    low, high = PERPLEXITY.metric_ci(windows())
    assert low < point < high


def test_perplexity_resample_is_the_metric_when_nothing_is_resampled():
    """Counts of 1 give exp(sum nll / sum tokens), not the mean of per-window perplexities."""
    stats = windows()
    got = resampled_metrics(Perplexity().finalize, stats, np.ones((1, 40)))
    assert got[0] == pytest.approx(math.exp(stats["nll"].sum() / stats["tokens"].sum()), rel=1e-12)
    assert got[0] != pytest.approx(np.mean(np.exp(stats["nll"] / stats["tokens"])), rel=1e-3)
    # a hand resample: window 0 twice, window 1 once, the rest not drawn
    counts = np.zeros((1, 40))
    counts[0, :2] = (2, 1)
    expected = math.exp((2 * stats["nll"][0] + stats["nll"][1]) / (2 * stats["tokens"][0] + stats["tokens"][1]))
    assert resampled_metrics(Perplexity().finalize, stats, counts)[0] == pytest.approx(expected, rel=1e-12)


def test_paired_interval_is_narrower_than_the_unpaired_difference():
    """Two candidates that share most errors: pairing cancels the shared example-to-example variation."""
    base = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 20
    worse = list(base)
    worse[0] = worse[2] = 0  # two sentences lost: -1 point of 200
    low, high = ACCURACY.delta_ci(sentences(worse), sentences(base))
    assert low < -1.0 <= high <= 0.0  # never better: every resample loses 0 or more of the two
    spread = np.subtract(*ACCURACY.metric_ci(sentences(base))[::-1])
    assert high - low < spread / 3
    assert ACCURACY.worst_degradation(sentences(worse), sentences(base), higher_is_better=True) == -low
    worse_ppl = {"nll": windows()["nll"] * 1.01, "tokens": windows()["tokens"]}
    assert PERPLEXITY.worst_degradation(worse_ppl, windows(), higher_is_better=False) == \
        PERPLEXITY.delta_ci(worse_ppl, windows())[1] > 0


def test_bad_statistics_and_levels_are_refused():
    with pytest.raises(DataError, match="same non-zero length"):
        check_examples({"correct": [1, 0], "examples": [1]}, "here")
    with pytest.raises(DataError, match="list of numbers"):
        check_examples({"nll": [[1.0], [2.0]], "tokens": [1, 1]}, "here")
    broken = {"nll": np.array([1.0, math.inf]), "tokens": np.ones(2)}  # a candidate whose NLL overflowed
    assert check_examples(broken, "here")["nll"][1] == math.inf
    assert all(math.isnan(x) for x in PERPLEXITY.metric_ci(broken) + PERPLEXITY.delta_ci(broken, windows(n=2)))
    assert math.isnan(PERPLEXITY.worst_degradation(broken, windows(n=2), higher_is_better=False))
    with pytest.raises(DataError, match="map statistic names"):
        check_examples([1, 2], "here")
    with pytest.raises(DataError, match="same examples"):
        ACCURACY.delta_ci(sentences([1, 0]), sentences([1, 0, 1]))
    with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
        Bootstrap(Accuracy().finalize, level=1.0)
    assert intervals(ACCURACY, sentences([1, 1]), sentences([1, 1])) == {"metric_ci": [100.0, 100.0],
                                                                          "delta_ci": [0.0, 0.0]}


N = 2000  # examples; one example is 0.05 points, so DAMAGE (multiples of 0.05) is a whole number of examples


class ExampleDamageModel(DamageModel):
    """:class:`DamageModel` as a real accuracy over N sentences: the fp32 plan gets the first 90% right and a
    plan with ``d`` points of damage loses the first ``20 d`` of them (same metric as DamageModel)."""

    def __call__(self, plans):
        self.batches.append(list(plans))
        out = []
        for plan in plans:
            lost = round(20 * (self.base - self.metric(plan)))
            correct = np.r_[np.zeros(lost), np.ones(round(N * self.base / 100) - lost)]
            correct = np.r_[correct, np.zeros(N - len(correct))]
            stats = {"correct": correct, "examples": np.ones(N)}
            out.append(Evaluation(Accuracy().finalize({k: v.sum() for k, v in stats.items()}), stats))
        return out


def _search(strategy, confidence=None, journal=None, model=None):
    model = model or ExampleDamageModel(small_hierarchy(), DAMAGE)
    common = dict(levels=LEVELS, const_a=2.0, const_m=1.0, higher_is_better=True, journal=journal,
                  confidence=confidence)
    if strategy == "knapsack":
        return knapsack_search(model.hierarchy, model, **common)
    return tiered_search(model.hierarchy, model, **common)


@pytest.mark.parametrize("strategy", ["tiered", "knapsack"])
def test_confidence_fails_a_borderline_candidate_the_point_rule_passes(strategy):
    point = _search(strategy)
    point_plain = (tiered_search if strategy == "tiered" else knapsack_search)(
        small_hierarchy(), DamageModel(small_hierarchy(), DAMAGE), levels=LEVELS, const_a=2.0, const_m=1.0,
        higher_is_better=True)
    assert [(c.plan.key(), c.ok) for c in point.candidates] == [(c.plan.key(), c.ok) for c in point_plain.candidates]
    strict = _search(strategy, confidence=Bootstrap(Accuracy().finalize))
    base = ExampleDamageModel(small_hierarchy(), DAMAGE)([QuantPlan()])[0].examples
    borderline = 0
    for cand in strict.candidates:
        examples = ExampleDamageModel(small_hierarchy(), DAMAGE)([cand.plan])[0].examples
        low, _ = ACCURACY.delta_ci(examples, base)
        drop = 90.0 - cand.metric
        assert cand.ok == (drop <= 2.0 + 1e-9 and -low <= 2.0)
        borderline += drop <= 2.0 + 1e-9 and not cand.ok
    assert borderline >= 1  # at least one candidate passes the point rule and fails the interval rule
    assert strict.plan != point.plan  # and it changes what the search ends with


def test_confidence_needs_per_example_statistics():
    with pytest.raises(ConfigError, match="per-example statistics"):
        tiered_search(small_hierarchy(), DamageModel(small_hierarchy(), DAMAGE), levels=LEVELS, const_a=2.0,
                      const_m=1.0, higher_is_better=True, confidence=ACCURACY)


def test_a_resumed_search_gives_identical_intervals(tmp_path):
    path = tmp_path / "journal.jsonl"
    first = _search("tiered", confidence=ACCURACY, journal=Journal(path, {"model": "synthetic"}))
    resumed_model = ExampleDamageModel(small_hierarchy(), DAMAGE)
    journal = Journal(path, {"model": "synthetic"})
    second = _search("tiered", confidence=ACCURACY, journal=journal, model=resumed_model)
    assert resumed_model.calls == 0 and second.journal_hits > 0
    assert second.candidates == first.candidates
    base = ExampleDamageModel(small_hierarchy(), DAMAGE)([QuantPlan()])[0].examples
    for cand in first.candidates:
        fresh = ExampleDamageModel(small_hierarchy(), DAMAGE)([cand.plan])[0].examples
        assert intervals(ACCURACY, journal.examples(cand.plan.key()), journal.examples(QuantPlan().key())) == \
            intervals(ACCURACY, fresh, base)
