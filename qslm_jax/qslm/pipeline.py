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
which the search never saw (:mod:`qslm_jax.qslm.tasks`). ``"same"`` is the paper's protocol: one set for both.
Journals live outside the case folders (default ``OUT/../journals/<task>-<split>-<fingerprint>.jsonl``), so
cases of one model and task share them without touching each other's folders.

The paper's six cases (:data:`CASES`) are stated for SpikeGPT-216M (861.6 MB at fp32); for another model the
memory budgets scale with its fp32 size (:func:`case_budget_mb`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import platform
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
from flax import nnx

from qslm_jax.errors import ConfigError
from qslm_jax.models.spikegpt import SpikeGPT
from qslm_jax.qslm.device_memory import memory_budget_bytes
from qslm_jax.qslm.energy import LayerOps, estimate_energy, mean_tokens_per_sample
from qslm_jax.qslm.evaluator import Evaluator, stack_batches
from qslm_jax.qslm.finetuning import check_vocabulary, metric_of
from qslm_jax.qslm.journal import Journal, fingerprint
from qslm_jax.qslm.knapsack import knapsack_search
from qslm_jax.qslm.power import PowerMeter
from qslm_jax.qslm.progress import SearchProgress, with_progress
from qslm_jax.qslm.report import plot_pareto, plot_sensitivity, search_title, write_candidates_csv, write_json
from qslm_jax.qslm.search import (
    BATCH_SIZES,
    CachedEvaluator,
    SearchResult,
    sensitivity_order,
    sensitivity_table,
    tiered_search,
)
from qslm_jax.qslm.selection import ALPHAS, NoFeasibleCandidate, alpha_ablation, scored_candidates, select
from qslm_jax.qslm.tasks import Task, load_task_data
from qslm_jax.qslm.uncertainty import LEVEL, Bootstrap, Evaluation, describe, intervals
from qslm_jax.quant.hierarchy import DEFAULT_SCHEME, Hierarchy, hierarchy_of
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import QuantScheme

log = logging.getLogger(__name__)
MB = 1e6
PAPER_FP32_MB = 861.597696  # SpikeGPT-216M at fp32 (qslm.md section 2)
DEFAULT_LEVELS = (32, 16, 12, 8, 6, 4, 3, 2)
EXIT_NO_FEASIBLE = 3  # exit status of a search with no feasible candidate (1: bad input, 2: usage error)
SELECTION_SPLITS = ("held-out", "same")
# the paper's cases on SpikeGPT-216M (qslm.md "What the user gives and gets"): task, const_a, const_m (MB)
CASES = {
    "a1": ("sst2", 2.0, 400.0), "a2": ("sst2", 5.0, 400.0), "a3": ("sst2", 5.0, 420.0),
    "b1": ("wikitext2", 1.0, 400.0), "b2": ("wikitext2", 4.0, 400.0), "b3": ("wikitext2", 4.0, 420.0),
}


def case_budget_mb(case: str, fp32_bytes: int) -> float:
    """The memory budget of paper case ``case`` for a model of ``fp32_bytes``: the case's MB scaled by
    ``fp32 / 861.6 MB`` (so SpikeGPT-216M gets exactly 400 or 420 MB)."""
    if case not in CASES:
        raise ConfigError(f"unknown case {case!r}: expected one of {sorted(CASES)}")
    return CASES[case][2] * (fp32_bytes / MB) / PAPER_FP32_MB


@dataclass(frozen=True)
class QSLMSettings:
    """What a search is asked: constraints, levels, selection factor and evaluation set-up."""

    const_a: float
    const_m_mb: float
    levels: tuple[float, ...] = DEFAULT_LEVELS
    alpha: float = 0.5
    alphas: tuple[float, ...] = ALPHAS
    eval_limit: int | None = None
    eval_batch_size: int = 32
    chunk_size: int | None = 8
    devices: int | None = None  # number of local devices to shard candidates over (default all)
    memory_budget_gb: float | None = None  # per device, sizes the chunk (default: device_memory.DEFAULT_FRACTION)
    case: str | None = None  # the paper's case the constraints come from (reports only; not in journals)
    selection_split: str = "held-out"  # "held-out": choose on the selection split, report on another; "same"
    scheme: QuantScheme = DEFAULT_SCHEME  # quantizer (--scheme, --group-size); in the journal fingerprint
    strategy: str = "tiered"  # "tiered" (qslm.md section 3) or "knapsack" (qslm_jax.qslm.knapsack)
    stop: bool = True  # tiered: the paper's stop at a unit's first failing level (False: --no-stop)
    confidence: float | None = None  # --confidence: pass only if the whole delta_ci is within const_a

    def __post_init__(self):
        def finite(x) -> bool:
            return isinstance(x, int | float) and math.isfinite(x)

        checks = [
            ("const_a", self.const_a, "a finite number >= 0", finite(self.const_a) and self.const_a >= 0),
            ("const_m_mb", self.const_m_mb, "a number > 0 (MB; inf for no budget)",
             isinstance(self.const_m_mb, int | float) and self.const_m_mb > 0 and not math.isnan(self.const_m_mb)),
            ("alpha", self.alpha, "a finite number >= 0", finite(self.alpha) and self.alpha >= 0),
            ("alphas", self.alphas, "finite numbers >= 0", all(finite(a) and a >= 0 for a in self.alphas)),
            ("eval_limit", self.eval_limit, "None or an integer >= 1",
             self.eval_limit is None or (isinstance(self.eval_limit, int) and self.eval_limit >= 1)),
            ("eval_batch_size", self.eval_batch_size, "an integer >= 1",
             isinstance(self.eval_batch_size, int) and self.eval_batch_size >= 1),
            ("chunk_size", self.chunk_size, "None or an integer >= 1",
             self.chunk_size is None or (isinstance(self.chunk_size, int) and self.chunk_size >= 1)),
            ("devices", self.devices, "None or an integer >= 1",
             self.devices is None or (isinstance(self.devices, int) and self.devices >= 1)),
            ("memory_budget_gb", self.memory_budget_gb, "None or a number > 0 (GB per device)",
             self.memory_budget_gb is None or (finite(self.memory_budget_gb) and self.memory_budget_gb > 0)),
            ("selection_split", self.selection_split, f"one of {SELECTION_SPLITS}",
             self.selection_split in SELECTION_SPLITS),
            ("levels", self.levels, "at least one level", len(self.levels) >= 1),
            ("confidence", self.confidence, "None or a number in (0, 1)",
             self.confidence is None or (finite(self.confidence) and 0 < self.confidence < 1)),
        ]
        problems = [f"{name}={value!r} (expected {rule})" for name, value, rule, ok in checks if not ok]
        if problems:
            raise ConfigError(f"invalid search settings: {'; '.join(problems)}")

    @property
    def search_split(self) -> str:
        """The task split the search chooses on (:data:`qslm_jax.qslm.tasks.EVAL_SPLITS`)."""
        return "selection" if self.selection_split == "held-out" else "all"

    def bootstrap(self, evaluator: Evaluator) -> Bootstrap:
        """The intervals of the reports (at ``confidence``, else 95%) for ``evaluator``'s metric."""
        return Bootstrap(evaluator.metric.finalize, level=self.confidence or LEVEL)


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


def spikegpt_energy(model: SpikeGPT, plan: QuantPlan, hierarchy: Hierarchy, *, classify: bool,
                    tokens_per_sample: float, spike_rates: np.ndarray | None = None) -> dict[str, Any]:
    """Operation-count energy per token and per sample of ``tokens_per_sample`` tokens
    (:mod:`qslm_jax.qslm.energy`) of SpikeGPT under ``plan``.

    Every SpikeGPT Linear reads real values (LayerNorm outputs, ``r * wkv``, ``relu(k)^2``), so each is counted
    as MACs at its weight bit width; the LM head runs only for language modelling, the classifier only once
    per sequence (neglected). No layer is spike-driven, so there are no accumulates; the LIF spike rates are
    reported alongside.
    """
    c, layers = model.config.n_embd, []
    shapes = {"att.key": (c, c), "att.value": (c, c), "att.receptance": (c, c), "att.output": (c, c),
              "ffn.key": (c, 4 * c), "ffn.receptance": (c, c), "ffn.value": (4 * c, c)}
    for i in range(model.config.n_layer):
        for name, (n_in, n_out) in shapes.items():
            module = f"attention_{i}/{name}"
            layers.append(LayerOps(n_in, n_out, None, float(plan.module_bits(module)), name=module))
    if not classify:
        layers.append(LayerOps(c, model.config.vocab_size, None, float(plan.block_bits("output")), name="head"))
    estimate = estimate_energy(layers, tokens_per_sample=tokens_per_sample).to_dict()
    if spike_rates is not None:
        estimate["lif_spike_rates"] = np.asarray(spike_rates).tolist()
    return estimate


def _mean_spike_rates(model: SpikeGPT, batch: dict, classify: bool) -> np.ndarray:
    if classify:
        _, rates = model.classify(batch["idx"], batch["attention_mask"], return_spike_rates=True)
    else:
        _, rates = model(batch["idx"], return_spike_rates=True)
    return np.asarray(rates)


class MeteredEvaluate:
    """``evaluate(plans) -> metrics`` over fixed batches, with GPU power sampled around every batched call.

    The chunk sizes a call needs are compiled before the metered window opens, so the energy is that of
    computing only; each candidate gets the call's energy divided by the candidate slots the call computed
    (padding included), and its mean power is the call's (``per_plan``: plan key -> that record).
    """

    def __init__(self, evaluator: Evaluator, batches: Sequence[dict]):
        self.evaluator, self.batches = evaluator, list(batches)
        self.calls: list[dict[str, Any]] = []
        self.per_plan: dict[str, dict[str, float]] = {}

    def __call__(self, plans: list[QuantPlan], *, on_chunk=None) -> list[Evaluation]:
        """The metrics of ``plans`` with their per-example statistics (``on_chunk``:
        :meth:`Evaluator.example_stats`'s progress callback)."""
        self.evaluator.prepare(len(plans), self.batches)
        slots = self.evaluator.slots
        with PowerMeter() as meter:
            metrics = self.evaluator.evaluations(plans, self.batches, on_chunk=on_chunk)
        slots = self.evaluator.slots - slots
        reading = meter.reading.to_dict()
        per = reading["energy_j"] / slots if reading["measured"] else None
        self.calls.append({"plans": len(plans), "slots": slots, **reading, "energy_j_per_candidate": per})
        if reading["measured"]:
            self.per_plan.update({p.key(): {"energy_j": per, "mean_w": reading["mean_w"]} for p in plans})
        return metrics

    def saving(self, baseline: QuantPlan, selected: QuantPlan) -> dict[str, Any]:
        """Energy and mean power per candidate of ``selected`` vs the fp32 ``baseline`` and the saving
        ``100 (1 - selected / baseline)`` in percent (qslm.md section 4), or ``measured: False``."""
        base, sel = self.per_plan.get(baseline.key()), self.per_plan.get(selected.key())
        if base is None or sel is None:
            return {"measured": False, "reason": "no NVML reading for the baseline or the selection in this run"}
        return {"measured": True, "baseline": base, "selection": sel,
                "energy_saving_percent": 100.0 * (1.0 - sel["energy_j"] / base["energy_j"]),
                "power_saving_percent": 100.0 * (1.0 - sel["mean_w"] / base["mean_w"])}


@dataclass
class EvaluationContext:
    """Everything a search or sensitivity run evaluates with: the hierarchy, data, compiled evaluator
    (power-metered) and the journal."""

    model: SpikeGPT
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


def prepare_evaluation(model: SpikeGPT, task: Task, settings: QSLMSettings, out: Path, *, model_description: dict,
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
    hierarchy = evaluator.hierarchy if evaluator is not None else hierarchy_of(model, scheme=settings.scheme)
    data = load_task_data(task, ctx_len=model.config.ctx_len, eval_batch_size=settings.eval_batch_size,
                          eval_limit=settings.eval_limit, data_dir=data_dir, with_train=False, eval_split=split)
    check_vocabulary(model, data.eval_batches)
    if evaluator is None:
        devices = jax.local_devices()[:settings.devices] if settings.devices else jax.devices()
        evaluator = Evaluator(model, metric_of(task), hierarchy=hierarchy, chunk_size=settings.chunk_size,
                              devices=devices,
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


def write_sensitivity(out: Path, table: dict, baseline_metric: float, task: Task, *, title: str | None = None
                      ) -> None:
    """``sensitivity.csv`` (blocks x levels, metric) and the heat-map ``sensitivity.png`` (metric change)."""
    levels = sorted({q for row in table.values() for q in row}, reverse=True)
    lines = ["block," + ",".join(str(q) for q in levels)]
    lines += [f"{b}," + ",".join(f"{row[q]:.6g}" for q in levels) for b, row in table.items()]
    (out / "sensitivity.csv").write_text("\n".join(lines) + "\n")
    plot_sensitivity(out / "sensitivity.png", table, baseline_metric=baseline_metric, metric_name=task.metric_name,
                     higher_is_better=task.higher_is_better, title=title)


def run_qslm(model: SpikeGPT, task: Task, settings: QSLMSettings, out: Path, *, model_description: dict,
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

    report = _base_report(model, task, settings, model_description, data, hierarchy, result, evaluator,
                          evaluate, journal, table, order, sensitivity_seconds)
    report["cost"] = cost_record(evaluator, sensitivity_computed, result, sensitivity_seconds)
    classify = bool(task.n_classes)
    rates = _mean_spike_rates(model, data.eval_batches[0], classify)
    tokens = mean_tokens_per_sample(data.eval_batches, "idx")
    report["energy_estimate"] = {"baseline": spikegpt_energy(model, QuantPlan(), hierarchy, classify=classify,
                                                             tokens_per_sample=tokens, spike_rates=rates)}
    exit_code = 0
    try:
        selection = select(result, settings.alpha)
        ci = interval_fields(journal, settings.bootstrap(evaluator))
        report["selection"] = {**selection.to_dict(), **ci(selection.candidate.plan), "memory_saving_percent":
                               100.0 * (1.0 - selection.candidate.memory_fraction)}
        report["energy_estimate"]["selection"] = spikegpt_energy(model, selection.candidate.plan, hierarchy,
                                                                 classify=classify, tokens_per_sample=tokens)
        ablation = alpha_ablation(result, settings.alphas)
        report["alpha_ablation"] = {str(a): s.to_dict() for a, s in ablation.items()}
        report["power"]["saving"] = evaluate.saving(QuantPlan(), selection.candidate.plan)
        _export_selection(model, selection.candidate.plan, hierarchy, out, report)
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
    report["invocations"] = [*_previous_invocations(out), _invocation(report, started_at)]
    _write_outputs(out, report, table, task, settings)
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
    return {"split": "report" if settings.selection_split == "held-out" else "same as the search",
            "protocol": scored.data.protocol, "eval_items": scored.data.eval_items,
            "metrics": dict(zip(plans, metrics, strict=True)),
            "intervals": {name: ci(plan) for name, plan in plans.items()}}


def _invocation(report: dict, started_at: str) -> dict[str, Any]:
    return {"started": started_at, "evaluations": report["evaluations"], "journal_hits": report["journal_hits"],
            "compilations": report["compilations"], "timings": dict(report["timings"])}


def _previous_invocations(out: Path) -> list[dict[str, Any]]:
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


STRATEGIES = ("tiered", "knapsack")


def check_strategy(settings: QSLMSettings) -> None:
    """Refuse an unknown ``strategy`` and ``stop=False`` outside the tiered search (:class:`ConfigError`)."""
    if settings.strategy not in STRATEGIES:
        raise ConfigError(f"unknown search strategy {settings.strategy!r}: expected one of {list(STRATEGIES)}")
    if not settings.stop and settings.strategy != "tiered":
        raise ConfigError(f"--no-stop changes the tiered search's stop rule; the {settings.strategy} strategy "
                          f"has none: drop --no-stop or use --strategy tiered")


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


def resampling_unit(task: Task, ctx_len: int) -> str:
    """What one bootstrap example is (:mod:`qslm_jax.qslm.uncertainty`): a sentence (pair), or a window."""
    if task.n_classes:
        return "sentence (one evaluation example)"
    return (f"window of {ctx_len} tokens (the evaluation's unit; documents are few and uneven; adjacent windows "
            f"are correlated, so the intervals are slightly narrow)")


def _base_report(model, task, settings, model_description, data, hierarchy, result: SearchResult, evaluator,
                 evaluate: MeteredEvaluate, journal, table, order, sensitivity_seconds) -> dict[str, Any]:
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
        "intervals": describe(bootstrap, resampling_unit(task, model.config.ctx_len)),
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


def _export_selection(model, plan: QuantPlan, hierarchy: Hierarchy, out: Path, report: dict) -> None:
    from qslm_jax.quant.export import export_quantized

    written = export_quantized(model, plan, out / "selection.safetensors", hierarchy=hierarchy)
    report["export"] = {"path": str(written.path), "file_bytes": written.file_bytes,
                        "payload_bytes": written.payload_bytes, "accounted_memory_bytes": written.memory_bytes}


def _write_outputs(out: Path, report: dict, table, task: Task, settings: QSLMSettings) -> None:
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
