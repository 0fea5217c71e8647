"""Task data: load, tokenize and batch the train and evaluation sets of every task (:mod:`qslm_jax.tasks.task`).

* GLUE classification (``sst2``, ``mrpc``, ``qnli``): right-padded tokens of the model's tokenizer (GPT-NeoX
  ``idx`` for SpikeGPT, BERT ``input_ids`` + ``segment_ids`` for SpikingBERT), ``attention_mask``, ``labels``,
  ``valid``. A task with a local train split trains on it minus a fixed held-out part (``selection_examples``
  rows drawn with :data:`SELECTION_SEED`), which is the ``selection`` split; the ``report`` split (and ``all``)
  is GLUE validation. QNLI has no local train split: :func:`load_glue_splits` trains on a fixed 80% of dev,
  and the other 20% is halved into ``selection`` and ``report``.
* ``wikitext2``: WikiText-2 raw; the model is trained on ``valid`` (the train split is not available on this
  machine, PROVENANCE.md), or with ``lm_train_text="wikitext2-valid+glue"`` on ``valid`` followed by the public
  GLUE sentences of :mod:`qslm_jax.data.extra_text` (none sharing an 8-word run with ``test``), and scored on
  ``test`` by the strided perplexity protocol of qslm.md section 4 (lower is better): ``all`` is every test
  token used, ``selection`` the first half of them and ``report`` the second half (each half its own strided
  token stream).

A search chooses on ``selection`` and reports on ``report``, data it never saw (``all`` is the paper's protocol,
choosing and reporting on one set). ``eval_limit`` keeps the first N examples of the split (classification) or
the first N tokens of the test text before it is halved (wikitext2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from qslm_jax.data import (
    ClassificationDataset,
    encode_classification,
    gpt_neox_tokenizer,
    lm_training_batches,
    load_glue,
    load_wikitext_rows,
    strided_windows,
)
from qslm_jax.data.extra_text import glue_sentences
from qslm_jax.data.glue import TextClassificationSplit, glue_task
from qslm_jax.data.sources import resolve_data_dir
from qslm_jax.data.tokenizer import TextTokenizer
from qslm_jax.data.wikitext import JOINS, join_rows
from qslm_jax.errors import ConfigError
from qslm_jax.tasks.task import TASKS, Task

SST2_MAX_LENGTH = TASKS["sst2"].max_length  # GPT-NeoX tokens: all of validation (max 60); longer train rows are cut
SST2_SELECTION_EXAMPLES = TASKS["sst2"].selection_examples  # train rows held out of training, for selection
SELECTION_SEED = SST2_SELECTION_SEED = 20261201
EVAL_SPLITS = ("selection", "report", "all")
# what a language model trains on: WikiText-2 raw valid alone, or followed by the GLUE sentences of extra_text
LM_TRAIN_TEXTS = ("wikitext2-valid", "wikitext2-valid+glue")
HELD_OUT_FRACTION = 0.2  # share of dev kept for evaluation when a task has no local train split


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


def held_out_rows(task: Task, n_train: int) -> np.ndarray:
    """The train-file rows held out of training as ``task``'s ``selection`` split (sorted; fixed seed)."""
    if n_train <= task.selection_examples:
        raise ConfigError(f"the {task.name} train file has {n_train} rows, too few to hold out "
                          f"{task.selection_examples} for selection")
    order = np.random.default_rng(SELECTION_SEED).permutation(n_train)
    return np.sort(order[:task.selection_examples])


@dataclass(frozen=True, eq=False)
class GlueSplits:
    """Encoded train and dev sets of one GLUE task, and a sentence on where they came from (for every report)."""

    train: ClassificationDataset
    dev: ClassificationDataset
    note: str


