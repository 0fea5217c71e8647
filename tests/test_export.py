"""Export: packed codes round trip bit-exactly to the fake-quant weights; file size = memory accounting."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from qslm_jax.errors import ConversionError
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.quant.apply import quantize_model
from qslm_jax.quant.export import (
    FORMAT,
    export_quantized,
    load_quantized,
    pack_bits,
    pack_trits,
    unpack_bits,
    unpack_trits,
)
from qslm_jax.quant.hierarchy import hierarchy_of
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import QuantScheme

CONFIG = SpikeGPTConfig(n_layer=2, n_embd=40, vocab_size=101, ctx_len=16, n_classes=2)


@pytest.fixture(scope="module")
def model():
    return SpikeGPT(CONFIG, rngs=nnx.Rngs(3))


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype == np.float32
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _header_bytes(path) -> int:
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


@pytest.mark.parametrize("level", [8, 4, 3, 2, 1.58, 1])
@pytest.mark.parametrize("scheme", ["minmax", "per_channel"])
def test_round_trip_is_bit_exact_and_size_matches_accounting(model, tmp_path, level, scheme):
    hierarchy = hierarchy_of(model, scheme=QuantScheme.preset(scheme))
    plan = QuantPlan(level)
    summary = export_quantized(model, plan, tmp_path / "q.safetensors", hierarchy=hierarchy)
    loaded = load_quantized(summary.path)
    _assert_bit_identical(loaded.params, _params(quantize_model(model, plan, hierarchy)))
    # payload (packed codes + 8 bytes per scale group + fp32 vectors) is exactly the accounted memory
    assert summary.payload_bytes == summary.memory_bytes == hierarchy.memory_bytes(plan)
    assert summary.file_bytes == summary.payload_bytes + _header_bytes(summary.path)
    assert summary.header_bytes == _header_bytes(summary.path)
    assert summary.memory_bytes < hierarchy.fp32_bytes * (level / 32 + 0.1)
    assert loaded.plan == plan and loaded.scheme == hierarchy.scheme


def test_mixed_plan_symmetric_and_model_reload(model, tmp_path):
    hierarchy = hierarchy_of(model, scheme=QuantScheme.preset("symmetric"))
    plan = (QuantPlan(6).with_block("input", 8).with_block("output", 16).with_block("attention_1", 3)
            .with_module("attention_1/att.key", 1.58).with_module("attention_0/ffn.value", 1)
            .with_module("attention_0/att.output", 32))
    summary = export_quantized(model, plan, tmp_path / "mixed.safetensors", hierarchy=hierarchy)
    loaded = load_quantized(summary)  # the summary is path-like
    quantized = quantize_model(model, plan, hierarchy)
    _assert_bit_identical(loaded.params, _params(quantized))
    assert loaded.config == {**CONFIG.__dict__}
    restored = loaded.apply_to(SpikeGPT(CONFIG, rngs=nnx.Rngs(99)))
    idx = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_array_equal(restored(idx), quantized(idx))
    assert summary.payload_bytes == hierarchy.memory_bytes(plan)


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_bits_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, 1003).astype(np.uint32)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and len(packed) == -(-1003 * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, 1003), codes)


def test_four_bit_codes_are_two_per_byte_low_nibble_first():
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 15, 0, 7]), 4), [0x21, 0x0F, 0x07])
    np.testing.assert_array_equal(pack_bits(np.array([1, 0, 0, 1, 1, 1, 1, 1, 1]), 1), [0b11111001, 0b1])


def test_trits_five_per_byte():
    codes = np.random.default_rng(0).integers(0, 3, 1001)
    packed = pack_trits(codes)
    assert len(packed) == 201
    np.testing.assert_array_equal(unpack_trits(packed, 1001), codes)
    np.testing.assert_array_equal(pack_trits(np.array([2, 1, 0, 0, 1])), [2 + 3 + 81])


def test_foreign_files_and_wrong_models_are_rejected(model, tmp_path):
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ConversionError, match=FORMAT):
        load_quantized(tmp_path / "plain.safetensors")
    with pytest.raises(ConversionError, match="cannot read"):
        load_quantized(tmp_path / "missing.safetensors")
    export_quantized(model, QuantPlan(4), tmp_path / "q.safetensors")
    other = SpikeGPT(SpikeGPTConfig(n_layer=1, n_embd=40, vocab_size=101, ctx_len=16), rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match="does not fit"):
        load_quantized(tmp_path / "q.safetensors").apply_to(other)
