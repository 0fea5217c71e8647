"""The stages of :mod:`experiments.extreme_kd` (teacher, internal-layer KD, prediction KD) and its report:
everything that runs after the command line is parsed and checked (imported then, so ``--help`` needs no JAX).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from flax import nnx

from converters.bert import load_bert, save_bert
from converters.spikingbert import spikingbert_from_bert
from qslm_jax.data import bert_tokenizer
from qslm_jax.equilibrium.evaluation import energy_report, evaluate_student, evaluate_teacher, model_size
from qslm_jax.equilibrium.implicit import SolveLog, fixed_point
from qslm_jax.equilibrium.kd import LayerMap
from qslm_jax.equilibrium.student import KDObjective, implicit_forward, kd_loss, student_level
from qslm_jax.equilibrium.teacher import (
    check_internal_kd_shapes,
    check_student_teacher_io,
    teacher_loss,
    teacher_targets,
)
from qslm_jax.errors import ConfigError
from qslm_jax.model_io import save_model
from qslm_jax.models.bert import BERT, BertConfig
from qslm_jax.models.loading import STUDENT_DIR
from qslm_jax.models.spikingbert import SpikingBERT, SpikingBERTConfig
from qslm_jax.qslm.report import write_json
from qslm_jax.tasks.data import GlueSplits, load_glue_splits
from qslm_jax.training import TrainConfig, train


def _stage_config(args, steps: int, learning_rate: float, schedule: str) -> TrainConfig:
    return TrainConfig(steps=steps, learning_rate=learning_rate,
                       warmup_steps=round(args.warmup_fraction * steps), schedule=schedule,
                       checkpoint_every=args.checkpoint_every, seed=args.seed)


class _Stages:
    """Runs the stages in order with one step budget (``--stop-after``) and collects their histories."""

    def __init__(self, args, out: Path):
        self.args, self.out = args, out
        self.done = 0  # steps of the stages before the current one
        self.histories: dict[str, list[dict]] = {}
        self.seconds: dict[str, float] = {}
        self.solver_stats: dict[str, dict] = {}
        self.interrupted = False

    def run(self, name: str, model: nnx.Module, loss_fn, batch_at, config: TrainConfig, items: int,
            solve_log: SolveLog | None = None) -> nnx.Module:
        """Train one stage (resuming from its checkpoints); after an interruption, return ``model`` as is.

        ``solve_log``: the :class:`SolveLog` that ``loss_fn``'s feedback solves report to; its summary is
        printed and kept in ``solver_stats[name]``.
        """
        budget = None if self.args.stop_after is None else self.args.stop_after - self.done
        if self.interrupted or (budget is not None and budget <= 0):
            self.interrupted = True
            return model
        print(f"[{name}] {config.steps} steps, lr {config.learning_rate:g} ({config.schedule})")
        result = train(model, loss_fn, batch_at, config, checkpoint_dir=self.out / "checkpoints" / name,
                       items_per_batch=items, item_unit="example", progress=not self.args.no_progress,
                       stop_after=budget)
        self.done += config.steps
        self.histories[name] = result.history
        self.seconds[name] = result.seconds
        if solve_log is not None:
            self.solver_stats[name] = solve_log.summary()
            print(f"[{name}] {format_solver_stats(self.solver_stats[name])}")
        self.interrupted = budget is not None and budget < config.steps
        return result.model


def format_solver_stats(summary: dict) -> str:
    """One line per :meth:`SolveLog.summary`: solves, mean / max iterations, max residual, unconverged."""
    parts = []
    for kind, stats in summary.items():
        if not stats["solves"]:
            parts.append(f"{kind}: no solves")
            continue
        parts.append(f"{kind}: {stats['solves']} solves, {stats['iterations_mean']:.1f} iterations on average "
                     f"(max {stats['iterations_max']}), residual <= {stats['residual_max']:.2e}, "
                     f"{stats['unconverged']} unconverged")
    return "feedback solver " + "; ".join(parts)


def _teacher(args, data: GlueSplits, vocab: int, stages: _Stages, out: Path) -> tuple[BERT, str]:
    if args.teacher is not None:
        return load_bert(args.teacher), f"loaded from {args.teacher}"
    hidden = args.hidden or 128
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_layers=args.teacher_layers,
                        num_heads=args.heads or 4, intermediate_size=args.intermediate or 4 * hidden,
                        max_positions=args.max_length, num_labels=data.train.num_labels)
    teacher = BERT(config, rngs=nnx.Rngs(args.seed))
    teacher = stages.run("teacher", teacher, teacher_loss,
                         data.train.training_batches(args.batch_size, args.seed),
                         _stage_config(args, args.teacher_steps, args.teacher_lr, "cosine"), args.batch_size)
    if not stages.interrupted:
        save_bert(teacher, out / "teacher")
    return teacher, (f"trained here from random initialisation ({args.teacher_steps} steps, cross-entropy); "
                     f"saved to {out / 'teacher'} for --teacher")


def _student(args, teacher: BERT, num_labels: int, vocab: int) -> SpikingBERT:
    tc = teacher.config
    shape = {"hidden": args.hidden or tc.hidden_size, "heads": args.heads or tc.num_heads}
    shape["intermediate"] = args.intermediate or (tc.intermediate_size if shape["hidden"] == tc.hidden_size
                                                  else 4 * shape["hidden"])
    if args.init == "teacher":
        if shape != {"hidden": tc.hidden_size, "heads": tc.num_heads, "intermediate": tc.intermediate_size}:
            raise ConfigError(f"--init teacher copies the teacher's shape, but --hidden/--heads/"
                              f"--intermediate ask for {shape}: drop them or use --init random")
        student = spikingbert_from_bert(teacher, T=args.T, vth=args.vth, num_layers=args.blocks,
                                        num_classes=num_labels, feedback=args.feedback, seed=args.seed)
    else:
        config = SpikingBERTConfig(**shape, vocab=vocab, max_positions=tc.max_positions, num_classes=num_labels,
                                   T=args.T, vth=args.vth, feedback=args.feedback, num_blocks=args.blocks)
        student = SpikingBERT(config, rngs=nnx.Rngs(args.seed))
    if args.feedback:
        student.feedback.kernel[...] = args.feedback_scale * student.feedback.kernel[...]
    return student


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """Training loss and its parts (and training accuracy) against the step."""
    parts = [k for k in history[0] if k not in ("step", "grad_norm", "accuracy")]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in history]
    for key in parts:
        ax_loss.plot(steps, [r[key] for r in history], marker=".", label=key)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(fontsize=8)
    ax_acc.plot(steps, [100 * r["accuracy"] for r in history], marker=".")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("training-batch accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _task_metrics(metrics: dict[str, Any], task: str) -> dict[str, Any]:
    """F1 is reported for MRPC only (GLUE's metrics)."""
    return metrics if task == "mrpc" else {k: v for k, v in metrics.items() if k != "f1"}


def _with_targets(batch_at, targets):
    """``batch_at`` with the teacher's targets added to every batch (still a pure function of the step)."""
    return lambda step: targets(batch_at(step))


def _feedback_report(args, stages: _Stages) -> dict | None:
    """The feedback solver's settings and, per student stage, its statistics (None without --feedback)."""
    if not args.feedback:
        return None
    return {"initial_scale": args.feedback_scale, "solver": args.feedback_solver, "tol": args.feedback_tol,
            "max_iter": args.feedback_max_iter, "stages": stages.solver_stats,
            "note": "forward: the feedback fixed point z = g(z) from the SNN's last-layer rate (ends at once with "
                    "--gradient-at equilibrium, where g's value is pinned to the SNN's rate); adjoint: "
                    "beta = (dg/dz)^T beta + dL/dz in the backward pass; one solve each per training step, "
                    "counted for the steps this process ran (a resumed run: the resumed steps)"}


def _report(args, out: Path, data: GlueSplits, teacher: BERT, teacher_source: str, student: SpikingBERT,
            layer_map: LayerMap, stages: _Stages) -> dict:
    """Evaluate teacher and student on dev; write results.json and the training curves."""
    bits, progress = student_level(args.bits), not args.no_progress
    dev = evaluate_student(student, data.dev, bits, batch_size=args.eval_batch_size, progress=progress)
    teacher_dev = evaluate_teacher(teacher, data.dev, batch_size=args.eval_batch_size, progress=progress)
    results = {
        "task": args.task, "bits": args.bits, "seed": args.seed, "data": data.note,
        "teacher": {"source": teacher_source, "layers": teacher.config.num_layers,
                    "dev": _task_metrics(teacher_dev, args.task)},
        "student": {"config": dataclasses.asdict(student.config), "init": args.init,
                    "gradient_at": args.gradient_at, "feedback": _feedback_report(args, stages),
                    "internal_kd": not args.no_internal_kd, "layer_map": vars(layer_map),
                    "dev": _task_metrics(dev, args.task), "model_size": model_size(student, bits),
                    "energy": energy_report(student.config, dev["spike_rates"], dev["tokens_per_example"],
                                            bits)},
        "history": stages.histories, "train_seconds": stages.seconds,
    }
    write_json(out / "results.json", results)
    save_model(student, out / STUDENT_DIR, overwrite=True)  # latent weights; QSLM re-quantizes them at ``bits``
    for name, history in stages.histories.items():
        if history:
            plot_history(history, out / f"curve_{name}.png",
                         f"{args.task}, {args.bits:g}-bit student: {name}")
    f1 = f" (F1 {dev['f1']:.2f})" if args.task == "mrpc" else ""
    print(f"{args.task} dev: student ({args.bits:g}-bit) {dev['accuracy']:.2f}%{f1}, teacher "
          f"{teacher_dev['accuracy']:.2f}%; mean spike rate {dev['mean_spike_rate']:.3f}; size "
          f"{results['student']['model_size']['megabytes']:.2f} MB -> {out}")
    return results


def run_stages(args, out: Path) -> dict:
    """Train the stages of the checked flags ``args`` into ``out`` (each resuming from its checkpoints) and
    report; returns the results (or ``status: interrupted`` after ``--stop-after``)."""
    bits = student_level(args.bits)
    tokenizer = bert_tokenizer(data_dir=args.data_dir)
    data = load_glue_splits(args.task, tokenizer, data_dir=args.data_dir, max_length=args.max_length,
                            train_limit=args.train_limit, eval_limit=args.eval_limit, split_seed=args.seed)
    print(data.note)
    stages = _Stages(args, out)

    teacher, teacher_source = _teacher(args, data, tokenizer.vocab_size, stages, out)
    student = _student(args, teacher, data.train.num_labels, tokenizer.vocab_size)
    check_student_teacher_io(student.config, teacher, data.train.num_labels)
    layer_map = LayerMap.uniform(student.config.num_blocks, teacher.config.num_layers)
    batch_at = data.train.training_batches(args.batch_size, args.seed)
    objectives = [("prediction", KDObjective.preset(args.prediction, temperature=args.temperature),
                   _stage_config(args, args.steps, args.lr, "cosine"))]
    if not args.no_internal_kd:
        check_internal_kd_shapes(student.config, teacher)
        internal_steps = args.steps if args.internal_steps is None else args.internal_steps
        objectives.insert(0, ("internal", KDObjective.preset("internal"),
                              _stage_config(args, internal_steps, args.internal_lr, "constant")))
    for name, objective, config in objectives:
        stage_batches = batch_at
        if objective.uses_teacher:
            targets = teacher_targets(teacher, layer_map, internal=objective.internal,
                                      predictions=objective.soft_ce > 0)
            stage_batches = _with_targets(batch_at, targets)
        solve_log = SolveLog() if args.feedback else None
        feedback_solve = functools.partial(fixed_point, solver=args.feedback_solver, tol=args.feedback_tol,
                                           max_iter=args.feedback_max_iter, log=solve_log)
        forward = functools.partial(implicit_forward, gradient_at=args.gradient_at, feedback_solve=feedback_solve)
        student = stages.run(name, student, kd_loss(objective, bits, forward), stage_batches, config,
                             args.batch_size, solve_log)

    if stages.interrupted:
        print(f"stopped after {args.stop_after} steps (--stop-after): rerun the command without --stop-after "
              "(or with a larger one) to resume")
        return {"status": "interrupted", "steps": args.stop_after, "out": str(out)}
    return _report(args, out, data, teacher, teacher_source, student, layer_map, stages)


