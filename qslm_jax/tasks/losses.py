"""Training losses of the tasks, on the model family's own forward (:mod:`qslm_jax.models.registry`).

Each loss is ``loss_fn(model, batch) -> (loss, metrics)`` as :func:`qslm_jax.training.train` expects.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from qslm_jax.errors import ConfigError
from qslm_jax.tasks.scores import batch_accuracy
from qslm_jax.tasks.task import Task


def classification_loss(logits_fn):
    """``loss_fn``: mean cross-entropy of ``logits_fn(model, batch)`` over the valid rows, and the batch
    accuracy."""

    def loss_fn(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = logits_fn(model, batch)
        weight = batch.get("valid", jnp.ones(logits.shape[0]))
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        mean = (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)
        return mean, {"accuracy": batch_accuracy(logits, batch["labels"], weight)}

    return loss_fn


def language_model_loss(logits_fn):
    """``loss_fn``: mean next-token cross-entropy of ``logits_fn(model, batch)`` over the targets (weighted by
    ``score_mask`` when present), and the batch perplexity."""

    def loss_fn(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        nll = optax.softmax_cross_entropy_with_integer_labels(logits_fn(model, batch), batch["targets"])
        weight = batch.get("score_mask", jnp.ones(nll.shape, nll.dtype))
        mean = (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)
        return mean, {"perplexity": jnp.exp(mean)}

    return loss_fn


def training_loss(task: Task, family):
    """The training loss ``(model, batch) -> (loss, metrics)`` of ``task`` for a model of ``family`` (a
    :class:`~qslm_jax.models.registry.ModelFamily`)."""
    if task.n_classes:
        return classification_loss(family.training_logits)
    if family.language_model is None:
        raise ConfigError(f"{task.name} is language modelling and the {family.name} family has no "
                          "language-model output: choose a classification task")
    return language_model_loss(family.language_model)
