"""Search reports: ``report.json``, ``candidates.csv``, ``summary.md`` and the two figures of the paper.

* :func:`plot_pareto` - memory (log axis) vs metric of every evaluated candidate, the feasible region and its
  Pareto front, the fp32 baseline and the selection marked (QSLM paper, Fig. 9);
* :func:`plot_sensitivity` - heat-map of the metric change when one block alone is quantized to each level
  (QSLM paper, Fig. 7);
* :func:`plot_training_curve` - a fine-tuning run's loss and training metric, raw and smoothed, with the
  evaluation metric of the trained model.

Candidates are plain dicts with the keys ``plan``, ``memory_bytes``, ``memory_fraction``, ``metric``,
``feasible`` and ``score`` (as the search and selection produce them) and optionally ``metric_ci`` and
``delta_ci`` (``[low, high]`` bootstrap intervals, :mod:`qslm_jax.qslm.uncertainty`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import Normalize, SymLogNorm
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from qslm_jax.qslm.search import degradation
from qslm_jax.qslm.selection import pareto_front

MB = 1e6
INTERVALS = ("metric_ci", "delta_ci")
CSV_FIELDS = ("phase", "unit", "level", "metric", "metric_ci_low", "metric_ci_high", "delta_ci_low", "delta_ci_high",
              "memory_bytes", "memory_mb", "memory_fraction", "ok", "feasible", "after_stop", "score", "plan")


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON (numpy scalars converted)."""
    Path(path).write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_candidates_csv(path: str | Path, candidates: Sequence[Mapping[str, Any]]) -> None:
    """One row per evaluated candidate (each interval as its ``_low`` and ``_high`` columns, empty without
    one); the plan as canonical JSON in the last column."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for cand in candidates:
            row = {key: cand.get(key, "") for key in CSV_FIELDS}
            for name in INTERVALS:
                if name in cand:
                    row[f"{name}_low"], row[f"{name}_high"] = cand[name]
            row["memory_mb"] = f"{cand['memory_bytes'] / MB:.4f}"
            row["plan"] = json.dumps(cand["plan"], sort_keys=True)
            writer.writerow(row)


def search_title(config: Mapping[str, Any]) -> str:
    """What a search's figures name, from its report's ``config``: ``"<model>, <task>, case <c>"`` (the weights
    when random, ``--eval-limit`` when set; ``custom constraints`` without a paper case)."""
    model = config.get("model") or {}
    name = str(model.get("preset") or Path(str(model.get("model", "model"))).name)
    if model.get("weights") == "random":
        name += " (random weights)"
    task = str(config["task"])
    if config.get("eval_limit") is not None:
        task += f" (--eval-limit {config['eval_limit']})"
    case = f"case {config['case']}" if config.get("case") else "custom constraints"
    return f"{name}, {task}, {case}"


def _number(value: float) -> str:
    """A metric for a label: 4 significant digits, large values in full with thousands separators."""
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _error_bars(candidates: Sequence[Mapping[str, Any]], key: str, shift: float = 0.0) -> np.ndarray:
    """``(2, n)`` distances from each metric down and up to its interval ``shift + c[key]`` (``metric_ci``; or
    ``delta_ci`` shifted by the fp32 metric); 0 where the interval does not contain the point or is not
    finite, so matplotlib never gets a negative length."""
    low = np.array([c["metric"] - shift - c[key][0] for c in candidates], dtype=float)
    high = np.array([shift + c[key][1] - c["metric"] for c in candidates], dtype=float)
    return np.nan_to_num(np.clip(np.stack([low, high]), 0.0, None))


class _Point(NamedTuple):
    memory_bytes: float
    metric: float


def _plain_log_ticks(axis: Any) -> None:
    """Ticks of a log axis at 1, 2, 5 x 10^k, written as plain numbers (``20``, not ``2 x 10^1``)."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _degradation_window(degradations: Sequence[float], const_a: float, scale: float) -> tuple[float, float]:
    """Range of degradation (accuracy drop / perplexity increase) the y-axis shows: every candidate within
    ``const_a + 3 margin`` of the baseline, the baseline (0) and the bound; worse candidates are drawn at the
    edge, so a 2-bit outlier does not flatten the region where the constraint is decided."""
    margin = max(abs(const_a), 0.01 * scale, 1e-12)
    kept = [d for d in degradations if d <= const_a + 3 * margin] + [0.0, const_a]
    low, high = min(kept), max(kept)
    pad = 0.08 * (high - low or margin)
    return low - pad, high + pad


