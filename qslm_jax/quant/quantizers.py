"""Weight quantizers with the precision level as data (qslm.md section 2, extreme_kd.md "Quantizers").

Every quantizer is a fake (simulated) quantizer: it returns a float32 tensor on the quantization grid, with a
straight-through estimator (the forward value is exactly the quantized tensor, the gradient w.r.t. ``W`` is 1).

Precision levels (what a :class:`~qslm_jax.quant.plan.QuantPlan` holds), one :class:`QuantizerKind` each in
:data:`KINDS`:

* ``32`` - fp32, the tensor is returned bit-for-bit unchanged;
* ``2 .. 16`` - uniform quantization, asymmetric min-max (default) or symmetric, per tensor, per output channel or
  per group of ``G`` inputs of each output channel, optionally with MSE-optimal clipping (:class:`QuantScheme`);
* ``1.58`` (:data:`TERNARY`) - BitNet ternary ``gamma * clip(round(W / (gamma + eps)), -1, 1)``, ``gamma = mean|W|``;
* ``1`` (:data:`BINARY`) - BitNet binary ``beta * sign(W - mean(W))`` (0 -> -1), ``beta = mean|W|``.

Inside traced code a level is an int32 *code* (:func:`level_code`, from the kinds table), so one compiled function
serves every assignment and a batch of assignments can be ``vmap``-ped. Binary and ternary are always per tensor
(BitNet practice).

Every kind is one affine grid ``codes = clip(round(W / d) + zp, 0, qmax)``, ``Wq = (codes - zp) * scale`` (binary:
``codes = [W - mean(W) > 0]``): :func:`quant_grid` selects the per-group parameters ``d, zp, qmax, scale`` of the
code's kind (small arrays) and then makes *one* element-wise pass over ``W``. The statistics (min, max, max|W|,
mean, mean|W|) do not depend on the level, so under ``vmap`` over candidates they are computed once for all.

Per-output-channel axis ("output" in the sense of PyTorch's per-row scales, so the number of scales equals
PyTorch's row count): Flax ``nnx.Linear`` kernels are ``(in, out)`` -> the last axis (one scale per output
feature); embedding tables ``(V, C)`` -> axis 0 (one scale per token row). Groups split the other (input) axis of
a matrix into runs of ``G`` elements (the last run may be shorter).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import jax
import jax.numpy as jnp

from qslm_jax.errors import ConfigError

FP32 = 32
BINARY = 1
TERNARY = 1.58
UNIFORM_BITS = tuple(range(2, 17))
LEVELS = (FP32, *reversed(UNIFORM_BITS), TERNARY, BINARY)
TERNARY_EPS = 1e-5
# candidate clipping ratios of the mse scheme: steps of 0.025 down to 0.5, then of 0.05 down to 0.2 (2-bit grids
# of large Gaussian-like tensors clip to a third of the range)
MSE_CLIP_RATIOS = (*(round(1.0 - 0.025 * i, 3) for i in range(21)), *(round(0.45 - 0.05 * i, 2) for i in range(6)))

Level = int | float


@dataclass(frozen=True)
class QuantizerKind:
    """One kind of quantizer: its levels, their int32 code in traced bits trees, how its codes are stored.

    ``code``: the code of the kind's single level (``None``: every level is its own code). ``packing``: ``"bits"``
    (b-bit codes bit-packed), ``"trits"`` (five ternary codes per byte) or ``"fp32"`` (the float32 tensor).
    ``per_tensor``: one scale per tensor whatever the scheme.
    """

    name: str
    levels: tuple[Level, ...]
    code: int | None
    packing: str
    per_tensor: bool

    def code_of(self, level: Level) -> int:
        """The int32 code of one of this kind's levels."""
        return int(level) if self.code is None else self.code


KINDS = (
    QuantizerKind("fp32", (FP32,), None, "fp32", per_tensor=True),
    QuantizerKind("uniform", UNIFORM_BITS, None, "bits", per_tensor=False),
    QuantizerKind("ternary", (TERNARY,), 158, "trits", per_tensor=True),  # 158: "1.58" without the dot
    QuantizerKind("binary", (BINARY,), None, "bits", per_tensor=True),
)


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


def kind_of(level: Level) -> QuantizerKind:
    """The :class:`QuantizerKind` of a precision level (from :data:`KINDS`)."""
    level = check_level(level)
    return next(kind for kind in KINDS if level in kind.levels)


