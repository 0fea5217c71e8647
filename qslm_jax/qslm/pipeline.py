"""The QSLM pipeline on one model and task: sensitivity analysis, tiered search, selection, report.

:func:`run_qslm` ties the pieces together (qslm.md sections 1-4):

1. the batched :class:`~qslm_jax.qslm.evaluator.Evaluator` (one compilation, vmapped candidates) behind a
   journal, with GPU power sampled around every batched call (NVML; "not measured" elsewhere);
2. the sensitivity table (every block alone at every level, one batched call) and the block order it implies;
3. the search under ``const_a`` / ``const_m``: :func:`~qslm_jax.qslm.search.tiered_search` (with the paper's
   stop rule or ``--no-stop``) or :func:`~qslm_jax.qslm.knapsack.knapsack_search` (``settings.strategy``), in
   calls of the evaluator's compiled sizes; ``report.json`` records their ``cost`` (:func:`cost_record`);
4. the trade-off selection at ``alpha`` and the alpha ablation; every candidate's ``metric_ci`` and paired
   ``delta_ci`` vs fp32 (:mod:`qslm_jax.qslm.uncertainty`, from the journaled per-example statistics;
   ``settings.confidence`` also makes them the pass rule);
5. the output directory: ``report.json``, ``candidates.csv``, ``sensitivity.csv``, ``pareto.png``,
   ``sensitivity.png``, ``summary.md`` and the selection exported as packed integer codes.

Held-out selection (default ``selection_split="held-out"``): the search, sensitivity and selection see only the
task's ``selection`` split; the fp32 baseline and the selected plans are then scored on the ``report`` split,
which the search never saw (:mod:`qslm_jax.tasks.data`). ``"same"`` is the paper's protocol: one set for both.
Journals live outside the case folders (default ``OUT/../journals/<task>-<split>-<fingerprint>.jsonl``), so
cases of one model and task share them without touching each other's folders.

What a search is asked (:class:`~qslm_jax.qslm.settings.QSLMSettings`, the paper's cases) is
:mod:`qslm_jax.qslm.settings`; what it writes, :mod:`qslm_jax.qslm.outputs`; the energy estimate,
:mod:`qslm_jax.qslm.energy_estimate`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from qslm_jax.energy import mean_tokens_per_sample
from qslm_jax.models.loading import STUDENT_BITS
from qslm_jax.models.registry import family_of, hierarchy_of, student_fixed_levels
from qslm_jax.qslm.device_memory import memory_budget_bytes
from qslm_jax.qslm.energy_estimate import model_energy
from qslm_jax.qslm.evaluator import Evaluator, stack_batches
from qslm_jax.qslm.journal import Journal, fingerprint
from qslm_jax.qslm.knapsack import knapsack_search
from qslm_jax.qslm.metering import MeteredEvaluate
from qslm_jax.qslm.outputs import (
    base_report,
    cost_record,
    export_selection,
    interval_fields,
    invocation,
    journaled_f1,
    previous_invocations,
    write_outputs,
)
from qslm_jax.qslm.progress import SearchProgress, with_progress
from qslm_jax.qslm.search import (
    BATCH_SIZES,
    CachedEvaluator,
    SearchResult,
    sensitivity_order,
    sensitivity_table,
    tiered_search,
)
from qslm_jax.qslm.selection import NoFeasibleCandidate, alpha_ablation, select
from qslm_jax.qslm.settings import EXIT_NO_FEASIBLE, QSLMSettings, check_strategy
from qslm_jax.quant.apply import quantize_model
from qslm_jax.quant.hierarchy import Hierarchy
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.tasks.metrics import metric_of
from qslm_jax.tasks.model_data import check_vocabulary, model_task_data
from qslm_jax.tasks.task import Task

log = logging.getLogger(__name__)
MB = 1e6
def data_fingerprint(batches: Sequence[dict]) -> str:
    """SHA-256 of the evaluation batches' content (every key's dtype, shape and bytes, in order): a journal
    computed on other data (a data file changed in place, another tokenizer or limit) is refused."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            array = np.ascontiguousarray(batch[key])
            digest.update(f"{key}{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def parameter_fingerprint(model: nnx.Module) -> str:
    """SHA-256 of every parameter array (path, dtype, shape, bytes): identifies the weights in journals."""
    digest = hashlib.sha256()
    for path, value in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
        array = np.asarray(value.get_value() if hasattr(value, "get_value") else value)
        digest.update(f"{path}{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@dataclass
class EvaluationContext:
    """Everything a search or sensitivity run evaluates with: the hierarchy, data, compiled evaluator
    (power-metered) and the journal."""

    model: nnx.Module
    task: Task
    hierarchy: Hierarchy
    data: Any
    evaluator: Evaluator
    evaluate: MeteredEvaluate
    journal: Journal


def default_journal_path(out: Path, task: Task, split: str, meta: dict) -> Path:
    """``OUT/../journals/<task>-<split>-<fingerprint[:16]>.jsonl``: outside the case folder, one per setup, so
    every case of one model, task and protocol shares it and a different setup never collides with it."""
    return out.parent / "journals" / f"{task.name}-{split}-{fingerprint(meta)[:16]}.jsonl"


def search_hierarchy(model: nnx.Module, settings: QSLMSettings, model_description: dict) -> Hierarchy:
    """The unit tree the search works on: the model family's, under the settings' scheme; an extreme-KD student
    (``model_description[STUDENT_BITS]``) keeps its encoder kernels at their trained level, so the search covers
    the rest (:meth:`~qslm_jax.quant.hierarchy.Hierarchy.with_fixed_levels`)."""
    hierarchy = hierarchy_of(model, scheme=settings.scheme)
    bits = model_description.get(STUDENT_BITS)
    return hierarchy.with_fixed_levels(student_fixed_levels(model, bits)) if bits is not None else hierarchy


def prepare_evaluation(model: nnx.Module, task: Task, settings: QSLMSettings, out: Path, *, model_description: dict,
                       data_dir: str | Path | None = None, journal_path: Path | None = None,
                       split: str | None = None, evaluator: Evaluator | None = None) -> EvaluationContext:
    """Load the evaluation data of ``split`` (default: the settings' search split), build the batched
    evaluator (or reuse ``evaluator``, whose compilation then serves batches of the same shapes) and open (or
    resume) the journal.

    The journal's fingerprint covers the weights, the task and split, the evaluation protocol, the content of
    the evaluation batches and the quantizer scheme, not the constraints, so one journal serves every case of
    a model and task (``journal_path`` default: :func:`default_journal_path`).
    """
    split = split or settings.search_split
    out.mkdir(parents=True, exist_ok=True)
    hierarchy = evaluator.hierarchy if evaluator is not None else search_hierarchy(model, settings, model_description)
    data = model_task_data(model, task, eval_batch_size=settings.eval_batch_size, eval_limit=settings.eval_limit,
                           data_dir=data_dir, with_train=False, eval_split=split)
    check_vocabulary(model, data.eval_batches)
    if evaluator is None:
        devices = jax.local_devices()[:settings.devices] if settings.devices else jax.devices()
        evaluator = Evaluator(model, metric_of(task, family_of(model)), hierarchy=hierarchy,
                              chunk_size=settings.chunk_size, devices=devices,
                              memory_budget_bytes=memory_budget_bytes(settings.memory_budget_gb, devices))
    meta = {"weights_sha256": parameter_fingerprint(model), "model": model_description, "task": task.name,
            "split": split, "protocol": data.protocol, "eval_items": data.eval_items,
            "data_sha256": data_fingerprint(data.eval_batches), "scheme": repr(hierarchy.scheme)}
    journal = Journal(journal_path or default_journal_path(out, task, split, meta), meta)
    return EvaluationContext(model, task, hierarchy, data, evaluator, MeteredEvaluate(evaluator, data.eval_batches),
                             journal)


def report_split_journal_path(search_journal: Path) -> Path:
    """Where the report-split evaluations of a search journaled at ``search_journal`` go (beside it)."""
    return search_journal.with_name(search_journal.stem + ".report" + search_journal.suffix)


def run_sensitivity(ctx: EvaluationContext, levels: Sequence[float], const_a: float, *, progress: bool = True
                    ) -> tuple[float, dict, tuple[str, ...]]:
    """The fp32 baseline metric, the sensitivity table (every block alone at every level, one batched call,
    with a bar of its plans) and the block order it implies (least sensitive first; qslm.md section 1)."""
    baseline_metric = CachedEvaluator(ctx.evaluate, ctx.hierarchy, ctx.journal)([QuantPlan()])[0]
    table = sensitivity_table(ctx.hierarchy, with_progress(ctx.evaluate, "sensitivity", enabled=progress), levels,
                              journal=ctx.journal)
    order = sensitivity_order(table, baseline_metric, const_a=const_a, higher_is_better=ctx.task.higher_is_better)
    return baseline_metric, table, order


def run_qslm(model: nnx.Module, task: Task, settings: QSLMSettings, out: Path, *, model_description: dict,
             data_dir: str | Path | None = None, journal_path: Path | None = None, progress: bool = True
             ) -> tuple[dict[str, Any], int]:
    """Run the whole pipeline (module docstring) and write the report into ``out``.

    Returns ``(report, exit_code)``: 0 with a selection, :data:`EXIT_NO_FEASIBLE` when no candidate meets both
    constraints (the report then lists the closest candidates).
    """
    out = Path(out)
    check_strategy(settings)
    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ctx = prepare_evaluation(model, task, settings, out, model_description=model_description, data_dir=data_dir,
                             journal_path=journal_path)
    hierarchy, data, evaluator, evaluate, journal = ctx.hierarchy, ctx.data, ctx.evaluator, ctx.evaluate, ctx.journal

    log.info("evaluating on %s; journal %s (%d entries)", data.protocol, journal.path, len(journal))
    tic, journaled = time.perf_counter(), len(journal)
    baseline_metric, table, order = run_sensitivity(ctx, settings.levels, settings.const_a, progress=progress)
    sensitivity_seconds = time.perf_counter() - tic
    sensitivity_computed = len(journal) - journaled
    log.info("sensitivity: fp32 %s %.4g; %d plans (%d new) in %.0f s; block order %s", task.metric_name,
             baseline_metric, sum(len(row) for row in table.values()), sensitivity_computed, sensitivity_seconds,
             ", ".join(order))

    bars = SearchProgress(hierarchy, settings.levels, order=order, strategy=settings.strategy, enabled=progress)
    result = run_strategy(ctx, settings, table, order, bars, progress=progress)
    bars.close()
    log.info("%s search: %d candidates (%d new, %d from the journal), %d feasible, in %.0f s", settings.strategy,
             len(result.candidates), result.evaluations, result.journal_hits, len(result.feasible),
             sum(result.seconds.values()))

    report = base_report(model, task, settings, model_description, data, hierarchy, result, evaluator,
                          evaluate, journal, table, order, sensitivity_seconds)
    report["cost"] = cost_record(evaluator, sensitivity_computed, result, sensitivity_seconds)
    classify = bool(task.n_classes)
    family = family_of(model)
    rates = family.spike_rates(model, data.eval_batches[0], classify)
    tokens = mean_tokens_per_sample(data.eval_batches, "idx" if "idx" in data.eval_batches[0] else "input_ids")
    report["energy_estimate"] = {"baseline": model_energy(model, QuantPlan(), hierarchy, classify=classify,
                                                          tokens_per_sample=tokens, spike_rates=rates)}
    exit_code = 0
    try:
        selection = select(result, settings.alpha)
        ci = interval_fields(journal, settings.bootstrap(evaluator))
        report["selection"] = {**selection.to_dict(), **ci(selection.candidate.plan), "memory_saving_percent":
                               100.0 * (1.0 - selection.candidate.memory_fraction)}
        chosen = selection.candidate.plan
        quantized_rates = family.spike_rates(quantize_model(model, chosen, hierarchy), data.eval_batches[0],
                                             classify)
        report["energy_estimate"]["selection"] = model_energy(model, chosen, hierarchy, classify=classify,
                                                              tokens_per_sample=tokens, spike_rates=quantized_rates)
        ablation = alpha_ablation(result, settings.alphas)
        report["alpha_ablation"] = {str(a): s.to_dict() for a, s in ablation.items()}
        report["power"]["saving"] = evaluate.saving(QuantPlan(), selection.candidate.plan)
        export_selection(model, selection.candidate.plan, hierarchy, out, report)
        tic = time.perf_counter()
        report["report_split"] = score_on_report_split(
            ctx, settings, out, model_description=model_description, data_dir=data_dir, journal_path=journal_path,
            plans={"baseline": QuantPlan(), "selection": selection.candidate.plan,
                   **{f"alpha={a}": s.candidate.plan for a, s in ablation.items()}})
        report["timings"]["report_split_seconds"] = time.perf_counter() - tic
        held = report["report_split"]["metrics"]
        log.info("selection: %s %.4g on the search split, %.4f MB (%.1f%% saved); on the report split %.4g "
                 "(fp32 %.4g)", task.metric_name, selection.candidate.metric, selection.candidate.memory_bytes / MB,
                 report["selection"]["memory_saving_percent"], held["selection"], held["baseline"])
    except NoFeasibleCandidate as err:
        exit_code = EXIT_NO_FEASIBLE
        report["selection"] = None
        report["no_feasible"] = {"message": str(err), "closest": [
            {**c.to_dict(), "violation": v} for c, v in err.closest]}
        stale = out / "selection.safetensors"
        if stale.exists():
            stale.unlink()
            log.info("removed %s: it held an earlier run's selection and this run has none", stale)
    report["compilations"] = evaluator.compilations
    report["timings"]["total_seconds"] = time.perf_counter() - started
    report["invocations"] = [*previous_invocations(out), invocation(report, started_at)]
    write_outputs(out, report, table, task, settings)
    return report, exit_code


def score_on_report_split(ctx: EvaluationContext, settings: QSLMSettings, out: Path, *, plans: dict[str, QuantPlan],
                          model_description: dict, data_dir: str | Path | None,
                          journal_path: Path | None) -> dict[str, Any]:
    """The metric of each named plan on the report split, which the search never saw (journaled beside the
    search journal); with ``selection_split="same"`` the search split's metrics themselves (the paper's
    protocol), each with its ``metric_ci`` and ``delta_ci`` vs ``plans["baseline"]`` (the fp32 plan) there."""
    if settings.selection_split == "same":
        scored = ctx
    else:
        scored = prepare_evaluation(ctx.model, ctx.task, settings, out, model_description=model_description,
                                    data_dir=data_dir, split="report", evaluator=ctx.evaluator,
                                    journal_path=journal_path and report_split_journal_path(journal_path))
    metrics = CachedEvaluator(scored.evaluate, scored.hierarchy, scored.journal)(list(plans.values()))
    ci = interval_fields(scored.journal, settings.bootstrap(ctx.evaluator))
    scores = {"split": "report" if settings.selection_split == "held-out" else "same as the search",
              "protocol": scored.data.protocol, "eval_items": scored.data.eval_items,
              "metrics": dict(zip(plans, metrics, strict=True)),
              "intervals": {name: ci(plan) for name, plan in plans.items()}}
    if ctx.task.reports_f1:
        scores["f1"] = {name: journaled_f1(scored.journal, plan) for name, plan in plans.items()}
    return scores


def run_strategy(ctx: EvaluationContext, settings: QSLMSettings, table: dict, order: tuple[str, ...],
                 on_evaluated, *, progress: bool = False) -> SearchResult:
    """The search ``settings.strategy`` names, in calls of the evaluator's compiled sizes: the tiered search
    (qslm.md section 3; ``settings.stop`` its stop rule, speculating from the sensitivity ``table``) or the
    knapsack strategy (:mod:`qslm_jax.qslm.knapsack`; ``progress``: a bar of the plans of each of its calls,
    the first of which measures every unit at every level)."""
    sizes = ctx.evaluator.chunk_sizes(settings.chunk_size or max(BATCH_SIZES), stack_batches(ctx.data.eval_batches))
    confidence = settings.bootstrap(ctx.evaluator) if settings.confidence is not None else None
    common = dict(levels=settings.levels, const_a=settings.const_a, const_m=settings.const_m_mb,
                  higher_is_better=ctx.task.higher_is_better, journal=ctx.journal, on_evaluated=on_evaluated,
                  confidence=confidence)
    if settings.strategy == "knapsack":
        return knapsack_search(ctx.hierarchy, with_progress(ctx.evaluate, "knapsack", enabled=progress),
                               batch_size=sizes[0], **common)
    return tiered_search(ctx.hierarchy, ctx.evaluate, order=order, stop=settings.stop, sensitivity=table,
                         batch_sizes=sizes, **common)
