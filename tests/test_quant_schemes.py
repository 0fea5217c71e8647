"""Quantizer schemes: group-wise scales, MSE clipping, scheme options and CLI flags (properties with hypothesis)."""

from __future__ import annotations

import argparse

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from experiments.common import add_model_and_evaluation_arguments, scheme_of
from qslm_jax.data import strided_windows
from qslm_jax.errors import ConfigError
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.qslm.evaluator import Evaluator
from qslm_jax.qslm.metrics import Perplexity
from qslm_jax.quant.apply import clip_ratio_table, quantize_model, quantize_params
from qslm_jax.quant.hierarchy import hierarchy_of
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import (
    MSE_CLIP_RATIOS,
    TERNARY,
    QuantScheme,
    fake_quantize,
    grid_shape,
    level_code,
    mse_clip_ratios,
    quant_grid,
)
from tests.test_quant_quantizers import _fp32_slack

SHAPE = (6, 10)
weights = arrays(np.float32, SHAPE, elements=st.floats(-100, 100, width=32, allow_subnormal=False))
_fake = jax.jit(fake_quantize, static_argnames=("symmetric", "channel_axis", "group_size"))
_grid = jax.jit(quant_grid, static_argnames=("symmetric", "channel_axis", "group_size"))
_mse = jax.jit(mse_clip_ratios, static_argnames=("symmetric", "channel_axis", "group_size"))


def _groups(w: np.ndarray, channel_axis: int, group_size: int) -> list[tuple]:
    """Index tuples of every scale group: one output channel, ``group_size`` consecutive inputs."""
    in_axis = 1 - channel_axis
    out = []
    for c in range(w.shape[channel_axis]):
        for start in range(0, w.shape[in_axis], group_size):
            run = slice(start, start + group_size)
            out.append((run, c) if channel_axis == 1 else (c, run))
    return out