def level_code(level: Level) -> int:
    """The int32 code of a precision level used in traced bits pytrees (its kind's :meth:`~QuantizerKind.code_of`)."""
    return kind_of(level).code_of(check_level(level))


@dataclass(frozen=True, repr=False)
class QuantScheme:
    """How uniform levels are computed and which tensors are quantized.

    ``symmetric``: ``scale = max|W| / (2^(b-1) - 1)`` instead of min-max (asymmetric) scales.
    ``per_channel``: one scale/zero-point per output channel (see module docstring) instead of per tensor.
    ``group_size``: one scale/zero-point per run of ``G`` inputs of each output channel (implies per channel).
    ``clipping``: ``"minmax"`` (the range of the weights) or ``"mse"`` (the range scaled by the ratio in
    :data:`MSE_CLIP_RATIOS` that minimises ``||W - Wq||^2``, chosen per tensor and level before a search).
    ``quantize_vectors``: also quantize 1-D / small tensors (LayerNorm, biases, SpikeGPT ``time_*``); they stay fp32
    by default (qslm.md section 1). Vectors are always quantized per tensor.
    """

    symmetric: bool = False
    per_channel: bool = False
    quantize_vectors: bool = False
    group_size: int | None = None
    clipping: str = "minmax"

    PRESETS: ClassVar[dict[str, dict]] = {
        "minmax": {},
        "symmetric": {"symmetric": True},
        "per-channel": {"per_channel": True},
        "mse": {"clipping": "mse"},
        "all-tensors": {"quantize_vectors": True},
    }
    CLIPPINGS: ClassVar[tuple[str, ...]] = ("minmax", "mse")

    def __post_init__(self):
        if self.clipping not in self.CLIPPINGS:
            raise ConfigError(f"clipping must be one of {self.CLIPPINGS}, found {self.clipping!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(
                self.group_size, int) or self.group_size < 1):
            raise ConfigError(f"group_size must be a positive integer (inputs per scale) or None, "
                              f"found {self.group_size!r}")

    def __repr__(self) -> str:
        """Fields, the newer ones (group_size, clipping) only when set: journals fingerprinted with the repr of
        an older default scheme stay valid."""
        shown = [f for f in fields(self) if f.name in ("symmetric", "per_channel", "quantize_vectors")
                 or getattr(self, f.name) != f.default]
        return f"QuantScheme({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"

    @classmethod
    def preset(cls, name: str, group_size: int | None = None) -> QuantScheme:
        """Named scheme: ``minmax`` (default, asymmetric per-tensor), ``symmetric``, ``per-channel``, ``mse``
        (min-max with MSE-optimal clipping), ``all-tensors`` (min-max, 1-D tensors quantized too); ``_`` may
        stand for ``-``. ``group_size``: scales per ``G`` inputs of each output channel."""
        key = name.replace("_", "-")
        if key not in cls.PRESETS:
            raise ConfigError(f"unknown quantization scheme {name!r}; choose one of {sorted(cls.PRESETS)}")
        return replace(cls(**cls.PRESETS[key]), group_size=group_size)

    @property
    def channelwise(self) -> bool:
        """Whether matrices get scales per output channel (per channel or per group)."""
        return self.per_channel or self.group_size is not None

    def to_dict(self) -> dict:
        """Plain dict (JSON)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def straight_through(w: jax.Array, wq: jax.Array) -> jax.Array:
    """Straight-through estimator: forward value exactly ``wq``, gradient w.r.t. ``w`` the identity.

    Same gradient as ``w + stop_gradient(wq - w)``, but written ``stop_gradient(wq) + (w - stop_gradient(w))``
    so that the forward value is bit-exactly ``wq`` (needed for the bit-exact export round trip).
    """
    return jax.lax.stop_gradient(wq) + (w - jax.lax.stop_gradient(w))


# --- scale layout: per tensor, per output channel, per group of inputs -------------------------------------------

def _input_axis(ndim: int, channel_axis: int) -> int:
    if ndim != 2:
        raise ConfigError(f"group-wise scales split the input axis of a matrix; a tensor of {ndim} dimensions "
                          "has none: use per-channel or per-tensor scales for it")
    return 1 - channel_axis % 2


def grid_shape(shape: tuple[int, ...], channel_axis: int | None = None,
               group_size: int | None = None) -> tuple[int, ...]:
    """Shape of the scale/zero-point grid of a tensor: all ones (per tensor); ``shape[c]`` at the channel axis
    (per channel); and ``ceil(shape[g] / G)`` at the input axis ``g`` too (groups of ``G`` inputs)."""
    out = [1] * len(shape)
    if channel_axis is None:
        return tuple(out)
    out[channel_axis % len(shape)] = shape[channel_axis]
    if group_size is not None:
        axis = _input_axis(len(shape), channel_axis)
        out[axis] = -(-shape[axis] // group_size)
    return tuple(out)


def expand_grid(grid: jax.Array, shape: tuple[int, ...], channel_axis: int | None = None,
                group_size: int | None = None) -> jax.Array:
    """A grid of per-group values broadcastable against a tensor of ``shape`` (groups repeated ``G`` times)."""
    if channel_axis is None or group_size is None:
        return grid
    axis = _input_axis(len(shape), channel_axis)
    repeated = jnp.repeat(grid, group_size, axis=axis)
    return jax.lax.slice_in_dim(repeated, 0, shape[axis], axis=axis)


def _group_view(w: jax.Array, channel_axis: int, group_size: int) -> tuple[jax.Array, int]:
    """``w`` with its input axis ``g`` padded to whole groups and split into ``(groups, G)``; returns the view and
    the axis of the elements of a group (``g + 1``). Padding repeats the last input, so a short last group keeps
    its min and max."""
    axis = _input_axis(w.ndim, channel_axis)
    groups = -(-w.shape[axis] // group_size)
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, groups * group_size - w.shape[axis])
    split = (*w.shape[:axis], groups, group_size, *w.shape[axis + 1:])
    return jnp.pad(w, pad, mode="edge").reshape(split), axis + 1


def _group_reduce(reduce, w: jax.Array, channel_axis: int | None, group_size: int | None) -> jax.Array:
    """``reduce`` (``jnp.min``/``jnp.max``) over every scale group, shaped as :func:`grid_shape`."""
    if channel_axis is None:
        return reduce(w, keepdims=True)
    if group_size is None:
        return reduce(w, axis=tuple(a for a in range(w.ndim) if a != channel_axis % w.ndim), keepdims=True)
    view, member_axis = _group_view(w, channel_axis, group_size)
    return reduce(view, axis=member_axis)


@dataclass(frozen=True)
class _Stats:
    """Level-independent statistics of a tensor: per group ``lo``, ``hi``, ``amax``; per tensor ``mean``,
    ``absmean``."""

    lo: jax.Array
    hi: jax.Array
    amax: jax.Array
    mean: jax.Array
    absmean: jax.Array


def _stats(w: jax.Array, symmetric: bool, channel_axis: int | None, group_size: int | None) -> _Stats:
    if symmetric:
        lo = hi = None
        amax = _group_reduce(jnp.max, jnp.abs(w), channel_axis, group_size)
    else:
        lo = _group_reduce(jnp.min, w, channel_axis, group_size)
        hi = _group_reduce(jnp.max, w, channel_axis, group_size)
        amax = None
    return _Stats(lo, hi, amax, jnp.mean(w), jnp.mean(jnp.abs(w)))


def _uniform_params(stats: _Stats, bits: jax.Array, symmetric: bool, ratio: jax.Array | None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scale, zero-point (per group) and largest code of uniform ``bits``-bit quantization of a clipped range.

    Asymmetric: ``scale = (hi - lo) / (2^b - 1)``, ``zp = round(-lo / scale)`` with ``[lo, hi] = r [min, max]``.
    Symmetric: ``scale = r max|W| / (2^(b-1) - 1)``, ``zp = 2^(b-1)`` (codes ``0 .. 2^b - 1`` hold the signed
    integers ``-2^(b-1) .. 2^(b-1) - 1``). ``r`` is the clipping ratio (1 for min-max).
    Constant tensors (``max == min``, or all zeros for symmetric; also a range so small that the scale
    underflows) get ``scale = |min|`` (1 if 0), so a constant is reproduced exactly instead of dividing by zero.
    """
    qmax = jnp.left_shift(1, bits).astype(jnp.float32) - 1.0  # 2^b - 1, exact
    if symmetric:
        amax = stats.amax if ratio is None else stats.amax * ratio
        half = jnp.left_shift(1, bits - 1).astype(jnp.float32)
        scale = amax / (half - 1.0)
        scale = jnp.where(scale > 0, scale, 1.0)
        return scale, jnp.broadcast_to(half, scale.shape), qmax
    lo, hi = (stats.lo, stats.hi) if ratio is None else (stats.lo * ratio, stats.hi * ratio)
    fallback = jnp.where(lo != 0, jnp.abs(lo), 1.0)
    scale = (hi - lo) / qmax
    scale = jnp.where(scale > 0, scale, fallback)
    return scale, jnp.round(-lo / scale), qmax


