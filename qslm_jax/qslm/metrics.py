"""Task metrics as additive per-batch statistics (qslm.md section 4).

A metric returns additive statistics per example (``example_stats``: one row of a batch, a sentence or a
window), their *sums* per batch (``batch_stats``) and turns the totals over a whole split into the number
(``finalize``), so the result over many batches, chunks or devices is exact, and resampling examples
(:mod:`qslm_jax.qslm.uncertainty`) needs no second pass:

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
import numpy as np

from qslm_jax.errors import DataError
from qslm_jax.tasks.scores import classification_rows


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
    """What the evaluator needs from a metric. ``count`` names the statistic that counts what the metric
    averages over (examples, scored tokens); it depends on the data only, and a row where it is 0 is padding."""

    name: str
    higher_is_better: bool
    count: str

    def example_stats(self, model: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Additive statistics of every row of one batch (arrays of shape (B,))."""
        ...

    def batch_stats(self, model: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Additive statistics of one batch (scalars): the sums of :meth:`example_stats`."""
        ...

    def finalize(self, totals: Mapping[str, float]) -> float:
        """The metric from statistics summed over every batch; elementwise when the totals are equally
        shaped arrays (one per bootstrap resample, :mod:`qslm_jax.qslm.uncertainty`)."""
        ...


class _Additive:
    """``batch_stats`` as the sums over the rows of ``example_stats``."""

    def batch_stats(self, model: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """``sum_b s_b`` of every statistic ``s`` of :meth:`example_stats`."""
        return {k: jnp.sum(v) for k, v in self.example_stats(model, batch).items()}


@dataclass(frozen=True)
class Accuracy(_Additive):
    """Classification accuracy in percent.

    Batch keys: ``idx`` (B, T) int, ``attention_mask`` (B, T), ``labels`` (B,) int and optionally ``valid``
    (B,) (0 for the dummy rows that fill the last batch). ``f1_counts``: also keep each sentence's true/false
    positive and false negative of the positive class, so F1 (GLUE's MRPC score) can be computed from the same
    per-example statistics (:func:`qslm_jax.tasks.scores.classification_metrics`); the metric stays accuracy.
    """

    name: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    count: ClassVar[str] = "examples"
    forward: Callable[[Any, Mapping[str, jax.Array]], jax.Array] = classify_logits
    f1_counts: bool = False

    def example_stats(self, model: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Per sentence ``b``: ``correct_b = w_b [argmax logits_b == label_b]`` and ``examples_b = w_b`` (with
        ``f1_counts``, also ``tp_b``, ``fp_b``, ``fn_b`` of the positive class)."""
        counts = classification_rows(self.forward(model, batch), batch["labels"], batch.get("valid"))
        keep = ("correct", "examples", "tp", "fp", "fn") if self.f1_counts else ("correct", "examples")
        return {k: counts[k] for k in keep}

    def finalize(self, totals: Mapping[str, float]) -> float:
        """``100 * correct / examples`` (elementwise over arrays of totals)."""
        if np.any(np.asarray(totals["examples"]) <= 0):
            raise DataError("accuracy over zero examples: the batches hold no example with valid = 1")
        return 100.0 * totals["correct"] / totals["examples"]


@dataclass(frozen=True)
class Perplexity(_Additive):
    """Language-model perplexity ``exp(sum NLL / scored tokens)``.

    Batch keys: ``idx`` (B, T), ``targets`` (B, T) (the next token of each position) and ``score_mask``
    (B, T) (1 where the prediction counts; strided windows score only their new tokens).
    """

    name: ClassVar[str] = "perplexity"
    higher_is_better: ClassVar[bool] = False
    count: ClassVar[str] = "tokens"
    forward: Callable[[Any, Mapping[str, jax.Array]], jax.Array] = language_model_logits

    def example_stats(self, model: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Per window ``b``: ``nll_b = -sum_t m_bt log p(targets_bt | idx_b,<=t)`` and ``tokens_b = sum_t m_bt``."""
        logp = jax.nn.log_softmax(self.forward(model, batch).astype(jnp.float32), axis=-1)
        target_logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["score_mask"].astype(jnp.float32)
        return {"nll": -jnp.sum(target_logp * mask, axis=-1), "tokens": jnp.sum(mask, axis=-1)}

    def finalize(self, totals: Mapping[str, float]) -> float:
        """:func:`perplexity` of the totals (elementwise over arrays of totals)."""
        return perplexity(totals["nll"], totals["tokens"])


def perplexity(total_nll: float, total_tokens: float) -> float:
    """``exp(total_nll / total_tokens)`` (QSLM paper Eq. 2 over a whole split). Scalars: ``math.exp``; arrays
    (bootstrap resamples): elementwise ``numpy.exp``, inf where it overflows."""
    if np.any(np.asarray(total_tokens) <= 0):
        raise DataError("perplexity over zero scored tokens: every score_mask entry is 0")
    if np.ndim(total_nll) == np.ndim(total_tokens) == 0:
        return math.exp(total_nll / total_tokens)
    with np.errstate(over="ignore"):
        return np.exp(np.asarray(total_nll) / total_tokens)

