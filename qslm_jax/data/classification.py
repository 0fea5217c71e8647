"""Fixed-shape classification batches, so a jitted evaluation or training step compiles once.

Every batch is a dict of numpy arrays with a fixed batch size B and length T:

* ``"idx"`` (GPT-NeoX / SpikeGPT) or ``"input_ids"`` (BERT): (B, T) int32 token ids, right-padded with the pad
  id;
* ``"attention_mask"``: (B, T) int32, 1 on real tokens;
* ``"segment_ids"``: (B, T) int32, BERT only (0 for sentence A, 1 for sentence B, 0 on padding);
* ``"labels"``: (B,) int32 (-1 for unlabelled test rows);
* ``"valid"``: (B,) float32, 1 for real examples and 0 for the dummy rows that fill the last batch.

Dummy rows are copies of the batch's first example (so no model sees an all-padding row and produces NaN);
metrics must weight every example by ``valid``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from qslm_jax.data.glue import TextClassificationSplit
from qslm_jax.data.tokenizer import TextTokenizer
from qslm_jax.errors import ConfigError

Batch = dict[str, np.ndarray]


@dataclass(frozen=True, eq=False)
class ClassificationDataset:
    """Encoded examples: ``inputs[field]`` of shape (N, T) and ``labels`` (N,)."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray
    num_labels: int
    description: str  # task, split, source, tokenizer and length: for reports

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, batch_size: int) -> int:
        """Number of batches of :meth:`batches` (the last one may be partly dummy)."""
        return -(-len(self) // _positive(batch_size, "batch_size"))

    def take(self, rows: np.ndarray, valid: np.ndarray | None = None) -> Batch:
        """The batch made of example indices ``rows`` (``valid`` defaults to all ones)."""
        batch = {name: array[rows] for name, array in self.inputs.items()}
        batch["labels"] = self.labels[rows]
        batch["valid"] = np.ones(len(rows), np.float32) if valid is None else valid.astype(np.float32)
        return batch

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """All examples in order, ``batch_size`` at a time; the last batch is filled with ``valid = 0``
        rows."""
        for start in range(0, len(self), _positive(batch_size, "batch_size")):
            rows = np.arange(start, min(start + batch_size, len(self)))
            fill = batch_size - len(rows)
            valid = np.concatenate([np.ones(len(rows)), np.zeros(fill)])
            yield self.take(np.concatenate([rows, np.full(fill, rows[0])]), valid)

    def training_batches(self, batch_size: int, seed: int = 0) -> Callable[[int], Batch]:
        """``batch_at(step)``: shuffled epochs (a fresh permutation per epoch from ``seed``), a pure function
        of ``step`` as :func:`qslm_jax.training.train` expects; an epoch's last partial batch is dropped."""
        per_epoch = len(self) // _positive(batch_size, "batch_size")
        if per_epoch == 0:
            raise ConfigError(f"batch_size {batch_size} is larger than the dataset ({len(self)} examples)")

        def batch_at(step: int) -> Batch:
            epoch, index = divmod(step, per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(len(self))
            return self.take(order[index * batch_size:(index + 1) * batch_size])

        return batch_at


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, found {value}")
    return value


def encode_classification(split: TextClassificationSplit, tokenizer: TextTokenizer, *,
                          max_length: int | None = None) -> ClassificationDataset:
    """Tokenize a split to fixed length (``max_length``, default the tokenizer's: 128) for batching."""
    length = max_length or tokenizer.default_max_length
    inputs = tokenizer.encode_fixed(split.first, split.second, max_length=length)
    description = (f"GLUE {split.task.name} {split.split} ({len(split)} examples, {split.source}), "
                   f"{tokenizer.name} tokens, fixed length {length}")
    return ClassificationDataset(inputs, split.labels, split.task.num_labels, description)