Grid = tuple[jax.Array, jax.Array, jax.Array]  # (integer codes as float32, scale grid, zero-point grid)


def _grid_of(w: jax.Array, stats: _Stats, code: jax.Array, ratio: jax.Array | None, *, symmetric: bool,
             channel_axis: int | None, group_size: int | None) -> Grid:
    """The kind's affine grid (module docstring) from precomputed statistics: one element-wise pass over ``w``."""
    is_binary, is_ternary = code == level_code(BINARY), code == level_code(TERNARY)
    scale_u, zp_u, qmax_u = _uniform_params(stats, jnp.clip(code, 2, 16), symmetric, ratio)
    scale = jnp.where(is_binary, 2.0 * stats.absmean, jnp.where(is_ternary, stats.absmean, scale_u))
    zero_point = jnp.where(is_binary, 0.5, jnp.where(is_ternary, 1.0, zp_u))
    divisor = jnp.where(is_ternary, stats.absmean + TERNARY_EPS, scale_u)
    qmax = jnp.where(is_ternary, 2.0, qmax_u)

    rounded = _affine_codes(w, divisor, zero_point, qmax, channel_axis, group_size)
    codes = jnp.where(is_binary, (w - stats.mean > 0).astype(jnp.float32), rounded)
    return codes, scale, zero_point


