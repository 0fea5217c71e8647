"""A small, resumable training loop for any Flax NNX model (fine-tuning SpikeGPT, KD training of SpikingBERT).

* optimizer: optax AdamW behind global-norm clipping, with linear warm-up then cosine or constant schedule;
* checkpoints: orbax, every ``checkpoint_every`` steps and at the end (parameters, optimizer state, step
  and the loss history); a rerun with the same ``checkpoint_dir`` resumes from the newest readable one (a
  corrupt newest step falls back to the previous kept step, saying so), and only when the settings and the
  batch shapes (so the batch size) are those of the saved run;
* determinism: the data come from ``batch_at(step)``, a pure function of the step, so an interrupted and
  resumed run reproduces the uninterrupted one exactly (same seed, same data order);
* divergence: a step whose loss, gradient or update is not finite stops the run with :class:`TrainingError`
  before anything is saved (the parameters of the last good step stay in the last checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from qslm_jax.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)
Batch = Any
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; every field except ``steps`` must match when a run is resumed."""

    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" (decay to 10% of the peak) or "constant" after warm-up
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    checkpoint_every: int = 200
    seed: int = 0

    def __post_init__(self):
        problems = [f"{name}={value!r} (expected {rule})" for name, value, rule, ok in (
            ("steps", self.steps, "an integer >= 0", isinstance(self.steps, int) and self.steps >= 0),
            ("learning_rate", self.learning_rate, "a finite number > 0",
             math.isfinite(self.learning_rate) and self.learning_rate > 0),
            ("warmup_steps", self.warmup_steps, "an integer >= 0",
             isinstance(self.warmup_steps, int) and self.warmup_steps >= 0),
            ("weight_decay", self.weight_decay, "a finite number >= 0",
             math.isfinite(self.weight_decay) and self.weight_decay >= 0),
            ("clip_norm", self.clip_norm, "a finite number > 0", math.isfinite(self.clip_norm) and self.clip_norm > 0),
            ("checkpoint_every", self.checkpoint_every, "an integer >= 0 (0: only at the end)",
             isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0),
        ) if not ok]
        if problems:
            raise ConfigError(f"invalid training settings: {'; '.join(problems)}")

    def learning_rate_schedule(self) -> optax.Schedule:
        """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then cosine or constant."""
        warmup = max(self.warmup_steps, 0)
        if self.schedule == "constant":
            return optax.join_schedules(
                [optax.linear_schedule(0.0, self.learning_rate, max(warmup, 1)),
                 optax.constant_schedule(self.learning_rate)],
                [warmup],
            )
        if self.schedule == "cosine":
            return optax.warmup_cosine_decay_schedule(
                0.0, self.learning_rate, max(warmup, 1), max(self.steps, warmup + 1), self.learning_rate * 0.1
            )
        raise ConfigError(f"unknown schedule {self.schedule!r}: expected 'cosine' or 'constant'")

    def optimizer(self) -> optax.GradientTransformation:
        """``clip_by_global_norm(clip_norm)`` followed by AdamW (decoupled weight decay on matrices only)."""
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.adamw(self.learning_rate_schedule(), weight_decay=self.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)),
        )


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model, the loss history and where the run started from."""

    model: nnx.Module
    history: list[dict[str, float]]
    resumed_from_step: int
    seconds: float
    steps_done: int  # optimizer steps the returned parameters have taken (resumed ones included)


def _metadata(config: TrainConfig) -> dict:
    fields = dataclasses.asdict(config)
    fields.pop("steps")
    return fields


def _batch_shapes(batch: Batch) -> dict[str, list[int]]:
    """``{path: shape}`` of a batch pytree: part of the resume check (a changed batch size changes a run)."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    return {jax.tree_util.keystr(path): list(jnp.shape(leaf)) for path, leaf in leaves}


def _checkpoint_manager(directory: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
                                 item_names=("state", "meta"))


