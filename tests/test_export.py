"""Export: packed codes round trip bit-exactly to the fake-quant weights; file size = memory accounting."""

from __future__ import annotations

import json
import time
import tracemalloc

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from qslm_jax.errors import ConversionError
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.quant.apply import quantize_model
from qslm_jax.quant.export import (
    FORMAT,
    export_quantized,
    load_quantized,
    pack_bits,
    pack_trits,
    payload_digest,
    read_header,
    unpack_bits,
    unpack_trits,
)
from qslm_jax.quant.hierarchy import hierarchy_of
from qslm_jax.quant.memory import memory_bytes
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
    assert summary.payload_bytes == summary.memory_bytes == memory_bytes(hierarchy, plan)
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
    assert summary.payload_bytes == memory_bytes(hierarchy, plan)


SLOW = pytest.mark.slow  # ~15-25 s each on a loaded 2-core CPU (compilation of every tensor shape)
SCHEMES = [QuantScheme.preset("per-channel", group_size=16), pytest.param(QuantScheme.preset("mse"), marks=SLOW),
           pytest.param(QuantScheme.preset("mse", group_size=12), marks=SLOW),
           pytest.param(QuantScheme(symmetric=True, group_size=7, quantize_vectors=True), marks=SLOW)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_every_scheme_round_trips_bit_exactly(model, tmp_path, scheme):
    # groups of 16 / 12 / 7 inputs leave a shorter last group in every matrix of CONFIG (40, 160, 101 inputs)
    hierarchy = hierarchy_of(model, scheme=scheme)
    plan = (QuantPlan(3).with_block("input", 8).with_block("output", 16).with_module("attention_0/att.key", 1.58)
            .with_module("attention_1/ffn.value", 1).with_module("attention_1/att.output", 2)
            .with_module("attention_0/ffn.key", 32))
    summary = export_quantized(model, plan, tmp_path / "s.safetensors", hierarchy=hierarchy)
    loaded = load_quantized(summary)
    _assert_bit_identical(loaded.params, _params(quantize_model(model, plan, hierarchy)))
    assert summary.payload_bytes == summary.memory_bytes == memory_bytes(hierarchy, plan)
    assert loaded.scheme == scheme and loaded.plan == plan


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


# --- refusals: every check of load_quantized --------------------------------------------------------------------

KEY = "blocks.0.att.key.kernel"  # a quantized matrix of CONFIG (40 x 40)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_quantized(model, QuantPlan(4), tmp_path_factory.mktemp("export") / "q.safetensors").path


def _rewrite(src, dst, *, arrays=None, table=None, fix_checksum=True):
    """A copy of the export ``src`` with tensors and/or table entries edited, by default with a consistent
    checksum (an edited-but-resigned file must be caught by the structural checks, not only by the digest)."""
    _, metadata = read_header(src)
    tensors = {**load_file(str(src)), **(arrays or {})}
    entries = json.loads(metadata["tensors"])
    for name, edit in (table or {}).items():
        entries[name] = {**entries[name], **edit}
    metadata = {**metadata, "tensors": json.dumps(entries)}
    if fix_checksum:
        metadata["sha256"] = payload_digest(tensors)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def test_edited_copy_without_edits_loads(exported, tmp_path):
    _assert_bit_identical(load_quantized(_rewrite(exported, tmp_path / "same.safetensors")).params,
                          load_quantized(exported).params)


def test_oversized_shape_fails_fast_without_allocating(exported, tmp_path):
    bad = _rewrite(exported, tmp_path / "huge.safetensors", table={KEY: {"shape": [100_000, 100_000]}})
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ConversionError, match=rf"{KEY}:codes.*call\s+for U8 \[5000000000\]"):
        load_quantized(bad)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000, f"refusing a forged shape allocated {peak:,} bytes"
    assert seconds < 5.0  # generous: the checks read only the header (the old loader ran out of memory here)


