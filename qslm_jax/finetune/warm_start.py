"""Warm starts of an embedded default: a real-valued model trained first, whose weights initialise the spiking one.

A SpikingBERT trained by equilibrium training from random weights stays at chance on SST-2 (the 4 x 128 student
at T = 16: 400 steps at lr 1e-3, 150 at 3e-3 or 1e-2, all about 51% on dev; its random encoder's logits barely
depend on the input). The reference initialises its students from a BERT (spikingbert.md, "Checkpoint format"),
and so does the embedded default: a BERT of the student's shape is trained on the task first, then its embeddings
and encoder layers are copied 1:1 (:func:`converters.spikingbert.spikingbert_from_bert`; fit_dense and the
classifier start fresh).
"""

from __future__ import annotations

from dataclasses import dataclass

from flax import nnx

from converters.spikingbert import spikingbert_from_bert
from qslm_jax.errors import ConfigError
from qslm_jax.models.bert import BERT, BertConfig
from qslm_jax.models.spikingbert import SpikingBERT, SpikingBERTConfig
from qslm_jax.training import TrainConfig


@dataclass(frozen=True)
class WarmStart:
    """How the real-valued model of a warm start is trained (a recipe's first stage)."""

    train: TrainConfig
    batch_size: int


def bert_of_shape(config: SpikingBERTConfig, seed: int = 0) -> BERT:
    """A random BERT with the layers, widths, vocabulary and positions of the SpikingBERT ``config`` (one
    encoder layer per spiking block) and its classifier width."""
    return BERT(BertConfig(vocab_size=config.vocab, hidden_size=config.hidden, num_layers=config.num_blocks,
                           num_heads=config.heads, intermediate_size=config.intermediate,
                           max_positions=config.max_positions, type_vocab_size=config.type_vocab,
                           pad_token_id=config.pad_token_id, num_labels=config.num_classes), rngs=nnx.Rngs(seed))


def spikingbert_from_trained_bert(bert: BERT, config: SpikingBERTConfig, seed: int = 0) -> SpikingBERT:
    """The SpikingBERT of ``config`` initialised from ``bert`` (:func:`bert_of_shape`'s shape, trained): layer
    ``i`` of the BERT becomes spiking block ``i``; :class:`ConfigError` if the shapes do not give ``config``."""
    student = spikingbert_from_bert(bert, T=config.T, vth=config.vth, num_layers=config.num_blocks,
                                    layers="first", num_classes=config.num_classes,
                                    feedback=config.feedback, seed=seed)
    if student.config != config:
        raise ConfigError(f"the BERT of the warm start gives the SpikingBERT {student.config}, not {config}")
    return student
