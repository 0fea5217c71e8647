"""A new model family costs a model, (optionally) a converter and one registry entry: a toy family registered here
runs the whole QSLM pipeline (tiered search, selection, export, energy estimate) and safe loading, following the
README's "Adding a model family" steps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qslm_jax.data.tokenizer import gpt_neox_tokenizer
from qslm_jax.energy import LayerOps
from qslm_jax.errors import ConfigError, ConversionError
from qslm_jax.model_io import MODEL_FAMILIES, load_model, load_quantized_model, save_model
from qslm_jax.models import registry
from qslm_jax.qslm.pipeline import run_qslm
from qslm_jax.qslm.settings import QSLMSettings
from qslm_jax.quant import hierarchy as quant_hierarchy
from qslm_jax.quant.hierarchy import FamilyRules
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.tasks.task import get_task


# step 1: the model file (a frozen dataclass config, ``Model(config, *, rngs)``, ``self.config``)
@dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 50277
    width: int = 8
    layers: int = 2
    n_classes: int = 2
    ctx_len: int = 64


class ToyLayer(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(width, width, rngs=rngs)
        self.scale = nnx.Param(jnp.ones(width))


class Toy(nnx.Module):
    """Mean token embedding through ``layers`` ReLU layers into a classifier."""

    def __init__(self, config: ToyConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.tok = nnx.Embed(config.vocab_size, config.width, rngs=rngs)
        self.blocks = nnx.List([ToyLayer(config.width, rngs=rngs) for _ in range(config.layers)])
        self.classifier = nnx.Linear(config.width, config.n_classes, rngs=rngs)

    def classify(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        m = mask[..., None].astype(jnp.float32)
        h = (self.tok(ids) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        for layer in self.blocks:
            h = jax.nn.relu(layer.linear(h)) * layer.scale
        return self.classifier(h)


def toy_layer_ops(config: ToyConfig, level, *, spike_rates=None, tokens=1, classify=True) -> list[LayerOps]:
    """One real-valued Linear per layer: ``width^2`` MACs per token at its module's level."""
    return [LayerOps(config.width, config.width, None, float(level(f"layer_{i}/linear")), f"layer_{i}/linear")
            for i in range(config.layers)]


# step 3: one registry entry (step 2, a converter, is optional: ``load`` / ``to_state_dict``)
TOY = registry.ModelFamily(
    name="toy", model_class=Toy, config_class=ToyConfig,
    rules=FamilyRules(name="toy", anchor="tok", top_level={"tok": "input", "classifier": "output"},
                      repeated="blocks", prefix="layer_", modules=(("linear",),), before=("input",),
                      after=("output",)),
    presets=MappingProxyType({"toy-small": ToyConfig}),
    tokenizer=gpt_neox_tokenizer,
    classify=lambda model, batch: model.classify(batch["idx"], batch["attention_mask"]),
    language_model=None, layer_ops=toy_layer_ops, positional=False,
    config_fields=MappingProxyType({"n_classes": "n_classes", "vocab_size": "vocab_size", "max_length": "ctx_len"}),
)


@pytest.fixture
def toy_family(monkeypatch):
    """The toy family registered for one test (the registries are restored afterwards)."""
    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))
    monkeypatch.setattr(quant_hierarchy, "FAMILIES", dict(quant_hierarchy.FAMILIES))
    return registry.register_family(TOY)


def test_registered_family_is_known_everywhere(toy_family, tmp_path):
    model = Toy(ToyConfig(), rngs=nnx.Rngs(0))
    assert registry.family_of(model) is toy_family and registry.preset_family("toy-small") is toy_family
    assert "toy" in MODEL_FAMILIES and "toy-small" in registry.all_presets()
    hierarchy = registry.hierarchy_of(model)
    assert hierarchy.blocks == ("input", "layer_0", "layer_1", "output")
    assert hierarchy.modules == ("layer_0/linear", "layer_1/linear")
    saved = load_model(save_model(model, tmp_path / "toy"))  # safe loading reads the registry
    assert type(saved) is Toy and saved.config == model.config


def test_unregistered_family_is_refused(tmp_path):
    model = Toy(ToyConfig(vocab_size=10), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="register_family"):
        save_model(model, tmp_path / "toy")
    with pytest.raises(ConfigError, match="already another family's"):
        registry.register_family(dataclasses.replace(TOY, presets={"spikegpt-small": ToyConfig}))


def test_tiered_search_runs_on_the_toy_family(toy_family, tmp_path, data_dir):
    model = toy_family.build(toy_family.config("toy-small"), seed=1)
    settings = QSLMSettings(const_a=100.0, const_m_mb=0.5 * registry.hierarchy_of(model).fp32_bytes / 1e6,
                            levels=(32, 8, 4, 2), eval_limit=16, eval_batch_size=16, chunk_size=4)
    report, code = run_qslm(model, get_task("sst2"), settings, tmp_path / "toy-a1",
                            model_description={"preset": "toy-small"}, data_dir=data_dir, progress=False)
    assert code == 0 and report["selection"]["memory_bytes"] <= settings.const_m_mb * 1e6
    assert list(report["sensitivity"]["table"]) == ["input", "layer_0", "layer_1", "output"]
    baseline = report["energy_estimate"]["baseline"]
    assert baseline["macs_per_token"] == 2 * 8 * 8 and baseline["acs_per_token"] == 0
    assert report["energy_estimate"]["selection"]["joules_per_token"] <= baseline["joules_per_token"]
    rebuilt, export = load_quantized_model(tmp_path / "toy-a1" / "selection.safetensors")
    assert type(rebuilt) is Toy and export.plan == QuantPlan.from_dict(report["selection"]["plan"])


def test_a_saved_family_that_is_no_longer_registered_is_refused(toy_family, tmp_path, monkeypatch):
    directory = save_model(Toy(ToyConfig(vocab_size=10), rngs=nnx.Rngs(0)), tmp_path / "toy")
    monkeypatch.delitem(registry.FAMILIES, "toy")
    with pytest.raises(ConversionError, match="not registered"):
        load_model(directory)
