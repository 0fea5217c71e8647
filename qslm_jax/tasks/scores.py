"""Classification scores, the one implementation every path uses (QSLM metric, fine-tuning, KD training and
evaluation): additive counts per batch, and accuracy / F1 from their totals.

Rows are weighted by ``valid`` (0 for the dummy rows that fill a last batch, :mod:`qslm_jax.data.classification`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

POSITIVE_CLASS = 1  # F1 is reported for class 1 ("equivalent" in MRPC), as GLUE does


def classification_rows(logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None
                        ) -> dict[str, jax.Array]:
    """Additive counts of every row ``b`` (arrays of shape (B,)): ``correct_b = w_b [argmax logits_b == y_b]``,
    ``examples_b = w_b``, and whether the row is a true/false positive or a false negative of class
    :data:`POSITIVE_CLASS` (for F1), each times ``w_b``."""
    pred = jnp.argmax(logits, axis=-1)
    w = jnp.ones(pred.shape, jnp.float32) if valid is None else jnp.asarray(valid).astype(jnp.float32)
    pos_pred, pos_true = pred == POSITIVE_CLASS, labels == POSITIVE_CLASS
    return {"correct": w * (pred == labels), "examples": w, "tp": w * (pos_pred & pos_true),
            "fp": w * (pos_pred & ~pos_true), "fn": w * (~pos_pred & pos_true)}


def classification_counts(logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None
                          ) -> dict[str, jax.Array]:
    """Additive counts over the valid rows: the sums ``sum_b`` of :func:`classification_rows` (``correct``,
    ``examples``, ``tp``, ``fp``, ``fn``)."""
    return {k: jnp.sum(v) for k, v in classification_rows(logits, labels, valid).items()}


def batch_accuracy(logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Fraction of valid rows whose argmax matches the label (0 with no valid row): training-batch accuracy."""
    counts = classification_counts(logits, labels, valid)
    return counts["correct"] / jnp.maximum(counts["examples"], 1.0)


def classification_metrics(totals: Mapping[str, float]) -> dict[str, float]:
    """Accuracy ``100 correct / examples`` and F1 of the positive class ``100 * 2tp / (2tp + fp + fn)``
    (GLUE's MRPC F1; 0 when the class is never predicted nor present)."""
    tp, fp, fn = totals["tp"], totals["fp"], totals["fn"]
    return {"accuracy": 100.0 * totals["correct"] / max(totals["examples"], 1.0),
            "f1": 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "examples": int(totals["examples"])}
