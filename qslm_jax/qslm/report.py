"""Search reports: ``report.json``, ``candidates.csv``, ``summary.md`` and the two figures of the paper.

* :func:`plot_pareto` - memory vs metric of every evaluated candidate, constraint lines, feasible/infeasible,
  the selection marked (QSLM paper, Fig. 9);
* :func:`plot_sensitivity` - heat-map of the metric change when one block alone is quantized to each level
  (QSLM paper, Fig. 7).

Candidates are plain dicts with the keys ``plan``, ``memory_bytes``, ``memory_fraction``, ``metric``,
``feasible`` and ``score`` (as the search and selection produce them).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

MB = 1e6
CSV_FIELDS = ("phase", "unit", "level", "metric", "memory_bytes", "memory_mb", "memory_fraction", "ok", "feasible",
              "after_stop", "score", "plan")


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
    """One row per evaluated candidate; the plan as canonical JSON in the last column."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for cand in candidates:
            row = {key: cand.get(key, "") for key in CSV_FIELDS}
            row["memory_mb"] = f"{cand['memory_bytes'] / MB:.4f}"
            row["plan"] = json.dumps(cand["plan"], sort_keys=True)
            writer.writerow(row)


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
) -> None:
    """Scatter memory (MB) vs metric; dashed lines at the memory budget and the performance bound
    (baseline - const_a when higher is better, baseline + const_a otherwise); the selection is starred."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = (("infeasible", "tab:gray", "o", lambda c: not c["feasible"]),
              ("feasible", "tab:blue", "o", lambda c: c["feasible"] and not c.get("after_stop", False)),
              ("feasible, past a unit's stop (not selectable)", "tab:cyan", "x",
               lambda c: c["feasible"] and c.get("after_stop", False)))
    for label, colour, marker, belongs in groups:
        pts = [(c["memory_bytes"] / MB, c["metric"]) for c in candidates if belongs(c)]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, s=18, c=colour, marker=marker, alpha=0.75, label=label)
    ax.scatter([baseline["memory_bytes"] / MB], [baseline["metric"]], marker="s", c="k", label="fp32 baseline")
    bound = baseline["metric"] - const_a if higher_is_better else baseline["metric"] + const_a
    ax.axhline(bound, ls="--", c="tab:red", lw=1, label=f"performance bound ({bound:.3g})")
    ax.axvline(const_m_bytes / MB, ls="--", c="tab:green", lw=1, label=f"memory budget ({const_m_bytes / MB:.4g} MB)")
    if selection is not None:
        ax.scatter([selection["memory_bytes"] / MB], [selection["metric"]], marker="*", s=260, c="tab:orange",
                   edgecolors="k", zorder=5, label="selection")
    ax.set_xlabel("weight memory (MB)")
    ax.set_ylabel(metric_name)
    ax.set_title("QSLM candidates: memory vs performance")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sensitivity(
    path: str | Path,
    table: Mapping[str, Mapping[int, float]],
    *,
    baseline_metric: float,
    metric_name: str,
) -> None:
    """Heat-map of ``table[block][level] - baseline_metric`` (rows: blocks, columns: levels, descending)."""
    blocks = list(table)
    levels = sorted({int(q) for row in table.values() for q in row}, reverse=True)
    delta = np.array([[table[b].get(q, np.nan) - baseline_metric for q in levels] for b in blocks], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(levels), 1.2 + 0.35 * len(blocks)))
    span = np.nanmax(np.abs(delta)) if np.isfinite(delta).any() else 1.0
    image = ax.imshow(delta, cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
    ax.set_xticks(range(len(levels)), [str(q) for q in levels])
    ax.set_yticks(range(len(blocks)), blocks)
    ax.set_xlabel("bits (this block alone)")
    for (i, j), value in np.ndenumerate(delta):
        if np.isfinite(value):
            ax.text(j, i, f"{value:+.2g}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label=f"change in {metric_name}")
    ax.set_title("Sensitivity: one block quantized at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
