"""Non-spiking BERT (the knowledge-distillation teacher) and the pieces SpikingBERT reuses.

HF-compatible numerics (``transformers`` 5.x ``BertModel`` / ``BertForSequenceClassification``, eval mode):
absolute position embeddings, LayerNorm with the config's epsilon, exact (erf) GELU, additive attention
mask ``0`` / ``finfo(float32).min``, tanh pooler on the [CLS] position and a linear classifier. The model
returns what KD needs: logits, every hidden state (embedding output + each layer) and every layer's
pre-softmax attention scores (B, heads, L, L), mask included.

:class:`Embeddings` and :class:`EncoderBlock` are shared with :mod:`qslm_jax.models.spikingbert`: the
spiking model applies the same modules to spikes and rates (spikingbert.md: "the parameter set is exactly
a 4-layer BERT").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qslm_jax.errors import ConfigError

HF_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def mask_bias(attention_mask: jax.Array, negative: float) -> jax.Array:
    """Additive attention bias ``(1 - m) * negative`` of shape (B, 1, 1, L) from a (B, L) 0/1 mask."""
    m = attention_mask.astype(jnp.float32)[:, None, None, :]
    return (1.0 - m) * negative


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU ``x/2 * (1 + erf(x / sqrt 2))`` (BERT's ``hidden_act="gelu"``)."""
    return jax.nn.gelu(x, approximate=False)


def layer_norm(features: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """BERT LayerNorm: ``(x - mean) / sqrt(var + eps) * scale + bias`` with the two-pass variance."""
    return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False, rngs=rngs)


class Embeddings(nnx.Module):
    """``LN(word[ids] + position[0..L) + token_type[segments])`` (BERT embeddings, eval mode).

    The word-embedding row ``pad_token_id`` gets no gradient (``padding_idx`` in PyTorch).
    """

    def __init__(self, vocab: int, hidden: int, max_positions: int, type_vocab: int, *, eps: float,
                 pad_token_id: int | None, rngs: nnx.Rngs):
        self.word = nnx.Embed(vocab, hidden, rngs=rngs)
        self.position = nnx.Embed(max_positions, hidden, rngs=rngs)
        self.token_type = nnx.Embed(type_vocab, hidden, rngs=rngs)
        self.layer_norm = layer_norm(hidden, eps, rngs)
        self.pad_token_id = pad_token_id
        self.max_positions = max_positions

    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ConfigError(
                f"sequence length {length} exceeds max_positions={self.max_positions}: truncate the inputs"
            )
        words = self.word(input_ids)
        if self.pad_token_id is not None:
            is_pad = (input_ids == self.pad_token_id)[..., None]
            words = jnp.where(is_pad, jax.lax.stop_gradient(words), words)
        positions = self.position(jnp.arange(length))[None]
        return self.layer_norm(words + self.token_type(segment_ids) + positions)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """(B, L, H) -> (B, heads, L, H / heads)."""
    b, length, hidden = x.shape
    return x.reshape(b, length, heads, hidden // heads).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    b, heads, length, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, length, heads * d)


class EncoderBlock(nnx.Module):
    """One BERT encoder layer, split into the steps SpikingBERT fires a neuron layer after.

    Attribute names are the project's contract: Linear ``query``, ``key``, ``value``,
    ``attention_output``, ``intermediate``, ``output``; LayerNorm ``attention_norm``, ``output_norm``.
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, *, eps: float, rngs: nnx.Rngs):
        if hidden % heads:
            raise ConfigError(f"hidden size {hidden} is not a multiple of the number of heads {heads}")
        self.heads = heads
        self.query = nnx.Linear(hidden, hidden, rngs=rngs)
        self.key = nnx.Linear(hidden, hidden, rngs=rngs)
        self.value = nnx.Linear(hidden, hidden, rngs=rngs)
        self.attention_output = nnx.Linear(hidden, hidden, rngs=rngs)
        self.attention_norm = layer_norm(hidden, eps, rngs)
        self.intermediate = nnx.Linear(hidden, intermediate, rngs=rngs)
        self.output = nnx.Linear(intermediate, hidden, rngs=rngs)
        self.output_norm = layer_norm(hidden, eps, rngs)

    def attend(self, x: jax.Array, keys: jax.Array, values: jax.Array, bias: jax.Array):
        """Self-attention on given key/value activations; returns ``(context, scores)``.

        ``scores = (W_Q x + b_Q) K^T / sqrt(d_head) + bias`` (pre-softmax, (B, heads, L, L));
        ``context = merge_heads(softmax(scores) V)``. ``keys``/``values`` are the key and value layers'
        outputs (real-valued in BERT, spikes or rates in SpikingBERT).
        """
        q = split_heads(self.query(x), self.heads)
        k = split_heads(keys, self.heads)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1]) + bias
        probs = jax.nn.softmax(scores, axis=-1)
        context = jnp.einsum("bhqk,bhkd->bhqd", probs, split_heads(values, self.heads))
        return merge_heads(context), scores

    def self_output(self, context: jax.Array, x: jax.Array) -> jax.Array:
        """``LN(W_O context + b_O + x)`` (attention output with the residual)."""
        return self.attention_norm(self.attention_output(context) + x)

    def feed_forward_in(self, h: jax.Array) -> jax.Array:
        """``GELU(W_1 h + b_1)``."""
        return gelu(self.intermediate(h))

    def feed_forward_out(self, inner: jax.Array, h: jax.Array) -> jax.Array:
        """``LN(W_2 inner + b_2 + h)``."""
        return self.output_norm(self.output(inner) + h)

    def __call__(self, x: jax.Array, bias: jax.Array):
        """The BERT layer ``x -> (y, pre-softmax scores)``."""
        context, scores = self.attend(x, self.key(x), self.value(x), bias)
        h = self.self_output(context, x)
        return self.feed_forward_out(self.feed_forward_in(h), h), scores


@dataclass(frozen=True)
class BertConfig:
    """BERT shape and head options. ``num_labels = 0`` means no classification head (``BertModel``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    num_labels: int = 0
    pooler: bool = True
    classifier_relu: bool = False  # TinyBERT-style teachers classify relu(pooled) (spikingbert.md)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.num_labels and not self.pooler:
            raise ConfigError("a classification head (num_labels > 0) needs the pooler (pooler=True)")

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], *, num_labels: int = 0, pooler: bool = True) -> BertConfig:
        """Config from an HF ``config.json`` dict; features this model does not implement raise ConfigError.

        Supported: absolute position embeddings, ``hidden_act="gelu"`` (exact erf), encoder only.
        """
        if hf.get("model_type", "bert") != "bert":
            raise ConfigError(f"expected an HF config with model_type 'bert', found {hf.get('model_type')!r}")
        unsupported = []
        if hf.get("hidden_act", "gelu") != "gelu":
            unsupported.append(f"hidden_act={hf['hidden_act']!r} (only 'gelu', the exact erf GELU)")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            unsupported.append(
                f"position_embedding_type={hf['position_embedding_type']!r} (only 'absolute')"
            )
        for flag in ("is_decoder", "add_cross_attention"):
            if hf.get(flag, False):
                unsupported.append(f"{flag}=True (only the bidirectional encoder)")
        if unsupported:
            raise ConfigError(
                "this BERT implementation does not support " + "; ".join(unsupported)
                + ": convert a model without these features"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in hf]
        if missing:
            raise ConfigError(f"HF BERT config lacks {missing}: expected a complete config.json")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
            max_positions=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12), pad_token_id=hf.get("pad_token_id", 0),
            num_labels=num_labels, pooler=pooler,
        )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BertConfig:
        """A named shape (``base``: bert-base-uncased, ``small``: a CPU-sized teacher) with overrides."""
        if name not in BERT_PRESETS:
            raise ConfigError(f"unknown BERT preset {name!r}: expected one of {sorted(BERT_PRESETS)}")
        return cls(**{**BERT_PRESETS[name], **overrides})


