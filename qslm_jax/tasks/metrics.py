"""The evaluation metric of a task for a model family: what the batched evaluator scores candidates with."""

from __future__ import annotations

from qslm_jax.errors import ConfigError
from qslm_jax.qslm.metrics import Accuracy, Perplexity
from qslm_jax.tasks.task import Task


def metric_of(task: Task, family) -> Accuracy | Perplexity:
    """Accuracy in % (classification; with the F1 counts for a task that reports F1) or perplexity (language
    modelling) of ``task`` on the outputs of ``family`` (a :class:`~qslm_jax.models.registry.ModelFamily`)."""
    if task.n_classes:
        if family.classify is None:
            raise ConfigError(f"the {family.name} family has no classification output for {task.name}")
        return Accuracy(forward=family.classify, f1_counts=task.reports_f1)
    if family.language_model is None:
        raise ConfigError(f"{task.name} is language modelling and the {family.name} family has no "
                          "language-model output: choose a classification task (sst2, mrpc, qnli)")
    return Perplexity(forward=family.language_model)
