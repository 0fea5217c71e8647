"""The report figures draw what their captions promise: Pareto front, constraints, readable axes, units."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import SymLogNorm

from qslm_jax.qslm import report

FP32 = 50e6
BUDGET = 20e6


def _cand(mb, metric, feasible, after_stop=False):
    return {"memory_bytes": mb * 1e6, "memory_fraction": mb * 1e6 / FP32, "metric": metric, "feasible": feasible,
            "after_stop": after_stop, "plan": {}}


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, kept open (their ``plt.close`` is intercepted)."""
    kept = []
    close = plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _line(ax, prefix):
    return next(line for line in ax.get_lines() if line.get_label().startswith(prefix))


ACCURACY = [_cand(3, 50.0, False), _cand(5, 79.0, True), _cand(6, 79.5, True), _cand(6.5, 79.2, True),
            _cand(8, 80.0, True), _cand(4, 80.2, True, after_stop=True), _cand(5.5, 77.0, False),
            _cand(25, 80.4, False)]


def test_pareto_plot_draws_the_feasible_front_constraints_and_a_log_memory_axis(tmp_path, figures):
    path = tmp_path / "pareto.png"
    title = report.search_title({"task": "sst2", "case": "a1", "eval_limit": None,
                                 "model": {"preset": "spikegpt-small", "weights": "embedded default"}})
    report.plot_pareto(path, ACCURACY, baseline={"metric": 80.5, "memory_bytes": FP32}, const_a=2.0,
                       const_m_bytes=BUDGET, selection=ACCURACY[4], metric_name="accuracy (%)",
                       higher_is_better=True, title=title)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "log"
    assert figures[0].get_suptitle() == "QSLM search: spikegpt-small, sst2, case a1"
    legend = _legend(ax)
    for wanted in ("feasible region", "performance bound: 78.5", "memory budget: 20 MB", "fp32 baseline",
                   "selection", "Pareto front of the feasible (3)", "1 off the scale"):
        assert any(text.startswith(wanted) for text in legend), (wanted, legend)
    # the front: selectable feasible points no other beats (6.5 MB is dominated by 6 MB; the after-stop
    # point at 4 MB and the infeasible ones are not selectable), extended to the budget
    front = _line(ax, "Pareto front")
    np.testing.assert_allclose(front.get_xdata(), [5, 6, 8, 20])
    np.testing.assert_allclose(front.get_ydata(), [79.0, 79.5, 80.0, 80.0])
    # the 50% outlier does not stretch the y-axis: it sits on the lower edge; bound and baseline are shown
    low, high = ax.get_ylim()
    assert 50.0 < low < 77.0 and high > 80.5


def test_pareto_plot_of_perplexity_keeps_outliers_off_the_scale(tmp_path, figures):
    candidates = [_cand(2, 61000.0, False), _cand(4, 9000.0, False), _cand(10, 733.4, True),
                  _cand(12, 732.6, True), _cand(15, 732.9, True), _cand(18, 741.0, False)]
    report.plot_pareto(tmp_path / "p.png", candidates, baseline={"metric": 732.0, "memory_bytes": FP32},
                       const_a=1.0, const_m_bytes=BUDGET, selection=None, metric_name="perplexity",
                       higher_is_better=False)
    ax = figures[0].axes[0]
    low, high = ax.get_ylim()
    assert low < 732.0 and 741.0 < high < 9000.0  # lower is better: outliers go to the top edge
    assert any(t.startswith("2 off the scale") and "61,000" in t for t in _legend(ax))
    np.testing.assert_allclose(_line(ax, "Pareto front").get_xdata(), [10, 12, 20])
    assert "selection" not in _legend(ax)


def test_search_title_names_model_task_and_case():
    base = {"task": "wikitext2", "case": "b1", "eval_limit": 32768, "model": {"preset": "spikegpt-small"}}
    assert report.search_title(base) == "spikegpt-small, wikitext2 (--eval-limit 32768), case b1"
    custom = {"task": "sst2", "case": None, "eval_limit": None,
              "model": {"model": "runs/ft216/model", "checkpoint": None}}
    assert report.search_title(custom) == "model, sst2, custom constraints"
    random = {**base, "model": {"preset": "spikegpt-micro", "weights": "random", "seed": 0}}
    assert report.search_title(random).startswith("spikegpt-micro (random weights), ")


def test_change_of_a_percentage_is_in_points():
    assert report.change_label("accuracy (%)") == "change in accuracy (percentage points)"
    assert report.change_label("perplexity") == "change in perplexity"


def test_sensitivity_heat_map_says_points_and_red_is_worse(tmp_path, figures):
    table = {"input": {16: 80.4, 8: 78.0, 2: 50.0}, "attention_0": {16: 80.5, 8: 80.1, 2: 79.0}}
    report.plot_sensitivity(tmp_path / "s.png", table, baseline_metric=80.5, metric_name="accuracy (%)",
                            higher_is_better=True, title="spikegpt-small, sst2, case a1")
    ax, bar = figures[0].axes
    assert bar.get_ylabel() == "change in accuracy (percentage points)"
    assert "spikegpt-small, sst2, case a1" in ax.get_title()
    image = ax.get_images()[0]
    red, _, blue, _ = image.cmap(image.norm(-30.5))  # the largest drop
    assert red > blue
    assert sorted(t.get_text() for t in ax.texts) == sorted(["-0.1", "-2.5", "-30.5", "+0", "-0.4", "-1.5"])