def plot_pareto(
    path: str | Path,
    candidates: Sequence[Mapping[str, Any]],
    *,
    baseline: Mapping[str, Any],
    const_a: float,
    const_m_bytes: float,
    selection: Mapping[str, Any] | None,
    metric_name: str,
    higher_is_better: bool,
    title: str | None = None,
    interval_level: float = 0.95,
) -> None:
    """Memory (MB, log axis; % of fp32 on top) vs metric of every candidate (QSLM paper, Fig. 9).

    Drawn: the feasible region (memory <= ``const_m_bytes`` and metric within ``const_a`` of the baseline,
    shaded, with both bounds as dashed lines), the candidates by status, the Pareto front of the selectable
    ones (feasible and reached by the search; :func:`~qslm_jax.qslm.selection.pareto_front`) as a staircase,
    the fp32 baseline and the selection; a candidate's ``metric_ci`` is a thin error bar, its ``delta_ci``
    added to the fp32 metric a thick one (the interval the ``--confidence`` rule holds against the bound). The
    y-axis covers the baseline, the bound and the candidates near
    them; candidates worse than that are drawn as triangles on the edge and counted in the legend.
    ``title``: what was searched (:func:`search_title`); ``interval_level``: the intervals' level (legend).
    """
    base_mb, base_metric = baseline["memory_bytes"] / MB, float(baseline["metric"])
    sign = 1.0 if higher_is_better else -1.0  # metric = base - sign * degradation
    bound = base_metric - sign * const_a

    def degradation_of(metric: float) -> float:
        return degradation(metric, base_metric, higher_is_better)

    d_low, d_high = _degradation_window([degradation_of(c["metric"]) for c in candidates], const_a,
                                        abs(base_metric))
    y_worst, y_best = base_metric - sign * d_high, base_metric - sign * d_low
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    memories = [c["memory_bytes"] / MB for c in candidates] + [base_mb, const_m_bytes / MB]
    x_low, x_high = min(memories) / 1.3, max(memories) * 1.3
    ax.fill_between([x_low, const_m_bytes / MB], bound, y_best, color="tab:green", alpha=0.08, lw=0,
                    label="feasible region")
    ax.axhline(bound, ls="--", c="tab:red", lw=1, label=f"performance bound: {_number(bound)} (const_a {const_a:g})")
    ax.axvline(const_m_bytes / MB, ls="--", c="tab:green", lw=1,
               label=f"memory budget: {const_m_bytes / MB:.4g} MB")

    groups = (("infeasible", "tab:gray", lambda c: not c["feasible"]),
              ("feasible", "tab:blue", lambda c: c["feasible"] and not c.get("after_stop", False)),
              ("feasible, past a unit's stop (not selectable)", "tab:cyan",
               lambda c: c["feasible"] and c.get("after_stop", False)))
    off_scale = 0
    for label, colour, belongs in groups:
        members = [c for c in candidates if belongs(c)]
        inside = [c for c in members if degradation_of(c["metric"]) <= d_high]
        outside = [c for c in members if degradation_of(c["metric"]) > d_high]
        if inside:
            ax.scatter([c["memory_bytes"] / MB for c in inside], [c["metric"] for c in inside], s=22, c=colour,
                       alpha=0.8, label=label, zorder=3)
            for key, shift, width in (("metric_ci", 0.0, 0.9), ("delta_ci", base_metric, 3.0)):
                with_ci = [c for c in inside if key in c]
                if with_ci:
                    ax.errorbar([c["memory_bytes"] / MB for c in with_ci], [c["metric"] for c in with_ci],
                                yerr=_error_bars(with_ci, key, shift), fmt="none", ecolor=colour, alpha=0.45,
                                lw=width, capsize=2 if key == "metric_ci" else 0, zorder=2)
        if outside:
            ax.scatter([c["memory_bytes"] / MB for c in outside], [y_worst] * len(outside), s=30, c=colour,
                       marker="v" if higher_is_better else "^", alpha=0.8, clip_on=False, zorder=3,
                       label=None if inside else label)
        off_scale += len(outside)
    if off_scale:
        worst = max(candidates, key=lambda c: degradation_of(c["metric"]))["metric"]
        ax.scatter([], [], marker="v" if higher_is_better else "^", c="k", s=30,
                   label=f"{off_scale} off the scale (on the edge; worst {_number(worst)})")

    selectable = [_Point(c["memory_bytes"] / MB, c["metric"]) for c in candidates
                  if c["feasible"] and not c.get("after_stop", False)]
    front = pareto_front(selectable, higher_is_better=higher_is_better)
    if front:
        xs = [p.memory_bytes for p in front] + [const_m_bytes / MB]
        ys = [p.metric for p in front] + [front[-1].metric]
        ax.step(xs, ys, where="post", c="tab:purple", lw=1.6, zorder=4,
                label=f"Pareto front of the feasible ({len(front)})")
        ax.scatter(xs[:-1], ys[:-1], s=46, facecolors="none", edgecolors="tab:purple", lw=1.4, zorder=4)
    ax.scatter([base_mb], [base_metric], marker="s", s=50, c="k", zorder=5, label="fp32 baseline")
    if "metric_ci" in baseline:
        ax.errorbar([base_mb], [base_metric], yerr=_error_bars([baseline], "metric_ci"), fmt="none", ecolor="k",
                    lw=0.9, capsize=3, zorder=5, label=f"{100 * interval_level:g}% bootstrap interval (metric_ci)")
    if any("delta_ci" in c for c in candidates):
        ax.errorbar([], [], yerr=[], fmt="none", ecolor="tab:blue", alpha=0.45, lw=3.0,
                    label="fp32 + paired change interval (delta_ci):\nwithin the bound = passes --confidence")
    ax.annotate(f"fp32: {_number(base_metric)}", (base_mb, base_metric), xytext=(-8, 8 if higher_is_better else -14),
                textcoords="offset points", ha="right", fontsize=8)
    if selection is not None:
        sel_mb = selection["memory_bytes"] / MB
        ax.scatter([sel_mb], [selection["metric"]], marker="*", s=300, c="tab:orange", edgecolors="k", zorder=6,
                   label="selection")
        ax.annotate(f"selection: {_number(selection['metric'])}, {sel_mb:.3g} MB", (sel_mb, selection["metric"]),
                    xytext=(10, -14 if higher_is_better else 10), textcoords="offset points", fontsize=8,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "tab:orange", "alpha": 0.9})

    ax.set_xscale("log")
    ax.set_xlim(x_low, x_high)
    ax.set_ylim(min(y_worst, y_best), max(y_worst, y_best))
    _plain_log_ticks(ax.xaxis)
    top = ax.secondary_xaxis("top", functions=(lambda mb: 100 * mb / base_mb, lambda pct: pct * base_mb / 100))
    _plain_log_ticks(top.xaxis)
    top.set_xlabel("% of the fp32 memory", fontsize=9)
    ax.set_xlabel("weight memory (MB, log scale)")
    ax.set_ylabel(metric_name + (" (higher is better)" if higher_is_better else " (lower is better)"))
    fig.suptitle(f"QSLM search: {title}" if title else "QSLM search: memory vs performance", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3, which="major")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def change_label(metric_name: str) -> str:
    """Axis label of a metric's change: a change of a percentage is in percentage points
    (``"accuracy (%)"`` -> ``"change in accuracy (percentage points)"``)."""
    if metric_name.endswith("(%)"):
        return f"change in {metric_name[:-3].rstrip()} (percentage points)"
    return f"change in {metric_name}"


