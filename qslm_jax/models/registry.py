"""The model-family registry: everything QSLM, the CLIs, safe loading and the energy estimate need to know about a
family of models, in one entry per family (design.md, "Where the design goes next").

A :class:`ModelFamily` holds

* the model and config classes and the named presets (``--model`` names, e.g. ``spikegpt-small``);
* the converter from the reference checkpoint (``load``: file or ``hf://`` source -> model) and back
  (``to_state_dict``), imported only when called (converters need torch);
* the hierarchy rules (blocks and modules from parameter paths, qslm.md section 1), registered with
  :mod:`qslm_jax.quant.hierarchy`;
* the tokenizer and how the model computes a task's output from a batch (``classify``: (B, C) logits,
  ``language_model``: (B, L, V) logits, ``train_classify``: the differentiable training forward);
* its per-layer operation counts for the energy estimate (:mod:`qslm_jax.energy`) and its spike rates.

A new family costs a model file, a converter and one :func:`register_family` call (README, "Adding a model
family"). Saved models name a registered family (``model.json``'s ``family``), never an importable path
(:mod:`qslm_jax.model_io`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qslm_jax.data.tokenizer import TextTokenizer, bert_tokenizer, gpt_neox_tokenizer
from qslm_jax.energy import LayerOps
from qslm_jax.errors import ConfigError
from qslm_jax.models.bert import BERT, BERT_PRESETS, BertConfig
from qslm_jax.models.spikegpt import PRESETS as SPIKEGPT_PRESETS
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.models.spikingbert import (
    NEURONS_PER_BLOCK,
    SPIKINGBERT_PRESETS,
    SpikingBERT,
    SpikingBERTConfig,
    is_encoder_kernel,
)
from qslm_jax.quant.hierarchy import FamilyRules, Hierarchy, param_shapes, register_rules
from qslm_jax.quant.quantizers import FP32, Level, QuantScheme

Batch = Mapping[str, jax.Array]
# level(unit) -> the weight level of a qualified module ("encoder_0/query") or a block ("output")
LevelOf = Callable[[str], Level]


@dataclass(frozen=True)
class ModelFamily:
    """One family of models (module docstring). ``config_fields`` maps the generic names ``n_classes``,
    ``vocab_size`` and ``max_length`` to the config's own field names."""

    name: str
    model_class: type
    config_class: type
    rules: FamilyRules
    presets: Mapping[str, Callable[..., Any]]  # preset name -> config factory (keyword overrides)
    tokenizer: Callable[..., TextTokenizer]  # (data_dir=...) -> tokenizer
    classify: Callable[[Any, Batch], jax.Array] | None
    language_model: Callable[[Any, Batch], jax.Array] | None
    layer_ops: Callable[..., list[LayerOps]]  # (config, level, *, spike_rates, tokens, classify) -> ops
    config_fields: Mapping[str, str]
    spike_rates: Callable[[Any, Batch, bool], np.ndarray | None] = lambda model, batch, classify: None
    train_classify: Callable[[Any, Batch], jax.Array] | None = None  # default: ``classify``
    load: Callable[..., Any] | None = None  # (source, config or None) -> model: the reference converter
    to_state_dict: Callable[[Any], dict[str, np.ndarray]] | None = None
    pretrained: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    embedded_preset: str | None = None  # the preset trained and cached on first use (qslm_jax.finetune)
    positional: bool = True  # learned positions cap the tokens per example at max_length (False: an RNN)

    def config_value(self, config: Any, generic: str) -> Any:
        """``n_classes`` / ``vocab_size`` / ``max_length`` of a config of this family."""
        return getattr(config, self.config_fields[generic])

    def with_classes(self, config: Any, n_classes: int) -> Any:
        """``config`` with a classifier of ``n_classes`` outputs."""
        return dataclasses.replace(config, **{self.config_fields["n_classes"]: n_classes})

    def config(self, preset: str, *, n_classes: int | None = None) -> Any:
        """The config of ``preset`` (with ``n_classes`` classes when given); ConfigError for an unknown name."""
        if preset not in self.presets:
            raise ConfigError(f"unknown {self.name} preset {preset!r}: expected one of {sorted(self.presets)}")
        config = self.presets[preset]()
        return config if n_classes is None else self.with_classes(config, n_classes)

    def build(self, config: Any, seed: int = 0) -> nnx.Module:
        """A randomly initialised model of ``config``."""
        return self.model_class(config, rngs=nnx.Rngs(seed))

    def abstract(self, config: Any) -> nnx.Module:
        """The model of ``config`` with shapes only (``nnx.eval_shape``: no weights, no memory)."""
        return nnx.eval_shape(lambda: self.model_class(config, rngs=nnx.Rngs(0)))

    def training_logits(self, model: Any, batch: Batch) -> jax.Array:
        """The classification logits gradients flow through (``train_classify``, else ``classify``)."""
        forward = self.train_classify or self.classify
        if forward is None:
            raise ConfigError(f"the {self.name} family has no classification output")
        return forward(model, batch)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry (and its hierarchy rules to :mod:`qslm_jax.quant.hierarchy`); presets must
    not clash with another family's. Returns the family."""
    if family.rules.name != family.name:
        raise ConfigError(f"the rules of family {family.name!r} are named {family.rules.name!r}")
    clash = {p for other in FAMILIES.values() if other.name != family.name for p in other.presets} & set(family.presets)
    if clash:
        raise ConfigError(f"presets {sorted(clash)} of {family.name!r} are already another family's")
    FAMILIES[family.name] = family
    register_rules(family.rules)
    return family


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name`` (ConfigError naming the registered ones)."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}: registered are {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(model: Any) -> ModelFamily:
    """The family whose model class ``model`` is an instance of (ConfigError for an unregistered class)."""
    for family in FAMILIES.values():
        if type(model) is family.model_class:
            return family
    raise ConfigError(f"{type(model).__name__} is not a registered model family ({sorted(FAMILIES)}): register "
                      "it with qslm_jax.models.registry.register_family (README, 'Adding a model family')")


