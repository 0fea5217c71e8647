"""Quantizers: properties (hypothesis), numpy cross-check, STE, levels as data, constant tensors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qslm_jax.errors import ConfigError
from qslm_jax.quant.quantizers import (
    BINARY,
    FP32,
    KINDS,
    LEVELS,
    TERNARY,
    QuantScheme,
    binary_quantize,
    check_level,
    fake_quantize,
    kind_of,
    level_code,
    quant_grid,
    ternary_quantize,
)

SHAPE = (6, 10)  # fixed, so the jitted quantizers compile once per (symmetric, axis)
SUM_RTOL = 60 * 2.0**-24  # worst-case relative error of an fp32 sum of 60 terms (mean|W| in XLA vs float64)
weights = arrays(np.float32, SHAPE, elements=st.floats(-100, 100, width=32, allow_subnormal=False))
uniform_bits = st.integers(2, 16)
layouts = st.sampled_from([(False, None), (True, None), (False, 1), (True, 1), (False, 0)])

_fake = jax.jit(fake_quantize, static_argnames=("symmetric", "channel_axis"))
_grid = jax.jit(quant_grid, static_argnames=("symmetric", "channel_axis", "group_size"))
TERNARY_CODE = level_code(TERNARY)


def _groups(x: np.ndarray, axis: int | None) -> list[np.ndarray]:
    """The slices that share one scale: the whole tensor, or each index along ``axis``."""
    return [x] if axis is None else [np.take(x, i, axis=axis) for i in range(x.shape[axis])]


def _fp32_slack(w: np.ndarray) -> float:
    """A few fp32 ulps of the largest magnitude: rounding of ``W / scale`` and ``(q - zp) * scale``."""
    return 2.0**-20 * float(np.max(np.abs(w)))


@settings(max_examples=60, deadline=None)
@given(w=weights, bits=uniform_bits, layout=layouts)
def test_uniform_properties(w, bits, layout):
    symmetric, axis = layout
    wq = np.asarray(_fake(w, bits, symmetric=symmetric, channel_axis=axis))
    _, scale, zp = (np.asarray(a) for a in _grid(w, bits, symmetric=symmetric, channel_axis=axis))
    for group in _groups(wq, axis):
        assert len(np.unique(group)) <= 2**bits
    # inside the range every value is within half a step of its grid point
    err = np.abs(wq - w)
    assert np.all(err <= np.broadcast_to(scale, w.shape) / 2 + _fp32_slack(w))
    # quantizing again keeps every value (the recomputed scale differs by a few ulps at most). Min-max grids
    # are idempotent except when -min/scale is a rounding tie: then min and max round in opposite directions,
    # the quantized range spans one step less and the second pass gets a different scale.
    if not symmetric:
        lo = np.min(w, axis=1 - axis, keepdims=True) if axis is not None else w.min()  # min of each group
        ratio = -lo.astype(np.float64) / scale.astype(np.float64)
        assume(np.all(np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) > 1e-3))
    again = np.asarray(_fake(wq, bits, symmetric=symmetric, channel_axis=axis))
    np.testing.assert_allclose(again, wq, rtol=0, atol=_fp32_slack(w))
    assert np.all(np.isfinite(zp))


@settings(max_examples=30, deadline=None)
@given(w=weights, layout=layouts)
def test_32_bits_is_bit_exact_identity(w, layout):
    symmetric, axis = layout
    out = np.asarray(_fake(w, 32, symmetric=symmetric, channel_axis=axis))
    assert out.tobytes() == w.tobytes()


@settings(max_examples=40, deadline=None)
@given(w=weights)
def test_binary_values_and_idempotence(w):
    wq = np.asarray(_fake(w, 1))
    beta = np.mean(np.abs(w), dtype=np.float64)
    values = np.unique(wq)
    assert len(values) <= 2
    np.testing.assert_allclose(np.abs(values), beta, rtol=SUM_RTOL)
    assert len(np.unique(np.abs(values))) == 1  # {-beta, +beta}
    # the sign pattern is W > mean(W), 0 -> -1 (away from the mean, where fp32 summation order cannot matter)
    centred = w - w.mean(dtype=np.float64)
    clear = np.abs(centred) > 1e-5 * np.max(np.abs(w))
    np.testing.assert_array_equal((wq > 0)[clear], (centred > 0)[clear])
    # idempotent whenever both signs occur (a constant tensor has W - mean(W) = +-rounding error: no sign)
    if len(values) == 2:
        np.testing.assert_allclose(np.asarray(_fake(wq, 1)), wq, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(w=weights)
@example(w=np.pad(np.full((1, 1), 6.1035156e-05, np.float32), ((0, 5), (0, 9))))  # found by CI: eps dominates
def test_ternary_values(w):
    wq = np.asarray(_fake(w, TERNARY_CODE))
    gamma = np.mean(np.abs(w), dtype=np.float64)
    values = np.unique(wq)
    assert len(values) <= 3
    np.testing.assert_allclose(np.abs(values[values != 0]), gamma, rtol=SUM_RTOL)
    # codes: clip(round(W / (gamma + eps)), -1, 1); away from the rounding boundaries they match float64 maths
    t = np.clip(np.round(w / (gamma + 1e-5)), -1, 1)
    boundary = np.abs(np.abs(w / (gamma + 1e-5)) - 0.5) < 1e-5
    np.testing.assert_array_equal(np.sign(wq)[~boundary], t[~boundary])
    # re-quantizing keeps the trits (the scale mean|Wq| shrinks by the fraction of zeros: absmean is not idempotent)
    # whenever eps does not dominate: a non-zero trit +-g becomes g / (f g + eps) >= 1/2 (f: the fraction of
    # non-zero trits) exactly when g (2 - f) >= eps; below that (tensors of ~1e-6 magnitude) eps floors the scale
    # and every trit rounds to 0, as BitNet's formula says
    magnitude, nonzero = np.max(np.abs(wq)), np.mean(wq != 0)
    if magnitude * (2 - nonzero) > 1e-5 * (1 + 1e-3):
        np.testing.assert_array_equal(np.sign(np.asarray(_fake(wq, TERNARY_CODE))), np.sign(wq))


def _numpy_minmax(w: np.ndarray, bits: int) -> np.ndarray:
    """Independent float32 reference of asymmetric per-tensor min-max (qslm.md section 2)."""
    w = w.astype(np.float32)
    scale = np.float32((w.max() - w.min()) / np.float32(2**bits - 1))
    zp = np.round(-w.min() / scale)
    q = np.clip(np.round(w / scale) + zp, 0, 2**bits - 1)
    return ((q - zp) * scale).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_int4_match_numpy_reference(bits):
    w = np.random.default_rng(bits).normal(0.1, 0.05, (64, 48)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_fake(w, bits)), _numpy_minmax(w, bits))


def test_symmetric_uses_max_abs_scale():
    w = np.array([-3.0, -1.0, 0.2, 1.5], np.float32)  # max|W| = 3, 4 bits -> scale 3/7
    out = np.asarray(_fake(w, 4, symmetric=True))
    np.testing.assert_allclose(out, np.round(w / (3 / 7)) * (3 / 7), rtol=1e-6)


def test_per_channel_axis_of_kernels_and_embeddings():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(16, 4)).astype(np.float32) * np.array([1, 10, 100, 1000], np.float32)
    per_tensor = np.asarray(_fake(kernel, 4))
    per_column = np.asarray(_fake(kernel, 4, channel_axis=1))  # Flax kernel (in, out): output = last axis
    # per tensor, the step (range / 15, about 400) swallows the small column; per column it has its own grid
    np.testing.assert_array_equal(per_tensor[:, 0], 0.0)
    step0 = (kernel[:, 0].max() - kernel[:, 0].min()) / 15
    assert np.abs(per_column[:, 0] - kernel[:, 0]).max() <= step0 / 2 + _fp32_slack(kernel[:, 0])
    for j in range(4):  # each column quantized alone equals its per-channel result
        np.testing.assert_array_equal(per_column[:, j], np.asarray(_fake(kernel[:, j], 4)))


@pytest.mark.parametrize("bits", [2, 8, 16])
@pytest.mark.parametrize("value", [0.0, 0.3, -2.5])
@pytest.mark.parametrize("symmetric", [False, True])
def test_constant_tensors_are_reproduced(bits, value, symmetric):
    w = np.full((5, 3), value, np.float32)
    out = np.asarray(_fake(w, bits, symmetric=symmetric))
    assert np.all(np.isfinite(out))
    if not symmetric:  # min-max reproduces a constant exactly; symmetric: +-max|W| is on its grid
        np.testing.assert_array_equal(out, w)
    else:
        np.testing.assert_allclose(out, w, rtol=1e-6)


def test_one_compilation_serves_every_level():
    f = jax.jit(lambda w, code: fake_quantize(w, code))  # a fresh cache
    w = jnp.linspace(-1, 1, 30).reshape(5, 6)
    outputs = [np.asarray(f(w, level_code(q))) for q in (32, 8, 4, 2, TERNARY, 1)]
    assert f._cache_size() == 1
    np.testing.assert_array_equal(outputs[0], w)
    assert [len(np.unique(o)) <= n for o, n in zip(outputs[1:4], (256, 16, 4), strict=True)] == [True] * 3
    assert [len(np.unique(o)) for o in outputs[4:]] == [3, 2]


def test_vmap_over_levels_equals_separate_calls():
    w = jax.random.normal(jax.random.key(1), (8, 8))
    codes = jnp.array([32, 6, 3, TERNARY_CODE, 1], jnp.int32)
    batched = jax.vmap(lambda c: fake_quantize(w, c))(codes)
    for i, c in enumerate(codes):
        np.testing.assert_array_equal(batched[i], fake_quantize(w, c))


@pytest.mark.parametrize("fn", [lambda w: fake_quantize(w, 4), lambda w: fake_quantize(w, 32),
                                lambda w: fake_quantize(w, 3, symmetric=True, channel_axis=1),
                                lambda w: fake_quantize(w, 3, channel_axis=1, group_size=2),
                                binary_quantize, ternary_quantize])
def test_straight_through_gradient_is_identity(fn):
    w = jax.random.normal(jax.random.key(0), (4, 5))
    cotangent = jax.random.normal(jax.random.key(1), (4, 5))
    grad = jax.grad(lambda x: jnp.sum(fn(x) * cotangent))(w)
    np.testing.assert_array_equal(grad, cotangent)


def test_grid_dequantizes_to_the_fake_value():
    w = jax.random.normal(jax.random.key(2), (7, 3))
    for code in (8, 3, TERNARY_CODE, 1):
        codes, scale, zp = quant_grid(w, code)
        assert float(jnp.max(jnp.abs(codes - jnp.round(codes)))) == 0.0
        np.testing.assert_array_equal((codes - zp) * scale, fake_quantize(w, code))


@pytest.mark.parametrize("bad", [0, 17, 24, 1.5, "8", True, None])
def test_invalid_levels_are_rejected(bad):
    with pytest.raises(ConfigError, match="precision level"):
        check_level(bad)


def test_level_normalisation():
    assert check_level(np.int64(8)) == 8 and isinstance(check_level(np.int64(8)), int)
    assert check_level(1.58) == TERNARY and check_level(8.0) == 8
    assert level_code(1.58) == TERNARY_CODE and level_code(32) == 32


def test_kinds_table_covers_every_level_once():
    assert sorted(level for kind in KINDS for level in kind.levels) == sorted(LEVELS)
    codes = [level_code(level) for level in LEVELS]
    assert len(set(codes)) == len(LEVELS)  # every level has its own code
    assert kind_of(8).name == "uniform" and kind_of(TERNARY).packing == "trits" and kind_of(BINARY).per_tensor
    assert level_code(FP32) == 32 and level_code(8) == 8


def test_scheme_presets():
    assert QuantScheme.preset("minmax") == QuantScheme()
    assert QuantScheme.preset("per_channel").per_channel and QuantScheme.preset("per-channel").per_channel
    with pytest.raises(ConfigError, match="unknown quantization scheme"):
        QuantScheme.preset("nope")