def _restore_newest_readable(manager: ocp.CheckpointManager, abstract: Any, directory: Path
                             ) -> tuple[int, Any, list[int]]:
    """Restore the newest checkpoint that reads; a corrupt newer one is skipped with a warning. Returns the step,
    the restored items and the unreadable newer steps."""
    failures, unreadable = [], []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            if not isinstance(restored.meta, dict) or not {"config", "history"} <= restored.meta.keys():
                raise ValueError("its metadata lacks 'config' / 'history'")
        except Exception as err:  # orbax raises many types (KeyError, ValueError, OSError, ...) for bad files
            failures.append(f"step {step}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
            log.warning("checkpoint step %d in %s is unreadable (%s); trying the previous kept step", step,
                        directory, failures[-1])
            unreadable.append(step)
            continue
        if failures:
            log.warning("resuming from step %d instead (%d newer checkpoint(s) unreadable)", step, len(failures))
        return step, restored, unreadable
    raise TrainingError(f"no readable checkpoint in {directory} ({'; '.join(failures)}): delete the directory "
                        "to start over, or restore it from a backup")


def train(
    model: nnx.Module,
    loss_fn: LossFn,
    batch_at: Callable[[int], Batch],
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    trainable: Any = nnx.Param,
    items_per_batch: int | None = None,
    item_unit: str = "item",
    log_every: int = 10,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Minimise ``loss_fn(model, batch_at(step))`` for ``config.steps`` steps; returns the trained model.

    ``trainable`` is an NNX filter of the variables the optimizer updates (others are carried unchanged).
    ``items_per_batch`` (tokens or examples, named ``item_unit``) turns steps/s into a throughput in the
    progress bar.
    ``stop_after`` ends the run after that many steps in total, as an interruption would (for tests and
    time-limited jobs); the last checkpoint lets a later call continue.
    """
    graphdef, params, rest = nnx.split(model, trainable, ...)
    tx = config.optimizer()
    opt_state = tx.init(params)
    history: list[dict[str, float]] = []
    start = 0

    manager = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir).resolve()
        manager = _checkpoint_manager(checkpoint_dir)
    shapes = _batch_shapes(batch_at(0))
    if manager is not None and manager.latest_step() is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt": opt_state})
        latest, restored, unreadable = _restore_newest_readable(manager, abstract, checkpoint_dir)
        if unreadable:  # moved aside (kept for inspection) so the resumed run can save those steps again
            manager.close()
            for step in unreadable:
                aside = checkpoint_dir.with_name(f"{checkpoint_dir.name}-unreadable-step-{step}-{int(time.time())}")
                (checkpoint_dir / str(step)).rename(aside)
                log.warning("moved the unreadable checkpoint step %d to %s", step, aside)
            manager = _checkpoint_manager(checkpoint_dir)
        saved = {"config": restored.meta["config"], "batch_shapes": restored.meta.get("batch_shapes")}
        if saved != {"config": _metadata(config), "batch_shapes": shapes}:
            raise ConfigError(
                f"checkpoint directory {checkpoint_dir} belongs to a run with settings {saved['config']} and "
                f"batches {saved['batch_shapes']}, not {_metadata(config)} and {shapes}: use another "
                "--out/--checkpoint-dir or the same settings (batch size included) to resume"
            )
        params, opt_state = restored.state["params"], restored.state["opt"]
        history, start = restored.meta["history"], latest
        log.info("resuming from step %d (checkpoint in %s)", start, checkpoint_dir)

    @jax.jit
    def step_fn(params, opt_state, rest, batch):
        def loss_of(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        return optax.apply_updates(params, updates), new_opt_state, loss, metrics, grad_norm, finite

    def save(step: int) -> None:
        if manager is not None:
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt": opt_state}),
                meta=ocp.args.JsonSave({"config": _metadata(config), "batch_shapes": shapes,
                                        "history": history})), force=True)
            manager.wait_until_finished()

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    began = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=not progress, unit="step")
    window_start, window_items = time.perf_counter(), 0
    for step in bar:
        new_params, new_opt_state, loss, metrics, grad_norm, finite = step_fn(params, opt_state, rest,
                                                                              batch_at(step))
        if not bool(finite):
            bar.close()
            if manager is not None:
                manager.close()
            raise TrainingError(
                f"training diverged at step {step + 1}: loss {float(loss)}, gradient norm {float(grad_norm)} "
                f"(a non-finite loss, gradient or update); nothing was saved for this step. Lower the "
                f"learning rate ({config.learning_rate}) or check the data, then rerun"
                + (f" (it resumes from the last checkpoint in {checkpoint_dir})" if manager is not None else ""))
        params, opt_state = new_params, new_opt_state
        window_items += items_per_batch or 1
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            record = {"step": step + 1, "loss": float(loss), "grad_norm": float(grad_norm),
                      **{k: float(jnp.mean(v)) for k, v in metrics.items()}}
            history.append(record)
            rate = window_items / max(time.perf_counter() - window_start, 1e-9)
            bar.set_postfix(loss=f"{record['loss']:.4f}",
                            **{(f"{item_unit}/s" if items_per_batch else "step/s"): f"{rate:.0f}"})
            window_start, window_items = time.perf_counter(), 0
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            save(step + 1)
    bar.close()
    if end > start and (not config.checkpoint_every or end % config.checkpoint_every):
        save(end)
    if manager is not None:
        manager.close()
    return TrainResult(nnx.merge(graphdef, params, rest), history, start, time.perf_counter() - began,
                       max(end, start))

