"""The two SpikeGPT tasks of the QSLM study: data, training loss and metric conventions in one place.

* ``sst2``: GLUE SST-2 sentiment; accuracy in percent (higher is better); :meth:`SpikeGPT.classify` on
  right-padded GPT-NeoX tokens. Training uses the train file minus a fixed held-out part
  (:data:`SST2_SELECTION_EXAMPLES` rows drawn with :data:`SST2_SELECTION_SEED`), which is the ``selection``
  split; the ``report`` split (and ``all``) is GLUE validation (872 sentences).
* ``wikitext2``: WikiText-2 raw; the model is trained on ``valid`` (the train split is not available on this
  machine, PROVENANCE.md) and scored on ``test`` by the strided perplexity protocol of qslm.md section 4
  (lower is better): ``all`` is every test token used, ``selection`` the first half of them and ``report`` the
  second half (each half its own strided token stream).

A search chooses on ``selection`` and reports on ``report``, data it never saw (``all`` is the paper's protocol,
choosing and reporting on one set). ``eval_limit`` keeps the first N examples of the split (sst2) or the first N
tokens of the test text before it is halved (wikitext2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qslm_jax.data import (
    ClassificationDataset,
    encode_classification,
    gpt_neox_tokenizer,
    lm_training_batches,
    load_glue,
    load_wikitext_rows,
    strided_windows,
)
from qslm_jax.data.glue import TextClassificationSplit
from qslm_jax.data.wikitext import JOINS, join_rows
from qslm_jax.errors import ConfigError

SST2_MAX_LENGTH = 64  # GPT-NeoX tokens: covers all of validation (max 60); the few longer train rows are cut
SST2_SELECTION_EXAMPLES = 1000  # train rows held out of training, for choosing among candidates
SST2_SELECTION_SEED = 20261201
EVAL_SPLITS = ("selection", "report", "all")


@dataclass(frozen=True)
class Task:
    """Metric conventions of a task: its name in reports, direction and the classifier width it needs."""

    name: str
    metric_name: str
    higher_is_better: bool
    n_classes: int  # 0: language modelling


TASKS = {
    "sst2": Task("sst2", "accuracy (%)", True, 2),
    "wikitext2": Task("wikitext2", "perplexity", False, 0),
}


def get_task(name: str) -> Task:
    """The :class:`Task` called ``name``; :class:`ConfigError` naming the choices otherwise."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name]


class TokenStreams(NamedTuple):
    """The whole tokenized training and test texts of a language-modelling task and the tokenizer's size."""

    train: np.ndarray
    test: np.ndarray
    vocab_size: int


@dataclass(frozen=True, eq=False)
class TaskData:
    """Training batches (``batch_at(step)``), fixed-shape evaluation batches and the protocol sentence."""

    train_batch_at: Callable[[int], dict[str, np.ndarray]] | None
    eval_batches: list[dict[str, np.ndarray]]
    eval_items: int  # examples (sst2) or scored tokens (wikitext2)
    protocol: str
    items_per_train_batch: int
    token_streams: TokenStreams | None = None  # wikitext2 with training data (e.g. for n-gram baselines)


def sst2_held_out_rows(n_train: int) -> np.ndarray:
    """The train-file rows held out of training as the SST-2 ``selection`` split (sorted; fixed seed)."""
    if n_train <= SST2_SELECTION_EXAMPLES:
        raise ConfigError(f"the SST-2 train file has {n_train} rows, too few to hold out "
                          f"{SST2_SELECTION_EXAMPLES} for selection")
    order = np.random.default_rng(SST2_SELECTION_SEED).permutation(n_train)
    return np.sort(order[:SST2_SELECTION_EXAMPLES])