def _affine_codes(w: jax.Array, divisor: jax.Array, zero_point: jax.Array, qmax: jax.Array,
                  channel_axis: int | None, group_size: int | None) -> jax.Array:
    """``clip(round(W / d) + zp, 0, qmax)`` with per-group ``d`` and ``zp`` expanded to ``w``."""
    def expand(grid):
        return expand_grid(grid, w.shape, channel_axis, group_size)

    return jnp.clip(jnp.round(w / expand(divisor)) + expand(zero_point), 0.0, qmax)


def quant_grid(w: jax.Array, code: jax.Array, *, symmetric: bool = False, channel_axis: int | None = None,
               group_size: int | None = None, clip_ratios: jax.Array | None = None) -> Grid:
    """Codes, scale and zero-point of ``w`` at the level with int32 code ``code`` (traced or not).

    Uniform ``b``-bit (``b = clip(code, 2, 16)``): ``codes = clip(round(W / scale) + zp, 0, 2^b - 1)`` with the
    scale and zero-point of :func:`_uniform_params`. Ternary: ``codes = clip(round(W / (gamma + eps)), -1, 1) + 1``,
    ``scale = gamma = mean|W|``, ``zp = 1``. Binary: ``codes = [W - mean(W) > 0]``, ``scale = 2 beta``,
    ``zp = 1/2``, so that ``(codes - zp) * scale = beta * sign(W - mean W)`` (0 -> -1), ``beta = mean|W|``.
    Only the selected kind's element-wise formula is evaluated (the caller keeps fp32 tensors out).
    Scale and zero-point have the shape :func:`grid_shape` (binary/ternary: the same value in every group).
    ``clip_ratios``: clipping ratio by bit width (index ``b`` of a length-17 array; see :func:`mse_clip_ratios`).
    """
    code = jnp.asarray(code, jnp.int32)
    w = jnp.asarray(w, jnp.float32)
    ratio = None if clip_ratios is None else jnp.asarray(clip_ratios, jnp.float32)[jnp.clip(code, 2, 16)]
    stats = _stats(w, symmetric, channel_axis, group_size)
    return _grid_of(w, stats, code, ratio, symmetric=symmetric, channel_axis=channel_axis, group_size=group_size)


