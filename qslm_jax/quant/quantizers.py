"""Weight quantizers with the precision level as data (qslm.md section 2, extreme_kd.md "Quantizers").

Every quantizer is a fake (simulated) quantizer: it returns a float32 tensor on the quantization grid, with a
straight-through estimator (the forward value is exactly the quantized tensor, the gradient w.r.t. ``W`` is 1).

Precision levels (what a :class:`~qslm_jax.quant.plan.QuantPlan` holds):

* ``32`` - fp32, the tensor is returned bit-for-bit unchanged;
* ``2 .. 16`` - uniform quantization, asymmetric min-max (default) or symmetric, per tensor or per output channel;
* ``1.58`` (:data:`TERNARY`) - BitNet ternary ``gamma * clip(round(W / (gamma + eps)), -1, 1)``, ``gamma = mean|W|``;
* ``1`` (:data:`BINARY`) - BitNet binary ``beta * sign(W - mean(W))`` (0 -> -1), ``beta = mean|W|``.

Inside traced code a level is an int32 *code* (:func:`level_code`): the level itself for integer levels and
:data:`TERNARY_CODE` for 1.58, so one compiled function serves every assignment and a batch of assignments can be
``vmap``-ped. Binary and ternary are always per tensor (BitNet practice).

Per-output-channel axis ("output" in the sense of PyTorch's per-row scales, so the number of scales equals
PyTorch's row count): Flax ``nnx.Linear`` kernels are ``(in, out)`` -> the last axis (one scale per output
feature); embedding tables ``(V, C)`` -> axis 0 (one scale per token row).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from qslm_jax.errors import ConfigError

FP32 = 32
BINARY = 1
TERNARY = 1.58
TERNARY_CODE = 158  # int32 code of the 1.58-bit level inside bits pytrees ("1.58" without the dot)
UNIFORM_BITS = tuple(range(2, 17))
LEVELS = (FP32, *reversed(UNIFORM_BITS), TERNARY, BINARY)
TERNARY_EPS = 1e-5

Level = int | float


def check_level(level: object) -> Level:
    """Return ``level`` normalised (``int`` or :data:`TERNARY`); raise :class:`ConfigError` if it is not a level."""
    if isinstance(level, bool) or not isinstance(level, numbers.Real):  # Python and numpy numbers only
        raise ConfigError(f"precision level must be a number in {LEVELS}, found {level!r}")
    value = float(level)
    if math.isclose(value, TERNARY, abs_tol=1e-9):
        return TERNARY
    if value.is_integer() and int(value) in LEVELS:
        return int(value)
    raise ConfigError(
        f"precision level must be one of {LEVELS} (32 = fp32, 1.58 = ternary, 1 = binary), found {level!r}"
    )


def level_code(level: Level) -> int:
    """The int32 code of a precision level used in traced bits pytrees (the level, or :data:`TERNARY_CODE`)."""
    level = check_level(level)
    return TERNARY_CODE if level == TERNARY else int(level)


@dataclass(frozen=True)
class QuantScheme:
    """How uniform levels are computed and which tensors are quantized.

    ``symmetric``: ``scale = max|W| / (2^(b-1) - 1)`` instead of min-max (asymmetric) scales.
    ``per_channel``: one scale/zero-point per output channel (see module docstring) instead of per tensor.
    ``quantize_vectors``: also quantize 1-D / small tensors (LayerNorm, biases, SpikeGPT ``time_*``); they stay fp32
    by default (qslm.md section 1). Vectors are always quantized per tensor.
    """

    symmetric: bool = False
    per_channel: bool = False
    quantize_vectors: bool = False

    PRESETS: ClassVar[dict[str, dict[str, bool]]] = {
        "minmax": {},
        "symmetric": {"symmetric": True},
        "per_channel": {"per_channel": True},
        "all_tensors": {"quantize_vectors": True},
    }

    @classmethod
    def preset(cls, name: str) -> QuantScheme:
        """Named scheme: ``minmax`` (default, asymmetric per-tensor), ``symmetric``, ``per_channel``,
        ``all_tensors`` (min-max, 1-D tensors quantized too)."""
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown quantization scheme {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls(**cls.PRESETS[name])

    def to_dict(self) -> dict[str, bool]:
        """Plain dict (JSON)."""
        return {"symmetric": self.symmetric, "per_channel": self.per_channel,
                "quantize_vectors": self.quantize_vectors}


def straight_through(w: jax.Array, wq: jax.Array) -> jax.Array:
    """Straight-through estimator: forward value exactly ``wq``, gradient w.r.t. ``w`` the identity.

    Same gradient as ``w + stop_gradient(wq - w)``, but written ``stop_gradient(wq) + (w - stop_gradient(w))``
    so that the forward value is bit-exactly ``wq`` (needed for the bit-exact export round trip).
    """
    return jax.lax.stop_gradient(wq) + (w - jax.lax.stop_gradient(w))


def _reduce_axes(w: jax.Array, channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return tuple(range(w.ndim))
    return tuple(a for a in range(w.ndim) if a != channel_axis % w.ndim)


def uniform_params(
    w: jax.Array, bits: jax.Array, *, symmetric: bool = False, channel_axis: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scale, zero-point and largest code of uniform ``bits``-bit quantization (shapes broadcast against ``w``).

    Asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zp = round(-min / scale)``.
    Symmetric: ``scale = max|W| / (2^(b-1) - 1)``, ``zp = 2^(b-1)`` (codes ``0 .. 2^b - 1`` hold the signed
    integers ``-2^(b-1) .. 2^(b-1) - 1``).
    Constant tensors (``max == min``, or all zeros for symmetric; also a range so small that the scale
    underflows) get ``scale = |min|`` (1 if 0), so a constant is reproduced exactly instead of dividing by zero.
    ``bits`` is a traced integer in 2..16.
    """
    axes = _reduce_axes(w, channel_axis)
    bits = jnp.asarray(bits, jnp.int32)
    qmax = jnp.left_shift(1, bits).astype(jnp.float32) - 1.0  # 2^b - 1, exact
    if symmetric:
        amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
        half = jnp.left_shift(1, bits - 1).astype(jnp.float32)
        scale = amax / (half - 1.0)
        scale = jnp.where(scale > 0, scale, 1.0)
        return scale, jnp.broadcast_to(half, scale.shape), qmax
    lo = jnp.min(w, axis=axes, keepdims=True)
    hi = jnp.max(w, axis=axes, keepdims=True)
    fallback = jnp.where(lo != 0, jnp.abs(lo), 1.0)
    scale = (hi - lo) / qmax
    scale = jnp.where(scale > 0, scale, fallback)
    zero_point = jnp.round(-lo / scale)
    return scale, zero_point, qmax


