"""What a QSLM run writes into its output directory (qslm.md section 4): ``report.json`` (base record, cost,
invocations), ``candidates.csv``, ``sensitivity.csv`` / ``sensitivity.png``, ``pareto.png``, ``summary.md`` and
the selection exported as packed integer codes."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import resource
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np

from qslm_jax.errors import DataError
from qslm_jax.qslm.evaluator import Evaluator
from qslm_jax.qslm.journal import Journal
from qslm_jax.qslm.metering import MeteredEvaluate
from qslm_jax.qslm.report import plot_pareto, plot_sensitivity, search_title, write_candidates_csv, write_json
from qslm_jax.qslm.search import SearchResult
from qslm_jax.qslm.selection import scored_candidates
from qslm_jax.qslm.settings import QSLMSettings
from qslm_jax.qslm.uncertainty import Bootstrap, describe, intervals
from qslm_jax.quant.hierarchy import Hierarchy
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.tasks.scores import classification_metrics
from qslm_jax.tasks.task import Task

log = logging.getLogger(__name__)
MB = 1e6


def write_sensitivity(out: Path, table: dict, baseline_metric: float, task: Task, *, title: str | None = None
                      ) -> None:
    """``sensitivity.csv`` (blocks x levels, metric) and the heat-map ``sensitivity.png`` (metric change)."""
    levels = sorted({q for row in table.values() for q in row}, reverse=True)
    lines = ["block," + ",".join(str(q) for q in levels)]
    lines += [f"{b}," + ",".join(f"{row[q]:.6g}" for q in levels) for b, row in table.items()]
    (out / "sensitivity.csv").write_text("\n".join(lines) + "\n")
    plot_sensitivity(out / "sensitivity.png", table, baseline_metric=baseline_metric, metric_name=task.metric_name,
                     higher_is_better=task.higher_is_better, title=title)


def invocation(report: dict, started_at: str) -> dict[str, Any]:
    return {"started": started_at, "evaluations": report["evaluations"], "journal_hits": report["journal_hits"],
            "compilations": report["compilations"], "timings": dict(report["timings"])}


def previous_invocations(out: Path) -> list[dict[str, Any]]:
    """The cost records of earlier runs into ``out`` (kept across reruns; an unreadable report keeps none)."""
    path = out / "report.json"
    if not path.is_file():
        return []
    try:
        previous = json.loads(path.read_text())
        runs = previous.get("invocations") if isinstance(previous, dict) else None
        if runs is None and isinstance(previous, dict) and "timings" in previous:  # written before invocations
            runs = [{k: previous.get(k) for k in ("evaluations", "journal_hits", "compilations", "timings")}]
        return [r for r in runs or [] if isinstance(r, dict)]
    except (OSError, ValueError) as err:
        log.warning("the earlier report %s is unreadable (%s): its cost record is not carried over", path, err)
        return []


def cost_record(evaluator: Evaluator, sensitivity_computed: int, result: SearchResult,
                sensitivity_seconds: float) -> dict[str, Any]:
    """``report["cost"]``: compiled ``calls``; ``slots`` they computed (padding and discarded speculation
    included); ``evaluations``, the distinct candidates computed whose metric was used (the sensitivity
    table's and those the search reached); their ``useful_fraction`` of the slots; ``discarded`` speculation
    and ``padding`` slots; ``compilations`` and seconds per phase (compilation apart); ``seconds_per_slot``
    (sensitivity and search seconds per slot) and this process's ``peak_rss_bytes`` (so far)."""
    evaluations = sensitivity_computed + result.used
    evaluating = sensitivity_seconds + sum(result.seconds.values())
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            "seconds_per_slot": evaluating / evaluator.slots if evaluator.slots else None,
            "calls": evaluator.calls, "slots": evaluator.slots, "evaluations": evaluations,
            "useful_fraction": evaluations / evaluator.slots if evaluator.slots else None,
            "discarded": result.evaluations - result.used,
            "padding": evaluator.slots - sensitivity_computed - result.evaluations,
            "compilations": evaluator.compilations, "strategy": result.strategy,
            "seconds": {"compile": evaluator.compile_seconds, "sensitivity": sensitivity_seconds,
                        **result.seconds}}