def _numpy_uniform(w: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Independent float32 reference of per-tensor min-max / symmetric quantization (qslm.md section 2), with
    the constant-tensor fallback of the quantizers (scale |min|, or 1 when that is 0)."""
    if symmetric:
        scale = np.float32(np.max(np.abs(w)) / np.float32(2 ** (bits - 1) - 1))
        scale, zp = (scale if scale > 0 else np.float32(1)), np.float32(2 ** (bits - 1))
    else:
        lo = np.min(w)
        scale = np.float32((np.max(w) - lo) / np.float32(2**bits - 1))
        scale = scale if scale > 0 else (np.abs(lo) if lo != 0 else np.float32(1))
        zp = np.round(-lo / scale)
    codes = np.clip(np.round(w / scale) + zp, 0, 2**bits - 1)
    return ((codes - zp) * scale).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(w=weights, bits=st.integers(2, 8), channel_axis=st.sampled_from([0, 1]), group_size=st.sampled_from([1, 4]),
       symmetric=st.booleans())
def test_each_group_is_quantized_as_a_tensor_of_its_own(w, bits, channel_axis, group_size, symmetric):
    wq = np.asarray(_fake(w, bits, symmetric=symmetric, channel_axis=channel_axis, group_size=group_size))
    _, scale, _ = _grid(w, bits, symmetric=symmetric, channel_axis=channel_axis, group_size=group_size)
    assert scale.shape == grid_shape(SHAPE, channel_axis, group_size)
    for index in _groups(w, channel_axis, group_size):
        # the group's own min/max, scale and codes (a scale may differ by an ulp: XLA divides vectors of scales
        # with a reciprocal, numpy exactly)
        np.testing.assert_allclose(wq[index], _numpy_uniform(w[index], bits, symmetric), rtol=0,
                                   atol=_fp32_slack(w))
        assert len(np.unique(wq[index])) <= 2**bits


@settings(max_examples=30, deadline=None)
@given(w=weights, bits=st.integers(2, 16), channel_axis=st.sampled_from([0, 1]), symmetric=st.booleans())
def test_one_group_per_channel_is_per_channel(w, bits, channel_axis, symmetric):
    whole = SHAPE[1 - channel_axis]
    grouped = _fake(w, bits, symmetric=symmetric, channel_axis=channel_axis, group_size=whole + 3)
    per_channel = _fake(w, bits, symmetric=symmetric, channel_axis=channel_axis)
    np.testing.assert_allclose(grouped, per_channel, rtol=0, atol=_fp32_slack(w))


@pytest.mark.parametrize("code", [level_code(1), level_code(TERNARY), level_code(32)])
def test_binary_ternary_fp32_ignore_groups(code):
    w = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    assert np.asarray(_fake(w, code, channel_axis=1, group_size=4)).tobytes() == np.asarray(_fake(w, code)).tobytes()


@settings(max_examples=20, deadline=None)
@given(w=weights, symmetric=st.booleans(), layout=st.sampled_from([(None, None), (0, 3)]))
def test_mse_ratios_never_increase_the_error(w, symmetric, layout):
    axis, group_size = layout
    ratios = np.asarray(_mse(w, symmetric=symmetric, channel_axis=axis, group_size=group_size))
    assert ratios.shape == (17,) and set(ratios[2:]) <= {np.float32(r) for r in MSE_CLIP_RATIOS}
    assert np.all(ratios[:2] == 1.0)
    for bits in (2, 3, 4, 8):
        clipped = _fake(w, bits, symmetric=symmetric, channel_axis=axis, group_size=group_size, clip_ratios=ratios)
        minmax = _fake(w, bits, symmetric=symmetric, channel_axis=axis, group_size=group_size)
        err = float(np.sum((np.asarray(clipped, np.float64) - w) ** 2))
        assert err <= float(np.sum((np.asarray(minmax, np.float64) - w) ** 2)) * (1 + 1e-5) + 1e-30
        # and no other ratio of the grid does better (the choice is the grid's minimum)
        for r in MSE_CLIP_RATIOS[::5]:
            other = _fake(w, bits, symmetric=symmetric, channel_axis=axis, group_size=group_size,
                          clip_ratios=np.full(17, r, np.float32))
            assert err <= float(np.sum((np.asarray(other, np.float64) - w) ** 2)) * (1 + 1e-4) + 1e-30


def test_mse_clips_outliers_at_low_bits_and_ratio_one_is_minmax():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 64)).astype(np.float32)
    w[0, 0] = 12.0  # one outlier stretches the min-max range
    ratios = np.asarray(_mse(w))
    assert ratios[2] < 0.9 and ratios[3] < 1.0
    ones = np.ones(17, np.float32)
    for bits in (2, 4, 16):
        assert np.asarray(_fake(w, bits, clip_ratios=ones)).tobytes() == np.asarray(_fake(w, bits)).tobytes()


def test_scheme_options_repr_and_validation():
    assert repr(QuantScheme()) == "QuantScheme(symmetric=False, per_channel=False, quantize_vectors=False)"
    mse = QuantScheme.preset("mse", group_size=64)
    assert repr(mse).endswith("group_size=64, clipping='mse')") and mse.channelwise
    assert QuantScheme(**mse.to_dict()) == mse
    assert QuantScheme.preset("all_tensors") == QuantScheme(quantize_vectors=True)
    for bad in ({"group_size": 0}, {"group_size": True}, {"clipping": "percentile"}):
        with pytest.raises(ConfigError, match=r"group_size|clipping"):
            QuantScheme(**bad)


def test_cli_flags_give_the_scheme():
    parser = argparse.ArgumentParser()
    add_model_and_evaluation_arguments(parser)
    assert scheme_of(parser.parse_args([])) == QuantScheme()
    args = parser.parse_args(["--scheme", "per-channel", "--group-size", "32"])
    assert scheme_of(args) == QuantScheme(per_channel=True, group_size=32)
    assert scheme_of(parser.parse_args(["--scheme", "mse"])).clipping == "mse"


CONFIG = SpikeGPTConfig(n_layer=1, n_embd=32, vocab_size=64, ctx_len=8)


_batch_stats = nnx.jit(lambda model, batch: Perplexity().batch_stats(model, batch))


@pytest.mark.slow
def test_mse_needs_its_table_and_the_evaluator_matches_quantize_model():
    model = SpikeGPT(CONFIG, rngs=nnx.Rngs(0))
    hierarchy = hierarchy_of(model, scheme=QuantScheme.preset("mse", group_size=16))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    plan = QuantPlan(3).with_block("input", 4).with_module("attention_0/ffn.key", 1.58)
    with pytest.raises(ConfigError, match="clip_ratio_table"):
        quantize_params(params, hierarchy.bits_tree(plan), hierarchy)
    table = clip_ratio_table(params, hierarchy)
    assert set(table) == {t.name for t in hierarchy.tensors if hierarchy.quantized(t)}
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 41)
    batches = list(strided_windows(tokens, CONFIG.ctx_len, stride=4).batches(4))
    [got] = Evaluator(model, Perplexity(), hierarchy=hierarchy, chunk_size=1)([plan], batches)
    quantized = quantize_model(model, plan, hierarchy)  # computes the same table itself
    stats = [jax.device_get(_batch_stats(quantized, b)) for b in batches]
    assert got == pytest.approx(Perplexity().finalize({k: sum(float(s[k]) for s in stats) for k in stats[0]}),
                                rel=1e-5)