def load_task_data(
    task: Task,
    *,
    ctx_len: int,
    train_batch_size: int = 32,
    eval_batch_size: int = 32,
    eval_limit: int | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    with_train: bool = True,
    eval_split: str = "report",
) -> TaskData:
    """Load, tokenize and batch the data of ``task``: training batches and the ``eval_split`` evaluation
    batches (see the module docstring for the splits)."""
    if eval_split not in EVAL_SPLITS:
        raise ConfigError(f"unknown evaluation split {eval_split!r}: expected one of {EVAL_SPLITS}")
    if eval_limit is not None and eval_limit < 1:
        raise ConfigError(f"eval_limit must be >= 1 (examples or tokens), found {eval_limit}")
    tokenizer = gpt_neox_tokenizer(data_dir=data_dir)
    if task.name == "sst2":
        train_at = None
        if with_train or eval_split == "selection":
            raw = load_glue("sst2", "train", data_dir=data_dir)
            rows = sst2_held_out_rows(len(raw))
            if with_train:
                kept = np.setdiff1d(np.arange(len(raw)), rows)
                train = encode_classification(_raw_subset(raw, kept), tokenizer, max_length=SST2_MAX_LENGTH)
                train_at = train.training_batches(train_batch_size, seed)
        if eval_split == "selection":
            dev = encode_classification(_raw_subset(raw, rows), tokenizer, max_length=SST2_MAX_LENGTH)
            dev = dataclasses.replace(dev, description=dev.description + f": the {len(rows)} train rows held out "
                                      f"of training for selection (seed {SST2_SELECTION_SEED})")
        else:
            dev = encode_classification(load_glue("sst2", "validation", data_dir=data_dir), tokenizer,
                                        max_length=SST2_MAX_LENGTH)
        if eval_limit is not None:
            dev = _subset(dev, np.arange(min(eval_limit, len(dev))), f", first {min(eval_limit, len(dev))} "
                                                                      "(--eval-limit)")
        return TaskData(train_at, list(dev.batches(eval_batch_size)), len(dev),
                        f"accuracy (%) on {dev.description}", train_batch_size)
    rows, source = load_wikitext_rows("test", data_dir=data_dir)
    tokens = tokenizer.encode(join_rows(rows, "hf"))
    used = tokens[:eval_limit]
    limited = "" if eval_limit is None else f", first {len(used)} tokens only (--eval-limit)"
    half = len(used) // 2
    part, which = {"all": (used, ""), "selection": (used[:half], f"; selection split: the first half, tokens "
                                                                 f"0..{half - 1} of those"),
                   "report": (used[half:], f"; report split: the second half, tokens {half}..{len(used) - 1} "
                                           "of those")}[eval_split]
    windows = strided_windows(part, ctx_len, pad_id=tokenizer.pad_id, text_description=(
        f"WikiText-2 raw test ({source}), text = {JOINS['hf']}, {tokenizer.name} tokenizer{limited}{which}"))
    train_at = streams = None
    if with_train:
        train_rows, _ = load_wikitext_rows("validation", data_dir=data_dir)
        train_tokens = tokenizer.encode(join_rows(train_rows, "hf"))
        train_at = lm_training_batches(train_tokens, ctx_len, train_batch_size, seed)
        streams = TokenStreams(train_tokens, tokens, tokenizer.vocab_size)
    return TaskData(train_at, list(windows.batches(eval_batch_size)), windows.scored_tokens, windows.protocol,
                    train_batch_size * ctx_len, streams)


def _raw_subset(split: TextClassificationSplit, rows: np.ndarray) -> TextClassificationSplit:
    pick = [int(i) for i in rows]
    second = None if split.second is None else tuple(split.second[i] for i in pick)
    return dataclasses.replace(split, first=tuple(split.first[i] for i in pick), second=second,
                               labels=split.labels[rows])


def _subset(dataset: ClassificationDataset, rows: np.ndarray, note: str) -> ClassificationDataset:
    return ClassificationDataset({k: v[rows] for k, v in dataset.inputs.items()}, dataset.labels[rows],
                                 dataset.num_labels, dataset.description + note)


def classification_loss(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of ``model.classify`` over the valid rows, and the batch accuracy."""
    logits = model.classify(batch["idx"], batch["attention_mask"])
    weight = batch.get("valid", jnp.ones(logits.shape[0]))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(logits.dtype)
    denom = jnp.maximum(weight.sum(), 1.0)
    return (nll * weight).sum() / denom, {"accuracy": (correct * weight).sum() / denom}


def language_model_loss(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over the targets (weighted by ``score_mask`` when present)."""
    logits = model(batch["idx"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weight = batch.get("score_mask", jnp.ones(nll.shape, nll.dtype))
    mean = (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)
    return mean, {"perplexity": jnp.exp(mean)}


def training_loss(task: Task):
    """The training loss function ``(model, batch) -> (loss, metrics)`` of ``task``."""
    return classification_loss if task.n_classes else language_model_loss
