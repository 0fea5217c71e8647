"""HF BERT checkpoint -> :class:`qslm_jax.models.bert.BERT`, and the key-mapping helpers every BERT-like
converter here shares (SpikingBERT's converter uses them with its own module table).

A *module table* maps a Flax module path (e.g. ``('blocks', 3, 'value')``) to the PyTorch module name
(``encoder.layer.3.attention.self.value``). Tensor keys and transforms follow from the Flax parameter name
(one rule for all BERT-like models): ``kernel`` <-> ``weight`` transposed (PyTorch Linear is (out, in)),
``scale`` / ``embedding`` <-> ``weight``, ``bias`` <-> ``bias``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.checkpoint_io import check_keys_and_shapes, read_state_dict
from qslm_jax.errors import ConfigError, ConversionError
from qslm_jax.models.bert import BERT, BertConfig

logger = logging.getLogger(__name__)

ParamPath = tuple[Any, ...]

TORCH_PARAM_NAME = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# Flax attribute -> PyTorch module name, for the embeddings and one encoder layer of HF BERT.
EMBEDDING_MODULES = {
    "word": "word_embeddings",
    "position": "position_embeddings",
    "token_type": "token_type_embeddings",
    "layer_norm": "LayerNorm",
}
HF_LAYER_MODULES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}
HF_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
HF_IGNORED_PREFIXES = ("cls.",)  # pre-training heads of BertForPreTraining checkpoints
LEGACY_LAYER_NORM_NAMES = {"gamma": "weight", "beta": "bias"}  # TF-era checkpoints


def tensor_keys(params: nnx.State, modules: Mapping[ParamPath, str]) -> dict[str, ParamPath]:
    """PyTorch tensor key -> Flax parameter path, for every parameter whose module is in ``modules``."""
    keys = {}
    for path, _ in nnx.to_flat_state(params):
        module = tuple(path[:-1])
        if module in modules:
            keys[f"{modules[module]}.{TORCH_PARAM_NAME[path[-1]]}"] = tuple(path)
    return keys


def _torch_shape(path: ParamPath, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


def expected_shapes(params: nnx.State, keys: Mapping[str, ParamPath]) -> dict[str, tuple[int, ...]]:
    """The PyTorch shape each key must have (kernels transposed)."""
    flat = dict(nnx.to_flat_state(params))
    return {k: _torch_shape(p, tuple(flat[p].shape)) for k, p in keys.items()}


def load_params(model: nnx.Module, state_dict: Mapping[str, np.ndarray], keys: Mapping[str, ParamPath]) -> None:
    """Write ``state_dict[key]`` (transposed for kernels, cast to the parameter dtype) into ``model``.

    The caller has checked keys and shapes (:func:`check_keys_and_shapes`).
    """
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    updates = []
    for key, path in keys.items():
        value = np.asarray(state_dict[key])
        value = value.T if path[-1] == "kernel" else value
        updates.append((path, jnp.asarray(value, dtype=flat[path].get_value().dtype)))
    nnx.update(model, nnx.from_flat_state(updates))


def export_params(params: nnx.State, keys: Mapping[str, ParamPath]) -> dict[str, np.ndarray]:
    """Inverse of :func:`load_params`: PyTorch key -> numpy array (kernels transposed back)."""
    flat = dict(nnx.to_flat_state(params))
    out = {}
    for key, path in keys.items():
        value = np.asarray(flat[path].get_value())
        out[key] = np.ascontiguousarray(value.T) if path[-1] == "kernel" else value
    return out


def bert_module_table(config: BertConfig) -> dict[ParamPath, str]:
    """Flax module path -> HF module name (keys without the ``bert.`` prefix) for a :class:`BERT`."""
    table: dict[ParamPath, str] = {("embeddings", a): f"embeddings.{n}" for a, n in EMBEDDING_MODULES.items()}
    for i in range(config.num_layers):
        table.update({("blocks", i, a): f"encoder.layer.{i}.{n}" for a, n in HF_LAYER_MODULES.items()})
    if config.pooler:
        table[("pooler",)] = "pooler.dense"
    if config.num_labels:
        table[("classifier",)] = "classifier"
    return table


def _normalise_hf_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the ``bert.`` prefix and buffers / pre-training heads; rename old ``gamma``/``beta`` LayerNorms."""
    out, dropped = {}, []
    for key, value in state_dict.items():
        name = key.removeprefix("bert.")
        if name.endswith(HF_IGNORED_SUFFIXES) or name.startswith(HF_IGNORED_PREFIXES):
            dropped.append(key)
            continue
        base, _, leaf = name.rpartition(".")
        if base.endswith("LayerNorm") and leaf in LEGACY_LAYER_NORM_NAMES:
            name = f"{base}.{LEGACY_LAYER_NORM_NAMES[leaf]}"
        out[name] = value
    if dropped:
        logger.info("ignoring %d BERT checkpoint entries not used by the encoder: %s", len(dropped),
                    ", ".join(sorted(dropped)[:5]) + (" ..." if len(dropped) > 5 else ""))
    return out


