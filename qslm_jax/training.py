"""A small, resumable training loop for any Flax NNX model (fine-tuning SpikeGPT, KD training of SpikingBERT).

* optimizer: optax AdamW behind global-norm clipping, with linear warm-up then cosine or constant schedule;
* checkpoints: orbax, every ``checkpoint_every`` steps and at the end (parameters, optimizer state, step
  and the loss history); a rerun with the same ``checkpoint_dir`` resumes from the newest one;
* determinism: the data come from ``batch_at(step)``, a pure function of the step, so an interrupted and
  resumed run reproduces the uninterrupted one exactly (same seed, same data order).
"""

from __future__ import annotations

import dataclasses
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

from qslm_jax.errors import ConfigError

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


def _metadata(config: TrainConfig) -> dict:
    fields = dataclasses.asdict(config)
    fields.pop("steps")
    return fields


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
        manager = ocp.CheckpointManager(
            checkpoint_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
            item_names=("state", "meta"),
        )
        latest = manager.latest_step()
        if latest is not None:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt": opt_state})
            restored = manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            if restored.meta["config"] != _metadata(config):
                raise ConfigError(
                    f"checkpoint directory {checkpoint_dir} belongs to a run with settings "
                    f"{restored.meta['config']}, not {_metadata(config)}: use another --out/--checkpoint-dir "
                    "or the same settings to resume"
                )
            params, opt_state = restored.state["params"], restored.state["opt"]
            history, start = restored.meta["history"], latest

    @jax.jit
    def step_fn(params, opt_state, rest, batch):
        def loss_of(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics, optax.tree.norm(grads)

    def save(step: int) -> None:
        if manager is not None:
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt": opt_state}),
                meta=ocp.args.JsonSave({"config": _metadata(config), "history": history})), force=True)
            manager.wait_until_finished()

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    began = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=not progress, unit="step")
    window_start, window_items = time.perf_counter(), 0
    for step in bar:
        params, opt_state, loss, metrics, grad_norm = step_fn(params, opt_state, rest, batch_at(step))
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
    return TrainResult(nnx.merge(graphdef, params, rest), history, start, time.perf_counter() - began)

