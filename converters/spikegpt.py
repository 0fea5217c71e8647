"""SpikeGPT reference checkpoints (``ridgerchu/SpikeGPT`` state dicts) <-> :class:`SpikeGPT` (Flax NNX).

One table (:func:`key_map`) maps each reference key to its NNX state path and a per-tensor
:class:`Transform`; it drives both :func:`load_spikegpt` and :func:`to_state_dict`, so a round trip is
bit-exact. Loading is strict (spikegpt.md, "Checkpoint"): the config is inferred from the tensor shapes, every
expected key must be present with the right shape, no other key may be, and known variants of the reference
(``ffnPre``, ``head_q``/``head_k``, ``pos_emb*``) are refused by name. A classification head is stored as
``classifier.weight`` ``(n_classes, C)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.checkpoint_io import check_keys_and_shapes, read_state_dict
from qslm_jax.errors import ConfigError, ConversionError
from qslm_jax.models.registry import SPIKEGPT
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig

PRETRAINED = SPIKEGPT.pretrained  # preset -> released weights (the registry entry's)
DEFAULT_CTX_LEN = 1024  # the released model's; not recoverable from a state dict
CLASSIFIER_KEY = "classifier.weight"

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Transform:
    """A per-tensor change of layout between the reference (PyTorch) and the NNX model."""

    to_flax: Callable[[np.ndarray], np.ndarray]
    to_reference: Callable[[np.ndarray], np.ndarray]
    reference_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


SAME = Transform(lambda a: a, lambda a: a, tuple)
# nn.Linear weight (out, in) <-> nnx.Linear kernel (in, out)
LINEAR = Transform(np.transpose, np.transpose, lambda s: tuple(reversed(s)))
# time_mix (1, 1, C) <-> (C,)
MIX = Transform(lambda a: a.reshape(-1), lambda a: a.reshape(1, 1, -1), lambda s: (1, 1, *s))

_TOP_IN = [("emb.weight", ("emb", "embedding"), SAME)]
_LN0 = [
    ("blocks.0.ln0.weight", ("ln0", "scale"), SAME),
    ("blocks.0.ln0.bias", ("ln0", "bias"), SAME),
]
_BLOCK_LN = [
    ("ln1.weight", ("ln1", "scale"), SAME),
    ("ln1.bias", ("ln1", "bias"), SAME),
    ("ln2.weight", ("ln2", "scale"), SAME),
    ("ln2.bias", ("ln2", "bias"), SAME),
]
_BLOCK_MIXERS = [
    ("att.time_decay", ("att", "time_decay"), SAME),
    ("att.time_first", ("att", "time_first"), SAME),
    ("att.time_mix_k", ("att", "time_mix_k"), MIX),
    ("att.time_mix_v", ("att", "time_mix_v"), MIX),
    ("att.time_mix_r", ("att", "time_mix_r"), MIX),
    ("att.key.weight", ("att", "key", "kernel"), LINEAR),
    ("att.value.weight", ("att", "value", "kernel"), LINEAR),
    ("att.receptance.weight", ("att", "receptance", "kernel"), LINEAR),
    ("att.output.weight", ("att", "output", "kernel"), LINEAR),
    ("ffn.time_mix_k", ("ffn", "time_mix_k"), MIX),
    ("ffn.time_mix_r", ("ffn", "time_mix_r"), MIX),
    ("ffn.key.weight", ("ffn", "key", "kernel"), LINEAR),
    ("ffn.receptance.weight", ("ffn", "receptance", "kernel"), LINEAR),
    ("ffn.value.weight", ("ffn", "value", "kernel"), LINEAR),
]
_TOP_OUT = [
    ("ln_out.weight", ("ln_out", "scale"), SAME),
    ("ln_out.bias", ("ln_out", "bias"), SAME),
    ("head.weight", ("head", "kernel"), LINEAR),
]

# reference variants this port does not implement: (description, key pattern)
_VARIANTS = [
    ("the RWKV-ffnPre variant (model_type='RWKV-ffnPre', a ChannelMix in place of block 0's TimeMix)",
     re.compile(r"(^|\.)ffnPre\.")),
    ("the head_q/head_k copy-attention head", re.compile(r"^(head_q|head_k|copy_mask)(\.|$)")),
    ("learned positional embeddings (pos_emb*)", re.compile(r"^pos_emb")),
]


def key_map(config: SpikeGPTConfig) -> dict[str, tuple[Path, Transform]]:
    """Reference key -> (NNX state path, transform) for every parameter, in the reference's key order."""
    table = {key: (path, t) for key, path, t in _TOP_IN}
    for i in range(config.n_layer):
        table.update({f"blocks.{i}.{key}": (("blocks", i, *path), t) for key, path, t in _BLOCK_LN})
        if i == 0:  # the reference stores the top-level ln0 inside block 0, after its ln2
            table.update({key: (path, t) for key, path, t in _LN0})
        table.update({f"blocks.{i}.{key}": (("blocks", i, *path), t) for key, path, t in _BLOCK_MIXERS})
    table.update({key: (path, t) for key, path, t in _TOP_OUT})
    if config.n_classes > 0:
        table[CLASSIFIER_KEY] = (("classifier", "kernel"), LINEAR)
    return table