def preset_family(preset: str) -> ModelFamily:
    """The family that has the preset ``preset`` (ConfigError listing every preset)."""
    for family in FAMILIES.values():
        if preset in family.presets:
            return family
    raise ConfigError(f"unknown model preset {preset!r}: expected one of {all_presets()}")


def all_presets() -> tuple[str, ...]:
    """Every registered preset name, family by family."""
    return tuple(p for family in FAMILIES.values() for p in family.presets)


def hierarchy_of(model: Any, *, scheme: QuantScheme | None = None) -> Hierarchy:
    """The unit tree of ``model`` by its own family's rules (no weights read)."""
    kwargs = {} if scheme is None else {"scheme": scheme}
    return Hierarchy.from_shapes(param_shapes(model), family=family_of(model).name, **kwargs)


# ------------------------------------------------------------------------------------------- operation counts


def spikegpt_layer_ops(config: SpikeGPTConfig, level: LevelOf, *, spike_rates: Sequence[float] | None = None,
                       tokens: int = 1, classify: bool = True) -> list[LayerOps]:
    """SpikeGPT's Linear layers per token as MACs at their weight level.

    Every SpikeGPT Linear reads real values (LayerNorm outputs, ``r * wkv``, ``relu(k)^2``), so none is
    spike-driven; the LM head runs only for language modelling, the classifier once per sequence (neglected).
    """
    c, layers = config.n_embd, []
    shapes = {"att.key": (c, c), "att.value": (c, c), "att.receptance": (c, c), "att.output": (c, c),
              "ffn.key": (c, 4 * c), "ffn.receptance": (c, c), "ffn.value": (4 * c, c)}
    for i in range(config.n_layer):
        for name, (n_in, n_out) in shapes.items():
            module = f"attention_{i}/{name}"
            layers.append(LayerOps(n_in, n_out, None, float(level(module)), name=module))
    if not classify:
        layers.append(LayerOps(c, config.vocab_size, None, float(level("output")), name="head"))
    return layers


def _spikingbert_block_ops(config: SpikingBERTConfig, tokens: int) -> tuple[tuple[str, int, int, int, bool], ...]:
    """Per encoder block: (name, n_in, n_out, offset of the neuron layer feeding it, has a weight kernel)."""
    h, i = config.hidden, config.intermediate
    return (("query", h, h, 0, True), ("key", h, h, 0, True), ("value", h, h, 0, True),
            ("scores", h, tokens, 1, False), ("context", tokens, h, 2, False),
            ("attention_output", h, h, 3, True), ("intermediate", h, i, 4, True), ("output", i, h, 5, True))


