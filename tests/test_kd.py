"""Knowledge-distillation losses on small hand-computed values (each expected number derived in the test)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qslm_jax.equilibrium.kd import (
    SPIKINGBERT_LAYER_MAP,
    LayerMap,
    attention_loss,
    batch_mean,
    cross_entropy,
    hidden_state_loss,
    internal_kd_loss,
    mask_scores,
    mse,
    soft_cross_entropy,
)
from qslm_jax.errors import ConfigError


def _reference_map(student_blocks: int, teacher_layers: int) -> LayerMap:
    """The reference's indexing (spiking_bert_task_distill.py) for a teacher depth divisible by the student's:
    hidden ``teacher_reps[i * lpb]``, attention ``teacher_atts[i * lpb + lpb - 1]``."""
    lpb = teacher_layers // student_blocks
    return LayerMap(hidden=tuple(i * lpb for i in range(student_blocks + 1)),
                    attention=tuple(i * lpb + lpb - 1 for i in range(student_blocks)))


def test_default_map_is_the_reference_map():
    assert LayerMap(hidden=(0, 3, 6, 9, 12), attention=(2, 5, 8, 11)) == SPIKINGBERT_LAYER_MAP
    for student, teacher in [(4, 12), (4, 4), (4, 8), (2, 12), (6, 24)]:
        assert LayerMap.uniform(student, teacher) == _reference_map(student, teacher)


def test_uniform_map_for_a_teacher_depth_not_divisible_by_the_student_depth():
    # 6 -> 4: g(m) = ceil(1.5 m) = 0, 2, 3, 5, 6; block k uses teacher layer g(k), i.e. index g(k) - 1
    assert LayerMap.uniform(4, 6) == LayerMap(hidden=(0, 2, 3, 5, 6), attention=(1, 2, 4, 5))
    # 2 -> 4 (shallower teacher): g(m) = ceil(m / 2) = 0, 1, 1, 2, 2
    assert LayerMap.uniform(4, 2) == LayerMap(hidden=(0, 1, 1, 2, 2), attention=(0, 0, 1, 1))
    assert LayerMap.uniform(4, 6).n_blocks == 4
    with pytest.raises(ConfigError):
        LayerMap.uniform(0, 12)
    with pytest.raises(ConfigError):
        LayerMap(hidden=(0, 3), attention=(2, 5))


def test_mse_and_valid_rows():
    s = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    t = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    # squared errors 1, 4 | 4, 9: mean 18 / 4 = 4.5; row 0 alone (1 + 4) / 2 = 2.5
    np.testing.assert_allclose(mse(s, t), 4.5)
    np.testing.assert_allclose(mse(s, t, jnp.array([1.0, 0.0])), 2.5)
    np.testing.assert_allclose(mse(s, t, jnp.array([True, True])), 4.5)
    np.testing.assert_allclose(mse(s, t, jnp.zeros(2)), 0.0)
    # a dummy row may hold garbage: it must not leak into the loss
    np.testing.assert_allclose(mse(s.at[1, 0].set(jnp.nan), t, jnp.array([1, 0])), 2.5)
    # weights: (1 * 2.5 + 3 * 6.5) / 4 = 5.5 (row 1: (4 + 9) / 2 = 6.5)
    np.testing.assert_allclose(batch_mean(jnp.array([2.5, 6.5]), jnp.array([1.0, 3.0])), 5.5)
    # gradient d/ds of the valid-row mean: 2 (s - t) / 2 elements on row 0, 0 on the dummy row
    grad = jax.grad(lambda s: mse(s, t, jnp.array([1.0, 0.0])))(s)
    np.testing.assert_allclose(grad, [[1.0, 2.0], [0.0, 0.0]])


def test_hidden_state_loss_through_fit_dense_uses_the_layer_map():
    # tap m holds m + 1 everywhere, fit_dense doubles it, teacher hidden state l holds l everywhere, so with
    # g(m) = 3m: sum_m (2 (m + 1) - 3 m)^2 = 4 + 1 + 0 + 1 + 4 = 10
    taps = [jnp.full((2, 3, 4), m + 1.0) for m in range(5)]
    teacher = [jnp.full((2, 3, 4), float(layer)) for layer in range(13)]
    np.testing.assert_allclose(hidden_state_loss(taps, teacher, fit_dense=lambda h: 2.0 * h), 10.0)
    # without a projection: sum_m (m + 1 - 3 m)^2 = 1 + 1 + 9 + 25 + 49 = 85
    np.testing.assert_allclose(hidden_state_loss(taps, teacher), 85.0)
    # 4-layer teacher, map m -> m: sum_m (2 (m + 1) - m)^2 = 4 + 9 + 16 + 25 + 36 = 90
    np.testing.assert_allclose(
        hidden_state_loss(taps, teacher[:5], LayerMap.uniform(4, 4), fit_dense=lambda h: 2.0 * h), 90.0)


def test_attention_loss_zeroes_masked_entries_on_both_sides():
    student = jnp.array([[[[0.5, -10000.3], [1.0, 2.0]]]])  # (B=1, heads=1, 2, 2)
    teacher = jnp.array([[[[1.5, -9999.0], [-99.5, -150.0]]]])
    # masked (<= -100) -> 0: student [[0.5, 0], [1, 2]], teacher [[1.5, 0], [-99.5, 0]]
    np.testing.assert_array_equal(mask_scores(teacher), [[[[1.5, 0.0], [-99.5, 0.0]]]])
    np.testing.assert_array_equal(mask_scores(jnp.array([-100.0, -99.75])), [0.0, -99.75])
    # squared differences 1, 0, 100.5^2, 4 -> mean (5 + 10100.25) / 4
    per_block = (1.0 + 0.0 + 100.5**2 + 4.0) / 4
    # teacher layers the default map does not use hold huge values: picking one would show in the loss
    teacher_layers = [teacher if i in (2, 5, 8, 11) else jnp.full_like(teacher, 1e3) for i in range(12)]
    np.testing.assert_allclose(attention_loss([student] * 4, teacher_layers), 4 * per_block, rtol=1e-6)


def test_internal_kd_loss_is_hidden_plus_attention():
    taps = [jnp.full((1, 2, 2), m + 1.0) for m in range(5)]
    teacher_hidden = [jnp.full((1, 2, 2), float(layer)) for layer in range(13)]
    scores = [jnp.ones((1, 1, 2, 2))] * 4
    teacher_scores = [jnp.zeros((1, 1, 2, 2))] * 12  # attention loss 4 blocks x mean(1) = 4
    total, parts = jax.jit(lambda *a: internal_kd_loss(*a, fit_dense=lambda h: 2.0 * h))(
        taps, scores, teacher_hidden, teacher_scores)
    np.testing.assert_allclose(parts["hidden_loss"], 10.0)
    np.testing.assert_allclose(parts["attention_loss"], 4.0)
    np.testing.assert_allclose(total, 14.0)


def test_soft_cross_entropy_hand_values():
    # teacher [0, 0] -> p = (1/2, 1/2); student [0, ln 3] -> q = (1/4, 3/4)
    # mean over the 2 classes of -p log q: (ln 4 + ln 4/3) / 4 = ln(16/3) / 4
    student = jnp.array([[0.0, math.log(3.0)], [0.0, 0.0]])
    teacher = jnp.array([[0.0, 0.0], [0.0, 0.0]])
    row0 = math.log(16.0 / 3.0) / 4
    row1 = math.log(2.0) / 2  # p = q = (1/2, 1/2): mean of (ln 2) / 2 over classes
    np.testing.assert_allclose(soft_cross_entropy(student, teacher), (row0 + row1) / 2, rtol=1e-6)
    np.testing.assert_allclose(soft_cross_entropy(student, teacher, valid=jnp.array([1, 0])), row0, rtol=1e-6)
    # temperature 2 on doubled logits gives the same distributions
    np.testing.assert_allclose(soft_cross_entropy(2 * student, 2 * teacher, 2.0), (row0 + row1) / 2,
                               rtol=1e-6)
    # and differs from temperature 1 on the doubled logits: q = (1/10, 9/10) -> (ln 10 + ln 10/9) / 4
    np.testing.assert_allclose(soft_cross_entropy(2 * student[:1], teacher[:1]), math.log(100 / 9) / 4,
                               rtol=1e-6)


def test_cross_entropy_hand_values():
    logits = jnp.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)], [5.0, -5.0]])
    labels = jnp.array([1, 0, 0])
    # -log q_y with q = (1/4, 3/4): ln(4/3) and ln 4; row 2 is a dummy row
    np.testing.assert_allclose(cross_entropy(logits, labels, valid=jnp.array([1, 1, 0])),
                               (math.log(4 / 3) + math.log(4)) / 2, rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(logits[:1], labels[:1]), math.log(4 / 3), rtol=1e-6)


def test_shape_and_map_errors():
    with pytest.raises(ConfigError, match="student shape"):
        mse(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ConfigError, match="one weight per batch row"):
        mse(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(3))
    with pytest.raises(ConfigError, match="needs 5 student entries"):
        hidden_state_loss([jnp.zeros((1, 2))] * 4, [jnp.zeros((1, 2))] * 13)
    with pytest.raises(ConfigError, match=r"LayerMap\.uniform"):
        attention_loss([jnp.zeros((1, 2))] * 4, [jnp.zeros((1, 2))] * 6)  # 12-layer map, 6-layer teacher
    with pytest.raises(ConfigError, match="temperature"):
        soft_cross_entropy(jnp.zeros((1, 2)), jnp.zeros((1, 2)), 0.0)
    with pytest.raises(ConfigError, match="one class id per row"):
        cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 1), jnp.int32))
