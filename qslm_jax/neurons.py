"""Spiking neurons as pure JAX functions, shared by every model.

* :func:`spike` - Heaviside step with the ATan surrogate gradient (spikingjelly ``surrogate.ATan``).
* :func:`lif_multistep` - SpikeGPT's multi-step LIF neuron (``MultiStepLIFNode(tau=2, v_threshold=1,
  v_reset=0)``) as a ``jax.lax.scan`` over the time (token) axis.
* :func:`if_step` - SpikingBERT's integrate-and-fire update with reset by subtraction (one time step;
  the model scans it over T together with its other layers).

The equations are those of ``shared/docs/spikegpt.md`` ("LIF neuron") and ``spikingbert.md``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ATAN_ALPHA = 2.0


def atan_surrogate_grad(x: jax.Array, alpha: float = ATAN_ALPHA) -> jax.Array:
    """Derivative of the ATan surrogate: ``alpha/2 / (1 + (pi/2 * alpha * x)^2)``."""
    return (alpha / 2.0) / (1.0 + jnp.square(math.pi / 2.0 * alpha * x))


@jax.custom_jvp
def spike(x: jax.Array) -> jax.Array:
    """Heaviside spike ``H(x) = 1 if x >= 0 else 0`` (same dtype as ``x``).

    Forward is the exact step; the JVP uses the ATan surrogate of :func:`atan_surrogate_grad`
    with alpha = 2, so ``d spike / dx = 1 / (1 + (pi x)^2)``.
    """
    return (x >= 0).astype(x.dtype)


@spike.defjvp
def _spike_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return spike(x), atan_surrogate_grad(x) * dx


def lif_multistep(
    x: jax.Array,
    *,
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: float = 0.0,
    time_axis: int = 1,
    membrane: jax.Array | None = None,
    return_membrane: bool = False,
):
    """Multi-step LIF with hard reset, scanned over ``time_axis``; returns the spikes.

    For every step t with input current ``x_t`` and membrane ``v`` (starting at ``membrane``, default
    ``v_reset`` = 0, a fresh sequence):

        h_t = v + (x_t - (v - v_reset)) / tau        (charge; for v_reset = 0: v + (x_t - v)/tau)
        s_t = H(h_t - v_threshold)                   (fire, ATan surrogate in the backward pass)
        v   = h_t * (1 - s_t) + v_reset * s_t        (hard reset; not detached)

    The operation order matches spikingjelly's so that fp32 spikes are bit-identical. With
    ``return_membrane`` the result is ``(spikes, v)``, ``v`` the membrane after the last step (the shape of
    ``x`` without ``time_axis``): continuing from it gives the spikes of the concatenated input.
    """
    xs = jnp.moveaxis(x, time_axis, 0)

    def step(v, x_t):
        h = v + (x_t - (v - v_reset)) / tau
        s = spike(h - v_threshold)
        v_next = h * (1.0 - s) + v_reset * s
        return v_next, s

    v0 = jnp.full(xs.shape[1:], v_reset, dtype=x.dtype) if membrane is None else membrane
    v_last, spikes = jax.lax.scan(step, v0, xs)
    spikes = jnp.moveaxis(spikes, 0, time_axis)
    return (spikes, v_last) if return_membrane else spikes


def if_step(u: jax.Array, current: jax.Array, v_threshold: float | jax.Array = 1.0, *, surrogate: bool = False):
    """One integrate-and-fire step with reset by subtraction (leak 1.0).

        u <- u + I;   s = 1[u >= v_threshold];   u <- u - v_threshold * s

    Returns ``(u_next, s)``. By default there is no gradient through the spike (SpikingBERT simulates its IF
    network without gradients); ``surrogate=True`` fires with :func:`spike` instead (same values, ATan
    surrogate derivative, reset not detached), for back-propagation through time.
    """
    u = u + current
    s = spike(u - v_threshold) if surrogate else (u >= v_threshold).astype(u.dtype)
    return u - v_threshold * s, s