def spikingbert_layer_ops(config: SpikingBERTConfig, level: LevelOf, *, spike_rates: Sequence[float] | None,
                          tokens: int, classify: bool = True) -> list[LayerOps]:
    """The spiking encoder's synaptic operations per token.

    Every encoder Linear reads the spikes of the IF layer before it (spikingbert.md, "Architecture"), so it
    runs T times on binary input of rate r (that layer's ASR): ``T r n_in n_out`` accumulates at the kernel's
    level. Attention on ``tokens`` = L positions: ``q . k`` with spiking keys is ``T r_K H L`` and
    ``probabilities . v`` with spiking values ``T r_V L H`` accumulates on fp32 operands. With
    ``config.feedback`` the feedback Linear reads the last layer's spikes: ``T r_last H H`` more. Embeddings,
    LayerNorm, softmax, GELU and the classifier are not counted. ``spike_rates=None``: a dense, non-spiking
    network of the same shape (MACs once per token).
    """
    ops = []
    for b in range(config.num_blocks):
        for name, n_in, n_out, offset, kernel in _spikingbert_block_ops(config, tokens):
            module = f"encoder_{b}/{name}"
            bits = float(level(module)) if kernel else FP32
            if spike_rates is None:
                ops.append(LayerOps(n_in, n_out, None, bits, module))
            else:
                ops.append(LayerOps(n_in, n_out, spike_rates[NEURONS_PER_BLOCK * b + offset], bits, module,
                                    config.T))
    if config.feedback and spike_rates is not None:
        ops.append(LayerOps(config.hidden, config.hidden, spike_rates[-1], float(level("head")), "feedback",
                            config.T))
    return ops


def bert_layer_ops(config: BertConfig, level: LevelOf, *, spike_rates: Sequence[float] | None = None,
                   tokens: int = 1, classify: bool = True) -> list[LayerOps]:
    """The BERT teacher's encoder Linear layers and attention products per token, as MACs."""
    h, i, ops = config.hidden_size, config.intermediate_size, []
    for b in range(config.num_layers):
        for name, n_in, n_out, kernel in (("query", h, h, True), ("key", h, h, True), ("value", h, h, True),
                                          ("scores", h, tokens, False), ("context", tokens, h, False),
                                          ("attention_output", h, h, True), ("intermediate", h, i, True),
                                          ("output", i, h, True)):
            module = f"layer_{b}/{name}"
            ops.append(LayerOps(n_in, n_out, None, float(level(module)) if kernel else FP32, module))
    return ops


# ------------------------------------------------------------------------------------------- task forwards


def _spikegpt_classify(model: SpikeGPT, batch: Batch) -> jax.Array:
    return model.classify(batch["idx"], batch["attention_mask"])


def _spikegpt_language_model(model: SpikeGPT, batch: Batch) -> jax.Array:
    return model(batch["idx"])


def _spikegpt_spike_rates(model: SpikeGPT, batch: Batch, classify: bool) -> np.ndarray:
    """Mean LIF spike rate of every block on ``batch``."""
    if classify:
        _, rates = model.classify(batch["idx"], batch["attention_mask"], return_spike_rates=True)
    else:
        _, rates = model(batch["idx"], return_spike_rates=True)
    return np.asarray(rates)


def _spikingbert_classify(model: SpikingBERT, batch: Batch) -> jax.Array:
    return model.simulate(batch["input_ids"], batch["segment_ids"], batch["attention_mask"]).logits


def _spikingbert_train_classify(model: SpikingBERT, batch: Batch) -> jax.Array:
    """Equilibrium training forward: SNN value, implicit (steady-state) gradient."""
    return model.train_forward(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                               gradient_at="equilibrium").logits


def _spikingbert_spike_rates(model: SpikingBERT, batch: Batch, classify: bool) -> np.ndarray:
    """Average spike rate of every neuron layer over the real tokens of the valid rows of ``batch``."""
    out = model.simulate(batch["input_ids"], batch["segment_ids"], batch["attention_mask"])
    tokens = jnp.asarray(batch["attention_mask"]) * jnp.asarray(batch.get("valid", 1.0))[..., None]
    return np.asarray([jnp.sum(jnp.mean(a, axis=-1) * tokens) / jnp.maximum(jnp.sum(tokens), 1.0)
                       for a in out.asrs])


def _bert_classify(model: BERT, batch: Batch) -> jax.Array:
    return model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"]).logits


# ------------------------------------------------------------------------------------------- converters


def _load_spikegpt(source, config: SpikeGPTConfig | None = None) -> SpikeGPT:
    from converters.spikegpt import load_spikegpt

    return load_spikegpt(source, config=config)


def _spikegpt_state_dict(model: SpikeGPT) -> dict[str, np.ndarray]:
    from converters.spikegpt import to_state_dict

    return to_state_dict(model)


def _load_spikingbert(source, config: SpikingBERTConfig | None = None) -> SpikingBERT:
    from converters.spikingbert import load_spikingbert

    if config is None:
        raise ConfigError("a reference SpikingBERT checkpoint needs the simulation settings its file lacks (T): "
                          "pass a preset as --model and the file as --checkpoint")
    return load_spikingbert(source, T=config.T, vth=config.vth, num_classes=config.num_classes,
                            num_heads=config.heads, feedback=config.feedback)


