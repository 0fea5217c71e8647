"""Reference SpikingBERT checkpoints (``pytorch_model.bin``) <-> :class:`qslm_jax.models.spikingbert.SpikingBERT`,
and SpikingBERT students initialised from HF BERT weights.

Canonical keys (spikingbert.md, "Checkpoint format"): ``network_x.*`` (embeddings), per block b (j = 6b)
``network_s{j+1}.dense`` key, ``network_s{j+2}.dense`` value, ``network_s{j+3}.query``,
``network_s{j+4}.dense/.LayerNorm`` attention output, ``network_s{j+5}.dense`` intermediate,
``network_s{j+6}.dense/.LayerNorm`` output; ``network_s{6n+1}.fc`` feedback, ``fit_dense``,
``classification``. The alias copies (``snn_func.*``, ``snn_ide_conv.*``, ``snn_func_copy.*``) and the unused
``pooler_layer.*`` are ignored; everything else must match exactly.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from converters.bert import (
    EMBEDDING_MODULES,
    ParamPath,
    expected_shapes,
    export_params,
    load_bert,
    load_params,
    read_hf_config,
    tensor_keys,
)
from converters.checkpoint_io import HF_PREFIX, check_keys_and_shapes, read_state_dict
from qslm_jax.errors import ConfigError, ConversionError
from qslm_jax.models.bert import BERT
from qslm_jax.models.spikingbert import NEURONS_PER_BLOCK, SpikingBERT, SpikingBERTConfig

logger = logging.getLogger(__name__)

IGNORED_PREFIXES = ("snn_func.", "snn_ide_conv.", "snn_func_copy.", "pooler_layer.")
# Block attribute -> (neuron offset within the block, module name under network_s{j + offset}).
BLOCK_MODULES = {
    "key": (1, "dense"),
    "value": (2, "dense"),
    "query": (3, "query"),
    "attention_output": (4, "dense"),
    "attention_norm": (4, "LayerNorm"),
    "intermediate": (5, "dense"),
    "output": (6, "dense"),
    "output_norm": (6, "LayerNorm"),
}
# config.json field -> SpikingBERTConfig field, cross-checked against the shapes.
CONFIG_FIELDS = {
    "hidden_size": "hidden",
    "intermediate_size": "intermediate",
    "vocab_size": "vocab",
    "max_position_embeddings": "max_positions",
    "type_vocab_size": "type_vocab",
    "num_hidden_layers": "num_blocks",
}


def module_table(config: SpikingBERTConfig, *, classifier: bool = True) -> dict[ParamPath, str]:
    """Flax module path -> reference module name (``classifier=False``: a general-KD checkpoint)."""
    table: dict[ParamPath, str] = {("embeddings", a): f"network_x.{n}" for a, n in EMBEDDING_MODULES.items()}
    for b in range(config.num_blocks):
        j = NEURONS_PER_BLOCK * b
        table.update({("blocks", b, a): f"network_s{j + k}.{n}" for a, (k, n) in BLOCK_MODULES.items()})
    table[("feedback",)] = f"network_s{config.num_neuron_layers}.fc"
    table[("fit_dense",)] = "fit_dense"
    if classifier:
        table[("classifier",)] = "classification"
    return table


def canonical_keys(model: SpikingBERT, *, classifier: bool = True) -> dict[str, ParamPath]:
    """Reference tensor key -> Flax parameter path of ``model``."""
    return tensor_keys(nnx.state(model, nnx.Param), module_table(model.config, classifier=classifier))


def _shape(state_dict: Mapping[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state_dict:
        raise ConversionError(f"missing key {key!r}, needed to infer the SpikingBERT shape: expected a "
                              "reference SpikingBERT state_dict")
    shape = tuple(state_dict[key].shape)
    if len(shape) != ndim:
        raise ConversionError(f"{key}: expected a {ndim}-d tensor, found shape {shape}")
    return shape


def infer_config(state_dict: Mapping[str, np.ndarray], *, T: int, vth: float, num_heads: int,
                 num_classes: int | None, feedback: bool = False) -> SpikingBERTConfig:
    """SpikingBERTConfig from canonical tensor shapes (heads cannot be inferred and are given)."""
    vocab, hidden = _shape(state_dict, "network_x.word_embeddings.weight", 2)
    neuron_ids = [int(m.group(1)) for k in state_dict if (m := re.match(r"network_s(\d+)\.", k))]
    last = max(neuron_ids, default=0)
    if last < NEURONS_PER_BLOCK + 1 or (last - 1) % NEURONS_PER_BLOCK:
        raise ConversionError(f"expected network_s1 .. network_s{{6n+1}} (n blocks + feedback), found the "
                              f"highest index {last}: not a reference SpikingBERT checkpoint")
    if "classification.weight" in state_dict:
        found = _shape(state_dict, "classification.weight", 2)[0]
        if num_classes is not None and num_classes != found:
            raise ConversionError(f"num_classes={num_classes} was requested but the checkpoint's classifier "
                                  f"has {found} classes: drop the argument or use a matching checkpoint")
        num_classes = found
    return SpikingBERTConfig(
        hidden=hidden, heads=num_heads, vocab=vocab,
        intermediate=_shape(state_dict, "network_s5.dense.weight", 2)[0],
        max_positions=_shape(state_dict, "network_x.position_embeddings.weight", 2)[0],
        type_vocab=_shape(state_dict, "network_x.token_type_embeddings.weight", 2)[0],
        num_classes=num_classes or 2, T=T, vth=vth, feedback=feedback, num_blocks=(last - 1) // NEURONS_PER_BLOCK,
    )


def _config_json(source: Any) -> dict[str, Any] | None:
    if isinstance(source, Mapping) or os.fspath(source).startswith(HF_PREFIX):
        return None
    path = Path(source).parent / "config.json"
    return read_hf_config(path) if path.is_file() else None


def _resolve_heads(num_heads: int | None, hf_config: Mapping[str, Any] | None) -> int:
    from_json = None if hf_config is None else hf_config.get("num_attention_heads")
    if num_heads is not None and from_json is not None and num_heads != from_json:
        raise ConversionError(f"num_heads={num_heads} contradicts config.json's num_attention_heads={from_json}")
    heads = num_heads if num_heads is not None else from_json
    if heads is None:
        raise ConversionError("the number of attention heads cannot be inferred from the weights and no "
                              "config.json lies next to the checkpoint: pass num_heads=...")
    return heads


def _check_against_json(config: SpikingBERTConfig, hf_config: Mapping[str, Any], what: str) -> None:
    wrong = [f"{k}={hf_config[k]} but the weights say {getattr(config, f)}"
             for k, f in CONFIG_FIELDS.items() if k in hf_config and hf_config[k] != getattr(config, f)]
    if wrong:
        raise ConversionError(f"config.json beside {what} contradicts the checkpoint: {'; '.join(wrong)}")


def load_spikingbert(source: str | os.PathLike | Mapping[str, Any], *, T: int, vth: float = 1.0,
                     num_classes: int | None = None, num_heads: int | None = None, feedback: bool = False,
                     seed: int = 0) -> SpikingBERT:
    """Load a reference SpikingBERT state_dict (any :func:`read_state_dict` source) as a :class:`SpikingBERT`.

    Shapes give the config; heads come from ``config.json`` beside the file or ``num_heads``. A general-KD
    checkpoint (no ``classification.*``) gets a freshly initialised classifier (``num_classes``, default 2;
    seed ``seed``) and a logged warning. Missing/extra canonical keys and wrong shapes raise ConversionError.
    """
    state_dict = read_state_dict(source)
    canonical = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
    hf_config = _config_json(source)
    what = "SpikingBERT checkpoint" if isinstance(source, Mapping) else f"SpikingBERT checkpoint {source}"
    config = infer_config(canonical, T=T, vth=vth, num_heads=_resolve_heads(num_heads, hf_config),
                          num_classes=num_classes, feedback=feedback)
    if hf_config is not None:
        _check_against_json(config, hf_config, what)
    model = SpikingBERT(config, rngs=nnx.Rngs(seed))
    has_classifier = any(k.startswith("classification.") for k in canonical)
    if not has_classifier:
        logger.warning("%s has no classification.* weights (a general-KD checkpoint): the %d-class "
                       "classifier is freshly initialised (seed %d)", what, config.num_classes, seed)
    keys = canonical_keys(model, classifier=has_classifier)
    check_keys_and_shapes(canonical, expected_shapes(nnx.state(model, nnx.Param), keys), what=what)
    load_params(model, canonical, keys)
    return model


def to_state_dict(model: SpikingBERT, params: nnx.State | None = None) -> dict[str, np.ndarray]:
    """``model``'s parameters under the reference's canonical keys (PyTorch layouts).

    ``params``: a State shaped like ``nnx.state(model, nnx.Param)`` (e.g. gradients) to export instead.
    """
    return export_params(nnx.state(model, nnx.Param) if params is None else params, canonical_keys(model))


def teacher_layers(num_teacher: int, num_student: int, layers: str | Sequence[int]) -> tuple[int, ...]:
    """0-based teacher layers initialising the student's blocks.

    ``"uniform"``: layer ``round((b + 1) * L / n) - 1`` for block b (layers 2, 5, 8, 11 of a 12-layer
    teacher: the same layers the KD layer map pairs with the blocks); ``"first"``: layers 0 .. n-1; or an
    explicit sequence of n indices.
    """
    if layers == "uniform":
        chosen = tuple(round((b + 1) * num_teacher / num_student) - 1 for b in range(num_student))
    elif layers == "first":
        chosen = tuple(range(num_student))
    elif isinstance(layers, str):
        raise ConfigError(f"layers={layers!r}: expected 'uniform', 'first' or a sequence of layer indices")
    else:
        chosen = tuple(int(i) for i in layers)
    if len(chosen) != num_student or not all(0 <= i < num_teacher for i in chosen):
        raise ConfigError(f"need {num_student} teacher layers in [0, {num_teacher}), found {chosen}: "
                          f"the teacher has {num_teacher} layers")
    return chosen


def spikingbert_from_bert(bert: BERT | str | os.PathLike, *, T: int, vth: float = 1.0, num_layers: int = 4,
                          layers: str | Sequence[int] = "uniform", num_classes: int | None = None,
                          feedback: bool = False, seed: int = 0) -> SpikingBERT:
    """A SpikingBERT student initialised from BERT weights (1:1: embeddings, and each block from one
    teacher layer chosen by :func:`teacher_layers`; spikingbert.md, "Checkpoint format").

    ``bert``: a :class:`BERT` or an HF checkpoint directory/file for :func:`~converters.bert.load_bert`.
    ``feedback``, ``fit_dense`` and ``classifier`` (``num_classes``, default the teacher's labels or 2) are
    freshly initialised with ``seed``.
    """
    teacher = bert if isinstance(bert, BERT) else load_bert(bert)
    tc = teacher.config
    chosen = teacher_layers(tc.num_layers, num_layers, layers)
    config = SpikingBERTConfig(
        hidden=tc.hidden_size, heads=tc.num_heads, intermediate=tc.intermediate_size, vocab=tc.vocab_size,
        max_positions=tc.max_positions, type_vocab=tc.type_vocab_size, num_classes=num_classes or tc.num_labels or 2,
        T=T, vth=vth, feedback=feedback, num_blocks=num_layers, pad_token_id=tc.pad_token_id,
    )
    student = SpikingBERT(config, rngs=nnx.Rngs(seed))
    nnx.update(student.embeddings, nnx.state(teacher.embeddings, nnx.Param))
    for block, layer in zip(student.blocks, chosen, strict=True):
        nnx.update(block, nnx.state(teacher.blocks[layer], nnx.Param))
    logger.info("SpikingBERT student initialised from teacher layers %s; fit_dense, feedback and the "
                "classifier are fresh", list(chosen))
    return student