def test_header_length_beyond_the_file_fails_fast(exported, tmp_path):
    data = bytearray(exported.read_bytes())
    data[:8] = (1 << 60).to_bytes(8, "little")
    (tmp_path / "len.safetensors").write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="header length"):
        load_quantized(tmp_path / "len.safetensors")


def test_truncated_codes_are_refused(exported, tmp_path):
    codes = load_file(str(exported))[f"{KEY}:codes"]
    bad = _rewrite(exported, tmp_path / "short.safetensors", arrays={f"{KEY}:codes": codes[:-1].copy()})
    with pytest.raises(ConversionError, match=rf"{KEY}:codes' is U8 \[{len(codes) - 1}\]"):
        load_quantized(bad)


def test_truncated_file_is_refused(exported, tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(exported.read_bytes()[:-10])
    with pytest.raises(ConversionError, match="payload has"):
        load_quantized(tmp_path / "cut.safetensors")


@pytest.mark.parametrize(("level", "match"), [(8, "call\\s+for U8"), (1.5, "precision level"),
                                              (32, "missing tensors"), ("4", "precision level")])
def test_edited_level_is_refused(exported, tmp_path, level, match):
    bad = _rewrite(exported, tmp_path / "level.safetensors", table={KEY: {"level": level}})
    with pytest.raises(ConversionError, match=match):
        load_quantized(bad)


@pytest.mark.parametrize(("value", "match"), [(np.float32(np.nan), "non-finite"), (np.float32(np.inf), "non-finite"),
                                              (np.float32(-1.0), "negative scales")])
def test_non_finite_or_negative_scale_is_refused(exported, tmp_path, value, match):
    scale = load_file(str(exported))[f"{KEY}:scale"].copy()
    scale[0] = value
    bad = _rewrite(exported, tmp_path / "scale.safetensors", arrays={f"{KEY}:scale": scale})
    with pytest.raises(ConversionError, match=match):
        load_quantized(bad)


def test_scale_of_wrong_length_is_refused(exported, tmp_path):
    bad = _rewrite(exported, tmp_path / "scales.safetensors", arrays={f"{KEY}:scale": np.ones(3, np.float32)})
    with pytest.raises(ConversionError, match=rf"{KEY}:scale' is F32 \[3\].*F32 \[1\]"):
        load_quantized(bad)


def test_non_finite_fp32_tensor_is_refused(exported, tmp_path):
    name = "blocks.0.ln1.scale"  # a vector kept at fp32
    vector = load_file(str(exported))[name].copy()
    vector[1] = np.nan
    with pytest.raises(ConversionError, match=f"non-finite.*{name}"):
        load_quantized(_rewrite(exported, tmp_path / "nan.safetensors", arrays={name: vector}))


def test_flipped_payload_byte_fails_the_checksum(exported, tmp_path):
    data = bytearray(exported.read_bytes())
    data[_header_bytes(exported) + 5] ^= 0x10
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="SHA-256"):
        load_quantized(tmp_path / "flip.safetensors")
    # an edit whose checksum is not recomputed is caught too
    codes = load_file(str(exported))[f"{KEY}:codes"] ^ np.uint8(1)
    with pytest.raises(ConversionError, match="SHA-256"):
        load_quantized(_rewrite(exported, tmp_path / "edit.safetensors", arrays={f"{KEY}:codes": codes},
                                fix_checksum=False))


def test_ternary_bytes_beyond_five_trits_are_refused(model, tmp_path):
    src = export_quantized(model, QuantPlan(1.58), tmp_path / "t.safetensors").path
    codes = load_file(str(src))[f"{KEY}:codes"].copy()
    codes[0] = 250
    with pytest.raises(ConversionError, match="ternary bytes above 242"):
        load_quantized(_rewrite(src, tmp_path / "trits.safetensors", arrays={f"{KEY}:codes": codes}))


@pytest.mark.parametrize("content", [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{}", b"not a safetensors file at all"])
def test_non_export_files_are_refused(tmp_path, content):
    (tmp_path / "junk.bin").write_bytes(content)
    with pytest.raises(ConversionError, match=r"not a valid|header"):
        load_quantized(tmp_path / "junk.bin")
