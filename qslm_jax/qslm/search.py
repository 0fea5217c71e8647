"""The QSLM tiered search (qslm.md section 3) over a batched evaluator, plus the sensitivity analysis (section
1).

``evaluate(plans) -> metrics`` is any callable (in practice the vmap-batched model evaluator); memory comes
from ``memory_bytes(hierarchy, plan)`` (:mod:`qslm_jax.quant.memory`). ``ok(c)``: accuracy drop ``A_0 - A_c <= const_a``
(``higher_is_better``) or perplexity increase ``P_c - P_0 <= const_a``; ``feasible(c)``: ``ok(c)`` and
``memory(c) <= const_m`` (MB = 10^6 B). With ``confidence`` (``--confidence``, a
:class:`~qslm_jax.qslm.uncertainty.Bootstrap` at that level) ``ok(c)`` also needs the whole paired bootstrap
interval of the change vs the baseline (``delta_ci``) within ``const_a``: the worse end of the interval, not
only the point, meets the constraint (a two-sided interval at level ``l`` is a one-sided test at
``(1 + l) / 2``). This rule never passes a candidate the point rule fails. It needs the per-example statistics
(``evaluate`` returning :class:`~qslm_jax.qslm.uncertainty.Evaluation`, or the journal's).

Phases (levels Q descending, 32 = fp32 excluded after the baseline):

1. baseline: the fp32 plan;
2. global: every block at q for q in Q, descending; ``q_g`` = the last level of the passing prefix;
3. block: from every block at ``q_g``, for each block in ``order``, the levels below its current one; the block
   keeps the lowest level of the passing prefix (it and every level above it passed ``ok``);
4. module: for each block with modules (in ``order``), for each module, the same below its block's level.

Stop rule. The paper's rule (``stop=True``) ends a unit at its first failing level, so a lower level that would
pass again (metrics are not monotone in the bits) is never reached. ``stop=False`` (``--no-stop``) evaluates
every level of each unit and keeps the lowest level that passed ``ok``, wherever it lies: more evaluations per
unit, every one of them selectable, and a unit can end lower than under the paper's rule.

Scheduling (every computed slot useful). The search is the sequential loop above (:func:`_walk`), replayed
against the metrics known so far; the first plan it needs and does not know is certain to be used. Each batched
call holds that plan plus the plans the loop would need next if predicted outcomes hold (speculation): the
prediction is additive over the sensitivity table, ``d(child) = d(parent) + A(child) - A(parent)`` with
``A(plan)`` the sum over blocks of each block's measured degradation at its level (a block's modules share it in
proportion to their parameters, unless the table has rows for modules). A prediction is trusted only when it
lies further from ``const_a`` than ``depth`` times the largest error such predictions have made so far in this
phase, and only once the phase has :data:`MIN_OBSERVATIONS` measured errors (``depth``: predicted links to the
last measured plan); speculation stops at the first untrusted
outcome a later plan depends on, and the batch is cut to the largest allowed size (``batch_sizes``, the
evaluator's compiled sizes) that fits. Speculated plans the loop then does not reach are recorded with
``after_stop=True`` (not selectable), so the reached candidates, the plan and the selection are exactly the
sequential loop's whatever the prediction does; the prediction only decides how many calls it takes. The
schedule is a deterministic function of the metrics, so a rerun on the journal replays it with 0 evaluations.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qslm_jax.errors import ConfigError
from qslm_jax.qslm.journal import Journal
from qslm_jax.qslm.uncertainty import Bootstrap, Evaluation, Examples
from qslm_jax.quant.memory import MB, memory_bytes
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import FP32, Level, check_level

if TYPE_CHECKING:
    from qslm_jax.quant.hierarchy import Hierarchy

MODEL_UNIT = "model"  # the unit name of baseline and global candidates
Evaluate = Callable[[list[QuantPlan]], Sequence[float | Evaluation]]
Interval = Callable[[QuantPlan], float]  # plan -> the worse end of its delta_ci, as a degradation


@dataclass(frozen=True)
class Candidate:
    """One evaluated plan: which ``unit`` was set to which ``level`` in which ``phase``, and the outcome."""

    plan: QuantPlan
    phase: str  # "baseline", "global", "block", "module"
    unit: str  # "model", a block name or a qualified module name
    level: Level
    metric: float
    memory_bytes: int
    memory_fraction: float  # M_q / M_0
    ok: bool
    feasible: bool
    after_stop: bool = False  # evaluated speculatively, not reached by the sequential search

    @property
    def selectable(self) -> bool:
        """Feasible and reached by the (sequential) search: a candidate for the selection."""
        return self.feasible and not self.after_stop

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON/CSV reports (``plan`` as its dict)."""
        return {"phase": self.phase, "unit": self.unit, "level": self.level, "metric": self.metric,
                "memory_bytes": self.memory_bytes, "memory_mb": self.memory_bytes / MB,
                "memory_fraction": self.memory_fraction, "ok": self.ok, "feasible": self.feasible,
                "after_stop": self.after_stop, "plan": self.plan.to_dict()}