BERT_PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, max_positions=128),
}


class BertOutput(NamedTuple):
    """What :class:`BERT` returns: ``logits`` (None without a head), ``hidden_states`` (embedding output
    + one per layer, each (B, L, H)), ``attention_scores`` (one (B, heads, L, L) per layer, pre-softmax
    with the additive mask) and ``pooled`` (tanh pooler on [CLS], None without a pooler)."""

    logits: jax.Array | None
    hidden_states: tuple[jax.Array, ...]
    attention_scores: tuple[jax.Array, ...]
    pooled: jax.Array | None


class BERT(nnx.Module):
    """Non-spiking BERT encoder with optional pooler and classifier (the KD teacher)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embeddings = Embeddings(c.vocab_size, c.hidden_size, c.max_positions, c.type_vocab_size,
                                     eps=c.layer_norm_eps, pad_token_id=c.pad_token_id, rngs=rngs)
        self.blocks = nnx.List([
            EncoderBlock(c.hidden_size, c.num_heads, c.intermediate_size, eps=c.layer_norm_eps, rngs=rngs)
            for _ in range(c.num_layers)
        ])
        self.pooler = nnx.Linear(c.hidden_size, c.hidden_size, rngs=rngs) if c.pooler else None
        self.classifier = nnx.Linear(c.hidden_size, c.num_labels, rngs=rngs) if c.num_labels else None

    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array | None = None,
                 attention_mask: jax.Array | None = None) -> BertOutput:
        """Forward pass (eval mode). ``segment_ids`` default to 0 and ``attention_mask`` to all ones."""
        if segment_ids is None:
            segment_ids = jnp.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        bias = mask_bias(attention_mask, HF_MASK_VALUE)
        hidden = [self.embeddings(input_ids, segment_ids)]
        scores = []
        for block in self.blocks:
            h, s = block(hidden[-1], bias)
            hidden.append(h)
            scores.append(s)
        pooled = jnp.tanh(self.pooler(hidden[-1][:, 0])) if self.pooler is not None else None
        logits = None
        if self.classifier is not None:
            logits = self.classifier(jax.nn.relu(pooled) if self.config.classifier_relu else pooled)
        return BertOutput(logits, tuple(hidden), tuple(scores), pooled)
