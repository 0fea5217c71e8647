"""The resumable training loop: it learns, and an interrupted run resumes to the uninterrupted result."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qslm_jax.errors import ConfigError
from qslm_jax.training import TrainConfig, train

TRUE_W = jnp.array([[2.0], [-1.0], [0.5]])


def _batch_at(step: int):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(7), step), (16, 3))
    return {"x": x, "y": x @ TRUE_W}


def _loss(model, batch):
    err = model(batch["x"]) - batch["y"]
    return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


def _model():
    return nnx.Linear(3, 1, rngs=nnx.Rngs(0))


CONFIG = TrainConfig(steps=30, learning_rate=0.1, warmup_steps=5, weight_decay=0.0, checkpoint_every=10)


def test_training_reduces_loss_and_logs_history():
    result = train(_model(), _loss, _batch_at, CONFIG, progress=False, log_every=5)
    losses = [r["loss"] for r in result.history]
    assert [r["step"] for r in result.history] == [5, 10, 15, 20, 25, 30]
    assert losses[-1] < 0.05 * losses[0]
    assert "mae" in result.history[-1]


def test_interrupted_run_resumes_to_identical_parameters(tmp_path):
    straight = train(_model(), _loss, _batch_at, CONFIG, checkpoint_dir=tmp_path / "a", progress=False)
    partial = train(_model(), _loss, _batch_at, CONFIG, checkpoint_dir=tmp_path / "b", progress=False,
                    stop_after=17)
    assert partial.resumed_from_step == 0
    resumed = train(_model(), _loss, _batch_at, CONFIG, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from_step == 17
    for a, b in zip(jax.tree.leaves(nnx.state(straight.model)), jax.tree.leaves(nnx.state(resumed.model)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert straight.history == resumed.history


def test_resume_with_other_settings_is_refused(tmp_path):
    train(_model(), _loss, _batch_at, CONFIG, checkpoint_dir=tmp_path, progress=False, stop_after=10)
    other = TrainConfig(**{**CONFIG.__dict__, "learning_rate": 0.5})
    with pytest.raises(ConfigError, match="belongs to a run with settings"):
        train(_model(), _loss, _batch_at, other, checkpoint_dir=tmp_path, progress=False)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown schedule"):
        TrainConfig(schedule="step").optimizer()
