"""A task's data as a given model reads it: its family's tokenizer, context length and positional limit, and the
check that every token id fits the model's vocabulary."""

from __future__ import annotations

import numpy as np
from flax import nnx

from qslm_jax.errors import ConfigError
from qslm_jax.models.registry import family_of
from qslm_jax.tasks.data import TaskData, load_task_data
from qslm_jax.tasks.task import Task


def model_task_data(model: nnx.Module, task: Task, **kwargs) -> TaskData:
    """:func:`~qslm_jax.tasks.data.load_task_data` for ``model``: its family's tokenizer, its context length
    and (BERT-style models) its positional limit; ``kwargs`` go to the loader."""
    family = family_of(model)
    length = family.config_value(model.config, "max_length")
    return load_task_data(task, ctx_len=length, tokenizer=family.tokenizer(data_dir=kwargs.get("data_dir")),
                          max_positions=length if family.positional else None, **kwargs)


def check_vocabulary(model: nnx.Module, batches) -> None:
    """:class:`ConfigError` when the data hold token ids the model's embedding does not have (JAX would clamp
    them silently)."""
    family = family_of(model)
    vocab = family.config_value(model.config, "vocab_size")
    largest = max(int(np.max(b["idx"] if "idx" in b else b["input_ids"])) for b in batches)
    if largest >= vocab:
        raise ConfigError(f"the data hold token id {largest} but the model's vocabulary has {vocab} entries: use "
                          f"a {family.name} model built for its tokenizer (e.g. the {family.embedded_preset} "
                          "preset)")