@dataclass(frozen=True)
class SearchResult:
    """Everything the search evaluated and how it went."""

    baseline: Candidate
    candidates: tuple[Candidate, ...]  # every evaluated candidate in search order, the baseline first
    plan: QuantPlan  # the assignment the search ended with (the last accepted one)
    global_level: Level  # q_g
    levels: tuple[Level, ...]
    order: tuple[str, ...]  # the block order of phases 3 and 4
    const_a: float
    const_m: float  # MB
    higher_is_better: bool
    evaluations: int  # plans passed to ``evaluate`` (journal hits excluded)
    calls: int  # calls of ``evaluate``
    journal_hits: int  # plans whose metric came from the journal
    seconds: Mapping[str, float] = field(default_factory=dict)  # wall time per phase
    used: int = 0  # of ``evaluations``: plans the search reached (the rest is discarded speculation)
    strategy: str = "tiered"

    @property
    def feasible(self) -> tuple[Candidate, ...]:
        """The selectable candidates: both constraints met, reached by the search (not ``after_stop``)."""
        return tuple(c for c in self.candidates if c.selectable)

    @property
    def const_m_bytes(self) -> float:
        """The memory budget in bytes."""
        return self.const_m * MB

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``report.json``."""
        return {"baseline": self.baseline.to_dict(), "candidates": [c.to_dict() for c in self.candidates],
                "plan": self.plan.to_dict(), "global_level": self.global_level, "levels": list(self.levels),
                "order": list(self.order), "const_a": self.const_a, "const_m_mb": self.const_m,
                "higher_is_better": self.higher_is_better, "evaluations": self.evaluations,
                "calls": self.calls, "journal_hits": self.journal_hits, "seconds": dict(self.seconds),
                "used": self.used, "strategy": self.strategy}


def search_levels(levels: Sequence[Level]) -> tuple[Level, ...]:
    """The valid, distinct levels below fp32 in descending order (the order the phases try them)."""
    checked = {check_level(q) for q in levels}
    return tuple(sorted((q for q in checked if q != FP32), reverse=True))


def degradation(metric: float, baseline: float, higher_is_better: bool) -> float:
    """How much worse ``metric`` is than ``baseline``: the accuracy drop or the perplexity increase
    (negative when better; +inf when the metric is not finite)."""
    if not math.isfinite(metric):
        return math.inf
    return baseline - metric if higher_is_better else metric - baseline


class CachedEvaluator:
    """``evaluate`` behind an in-memory cache and an optional journal, counting calls and evaluations.

    Only plans neither cached nor journaled reach ``evaluate``, all of them in one call. Per-example
    statistics (``evaluate`` returning :class:`Evaluation`) are kept and journaled with the metrics.
    """

    def __init__(self, evaluate: Evaluate, hierarchy: Hierarchy, journal: Journal | None = None):
        self.evaluate, self.hierarchy, self.journal = evaluate, hierarchy, journal
        self.cache: dict[str, float] = {}
        self.examples: dict[str, Examples | None] = {}
        self.calls = self.evaluations = self.journal_hits = 0
        self.computed: set[str] = set()  # keys of the plans passed to ``evaluate``

    def __call__(self, plans: Sequence[QuantPlan]) -> list[float]:
        """The metric of every plan (from the cache, the journal, or one batched ``evaluate`` call)."""
        todo: dict[str, QuantPlan] = {}
        for plan in plans:
            key = plan.key()
            if key in self.cache or key in todo:
                continue
            journaled = self.journal.metric(key) if self.journal is not None else None
            if journaled is None:
                todo[key] = plan
            else:
                self.cache[key] = journaled
                self.examples[key] = self.journal.examples(key)
                self.journal_hits += 1
        if todo:
            batch = list(todo.values())
            results = list(self.evaluate(batch))
            metrics = [float(m) for m in results]
            self.calls += 1
            self.evaluations += len(batch)
            if len(metrics) != len(batch):
                raise ConfigError(f"evaluate returned {len(metrics)} metrics for {len(batch)} plans; it must "
                                  f"return one metric per plan, in order")
            self.computed.update(todo)
            for key, plan, metric, result in zip(todo, batch, metrics, results, strict=True):
                self.cache[key] = metric
                self.examples[key] = result.examples if isinstance(result, Evaluation) else None
                if self.journal is not None:
                    self.journal.record(plan, metric, memory_bytes(self.hierarchy, plan), self.examples[key])
        return [self.cache[plan.key()] for plan in plans]

    def examples_of(self, plan: QuantPlan) -> Examples:
        """The per-example statistics of an evaluated ``plan`` (:class:`ConfigError` if there are none)."""
        examples = self.examples.get(plan.key())
        if examples is None:
            raise ConfigError(f"no per-example statistics for plan {plan.key()}: the interval rule "
                              f"(--confidence) needs an evaluate function returning Evaluation objects (the "
                              f"model evaluator does) and journal entries that store them")
        return examples


def interval_rule(confidence: Bootstrap, evaluator: CachedEvaluator, higher_is_better: bool) -> Interval:
    """``plan -> `` the worse end of the plan's paired ``delta_ci`` vs the fp32 baseline as a degradation
    (:meth:`Bootstrap.worst_degradation`; cached per plan)."""
    worst: dict[str, float] = {}

    def interval(plan: QuantPlan) -> float:
        key = plan.key()
        if key not in worst:
            worst[key] = confidence.worst_degradation(evaluator.examples_of(plan),
                                                      evaluator.examples_of(QuantPlan()), higher_is_better)
        return worst[key]

    return interval


def passes(degradation: float, plan: QuantPlan, const_a: float, interval: Interval | None) -> bool:
    """The performance constraint: ``degradation <= const_a`` (the paper's point rule) and, with an
    ``interval`` rule, the worse end of the plan's ``delta_ci`` too (nan fails)."""
    return degradation <= const_a and (interval is None or interval(plan) <= const_a)


def check_constraints(const_a: float, const_m: float) -> None:
    """Refuse ``const_a < 0`` or ``const_m <= 0`` (MB) with a :class:`ConfigError`."""
    if const_a < 0 or const_m <= 0:
        raise ConfigError(f"expected const_a >= 0 and const_m > 0 (MB), found const_a={const_a}, "
                          f"const_m={const_m}")


def check_baseline(metric: float) -> float:
    """The fp32 baseline ``metric``, refused (:class:`ConfigError`) when it is not finite."""
    if not math.isfinite(metric):
        raise ConfigError(f"the fp32 baseline metric is {metric}: expected a finite number; check the "
                          f"evaluator and the data before searching")
    return metric


def _check_order(hierarchy: Hierarchy, order: Sequence[str] | None) -> tuple[str, ...]:
    if order is None:
        return tuple(hierarchy.blocks)
    order = tuple(order)
    missing = [b for b in hierarchy.blocks if b not in order]
    unknown = [b for b in order if b not in hierarchy.blocks]
    if missing or unknown or len(set(order)) != len(order):
        raise ConfigError(f"order must list every block of the hierarchy once: {list(hierarchy.blocks)}; "
                          f"found {list(order)} (missing {missing}, unknown {unknown})")
    return order


BATCH_SIZES = (8, 4, 2, 1)  # default allowed batch sizes: the compiled sizes of an Evaluator with chunk_size 8
MIN_OBSERVATIONS = 2  # measured prediction errors a phase needs before its predictions are trusted


@dataclass(frozen=True)
class Step:
    """One evaluation the sequential search asks for: ``plan`` is ``parent`` with ``unit`` set to ``level``
    (``parent`` is None for the baseline)."""

    plan: QuantPlan
    phase: str
    unit: str
    level: Level
    parent: QuantPlan | None = None


@dataclass(frozen=True)
class Judge:
    """``ok`` / ``feasible`` of qslm.md section 3 against a measured fp32 baseline; builds :class:`Candidate`."""

    hierarchy: Hierarchy
    baseline_metric: float
    const_a: float
    const_m: float  # MB
    higher_is_better: bool
    interval: Interval | None = None  # the --confidence rule (:func:`interval_rule`); None: the point rule

    def degradation(self, metric: float) -> float:
        """The accuracy drop / perplexity increase of ``metric`` vs the baseline."""
        return degradation(metric, self.baseline_metric, self.higher_is_better)

    def ok(self, plan: QuantPlan, metric: float) -> bool:
        """The performance constraint (:func:`passes`)."""
        return passes(self.degradation(metric), plan, self.const_a, self.interval)

    def candidate(self, plan: QuantPlan, phase: str, unit: str, level: Level, metric: float, *,
                  after_stop: bool = False) -> Candidate:
        """The evaluated ``plan`` with its memory, ``ok`` and feasibility."""
        memory = memory_bytes(self.hierarchy, plan)
        ok = self.ok(plan, metric)
        return Candidate(plan, phase, unit, level, metric, memory, memory / self.hierarchy.fp32_bytes, ok,
                         ok and memory <= self.const_m * MB, after_stop)


class _Halt(Exception):
    """Ends a replay of :func:`_walk` (an unknown plan, an untrusted prediction or a full batch)."""


def _walk(hierarchy: Hierarchy, q_levels: Sequence[Level], order: Sequence[str], stop: bool,
          probe: Callable[[Step], bool]) -> tuple[list[Step], QuantPlan]:
    """The sequential tiered search of the module docstring, one step at a time: every step it takes, in
    order, and the plan it ends with. ``probe(step) -> ok`` supplies each outcome (it may raise :class:`_Halt`;
    the step it was asked about is then the last of the path)."""
    path: list[Step] = []

    def descend(current: QuantPlan, phase: str, unit: str, start: Level,
                set_level: Callable[[QuantPlan, Level], QuantPlan]) -> QuantPlan:
        kept = current
        for q in (q for q in q_levels if q < start):
            step = Step(set_level(current, q), phase, unit, q, current)
            path.append(step)
            if probe(step):
                kept = step.plan  # levels descend: the last passing one is the lowest
            elif stop:
                break
        return kept

    path.append(Step(QuantPlan(), "baseline", MODEL_UNIT, FP32))
    probe(path[0])
    plan = descend(QuantPlan(), "global", MODEL_UNIT, FP32, QuantPlan.with_default)
    for block in order:
        plan = descend(plan, "block", block, plan.block_bits(block), lambda p, q, b=block: p.with_block(b, q))
    for block in order:
        for module in hierarchy.modules_of(block):
            plan = descend(plan, "module", module, plan.module_bits(module),
                           lambda p, q, m=module: p.with_module(m, q))
    return path, plan


class AdditivePrediction:
    """``A(plan)``: predicted degradation of a plan, the sum of the measured degradations of its units alone.

    ``table``: ``{unit: {level: metric}}`` with a row per block (the sensitivity table) and optionally rows for
    modules; a module without a row gets its block's degradation times its share of the block's module
    parameters. ``None`` where a level or a row is missing.
    """

    def __init__(self, hierarchy: Hierarchy, table: Mapping[str, Mapping[Level, float]], baseline_metric: float,
                 higher_is_better: bool):
        self.hierarchy = hierarchy
        self.rows = {unit: {q: degradation(m, baseline_metric, higher_is_better) for q, m in row.items()}
                     | {FP32: 0.0} for unit, row in table.items()}

    def unit(self, unit: str, level: Level) -> float | None:
        """The measured degradation of ``unit`` (block or module) alone at ``level``, or None."""
        row = self.rows.get(unit)
        if row is not None:
            return row.get(level)
        if "/" not in unit:
            return None
        block = unit.partition("/")[0]
        whole = self.rows.get(block, {}).get(level)
        share = self.hierarchy.numel(module=unit) / sum(self.hierarchy.numel(module=m)
                                                        for m in self.hierarchy.modules_of(block))
        return None if whole is None else whole * share

    def __call__(self, plan: QuantPlan) -> float | None:
        """``A(plan)``, or None if the table lacks a unit's level."""
        total = 0.0
        for block in self.hierarchy.blocks:
            modules = self.hierarchy.modules_of(block)
            parts = [self.unit(m, plan.module_bits(m)) for m in modules] if modules else \
                [self.unit(block, plan.block_bits(block))]
            if any(p is None for p in parts):
                return None
            total += sum(parts)
        return total


class _Schedule:
    """Drives :func:`_walk` with batched, speculative calls (module docstring, "Scheduling")."""

    def __init__(self, walk: Callable[[Callable[[Step], bool]], tuple[list[Step], QuantPlan]],
                 evaluator: CachedEvaluator, *, const_a: float, higher_is_better: bool, stop: bool,
                 batch_sizes: Sequence[int], table: Mapping[str, Mapping[Level, float]] | None,
                 interval: Interval | None = None):
        if not batch_sizes or any(int(b) != b or b < 1 for b in batch_sizes):
            raise ConfigError(f"batch_sizes must be positive integers, found {list(batch_sizes)}")
        self.walk, self.evaluator, self.table = walk, evaluator, table
        self.const_a, self.higher_is_better, self.stop, self.interval = const_a, higher_is_better, stop, interval
        self.batch_sizes = sorted({int(b) for b in batch_sizes}, reverse=True)
        self.metrics: dict[str, float] = {}  # measured in this run (journal hits included)
        self.evaluated: list[Step] = []  # in evaluation order
        self.errors: dict[str, list[float]] = {}  # |measured - predicted| increments, per phase
        self.baseline_metric: float | None = None
        self.predict: AdditivePrediction | None = None

    def run(self, on_batch: Callable[[list[Step], list[float]], None]) -> tuple[list[Step], QuantPlan]:
        """Evaluate batches until the walk completes on measured metrics; returns its path and plan."""
        while True:
            try:
                return self.walk(self._measured)
            except _Halt:
                batch = self._speculate()
            metrics = self.evaluator([step.plan for step in batch])
            for step, metric in zip(batch, metrics, strict=True):
                self.metrics[step.plan.key()] = metric
                self.evaluated.append(step)
                if step.phase == "baseline":
                    self._set_baseline(metric)
            self._observe(batch)
            on_batch(batch, metrics)

    def _set_baseline(self, metric: float) -> None:
        self.baseline_metric = check_baseline(metric)
        if self.table is not None:
            self.predict = AdditivePrediction(self.evaluator.hierarchy, self.table, metric, self.higher_is_better)

    def degradation(self, plan: QuantPlan) -> float | None:
        """The measured degradation of ``plan``, or None if it is not measured yet."""
        metric = self.metrics.get(plan.key())
        if metric is None or self.baseline_metric is None:
            return None
        return degradation(metric, self.baseline_metric, self.higher_is_better)

    def _measured(self, step: Step) -> bool:
        measured = self.degradation(step.plan)
        if measured is None:
            raise _Halt
        return passes(measured, step.plan, self.const_a, self.interval)

    def _increment(self, step: Step) -> float:
        """``A(child) - A(parent)`` (nan without a prediction)."""
        child = self.predict(step.plan) if self.predict is not None else None
        parent = self.predict(step.parent) if self.predict is not None else None
        return math.nan if child is None or parent is None else child - parent

    def _error_scale(self, phase: str) -> float:
        errors = self.errors.get(phase, [])
        return max(errors) if len(errors) >= MIN_OBSERVATIONS else math.inf

    def _speculate(self) -> list[Step]:
        """The next batch: the first unmeasured step of the walk, then the steps it would take next while
        the predicted outcomes they depend on are trusted, cut to an allowed batch size."""
        batch: list[Step] = []
        predicted: dict[str, tuple[float, int]] = {}  # key -> (predicted degradation, depth)
        untrusted: list[tuple[str, str]] = []  # (phase, unit) of the first untrusted outcome

        def probe(step: Step) -> bool:
            key = step.plan.key()
            if key in self.metrics:
                return step.phase == "baseline" or self._measured(step)
            if untrusted and (self.stop or untrusted[0] != (step.phase, step.unit)):
                raise _Halt  # its being reached depends on an untrusted outcome
            if len(batch) == self.batch_sizes[0]:
                raise _Halt
            if key not in predicted:
                batch.append(step)
            if step.phase == "baseline":
                predicted[key] = (0.0, 0)
                return True
            parent = self.degradation(step.parent)
            parent, depth = (parent, 0) if parent is not None else predicted[step.parent.key()]
            guess, depth = parent + self._increment(step), depth + 1
            predicted[key] = (guess, depth)
            if not abs(guess - self.const_a) > depth * self._error_scale(step.phase):  # nan: untrusted
                untrusted.append((step.phase, step.unit))
            return guess <= self.const_a

        with contextlib.suppress(_Halt):
            self.walk(probe)
        size = next((b for b in self.batch_sizes if b <= len(batch)), len(batch))
        return batch[:size]

    def _observe(self, batch: list[Step]) -> None:
        for step in batch:
            if step.parent is None:
                continue
            child, parent = self.degradation(step.plan), self.degradation(step.parent)
            if child is not None and parent is not None:
                error = abs(child - parent - self._increment(step))
                if math.isfinite(error):
                    self.errors.setdefault(step.phase, []).append(error)


def tiered_search(
    hierarchy: Hierarchy,
    evaluate: Evaluate,
    *,
    levels: Sequence[Level],
    const_a: float,
    const_m: float,
    higher_is_better: bool,
    order: Sequence[str] | None = None,
    journal: Journal | None = None,
    on_evaluated: Callable[[Sequence[Candidate]], None] | None = None,
    stop: bool = True,
    sensitivity: Mapping[str, Mapping[Level, float]] | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    confidence: Bootstrap | None = None,
) -> SearchResult:
    """Run the tiered search of qslm.md section 3 (see the module docstring); ``const_m`` in MB.

    ``order``: the block order of the block and module phases (least sensitive first: see
    :func:`sensitivity_order`); default: the hierarchy's order. ``journal``: resume from / record into it.
    ``on_evaluated``: called with the candidates of each batched call as they are evaluated (progress
    reporting; whether each is reached is known at the end). ``stop``: the paper's stop rule (True) or
    ``--no-stop``. ``sensitivity``: ``{block or module: {level: metric}}`` for the speculation's prediction
    (without it every call holds one plan, or the baseline and the first global plan). ``batch_sizes``: the
    numbers of plans a call may hold (the evaluator's compiled sizes, so that no slot is padding).
    ``confidence``: the interval rule of the module docstring (None: the paper's point rule).
    """
    check_constraints(const_a, const_m)
    q_levels = search_levels(levels)
    order = _check_order(hierarchy, order)
    evaluator = CachedEvaluator(evaluate, hierarchy, journal)
    interval = interval_rule(confidence, evaluator, higher_is_better) if confidence is not None else None
    schedule = _Schedule(lambda probe: _walk(hierarchy, q_levels, order, stop, probe), evaluator,
                         const_a=const_a, higher_is_better=higher_is_better, stop=stop, batch_sizes=batch_sizes,
                         table=sensitivity, interval=interval)
    seconds = dict.fromkeys(("baseline", "global", "block", "module"), 0.0)
    tic = [time.perf_counter()]

    def on_batch(batch: list[Step], metrics: list[float]) -> None:
        now = time.perf_counter()
        seconds[batch[0].phase] += now - tic[0]  # a call is timed under the phase of its first (certain) plan
        tic[0] = now
        if on_evaluated is not None:
            judge = Judge(hierarchy, schedule.baseline_metric, const_a, const_m, higher_is_better, interval)
            on_evaluated([judge.candidate(s.plan, s.phase, s.unit, s.level, m) for s, m in zip(batch, metrics,
                                                                                                 strict=True)])

    path, plan = schedule.run(on_batch)
    judge = Judge(hierarchy, schedule.baseline_metric, const_a, const_m, higher_is_better, interval)
    reached = {step.plan.key() for step in path}
    discarded = {step.plan.key(): step for step in schedule.evaluated if step.plan.key() not in reached}
    candidates = [judge.candidate(s.plan, s.phase, s.unit, s.level, schedule.metrics[s.plan.key()]) for s in path]
    candidates += [judge.candidate(s.plan, s.phase, s.unit, s.level, schedule.metrics[key], after_stop=True)
                   for key, s in discarded.items()]
    return SearchResult(candidates[0], tuple(candidates), plan, plan.default, q_levels, order, const_a, const_m,
                        higher_is_better, evaluator.evaluations, evaluator.calls, evaluator.journal_hits, seconds,
                        used=len(reached & evaluator.computed), strategy="tiered" if stop else "tiered-no-stop")


def sensitivity_plans(hierarchy: Hierarchy, levels: Sequence[Level]) -> list[QuantPlan]:
    """Every block alone at every level below fp32 (the rest fp32), block-major in hierarchy order:
    the whole sensitivity analysis (qslm.md section 1) as one batch."""
    return [QuantPlan().with_block(block, q) for block in hierarchy.blocks for q in search_levels(levels)]


def sensitivity_table(hierarchy: Hierarchy, evaluate: Evaluate, levels: Sequence[Level], *,
                      journal: Journal | None = None) -> dict[str, dict[Level, float]]:
    """``{block: {level: metric}}`` of :func:`sensitivity_plans`, evaluated in one batched call
    (journaled)."""
    plans = sensitivity_plans(hierarchy, levels)
    metrics = iter(CachedEvaluator(evaluate, hierarchy, journal)(plans))
    return {block: {q: next(metrics) for q in search_levels(levels)} for block in hierarchy.blocks}


def sensitivity_order(table: Mapping[str, Mapping[Level, float]], baseline_metric: float, *, const_a: float,
                      higher_is_better: bool) -> tuple[str, ...]:
    """Blocks least sensitive first, from a sensitivity table ``{block: {level: metric}}``.

    A block's reach is the lowest level it passes ``ok`` alone at, the prefix rule applied from the highest
    level down (fp32 if even the highest fails). Sort key: reach ascending (a block that tolerates lower
    precision is less sensitive), then the degradation at its reach level (or at the highest level if it
    reaches nothing), then the table's order.
    """
    def key(item: tuple[int, str]) -> tuple[float, float, int]:
        index, block = item
        row = table[block]
        levels = sorted(row, reverse=True)
        if not levels:
            raise ConfigError(f"sensitivity table row of {block!r} is empty: expected a metric per level")
        reach, cost = FP32, degradation(row[levels[0]], baseline_metric, higher_is_better)
        for q in levels:
            d = degradation(row[q], baseline_metric, higher_is_better)
            if d > const_a:
                break
            reach, cost = q, d
        return reach, cost, index

    return tuple(block for _, block in sorted(enumerate(table), key=key))