def interval_fields(journal: Journal, bootstrap: Bootstrap):
    """``plan -> {"metric_ci", "delta_ci"}`` of a plan journaled in ``journal`` (paired with its fp32 plan)."""
    baseline = journal.examples(QuantPlan().key())
    return lambda plan: intervals(bootstrap, journal.examples(plan.key()), baseline)


def journaled_f1(journal: Journal, plan: QuantPlan) -> float:
    """F1 (%) of the positive class, ``100 * 2tp / (2tp + fp + fn)``, from the per-example counts journaled for
    ``plan`` by an :class:`~qslm_jax.qslm.metrics.Accuracy` with ``f1_counts`` (GLUE's MRPC score)."""
    examples = journal.examples(plan.key())
    if examples is None or not {"tp", "fp", "fn"} <= examples.keys():
        raise DataError(f"the journal {journal.path} holds no F1 counts for plan {plan.key()}")
    return classification_metrics({k: float(np.sum(v)) for k, v in examples.items()})["f1"]


def resampling_unit(task: Task, model) -> str:
    """What one bootstrap example is (:mod:`qslm_jax.qslm.uncertainty`): a sentence (pair), or a window of the
    language model's ``config.ctx_len`` tokens."""
    if task.n_classes:
        return "sentence (one evaluation example)"
    return (f"window of {model.config.ctx_len} tokens (the evaluation's unit; documents are few and uneven; "
            f"adjacent windows are correlated, so the intervals are slightly narrow)")


def base_report(model, task, settings, model_description, data, hierarchy, result: SearchResult, evaluator,
                evaluate: MeteredEvaluate, journal, table, order, sensitivity_seconds) -> dict[str, Any]:
    """The record of a search every report starts from: configuration, versions, baseline, candidates, search
    phases, sensitivity, journal, timings and power; the baseline and every candidate with its ``metric_ci`` and
    ``delta_ci`` vs fp32."""
    baseline = result.baseline
    power_measured = any(call["measured"] for call in evaluate.calls)
    bootstrap = settings.bootstrap(evaluator)
    ci = interval_fields(journal, bootstrap)
    return {
        "config": {"task": task.name, "metric": task.metric_name, "higher_is_better": task.higher_is_better,
                   **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()},
                   "model": model_description, "model_config": dataclasses.asdict(model.config),
                   "protocol": data.protocol, "eval_items": data.eval_items},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "flax": flax.__version__, "devices": [str(d) for d in evaluator.devices]},
        "baseline": {"metric": baseline.metric, "memory_bytes": baseline.memory_bytes, **ci(baseline.plan)},
        "fp32_bytes": hierarchy.fp32_bytes,
        "intervals": describe(bootstrap, resampling_unit(task, model)),
        "candidates": [{**row, **ci(c.plan)} for c, row in zip(result.candidates,
                                                               scored_candidates(result, settings.alpha),
                                                               strict=True)],
        "search": {k: v for k, v in result.to_dict().items() if k not in ("candidates", "baseline")},
        "sensitivity": {"table": {b: {str(q): m for q, m in row.items()} for b, row in table.items()},
                        "order": list(order)},
        "evaluations": result.evaluations, "journal_hits": result.journal_hits,
        "journal": {"path": str(journal.path), "entries": len(journal)},
        "compilations": evaluator.compilations,
        "timings": {"sensitivity_seconds": sensitivity_seconds, **{f"{k}_seconds": v
                                                                   for k, v in result.seconds.items()}},
        "power": {"measured": power_measured, "calls": evaluate.calls,
                  "note": "NVML GPU power sampled around each batched evaluation call, compilation excluded; "
                          "energy per candidate = call energy / candidate slots computed" if power_measured else
                          "not measured (no NVIDIA GPU / NVML here); see energy_estimate for the "
                          "operation-count model"},
    }