def test_sensitivity_heat_map_of_perplexity_uses_a_log_colour_scale(tmp_path, figures):
    table = {"input": {16: 732.2, 8: 5000.0, 2: 60000.0}, "attention_0": {16: 732.1, 8: 734.0, 2: 760.0}}
    report.plot_sensitivity(tmp_path / "s.png", table, baseline_metric=732.0, metric_name="perplexity",
                            higher_is_better=False)
    ax, bar = figures[0].axes
    image = ax.get_images()[0]
    assert isinstance(image.norm, SymLogNorm)
    red, _, blue, _ = image.cmap(image.norm(2.0))  # a rise of perplexity is worse: red
    assert red > blue
    assert bar.get_ylabel() == "change in perplexity"


def test_smooth_is_a_debiased_exponential_moving_average():
    np.testing.assert_allclose(report.smooth([3.0] * 7, 4), 3.0)  # no pull towards 0 at the start
    np.testing.assert_array_equal(report.smooth([1.0, 5.0, 2.0], 1), [1.0, 5.0, 2.0])
    b = 0.5
    expected = [1.0, (b * 1 + 3) * (1 - b) / (1 - b**2)]
    np.testing.assert_allclose(report.smooth([1.0, 3.0], 2), expected)


def test_training_curve_shows_smoothed_loss_metric_and_evaluation(tmp_path, figures):
    history = [{"step": 10 * (i + 1), "loss": 10.0 - 0.1 * i, "perplexity": float(np.exp(10.0 - 0.1 * i))}
               for i in range(60)]
    report.plot_training_curve(tmp_path / "curve.png", history, metric_key="perplexity", metric_name="perplexity",
                               eval_metric=1037.6, title="fine-tuning on wikitext2")
    loss_ax, metric_ax = figures[0].axes
    assert loss_ax.get_title() == "fine-tuning on wikitext2"
    assert any(t.startswith("smoothed (EMA over 6 logs)") for t in _legend(loss_ax))
    assert any(t.endswith(": 1038") for t in _legend(metric_ax))
    assert metric_ax.get_yscale() == "log" and loss_ax.get_yscale() == "linear"
    smoothed = _line(metric_ax, "smoothed").get_ydata()
    np.testing.assert_allclose(np.log(smoothed), report.smooth(np.log([r["perplexity"] for r in history]), 6))


def test_pareto_plot_draws_each_interval_as_an_error_bar_and_the_csv_lists_them(tmp_path, figures):
    """metric_ci becomes a thin error bar at each candidate (a nan interval: no bar), the baseline's too, and
    fp32 + delta_ci a thick one; candidates.csv has each interval's ends as columns."""
    import csv

    candidates = [{**_cand(5, 79.0, True), "metric_ci": [77.5, 80.0], "delta_ci": [-2.5, -0.5]},
                  {**_cand(8, 80.0, True), "metric_ci": [79.0, 81.5], "delta_ci": [-1.0, 0.0]},
                  {**_cand(6, 79.5, True), "metric_ci": [float("nan")] * 2, "delta_ci": [float("nan")] * 2}]
    baseline = {"metric": 80.5, "memory_bytes": FP32, "metric_ci": [79.5, 81.5], "delta_ci": [0.0, 0.0]}
    report.plot_pareto(tmp_path / "p.png", candidates, baseline=baseline, const_a=2.0, const_m_bytes=BUDGET,
                       selection=None, metric_name="accuracy (%)", higher_is_better=True, interval_level=0.9)
    ax = figures[0].axes[0]
    bars = sorted(tuple(np.round(segment[:, 1], 6)) for collection in ax.collections
                  if type(collection).__name__ == "LineCollection" for segment in collection.get_segments())
    metric_bars = [(77.5, 80.0), (79.0, 81.5), (79.5, 79.5), (79.5, 81.5)]  # nan: a zero-length bar
    delta_bars = [(78.0, 80.0), (79.5, 80.5), (79.5, 79.5)]  # fp32 80.5 + delta_ci
    assert bars == sorted(metric_bars + delta_bars)
    assert "90% bootstrap interval (metric_ci)" in _legend(ax)
    assert any(text.startswith("fp32 + paired change interval (delta_ci)") for text in _legend(ax))
    report.write_candidates_csv(tmp_path / "c.csv", [*candidates, _cand(3, 50.0, False)])
    with (tmp_path / "c.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [rows[0][k] for k in ("metric_ci_low", "metric_ci_high", "delta_ci_low", "delta_ci_high")] == \
        ["77.5", "80.0", "-2.5", "-0.5"]
    assert rows[3]["metric_ci_low"] == "" and rows[3]["delta_ci_high"] == ""  # a row without intervals