def _raw_splits(task: str, data_dir: str | Path | None, split_seed: int, *, need_train: bool = True
                ) -> tuple[TextClassificationSplit | None, TextClassificationSplit, str]:
    """(train, dev, note) of a GLUE task as text. A task whose local data has no train split (QNLI in
    shared/data: dev and unlabelled test only) trains on a fixed random 80% of dev (permutation with
    ``split_seed``) and is evaluated on the other 20%."""
    spec = glue_task(task)
    dev = load_glue(task, "validation", data_dir=data_dir)
    if resolve_data_dir(data_dir) is not None and "train" not in spec.local_files:
        order = np.random.default_rng(split_seed).permutation(len(dev))
        cut = len(dev) - round(HELD_OUT_FRACTION * len(dev))
        how = f"split of dev with seed {split_seed}"
        train = _raw_subset(dev, order[:cut], "train", f"first {cut} of a {how}")
        dev = _raw_subset(dev, order[cut:], "validation", f"last {len(order) - cut} of a {how}")
        return train, dev, (f"{task}: no train split in the local data, so training uses {cut} dev examples and "
                            f"evaluation the other {len(order) - cut} (random split with seed {split_seed}); "
                            "not comparable with GLUE dev results")
    train = load_glue(task, "train", data_dir=data_dir) if need_train else None
    return train, dev, f"{task}: GLUE train for training, GLUE dev (validation) for evaluation"


def load_glue_splits(task: str, tokenizer: TextTokenizer, *, data_dir: str | Path | None = None,
                     max_length: int, train_limit: int | None = None, eval_limit: int | None = None,
                     split_seed: int = 0) -> GlueSplits:
    """Train and dev (GLUE validation) sets of ``task``, tokenized to ``max_length`` (knowledge distillation).

    QNLI's local data has no train split: see :func:`_raw_splits`; the returned ``note`` says so, and must go
    into every report. ``train_limit`` / ``eval_limit`` keep the first N examples of each set (in file order;
    in permutation order for a split dev).
    """
    train, dev, note = _raw_splits(task, data_dir, split_seed)
    spec = TASKS[task]
    if spec.selection_examples is not None:
        train = _without_selection_rows(spec, train)
        note += (f"; the {spec.selection_examples} train rows of the QSLM selection split (seed {SELECTION_SEED}) "
                 "left out of training")
    if train_limit is not None:
        train = _raw_subset(train, np.arange(min(train_limit, len(train))), train.split, f"first {train_limit}")
    if eval_limit is not None:
        dev = _raw_subset(dev, np.arange(min(eval_limit, len(dev))), dev.split, f"first {eval_limit}")
    return GlueSplits(encode_classification(train, tokenizer, max_length=max_length),
                      encode_classification(dev, tokenizer, max_length=max_length),
                      f"{note}; {len(train)} train / {len(dev)} eval examples")


def load_task_data(
    task: Task,
    *,
    ctx_len: int,
    tokenizer: TextTokenizer | None = None,
    max_positions: int | None = None,
    train_batch_size: int = 32,
    eval_batch_size: int = 32,
    eval_limit: int | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    with_train: bool = True,
    eval_split: str = "report",
    lm_train_text: str = LM_TRAIN_TEXTS[0],
) -> TaskData:
    """Load, tokenize and batch the data of ``task``: training batches and the ``eval_split`` evaluation
    batches (see the module docstring for the splits; ``lm_train_text``: one of :data:`LM_TRAIN_TEXTS`, what a
    language model trains on).

    ``tokenizer``: the model family's (default GPT-NeoX); ``ctx_len``: language-modelling window;
    ``max_positions``: a positional limit that caps the task's ``max_length`` (BERT-style models).
    """
    if eval_split not in EVAL_SPLITS:
        raise ConfigError(f"unknown evaluation split {eval_split!r}: expected one of {EVAL_SPLITS}")
    if lm_train_text not in LM_TRAIN_TEXTS:
        raise ConfigError(f"unknown language-model training text {lm_train_text!r}: expected one of "
                          f"{LM_TRAIN_TEXTS}")
    if eval_limit is not None and eval_limit < 1:
        raise ConfigError(f"eval_limit must be >= 1 (examples or tokens), found {eval_limit}")
    tokenizer = tokenizer or gpt_neox_tokenizer(data_dir=data_dir)
    if task.n_classes:
        length = min(task.max_length, max_positions) if max_positions else task.max_length
        return _classification_data(task, tokenizer, length, train_batch_size, eval_batch_size, eval_limit,
                                    data_dir, seed, with_train, eval_split)
    rows, source = load_wikitext_rows("test", data_dir=data_dir)
    test_text = join_rows(rows, "hf")
    tokens = tokenizer.encode(test_text)
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
        train_tokens = _lm_train_tokens(lm_train_text, tokenizer, test_text, data_dir)
        train_at = lm_training_batches(train_tokens, ctx_len, train_batch_size, seed)
        streams = TokenStreams(train_tokens, tokens, tokenizer.vocab_size)
    return TaskData(train_at, list(windows.batches(eval_batch_size)), windows.scored_tokens, windows.protocol,
                    train_batch_size * ctx_len, streams)


