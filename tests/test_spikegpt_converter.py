"""The SpikeGPT converter: strict loading, bit-exact round trips, the real 216M key scheme, bad inputs."""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import pytest
from flax import nnx

from converters.checkpoint_io import read_state_dict
from converters.spikegpt import from_pretrained, key_map, load_spikegpt, to_state_dict
from qslm_jax.errors import ConfigError, ConversionError
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig

TINY = "spikegpt_L2_C64_V100"


@pytest.fixture(scope="module")
def tiny_path(fixtures_dir):
    return fixtures_dir / TINY / "tiny_random.pth"


@pytest.fixture()
def tiny_state(tiny_path):
    return read_state_dict(tiny_path)


@pytest.fixture(scope="module")
def keys_216m(fixtures_dir):
    return json.loads((fixtures_dir / "spikegpt216m_keys.json").read_text())


def _params(model) -> dict:
    return nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        np.testing.assert_array_equal(np.asarray(pa[path]), np.asarray(pb[path]), err_msg=str(path))


# ---------------------------------------------------------------- round trips


def test_round_trip_is_bit_exact_and_keeps_the_reference_key_order(tiny_path, tiny_state):
    model = load_spikegpt(tiny_path)
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (2, 64, 100)
    assert model.config.ctx_len == 1024  # not in the shapes: the released model's default
    exported = to_state_dict(model)
    assert list(exported) == list(tiny_state)
    for key, value in tiny_state.items():
        assert exported[key].dtype == np.float32 and exported[key].flags.c_contiguous
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    _assert_same_params(load_spikegpt(exported), model)


def test_safetensors_source_loads_the_same_model(tmp_path, tiny_path, tiny_state):
    from safetensors.numpy import save_file

    save_file(tiny_state, tmp_path / "tiny.safetensors")
    _assert_same_params(load_spikegpt(tmp_path / "tiny.safetensors"), load_spikegpt(tiny_path))


def test_linear_kernels_are_transposed_and_time_mix_flattened(tiny_path, tiny_state):
    model = load_spikegpt(tiny_path)
    b0, b1 = model.blocks[0], model.blocks[1]
    np.testing.assert_array_equal(b1.ffn.key.kernel[...], tiny_state["blocks.1.ffn.key.weight"].T)
    np.testing.assert_array_equal(b0.att.time_mix_v[...], tiny_state["blocks.0.att.time_mix_v"][0, 0])
    np.testing.assert_array_equal(model.ln0.scale[...], tiny_state["blocks.0.ln0.weight"])
    np.testing.assert_array_equal(b1.att.time_decay[...], tiny_state["blocks.1.att.time_decay"])


def test_classifier_weight_is_loaded_and_exported(tiny_state):
    tiny_state["classifier.weight"] = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    model = load_spikegpt(tiny_state)
    assert model.config.n_classes == 2
    np.testing.assert_array_equal(model.classifier.kernel[...], tiny_state["classifier.weight"].T)
    np.testing.assert_array_equal(to_state_dict(model)["classifier.weight"], tiny_state["classifier.weight"])


def test_mode_and_config(tiny_state):
    rnn = load_spikegpt(tiny_state, mode="rnn", config=SpikeGPTConfig(2, 64, 100, ctx_len=16))
    assert (rnn.config.ctx_len, rnn.config.binarize_embedding, rnn.config.rescale_every) == (16, False, 6)
    with pytest.raises(ConversionError, match="n_embd: config 32, checkpoint 64"):
        load_spikegpt(tiny_state, config=SpikeGPTConfig(2, 32, 100, ctx_len=16))
    with pytest.raises(ConfigError, match="forward mode"):
        load_spikegpt(tiny_state, mode="cuda")


# ---------------------------------------------------------------- the real SpikeGPT-216M layout


def test_216m_key_map_reproduces_every_reference_key_and_shape(keys_216m):
    config = SpikeGPTConfig.preset("spikegpt216m")
    assert keys_216m["config"] == {"n_layer": 18, "n_embd": 768, "vocab_size": 50277, "ctx_len": 1024}
    abstract = nnx.eval_shape(lambda: SpikeGPT(config, rngs=nnx.Rngs(0)))
    shapes = {path: x.shape for path, x in _params(abstract).items()}
    table = key_map(config)
    assert {path for path, _ in table.values()} == set(shapes)  # every parameter is mapped exactly once
    exported = [[key, list(t.reference_shape(shapes[path]))] for key, (path, t) in table.items()]
    assert exported == keys_216m["keys"]
    assert len(exported) == 330