def _reject_variants(keys: list[str]) -> None:
    problems = []
    for description, pattern in _VARIANTS:
        hits = sorted(k for k in keys if pattern.search(k))
        if hits:
            problems.append(f"{description}: keys {hits}")
    if problems:
        raise ConversionError(
            "unsupported SpikeGPT checkpoint variant; this port implements the plain SpikeGPT of "
            "src/model.py (as in SpikeGPT-216M). Found " + "; ".join(problems)
        )


def infer_config(state_dict: Mapping[str, np.ndarray], *, ctx_len: int = DEFAULT_CTX_LEN) -> SpikeGPTConfig:
    """The GPT-mode config implied by the shapes: ``emb.weight`` (V, C), block indices, classifier rows."""
    emb = state_dict.get("emb.weight")
    if emb is None or emb.ndim != 2:
        found = "missing" if emb is None else f"of shape {emb.shape}"
        raise ConversionError(
            f"not a SpikeGPT checkpoint: expected 'emb.weight' of shape (vocab, n_embd), it is {found} "
            f"(first keys: {sorted(state_dict)[:8]})"
        )
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        raise ConversionError("not a SpikeGPT checkpoint: no 'blocks.<i>.*' keys found")
    classifier = state_dict.get(CLASSIFIER_KEY)
    return SpikeGPTConfig(
        n_layer=max(layers) + 1,
        n_embd=int(emb.shape[1]),
        vocab_size=int(emb.shape[0]),
        ctx_len=ctx_len,
        n_classes=int(classifier.shape[0]) if classifier is not None and classifier.ndim == 2 else 0,
    )


def _abstract_model(config: SpikeGPTConfig) -> SpikeGPT:
    return nnx.eval_shape(lambda: SpikeGPT(config, rngs=nnx.Rngs(0)))


def _check_config(inferred: SpikeGPTConfig, given: SpikeGPTConfig) -> None:
    fields = ("n_layer", "n_embd", "vocab_size", "n_classes")
    wrong = [f"{f}: config {getattr(given, f)}, checkpoint {getattr(inferred, f)}"
             for f in fields if getattr(given, f) != getattr(inferred, f)]
    if wrong:
        raise ConversionError(
            f"the checkpoint does not fit the given config ({'; '.join(wrong)}): pass a matching config "
            "or config=None to infer it from the checkpoint"
        )


def load_spikegpt(
    source: str | os.PathLike | Mapping[str, Any], *, mode: str = "gpt", config: SpikeGPTConfig | None = None
) -> SpikeGPT:
    """Build a :class:`SpikeGPT` from a reference checkpoint (path, ``hf://...`` or in-memory state dict).

    ``mode`` selects the forward quirks (:meth:`SpikeGPTConfig.with_mode`: "gpt" = src/model.py, "rnn" =
    run.py). ``config`` supplies what shapes cannot tell (``ctx_len``; default 1024) and must agree with them.
    Raises :class:`ConversionError` for unreadable files, unsupported variants, missing/unexpected keys,
    wrong shapes or non-float tensors; never returns a partially loaded model.
    """
    state_dict = read_state_dict(source)
    _reject_variants(list(state_dict))
    inferred = infer_config(state_dict, ctx_len=DEFAULT_CTX_LEN if config is None else config.ctx_len)
    if config is not None:
        _check_config(inferred, config)
    config = (config or inferred).with_mode(mode)

    graphdef, abstract = nnx.split(_abstract_model(config))
    shapes = nnx.traversals.flatten_mapping(nnx.to_pure_dict(abstract))
    table = key_map(config)
    expected = {key: t.reference_shape(shapes[path].shape) for key, (path, t) in table.items()}
    what = (f"SpikeGPT checkpoint (n_layer={config.n_layer}, n_embd={config.n_embd}, "
            f"vocab_size={config.vocab_size}, n_classes={config.n_classes})")
    check_keys_and_shapes(state_dict, expected, what=what)
    not_float = sorted(f"{k} ({v.dtype})" for k, v in state_dict.items() if v.dtype.kind != "f")
    if not_float:
        raise ConversionError(f"{what}: expected floating-point tensors, found {not_float}")

    params = {path: jnp.asarray(t.to_flax(state_dict[key]), jnp.float32) for key, (path, t) in table.items()}
    del state_dict
    nnx.replace_by_pure_dict(abstract, nnx.traversals.unflatten_mapping(params))
    return nnx.merge(graphdef, abstract)


def to_state_dict(model: SpikeGPT) -> dict[str, np.ndarray]:
    """The model's parameters in the reference's keys and layouts (the inverse of :func:`load_spikegpt`)."""
    params = nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {
        key: np.ascontiguousarray(t.to_reference(np.asarray(params[path])))
        for key, (path, t) in key_map(model.config).items()
    }


def from_pretrained(name: str = "spikegpt216m", *, mode: str = "gpt", **config_overrides) -> SpikeGPT:
    """A released checkpoint by name (:data:`PRETRAINED`), downloaded from the HF hub and converted.

    ``config_overrides`` change preset fields that the checkpoint does not fix (e.g. ``ctx_len``).
    Offline it fails at once with a :class:`ConversionError` saying how to pass a local file instead.
    """
    if name not in PRETRAINED:
        raise ConfigError(f"unknown pretrained SpikeGPT {name!r}: expected one of {sorted(PRETRAINED)}")
    return load_spikegpt(PRETRAINED[name], mode=mode, config=SpikeGPTConfig.preset(name, **config_overrides))
