"""Orbax save/load of a SpikeGPT (the generic qslm_jax.model_io): identical outputs, clear errors."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from converters.spikegpt import load_spikegpt
from qslm_jax.errors import ConfigError, ConversionError
from qslm_jax.model_io import load_model, save_model
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig


def _forward(model, idx):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(idx))(state))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, fixtures_dir):
    model = load_spikegpt(fixtures_dir / "spikegpt_L8_C32_V77" / "tiny_random.pth", mode="rnn")
    directory = save_model(model, tmp_path_factory.mktemp("ckpt") / "spikegpt")
    return model, directory


def test_save_load_gives_identical_config_params_and_logits(saved, fixtures_dir):
    model, directory = saved
    restored = load_model(directory)
    assert isinstance(restored, SpikeGPT)
    assert restored.config == model.config  # the RNN-mode flags travel with the config
    idx = np.load(fixtures_dir / "spikegpt_L8_C32_V77" / "io.npz")["input_idx"]
    np.testing.assert_array_equal(_forward(restored, idx), _forward(model, idx))


def test_refuses_to_overwrite_unless_asked(saved):
    model, directory = saved
    with pytest.raises(ConversionError, match="overwrite=True"):
        save_model(model, directory)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match=r"no saved model .*model\.json"):
        load_model(tmp_path / "nothing-here")


def test_mismatched_checkpoint_lists_the_differences(saved, tmp_path):
    _, directory = saved
    copy = tmp_path / "edited"
    shutil.copytree(directory, copy)
    info = json.loads((copy / "model.json").read_text())
    info["config"]["n_layer"] = 9
    (copy / "model.json").write_text(json.dumps(info))
    with pytest.raises(ConversionError, match=r"missing keys \['blocks\.8\.att\.key\.kernel'"):
        load_model(copy)


def test_corrupted_state_and_bad_description(saved, tmp_path):
    _, directory = saved
    copy = tmp_path / "broken"
    shutil.copytree(directory, copy)
    (copy / "state" / "_METADATA").unlink()
    with pytest.raises(ConversionError, match="cannot read the orbax checkpoint"):
        load_model(copy)
    (copy / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ConversionError, match="expected format"):
        load_model(copy)


def test_model_without_dataclass_config_cannot_be_saved(tmp_path):
    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.zeros(3, np.float32))

    with pytest.raises(ConfigError, match="dataclass `config`"):
        save_model(Bare(), tmp_path / "bare")


def test_classifier_model_round_trips(tmp_path):
    model = SpikeGPT(SpikeGPTConfig.preset("spikegpt-tiny", n_classes=3), rngs=nnx.Rngs(4))
    restored = load_model(save_model(model, tmp_path / "cls"))
    np.testing.assert_array_equal(restored.classifier.kernel[...], model.classifier.kernel[...])


def test_model_json_naming_an_arbitrary_callable_runs_nothing(saved, tmp_path):
    """A model.json that names ``subprocess:Popen`` (or any importable callable) is refused before anything is
    imported or called: only registered families are rebuilt."""
    _, directory = saved
    copy = tmp_path / "hostile"
    shutil.copytree(directory, copy)
    marker = tmp_path / "ran"
    info = {"format": "qslm-jax-model/1", "model_class": "subprocess:Popen", "config_class": "builtins:dict",
            "config": {"args": ["touch", str(marker)]}}
    (copy / "model.json").write_text(json.dumps(info))
    with pytest.raises(ConversionError, match=r"not a registered model family.*spikegpt"):
        load_model(copy)
    (copy / "model.json").write_text(json.dumps({"format": "qslm-jax-model/1", "family": "subprocess:Popen",
                                                 "config": {"args": ["touch", str(marker)]}}))
    with pytest.raises(ConversionError, match="not registered"):
        load_model(copy)
    assert not marker.exists()


def test_saves_written_with_class_names_still_load(saved, tmp_path):
    """model.json files written before the family table (``model_class: module:QualName``) load when the
    names are exactly a registered family's."""
    model, directory = saved
    copy = tmp_path / "legacy"
    shutil.copytree(directory, copy)
    info = json.loads((copy / "model.json").read_text())
    assert info["family"] == "spikegpt"
    legacy = {"format": info["format"], "model_class": "qslm_jax.models.spikegpt:SpikeGPT",
              "config_class": "qslm_jax.models.spikegpt:SpikeGPTConfig", "config": info["config"]}
    (copy / "model.json").write_text(json.dumps(legacy))
    assert load_model(copy).config == model.config


def test_non_finite_saved_weights_are_refused(tmp_path):
    model = SpikeGPT(SpikeGPTConfig.preset("spikegpt-tiny"), rngs=nnx.Rngs(0))
    model.blocks[0].att.key.kernel[...] = model.blocks[0].att.key.kernel[...].at[0, 0].set(np.nan)
    directory = save_model(model, tmp_path / "nan")
    with pytest.raises(ConversionError, match=r"non-finite weights: blocks\.0\.att\.key\.kernel \(1 of"):
        load_model(directory)