def _lm_train_tokens(which: str, tokenizer: TextTokenizer, test_text: str, data_dir) -> np.ndarray:
    """The token stream of training text ``which`` (:data:`LM_TRAIN_TEXTS`): WikiText-2 raw valid joined as the
    test text is, then (``+glue``) each GLUE sentence of :func:`~qslm_jax.data.extra_text.glue_sentences`
    that shares no 8-word run with ``test_text``, every piece separated by the same ``"\\n\\n"`` join."""
    train_rows, _ = load_wikitext_rows("validation", data_dir=data_dir)
    text = join_rows(train_rows, "hf")
    if which == "wikitext2-valid+glue":
        sentences, _ = glue_sentences(test_text, data_dir=data_dir)
        text = "\n\n".join([text, *sentences])
    return np.asarray(tokenizer.encode(text), np.int32)


def _classification_data(task: Task, tokenizer: TextTokenizer, length: int, train_batch_size: int,
                         eval_batch_size: int, eval_limit: int | None, data_dir, seed: int, with_train: bool,
                         eval_split: str) -> TaskData:
    """A GLUE task's training batches and ``eval_split`` batches (module docstring)."""
    held_out = task.selection_examples is not None
    raw, dev_raw, _ = _raw_splits(task.name, data_dir, 0, need_train=with_train or (held_out and
                                                                                   eval_split == "selection"))
    train_at = None
    if with_train:
        train_raw = _without_selection_rows(task, raw) if held_out else raw
        train = encode_classification(train_raw, tokenizer, max_length=length)
        train_at = train.training_batches(train_batch_size, seed)
    if held_out and eval_split == "selection":
        rows = held_out_rows(task, len(raw))
        dev = encode_classification(_raw_subset(raw, rows), tokenizer, max_length=length)
        dev = dataclasses.replace(dev, description=dev.description + f": the {len(rows)} train rows held out "
                                  f"of training for selection (seed {SELECTION_SEED})")
    elif held_out or eval_split == "all":
        dev = encode_classification(dev_raw, tokenizer, max_length=length)
    else:  # no train split: the evaluation part of dev is halved into selection and report
        half = len(dev_raw) // 2
        rows = np.arange(half) if eval_split == "selection" else np.arange(half, len(dev_raw))
        dev = encode_classification(_raw_subset(dev_raw, rows, dev_raw.split, f"{eval_split} split: "
                                                f"{'first' if eval_split == 'selection' else 'second'} half"),
                                    tokenizer, max_length=length)
    if eval_limit is not None:
        dev = _subset(dev, np.arange(min(eval_limit, len(dev))), f", first {min(eval_limit, len(dev))} "
                                                                  "(--eval-limit)")
    return TaskData(train_at, list(dev.batches(eval_batch_size)), len(dev), f"accuracy (%) on {dev.description}",
                    train_batch_size)


def _without_selection_rows(task: Task, train: TextClassificationSplit) -> TextClassificationSplit:
    """``train`` less the rows :func:`held_out_rows` keeps for ``task``'s selection split: what every model of
    the library trains on (fine-tuning, the embedded defaults, extreme KD), so a search never selects on
    sentences its model was trained on."""
    return _raw_subset(train, np.setdiff1d(np.arange(len(train)), held_out_rows(task, len(train))))


def _raw_subset(split: TextClassificationSplit, rows: np.ndarray, name: str | None = None,
                how: str | None = None) -> TextClassificationSplit:
    """The rows ``rows`` of ``split``; with ``name`` / ``how``, renamed and its source annotated."""
    pick = [int(i) for i in rows]
    second = None if split.second is None else tuple(split.second[i] for i in pick)
    extra = {} if how is None else {"split": name, "source": f"{split.source} ({how})"}
    return dataclasses.replace(split, first=tuple(split.first[i] for i in pick), second=second,
                               labels=split.labels[rows], **extra)


def _subset(dataset: ClassificationDataset, rows: np.ndarray, note: str) -> ClassificationDataset:
    return ClassificationDataset({k: v[rows] for k, v in dataset.inputs.items()}, dataset.labels[rows],
                                 dataset.num_labels, dataset.description + note)
