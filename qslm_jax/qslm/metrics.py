"""Task metrics as additive per-batch statistics (qslm.md section 4).

A metric returns *sums* per batch (``batch_stats``) and turns the totals over a whole split into the number
(``finalize``), so the result over many batches, chunks or devices is exact:

* :class:`Accuracy` - ``100 * correct / examples`` of the logits ``forward(model, batch)`` (the model family's
  classification output; default ``model.classify(input_ids, attention_mask)``);
* :class:`Perplexity` - ``exp(total_nll / total_tokens)`` (the QSLM paper's Eq. 2) of ``forward(model, batch)``
  (default ``model(input_ids)``),
  never a mean of per-batch perplexities; a per-token ``score_mask`` selects the scored tokens (strided windows,
  padding).

Batches are dicts of arrays with fixed shapes, as :mod:`qslm_jax.data` builds them (``ClassificationDataset.batches``,
``PerplexityWindows.batches``): token ids under ``"idx"`` (SpikeGPT; ``"input_ids"`` is accepted too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp

from qslm_jax.errors import DataError
from qslm_jax.tasks.scores import classification_counts


def token_ids(batch: Mapping[str, jax.Array]) -> jax.Array:
    """The token ids of a batch: ``batch["idx"]`` (SpikeGPT convention) or ``batch["input_ids"]``."""
    if "idx" in batch:
        return batch["idx"]
    if "input_ids" in batch:
        return batch["input_ids"]
    raise DataError(f"a batch needs token ids under 'idx' or 'input_ids', found keys {sorted(batch)}")


def classify_logits(model: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """``model.classify(token ids, attention_mask)``: the classification output of a SpikeGPT-style model."""
    return model.classify(token_ids(batch), batch["attention_mask"])


def language_model_logits(model: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """``model(token ids)``: next-token logits of a SpikeGPT-style model."""
    return model(token_ids(batch))


class Metric(Protocol):
    """What the evaluator needs from a metric."""

    name: str
    higher_is_better: bool

    def batch_stats(self, model: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Additive statistics of one batch (scalars)."""
        ...

    def finalize(self, totals: Mapping[str, float]) -> float:
        """The metric from statistics summed over every batch."""
        ...


@dataclass(frozen=True)
class Accuracy:
    """Classification accuracy in percent.

    Batch keys: ``idx`` (B, T) int, ``attention_mask`` (B, T), ``labels`` (B,) int and optionally ``valid``
    (B,) (0 for the dummy rows that fill the last batch).
    """

    name: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    forward: Callable[[Any, Mapping[str, jax.Array]], jax.Array] = classify_logits

    def batch_stats(self, model: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """``correct = sum_b w_b [argmax logits_b == label_b]`` and ``examples = sum_b w_b``."""
        counts = classification_counts(self.forward(model, batch), batch["labels"], batch.get("valid"))
        return {"correct": counts["correct"], "examples": counts["examples"]}

    def finalize(self, totals: Mapping[str, float]) -> float:
        """``100 * correct / examples``."""
        if totals["examples"] <= 0:
            raise DataError("accuracy over zero examples: the batches hold no example with valid = 1")
        return 100.0 * totals["correct"] / totals["examples"]


@dataclass(frozen=True)
class Perplexity:
    """Language-model perplexity ``exp(sum NLL / scored tokens)``.

    Batch keys: ``idx`` (B, T), ``targets`` (B, T) (the next token of each position) and ``score_mask``
    (B, T) (1 where the prediction counts; strided windows score only their new tokens).
    """

    name: ClassVar[str] = "perplexity"
    higher_is_better: ClassVar[bool] = False
    forward: Callable[[Any, Mapping[str, jax.Array]], jax.Array] = language_model_logits

    def batch_stats(self, model: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """``nll = -sum_{b,t} m_bt log p(targets_bt | idx_b,<=t)`` and ``tokens = sum m_bt``."""
        logp = jax.nn.log_softmax(self.forward(model, batch).astype(jnp.float32), axis=-1)
        target_logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["score_mask"].astype(jnp.float32)
        return {"nll": -jnp.sum(target_logp * mask), "tokens": jnp.sum(mask)}

    def finalize(self, totals: Mapping[str, float]) -> float:
        """:func:`perplexity` of the totals."""
        return perplexity(totals["nll"], totals["tokens"])


def perplexity(total_nll: float, total_tokens: float) -> float:
    """``exp(total_nll / total_tokens)`` (QSLM paper Eq. 2 over a whole split)."""
    if total_tokens <= 0:
        raise DataError("perplexity over zero scored tokens: every score_mask entry is 0")
    return math.exp(total_nll / total_tokens)