def uniform_codes(w: jax.Array, scale: jax.Array, zero_point: jax.Array, qmax: jax.Array) -> jax.Array:
    """Integer codes (as float32) ``clip(round(W / scale) + zp, 0, 2^b - 1)``."""
    return jnp.clip(jnp.round(w / scale) + zero_point, 0.0, qmax)


def dequantize(codes: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
    """``(codes - zp) * scale`` in float32: the one dequantization formula of every level (export uses it too)."""
    return (jnp.asarray(codes).astype(jnp.float32) - zero_point) * scale


Grid = tuple[jax.Array, jax.Array, jax.Array]  # (integer codes as float32, scale, zero-point)


def binary_grid(w: jax.Array) -> Grid:
    """BitNet 1-bit as codes: ``c = [W - mean(W) > 0]`` in {0, 1}, ``scale = 2 beta``, ``zp = 1/2``.

    ``(c - 1/2) * 2 beta`` is bit-exactly ``beta * sign(W - mu)`` (0 -> -1) with ``beta = mean|W|``.
    """
    beta = jnp.mean(jnp.abs(w))
    codes = (w - jnp.mean(w) > 0).astype(jnp.float32)
    return codes, 2.0 * beta, jnp.float32(0.5)


def ternary_grid(w: jax.Array, eps: float = TERNARY_EPS) -> Grid:
    """BitNet 1.58-bit as codes: ``c = clip(round(W / (gamma + eps)), -1, 1) + 1`` in {0, 1, 2},
    ``scale = gamma = mean|W|``, ``zp = 1``."""
    gamma = jnp.mean(jnp.abs(w))
    codes = jnp.clip(jnp.round(w / (gamma + eps)), -1.0, 1.0) + 1.0
    return codes, gamma, jnp.float32(1.0)


def uniform_grid(w: jax.Array, bits: jax.Array, *, symmetric: bool = False,
                 channel_axis: int | None = None) -> Grid:
    """Uniform ``bits``-bit codes with their scale and zero-point (:func:`uniform_params`); bits clipped to 2..16."""
    scale, zero_point, qmax = uniform_params(w, jnp.clip(jnp.asarray(bits, jnp.int32), 2, 16),
                                             symmetric=symmetric, channel_axis=channel_axis)
    return uniform_codes(w, scale, zero_point, qmax), scale, zero_point


def quant_grid(w: jax.Array, code: jax.Array, *, symmetric: bool = False,
               channel_axis: int | None = None) -> Grid:
    """Codes, scale and zero-point of ``w`` at the level with int32 code ``code`` (traced or not).

    1 -> :func:`binary_grid`, :data:`TERNARY_CODE` -> :func:`ternary_grid`, otherwise :func:`uniform_grid`
    (the caller keeps fp32 tensors out). Every branch is computed and one selected, so ``code`` can be vmapped.
    Scale and zero-point broadcast against ``w``.
    """
    code = jnp.asarray(code, jnp.int32)
    w = jnp.asarray(w, jnp.float32)
    grid = uniform_grid(w, code, symmetric=symmetric, channel_axis=channel_axis)
    for level, other in ((BINARY, binary_grid(w)), (TERNARY_CODE, ternary_grid(w))):
        grid = tuple(jnp.where(code == level, o, g) for o, g in zip(other, grid, strict=True))
    return grid


def _fake(w: jax.Array, grid: Grid) -> jax.Array:
    return straight_through(w, dequantize(*grid))


def uniform_quantize(
    w: jax.Array, bits: jax.Array, *, symmetric: bool = False, channel_axis: int | None = None
) -> jax.Array:
    """Uniform fake quantization ``Wq = (clip(round(W/scale) + zp, 0, 2^b-1) - zp) * scale`` with STE.

    ``bits`` may be a traced int array; a value of 32 returns ``w`` bit-for-bit unchanged.
    Bits below 2 are treated as 2 (use :func:`fake_quantize` for binary/ternary levels).
    """
    wq = _fake(w, uniform_grid(w, bits, symmetric=symmetric, channel_axis=channel_axis))
    return jnp.where(jnp.asarray(bits) == FP32, w, wq)


def binary_quantize(w: jax.Array) -> jax.Array:
    """BitNet 1-bit fake quantization ``beta * sign(W - mean(W))``, 0 -> -1, ``beta = mean|W|`` (STE)."""
    return _fake(w, binary_grid(w))


def ternary_quantize(w: jax.Array, eps: float = TERNARY_EPS) -> jax.Array:
    """BitNet 1.58-bit fake quantization ``gamma * clip(round(W / (gamma + eps)), -1, 1)``, ``gamma = mean|W|``
    (STE)."""
    return _fake(w, ternary_grid(w, eps))


def fake_quantize(
    w: jax.Array, code: jax.Array, *, symmetric: bool = False, channel_axis: int | None = None
) -> jax.Array:
    """Fake-quantize ``w`` to the level whose int32 code (:func:`level_code`) is ``code`` (traced or not), STE.

    32 -> ``w`` unchanged (bit-exact), 1 -> binary, :data:`TERNARY_CODE` -> ternary, 2..16 -> uniform.
    """
    w = jnp.asarray(w, jnp.float32)
    wq = _fake(w, quant_grid(w, code, symmetric=symmetric, channel_axis=channel_axis))
    return jnp.where(jnp.asarray(code) == FP32, w, wq)