def export_selection(model, plan: QuantPlan, hierarchy: Hierarchy, out: Path, report: dict) -> None:
    from qslm_jax.quant.export import export_quantized

    written = export_quantized(model, plan, out / "selection.safetensors", hierarchy=hierarchy)
    report["export"] = {"path": str(written.path), "file_bytes": written.file_bytes,
                        "payload_bytes": written.payload_bytes, "accounted_memory_bytes": written.memory_bytes}


def write_outputs(out: Path, report: dict, table, task: Task, settings: QSLMSettings) -> None:
    title = search_title(report["config"])
    write_json(out / "report.json", report)
    write_candidates_csv(out / "candidates.csv", report["candidates"])
    write_sensitivity(out, table, report["baseline"]["metric"], task, title=title)
    plot_pareto(out / "pareto.png", report["candidates"], baseline=report["baseline"], const_a=settings.const_a,
                const_m_bytes=settings.const_m_mb * MB, selection=report["selection"],
                metric_name=task.metric_name, higher_is_better=task.higher_is_better, title=title,
                interval_level=report["intervals"]["level"])
    (out / "summary.md").write_text(summary_markdown(report))


def _describe(value: Any) -> str:
    """A plain ``key: value`` rendering of a model description (numbers to 4 significant digits)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_describe(v)}" for k, v in value.items() if v is not None)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_markdown(report: dict) -> str:
    """A human summary of ``report``: constraints, baseline, selection and its held-out score, ablation, cost."""
    cfg, base = report["config"], report["baseline"]
    lines = [f"# QSLM search: {cfg['task']} ({cfg['metric']})", "",
             f"- model: {_describe(cfg['model'])}", f"- search protocol: {cfg['protocol']}",
             f"- constraints: const_a = {cfg['const_a']}, const_m = {cfg['const_m_mb']:.4g} MB; "
             f"levels {cfg['levels']}; alpha = {cfg['alpha']}",
             f"- fp32 baseline: {cfg['metric']} {base['metric']:.4f}, {base['memory_bytes'] / MB:.4f} MB",
             f"- evaluated {report['evaluations']} candidates ({report['journal_hits']} from the journal), "
             f"{report['compilations']} compilation(s), {report['timings']['total_seconds']:.1f} s",
             f"- cost ({report['cost']['strategy']}): {report['cost']['calls']} calls, {report['cost']['slots']} "
             f"slots, {report['cost']['evaluations']} used ({100 * (report['cost']['useful_fraction'] or 0):.1f}%)",
             ""]
    sel = report.get("selection")
    if sel:
        low, high = sel["delta_ci"]
        lines += ["## Selection", "", f"- {cfg['metric']}: {sel['metric']:.4f} (search split; change vs fp32 "
                  f"[{low:+.4g}, {high:+.4g}], {100 * report['intervals']['level']:g}% paired bootstrap)",
                  f"- memory: {sel['memory_bytes'] / MB:.4f} MB ({sel['memory_saving_percent']:.1f}% saved vs fp32)",
                  f"- plan: `{sel['plan']}`"]
        held = report.get("report_split")
        if held:
            m = held["metrics"]
            low, high = held["intervals"]["selection"]["delta_ci"]
            lines += [f"- on the report split ({held['split']}: {held['protocol']}): fp32 {m['baseline']:.4f}, "
                      f"selection {m['selection']:.4f} (change [{low:+.4g}, {high:+.4g}])"]
        lines += ["", "## Alpha ablation", "",
                  "| alpha | metric | memory (MB) | saving | score |", "|---|---|---|---|---|"]
        for alpha, row in report["alpha_ablation"].items():
            lines.append(f"| {alpha} | {row['metric']:.4f} | {row['memory_bytes'] / MB:.4f} | "
                         f"{100 * (1 - row['memory_fraction']):.1f}% | {row['score']:.4f} |")
    else:
        lines += ["## No feasible candidate", "", report["no_feasible"]["message"]]
    lines += ["", f"Power: {report['power']['note']}."]
    return "\n".join(lines) + "\n"