def _locate_hf_files(dir_or_file: str | os.PathLike) -> tuple[Path, Path]:
    """(config.json, weights file) of an HF checkpoint directory or of a weights file with its config."""
    path = Path(dir_or_file)
    if path.is_dir():
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / name).exists():
                raise ConversionError(
                    f"{path} holds a sharded checkpoint ({name}); expected a single model.safetensors or "
                    "pytorch_model.bin: re-save it with save_pretrained(..., max_shard_size='10GB')"
                )
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        weights = next((c for c in candidates if c.is_file()), None)
        if weights is None:
            raise ConversionError(f"no model.safetensors or pytorch_model.bin in {path}: expected an HF BERT "
                                  "checkpoint directory (save_pretrained output)")
        config = path / "config.json"
    elif path.is_file():
        weights, config = path, path.parent / "config.json"
    else:
        raise ConversionError(f"BERT checkpoint not found: {path} (expected a directory or weights file)")
    if not config.is_file():
        raise ConversionError(f"expected config.json next to {weights}, found none: copy the model's config.json "
                              "there (heads and epsilon cannot be inferred from the weights)")
    return config, weights


def read_hf_config(config_path: Path) -> dict[str, Any]:
    """The parsed ``config.json`` (ConversionError when unreadable)."""
    try:
        return json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot read {config_path}: {err}; expected a JSON config") from err


def load_bert(dir_or_file: str | os.PathLike, *, seed: int = 0) -> BERT:
    """Load an HF ``BertModel`` / ``BertForSequenceClassification`` checkpoint as a Flax :class:`BERT`.

    ``dir_or_file``: a ``save_pretrained`` directory (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``) or one of those weights files with ``config.json`` beside it. Keys may carry the
    ``bert.`` prefix; the pooler and classifier are loaded when present (``num_labels`` from the
    classifier's shape). Unsupported config features raise ConfigError; missing/unexpected keys or wrong
    shapes raise ConversionError naming them.
    """
    config_path, weights = _locate_hf_files(dir_or_file)
    state_dict = _normalise_hf_keys(read_state_dict(weights))
    classifier = state_dict.get("classifier.weight")
    config = BertConfig.from_hf_dict(
        read_hf_config(config_path),
        num_labels=0 if classifier is None else int(classifier.shape[0]),
        pooler="pooler.dense.weight" in state_dict,
    )
    model = BERT(config, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    keys = tensor_keys(params, bert_module_table(config))
    check_keys_and_shapes(state_dict, expected_shapes(params, keys), what=f"BERT checkpoint {weights}")
    load_params(model, state_dict, keys)
    return model


def save_bert(model: BERT, directory: str | os.PathLike) -> Path:
    """Write ``model`` as an HF ``save_pretrained`` directory (``config.json`` + ``model.safetensors``):
    the inverse of :func:`load_bert`, also readable by ``transformers.BertModel`` /
    ``BertForSequenceClassification`` (``num_labels`` > 0). Returns the directory.

    A TinyBERT-style head (``classifier_relu``) has no HF equivalent and raises ConfigError.
    """
    from safetensors.numpy import save_file

    c = model.config
    if c.classifier_relu:
        raise ConfigError("HF BERT classifiers see the pooled output without a relu: a classifier_relu model "
                          "cannot be saved in the HF layout")
    hf_config = {"model_type": "bert", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
                 "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
                 "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_positions,
                 "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.layer_norm_eps,
                 "pad_token_id": c.pad_token_id, "hidden_act": "gelu"}
    if c.num_labels:
        hf_config |= {"architectures": ["BertForSequenceClassification"], "num_labels": c.num_labels}
    else:
        hf_config["architectures"] = ["BertModel"]
    params = nnx.state(model, nnx.Param)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(export_params(params, tensor_keys(params, bert_module_table(c))), directory / "model.safetensors")
    return directory