def dequantize(codes: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
    """``(codes - zp) * scale`` in float32: the one dequantization formula of every level (export uses it too)."""
    return (jnp.asarray(codes).astype(jnp.float32) - zero_point) * scale


def dequantize_grid(codes: jax.Array, scale: jax.Array, zero_point: jax.Array, *, channel_axis: int | None = None,
                    group_size: int | None = None) -> jax.Array:
    """:func:`dequantize` with the scale and zero-point grids (:func:`grid_shape`) expanded to the codes."""
    shape = jnp.shape(codes)
    return dequantize(codes, expand_grid(scale, shape, channel_axis, group_size),
                      expand_grid(zero_point, shape, channel_axis, group_size))


def fake_quantize(w: jax.Array, code: jax.Array, *, symmetric: bool = False, channel_axis: int | None = None,
                  group_size: int | None = None, clip_ratios: jax.Array | None = None) -> jax.Array:
    """Fake-quantize ``w`` to the level whose int32 code (:func:`level_code`) is ``code`` (traced or not), STE.

    32 -> ``w`` unchanged (bit-exact), else ``(codes - zp) * scale`` of :func:`quant_grid`.
    """
    w = jnp.asarray(w, jnp.float32)
    grid = quant_grid(w, code, symmetric=symmetric, channel_axis=channel_axis, group_size=group_size,
                      clip_ratios=clip_ratios)
    wq = straight_through(w, dequantize_grid(*grid, channel_axis=channel_axis, group_size=group_size))
    return jnp.where(jnp.asarray(code) == level_code(FP32), w, wq)


def binary_quantize(w: jax.Array) -> jax.Array:
    """BitNet 1-bit fake quantization ``beta * sign(W - mean(W))``, 0 -> -1, ``beta = mean|W|`` (STE)."""
    return fake_quantize(w, level_code(BINARY))


def ternary_quantize(w: jax.Array) -> jax.Array:
    """BitNet 1.58-bit fake quantization ``gamma * clip(round(W / (gamma + eps)), -1, 1)``, ``gamma = mean|W|``
    (STE)."""
    return fake_quantize(w, level_code(TERNARY))


def mse_clip_ratios(w: jax.Array, *, symmetric: bool = False, channel_axis: int | None = None,
                    group_size: int | None = None) -> jax.Array:
    """Per uniform bit width ``b``, the clipping ratio ``r`` in :data:`MSE_CLIP_RATIOS` minimising
    ``sum (W - Wq_{b,r})^2`` (the range ``r [min, max]``, or ``r max|W|``, quantized at ``b`` bits).

    Calibration-free (the weights only) and exact on the whole tensor; ties go to the larger ratio (least
    clipping). Returns a length-17 float32 array indexed by ``b`` (entries 0 and 1 are 1).
    """
    w = jnp.asarray(w, jnp.float32)
    stats = _stats(w, symmetric, channel_axis, group_size)
    bits = jnp.repeat(jnp.asarray(UNIFORM_BITS, jnp.int32), len(MSE_CLIP_RATIOS))
    ratios = jnp.tile(jnp.asarray(MSE_CLIP_RATIOS, jnp.float32), len(UNIFORM_BITS))
    # grouped: work on the split view (the scale grid broadcasts against it; no per-iteration repeat) and leave
    # the padding out of the error
    view, weight, expand = w, 1.0, (lambda grid: grid)
    if channel_axis is not None and group_size is not None:
        view, member_axis = _group_view(w, channel_axis, group_size)
        position = jnp.arange(view.shape[member_axis - 1])[:, None] * group_size + jnp.arange(group_size)
        weight = (position < w.shape[member_axis - 1]).astype(jnp.float32).reshape(
            [d if a in (member_axis - 1, member_axis) else 1 for a, d in enumerate(view.shape)])

        def expand(grid):
            return jnp.expand_dims(grid, member_axis)

    def error(pair):
        b, r = pair
        scale, zero_point, qmax = _uniform_params(stats, b, symmetric, r)
        codes = jnp.clip(jnp.round(view / expand(scale)) + expand(zero_point), 0.0, qmax)
        return jnp.sum(weight * jnp.square(view - dequantize(codes, expand(scale), expand(zero_point))))

    errors = jax.lax.map(error, (bits, ratios)).reshape(len(UNIFORM_BITS), len(MSE_CLIP_RATIOS))
    best = jnp.asarray(MSE_CLIP_RATIOS, jnp.float32)[jnp.argmin(errors, axis=1)]
    return jnp.concatenate([jnp.ones(UNIFORM_BITS[0], jnp.float32), best])