@pytest.mark.slow
def test_216m_random_checkpoint_loads_round_trips_and_runs(keys_216m):
    # one random state dict of the real shapes (862 MB), freed at the end; peak RAM about 3 x 0.86 GB
    rng = np.random.default_rng(0)
    state = {key: rng.standard_normal(shape, dtype=np.float32) * 0.05 for key, shape in keys_216m["keys"]}
    model = load_spikegpt(state)
    assert model.config == SpikeGPTConfig.preset("spikegpt216m")
    exported = to_state_dict(model)
    assert [[k, list(v.shape)] for k, v in exported.items()] == keys_216m["keys"]
    for key in state:
        np.testing.assert_array_equal(exported[key], state[key], err_msg=key)
    del state, exported
    idx = np.array([[0, 187, 510, 50276]])
    logits = model(idx)
    assert logits.shape == (1, 4, 50277)
    assert np.isfinite(np.asarray(logits)).all()
    del model, logits
    jax.clear_caches()


# ---------------------------------------------------------------- bad input


def test_truncated_file(tmp_path, tiny_path):
    data = tiny_path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"cannot read PyTorch checkpoint .*cut\.pth"):
        load_spikegpt(tmp_path / "cut.pth")


class _WritesMarker:
    """Unpickling this would call ``open(marker, 'w')``: a stand-in for arbitrary code in a malicious file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_a_non_tensor_object_is_refused_and_not_executed(tmp_path, tiny_state):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "executed.txt"
    payload = {k: torch.from_numpy(v) for k, v in tiny_state.items()}
    payload["extra"] = _WritesMarker(marker)
    torch.save(payload, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(ConversionError, match="refused"):
        load_spikegpt(tmp_path / "evil.pth")
    assert not marker.exists()


def test_wrong_shape_extra_and_missing_keys_are_all_listed(tiny_state):
    tiny_state["blocks.1.att.key.weight"] = np.zeros((64, 65), np.float32)
    tiny_state["blocks.0.att.extra.weight"] = np.zeros((3,), np.float32)
    del tiny_state["blocks.1.ffn.value.weight"]
    with pytest.raises(ConversionError) as info:
        load_spikegpt(tiny_state)
    text = str(info.value)
    assert "blocks.1.att.key.weight: expected (64, 64), found (64, 65)" in text
    assert "unexpected keys ['blocks.0.att.extra.weight']" in text
    assert "missing keys ['blocks.1.ffn.value.weight']" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"blocks.0.ffnPre.key.weight": (256, 64), "blocks.0.ffnPre.time_mix_k": (1, 1, 64)}, "ffnPre"),
        ({"pos_emb_x": (1, 16, 64), "pos_emb_y": (16, 1, 64)}, r"pos_emb.*\['pos_emb_x', 'pos_emb_y'\]"),
        ({"head_q.weight": (256, 64), "head_k.weight": (256, 64), "copy_mask": (16, 16)}, "head_q/head_k"),
    ],
)
def test_unsupported_variants_are_named(tiny_state, extra, message):
    tiny_state.update({k: np.zeros(shape, np.float32) for k, shape in extra.items()})
    with pytest.raises(ConversionError, match=message):
        load_spikegpt(tiny_state)


def test_not_a_spikegpt_checkpoint_or_non_float_tensors(tiny_state):
    with pytest.raises(ConversionError, match=r"emb\.weight"):
        load_spikegpt({"encoder.weight": np.zeros((4, 4), np.float32)})
    tiny_state["blocks.0.att.time_first"] = np.zeros(64, np.int64)
    with pytest.raises(ConversionError, match=r"floating-point.*blocks\.0\.att\.time_first \(int64\)"):
        load_spikegpt(tiny_state)


def test_from_pretrained_offline_fails_fast_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ConversionError, match=r"SpikeGPT-216M\.pth") as info:
        from_pretrained("spikegpt216m")
    assert time.monotonic() - start < 10
    assert "ridger/SpikeGPT-OpenWebText-216M" in str(info.value) and "local path" in str(info.value)
    with pytest.raises(ConfigError, match="spikegpt216m"):
        from_pretrained("gpt2")