def _spikingbert_state_dict(model: SpikingBERT) -> dict[str, np.ndarray]:
    from converters.spikingbert import to_state_dict

    return to_state_dict(model)


def _load_bert(source, config: BertConfig | None = None) -> BERT:
    from converters.bert import load_bert

    return load_bert(source)


# ------------------------------------------------------------------------------------------- the families

SPIKEGPT = register_family(ModelFamily(
    name="spikegpt", model_class=SpikeGPT, config_class=SpikeGPTConfig,
    rules=FamilyRules(
        name="spikegpt", anchor="emb",
        top_level={"emb": "input", "ln0": "input", "ln_out": "output", "head": "output", "classifier": "output"},
        repeated="blocks", prefix="attention_",
        modules=(("att", "key"), ("att", "value"), ("att", "receptance"), ("att", "output"),
                 ("ffn", "key"), ("ffn", "value"), ("ffn", "receptance")),
        before=("input",), after=("output",)),
    presets=MappingProxyType({name: (lambda config=config: config) for name, config in SPIKEGPT_PRESETS.items()}),
    tokenizer=gpt_neox_tokenizer, classify=_spikegpt_classify, language_model=_spikegpt_language_model,
    layer_ops=spikegpt_layer_ops, spike_rates=_spikegpt_spike_rates,
    config_fields=MappingProxyType({"n_classes": "n_classes", "vocab_size": "vocab_size", "max_length": "ctx_len"}),
    load=_load_spikegpt, to_state_dict=_spikegpt_state_dict,
    pretrained=MappingProxyType({"spikegpt216m": "hf://ridger/SpikeGPT-OpenWebText-216M/SpikeGPT-216M.pth"}),
    embedded_preset="spikegpt-small", positional=False,
))

SPIKINGBERT = register_family(ModelFamily(
    name="spikingbert", model_class=SpikingBERT, config_class=SpikingBERTConfig,
    rules=FamilyRules(
        name="spikingbert", anchor="embeddings",
        top_level={"embeddings": "embeddings", "fit_dense": "head", "classifier": "head", "feedback": "head"},
        repeated="blocks", prefix="encoder_",
        modules=(("query",), ("key",), ("value",), ("attention_output",), ("intermediate",), ("output",)),
        before=("embeddings",), after=("head",)),
    presets=MappingProxyType({f"spikingbert-{name}": (lambda name=name: SpikingBERTConfig.preset(name))
                              for name in SPIKINGBERT_PRESETS}),
    tokenizer=bert_tokenizer, classify=_spikingbert_classify, language_model=None,
    train_classify=_spikingbert_train_classify, layer_ops=spikingbert_layer_ops,
    spike_rates=_spikingbert_spike_rates,
    config_fields=MappingProxyType({"n_classes": "num_classes", "vocab_size": "vocab", "max_length": "max_positions"}),
    load=_load_spikingbert, to_state_dict=_spikingbert_state_dict, embedded_preset="spikingbert-small",
))

BERT_FAMILY = register_family(ModelFamily(
    name="bert", model_class=BERT, config_class=BertConfig,
    rules=FamilyRules(
        name="bert", anchor="embeddings",
        top_level={"embeddings": "embeddings", "pooler": "head", "classifier": "head"},
        repeated="blocks", prefix="layer_",
        modules=(("query",), ("key",), ("value",), ("attention_output",), ("intermediate",), ("output",)),
        before=("embeddings",), after=("head",)),
    presets=MappingProxyType({f"bert-{name}": (lambda name=name: BertConfig.preset(name)) for name in BERT_PRESETS}),
    tokenizer=bert_tokenizer, classify=_bert_classify, language_model=None, layer_ops=bert_layer_ops,
    config_fields=MappingProxyType({"n_classes": "num_labels", "vocab_size": "vocab_size",
                                    "max_length": "max_positions"}),
    load=_load_bert,  # written back with converters.bert.save_bert (an HF directory)
))


def student_fixed_levels(model: SpikingBERT, bits: Level) -> dict[tuple, Level]:
    """State path -> ``bits`` of every encoder Linear kernel: what an extreme-KD student (extreme_kd.md) trained
    at ``bits`` keeps when QSLM searches the rest (empty at fp32)."""
    if bits == FP32:
        return {}
    return {path: bits for path in param_shapes(model) if is_encoder_kernel(path)}
