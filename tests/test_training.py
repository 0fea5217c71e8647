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


def test_steps_done_is_the_true_step_not_the_last_logged_one(tmp_path):
    result = train(_model(), _loss, _batch_at, CONFIG, checkpoint_dir=tmp_path, progress=False, log_every=10,
                   stop_after=17)
    assert result.steps_done == 17 and result.history[-1]["step"] == 10
    assert train(_model(), _loss, _batch_at, CONFIG, checkpoint_dir=tmp_path, progress=False).steps_done == 30


@pytest.mark.parametrize("field", ["learning_rate", "clip_norm", "weight_decay"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"invalid training settings: {field}="):
        TrainConfig(**{field: value})


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing_for_it(tmp_path):
    from qslm_jax.errors import TrainingError

    def exploding_batch_at(step):
        batch = _batch_at(step)
        return {**batch, "y": batch["y"] * (jnp.inf if step == 12 else 1.0)}

    with pytest.raises(TrainingError, match="diverged at step 13"):
        train(_model(), _loss, exploding_batch_at, CONFIG, checkpoint_dir=tmp_path, progress=False)
    resumed = train(_model(), _loss, _batch_at, CONFIG, checkpoint_dir=tmp_path, progress=False, stop_after=10)
    assert resumed.resumed_from_step == 10  # the last good checkpoint; no checkpoint holds the bad step
    leaves = jax.tree.leaves(nnx.state(resumed.model))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    train(_model(), _loss, _batch_at, CONFIG, checkpoint_dir=tmp_path, progress=False, stop_after=20)
    for item in (tmp_path / "20").rglob("*"):
        if item.is_file():
            item.write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        resumed = train(_model(), _loss, _batch_at, CONFIG, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_step == 10
    assert "step 20" in caplog.text and "unreadable" in caplog.text
    straight = train(_model(), _loss, _batch_at, CONFIG, progress=False)
    for a, b in zip(jax.tree.leaves(nnx.state(straight.model)), jax.tree.leaves(nnx.state(resumed.model)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_with_another_batch_size_is_refused(tmp_path):
    train(_model(), _loss, _batch_at, CONFIG, checkpoint_dir=tmp_path, progress=False, stop_after=10)

    def bigger_batch_at(step):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(7), step), (32, 3))
        return {"x": x, "y": x @ TRUE_W}

    with pytest.raises(ConfigError, match=r"batches .*\[32, 3\]"):
        train(_model(), _loss, bigger_batch_at, CONFIG, checkpoint_dir=tmp_path, progress=False)