def _cell_text(value: float) -> str:
    return f"{value:+.3g}" if abs(value) < 1000 else f"{value:+.0f}"


def plot_sensitivity(
    path: str | Path,
    table: Mapping[str, Mapping[int, float]],
    *,
    baseline_metric: float,
    metric_name: str,
    higher_is_better: bool | None = None,
    title: str | None = None,
) -> None:
    """Heat-map of ``table[block][level] - baseline_metric`` (rows: blocks, columns: levels, descending).

    With ``higher_is_better`` given, red is always the worse direction (a drop of accuracy, a rise of
    perplexity); otherwise red is an increase. Changes spanning orders of magnitude get a symmetric log colour
    scale (the cells print the values). ``title``: what was searched (:func:`search_title`).
    """
    blocks = list(table)
    levels = sorted({int(q) for row in table.values() for q in row}, reverse=True)
    delta = np.array([[table[b].get(q, np.nan) - baseline_metric for q in levels] for b in blocks], dtype=float)
    magnitudes = np.abs(delta[np.isfinite(delta)])
    span = float(magnitudes.max()) if magnitudes.size else 1.0
    span = span or 1.0
    small = float(np.percentile(magnitudes[magnitudes > 0], 25)) if (magnitudes > 0).any() else span
    logarithmic = span > 50 * small
    norm = (SymLogNorm(linthresh=small, vmin=-span, vmax=span, base=10) if logarithmic
            else Normalize(vmin=-span, vmax=span))
    fig, ax = plt.subplots(figsize=(2.2 + 0.8 * len(levels), 1.6 + 0.35 * len(blocks)))
    image = ax.imshow(delta, cmap="RdBu" if higher_is_better else "RdBu_r", norm=norm, aspect="auto")
    ax.set_xticks(range(len(levels)), [str(q) for q in levels])
    ax.set_yticks(range(len(blocks)), blocks)
    ax.set_xlabel("bits (this block alone; the rest fp32)")
    for (i, j), value in np.ndenumerate(delta):
        if np.isfinite(value):
            ax.text(j, i, _cell_text(value), ha="center", va="center", fontsize=7,
                    color="white" if abs(norm(value) - 0.5) > 0.35 else "black")
    bar = fig.colorbar(image, ax=ax, label=change_label(metric_name))
    if logarithmic:  # 0 and the powers of ten beyond the linear part, both signs
        decades = [10.0 ** k for k in range(int(np.ceil(np.log10(small))), int(np.floor(np.log10(span))) + 1)]
        bar.set_ticks([*(-d for d in reversed(decades)), 0.0, *decades])
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:+g}" if value else "0"))
    heading = f"Sensitivity: one block quantized at a time (fp32 {_number(baseline_metric)})"
    ax.set_title(f"{heading}\n{title}" if title else heading, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Debiased exponential moving average: ``s_t = b s_(t-1) + (1 - b) x_t`` with ``b = 1 - 1/window``,
    divided by ``1 - b^t`` so the first points are not pulled to 0 (a trailing mean over about ``window``
    points; window 1 returns the values)."""
    decay = 1.0 - 1.0 / max(window, 1)
    out, state = np.empty(len(values)), 0.0
    for t, value in enumerate(values, start=1):
        state = decay * state + (1.0 - decay) * float(value)
        out[t - 1] = state / (1.0 - decay ** t) if decay else state
    return out


def plot_training_curve(
    path: str | Path,
    history: Sequence[Mapping[str, float]],
    *,
    metric_key: str,
    metric_name: str,
    metric_scale: float = 1.0,
    eval_metric: float | None = None,
    title: str,
) -> None:
    """A training run's loss (top) and training-batch metric ``metric_scale * record[metric_key]`` (bottom)
    against the step, each raw (faint) and :func:`smooth`-ed over a tenth of the run, with the trained
    model's evaluation metric as a dashed line. A series spanning more than 20x (perplexity) is drawn and
    smoothed on a log axis (a geometric mean).
    """
    steps = [r["step"] for r in history]
    window = max(1, len(history) // 10)
    series = (("training loss (cross-entropy)", [r["loss"] for r in history]),
              (f"training-batch {metric_name}", [metric_scale * r[metric_key] for r in history]))
    fig, axes = plt.subplots(2, 1, sharex=True, figsize=(7, 6.4))
    for ax, (label, values) in zip(axes, series, strict=True):
        logarithmic = min(values) > 0 and max(values) / min(values) > 20
        smoothed = np.exp(smooth(np.log(values), window)) if logarithmic else smooth(values, window)
        ax.plot(steps, values, c="tab:blue", alpha=0.25, lw=0.8, label="raw (logged steps)")
        ax.plot(steps, smoothed, c="tab:blue", lw=1.8, label=f"smoothed (EMA over {window} logs)")
        if logarithmic:
            ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    if eval_metric is not None:
        ax = axes[1]
        ax.axhline(eval_metric, ls="--", c="tab:orange", lw=1.4,
                   label=f"evaluation of the trained model (metrics.json): {_number(eval_metric)}")
        ax.scatter([steps[-1]], [eval_metric], marker="*", s=120, c="tab:orange", edgecolors="k", zorder=5)
    for ax in axes:
        ax.legend(fontsize=8, loc="best")
    axes[1].set_xlabel("step")
    axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
