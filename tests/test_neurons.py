"""The shared neuron functions: exact forward dynamics and the ATan surrogate gradient."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qslm_jax.neurons import atan_surrogate_grad, if_step, lif_multistep, spike


def test_spike_forward_is_heaviside_with_ge():
    x = jnp.array([-1.0, -1e-7, 0.0, 1e-7, 3.0])
    np.testing.assert_array_equal(spike(x), [0.0, 0.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("x", [-2.0, -0.3, 0.0, 0.1, 1.5])
def test_spike_gradient_is_analytic_atan_derivative(x):
    alpha = 2.0
    expected = alpha / 2 / (1 + (math.pi / 2 * alpha * x) ** 2)
    got = jax.grad(lambda v: spike(v))(jnp.float32(x))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(atan_surrogate_grad(jnp.float32(x)), expected, rtol=1e-6)


def _lif_reference(x: np.ndarray) -> np.ndarray:
    """Plain-numpy loop of spikingjelly's MultiStepLIFNode(tau=2, v_threshold=1, v_reset=0) over axis 1."""
    v = np.zeros(x.shape[:1] + x.shape[2:], dtype=x.dtype)
    out = np.zeros_like(x)
    for t in range(x.shape[1]):
        h = v + (x[:, t] - v) / np.float32(2.0)
        s = (h >= 1.0).astype(x.dtype)
        out[:, t] = s
        v = h * (1 - s)
    return out


def test_lif_matches_loop_reference_and_resets_per_sequence():
    rng = np.random.default_rng(0)
    x = rng.normal(0.8, 1.0, size=(3, 20, 5)).astype(np.float32)
    np.testing.assert_array_equal(lif_multistep(jnp.asarray(x)), _lif_reference(x))
    # the membrane starts at 0 for every sequence: a sequence's spikes do not depend on its batch neighbours
    np.testing.assert_array_equal(lif_multistep(jnp.asarray(x[1:2])), _lif_reference(x)[1:2])


def test_lif_continues_from_a_membrane():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(0.8, 1.0, size=(2, 12, 3)).astype(np.float32))
    first, v = lif_multistep(x[:, :5], return_membrane=True)
    rest = lif_multistep(x[:, 5:], membrane=v)
    np.testing.assert_array_equal(np.concatenate([first, rest], axis=1), _lif_reference(np.asarray(x)))
    assert np.any(np.asarray(v) != 0)


def test_lif_hand_computed_trace():
    # x = 1.5 each step: h1 = 0.75 (no spike), h2 = 0.75 + 0.375 = 1.125 (spike, reset), h3 = 0.75 ...
    spikes = lif_multistep(jnp.full((1, 4, 1), 1.5))
    np.testing.assert_array_equal(spikes[0, :, 0], [0.0, 1.0, 0.0, 1.0])


def test_lif_fixture_spikes_bit_exact(fixtures_dir):
    io = np.load(fixtures_dir / "spikegpt_L8_C32_V77" / "io.npz")
    for name in [k for k in io.files if k.endswith("_in")]:
        spikes = lif_multistep(jnp.asarray(io[name]))
        np.testing.assert_array_equal(np.asarray(spikes), io[name.replace("_in", "_spk")], err_msg=name)


def test_lif_gradient_flows_through_surrogate():
    x = jnp.linspace(0.5, 2.5, 12).reshape(1, 12, 1)
    grad = jax.grad(lambda v: lif_multistep(v).sum())(x)
    assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)


def test_if_step_reset_by_subtraction():
    u = jnp.zeros(2)
    spikes = []
    for current in (0.6, 0.6, 0.6, 2.5):
        u, s = if_step(u, jnp.full(2, current), 1.0)
        spikes.append(float(s[0]))
    assert spikes == [0.0, 1.0, 0.0, 1.0]
    # after 0.6, 1.2 (fire -> 0.2), 0.8, 3.3 (fire -> 2.3): the surplus is kept
    np.testing.assert_allclose(u, [2.3, 2.3], rtol=1e-6)
