"""The tasks of the library: GLUE SST-2, MRPC and QNLI (classification) and WikiText-2 (language modelling).

A :class:`Task` states its metric's name and direction, the classifier width it needs, how many tokens a sentence
(pair) is cut to and how its ``selection`` split is held out (:mod:`qslm_jax.tasks.data`). MRPC's F1 (of class 1,
"equivalent", as GLUE reports it) is computed beside accuracy by :mod:`qslm_jax.tasks.scores`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qslm_jax.errors import ConfigError


@dataclass(frozen=True)
class Task:
    """Metric conventions of a task: its name in reports, direction and the classifier width it needs.

    ``max_length``: tokens per example (classification); ``selection_examples``: train rows held out of training
    as the ``selection`` split (``None``: the task has no local train split, so both evaluation splits come from
    the part of dev a model is not trained on); ``reports_f1``: GLUE reports F1 beside accuracy.
    """

    name: str
    metric_name: str
    higher_is_better: bool
    n_classes: int  # 0: language modelling
    max_length: int = 0
    selection_examples: int | None = None
    reports_f1: bool = False


TASKS = {
    "sst2": Task("sst2", "accuracy (%)", True, 2, max_length=64, selection_examples=1000),
    "mrpc": Task("mrpc", "accuracy (%)", True, 2, max_length=128, selection_examples=400, reports_f1=True),
    "qnli": Task("qnli", "accuracy (%)", True, 2, max_length=128),
    "wikitext2": Task("wikitext2", "perplexity", False, 0),
}


def get_task(name: str) -> Task:
    """The :class:`Task` called ``name``; :class:`ConfigError` naming the choices otherwise."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name]
