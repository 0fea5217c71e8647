"""GLUE text-classification splits (SST-2, MRPC, QNLI) from the HF hub or local ``download_glue_data`` tsv
files.

Hub: ``datasets.load_dataset("glue", <task>, split=...)``. Local layout (``shared/data``):
``glue/sst2/{train,dev}.tsv``, ``glue/mrpc/{train,dev,test}.tsv`` (UTF-8 BOM in the header),
``glue/qnli/{dev,test}.tsv``; every tsv is read with ``csv.QUOTE_NONE`` (MRPC/QNLI texts hold unbalanced
quotes). Splits are named as on the hub: ``train``, ``validation`` (= ``dev.tsv``), ``test``. Unlabelled test
rows carry label -1 (as on the hub).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from qslm_jax.data.sources import from_hub, local_file, resolve_data_dir
from qslm_jax.errors import DataError

UNLABELLED = -1


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is stored on the hub and in the local tsv layout."""

    name: str
    hub_text_columns: tuple[str, ...]  # one column (single sentence) or two (sentence pair)
    local_text_columns: tuple[str, ...]
    local_label_column: str
    label_names: tuple[str, ...]  # index = label id; also maps textual tsv labels ("entailment") to ids
    local_files: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks (MRPC, QNLI)."""
        return len(self.hub_text_columns) == 2

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


GLUE_TASKS: Mapping[str, GlueTask] = MappingProxyType({
    "sst2": GlueTask("sst2", ("sentence",), ("sentence",), "label", ("negative", "positive"),
                     MappingProxyType({"train": "train.tsv", "validation": "dev.tsv"})),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                     ("not_equivalent", "equivalent"),
                     MappingProxyType({"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"})),
    "qnli": GlueTask("qnli", ("question", "sentence"), ("question", "sentence"), "label",
                     ("entailment", "not_entailment"),
                     MappingProxyType({"validation": "dev.tsv", "test": "test.tsv"})),
})


@dataclass(frozen=True)
class TextClassificationSplit:
    """Raw texts and labels of one split: ``first[i]`` (and ``second[i]`` for pair tasks) with
    ``labels[i]``."""

    task: GlueTask
    split: str
    first: tuple[str, ...]
    second: tuple[str, ...] | None
    labels: np.ndarray  # (N,) int32; -1 where the split has no labels
    source: str  # "local:<path>" or "hub:glue/<task>"

    def __len__(self) -> int:
        return len(self.first)


def glue_task(name: str) -> GlueTask:
    """The :class:`GlueTask` called ``name`` (``sst2``, ``mrpc``, ``qnli``)."""
    try:
        return GLUE_TASKS[name]
    except KeyError:
        raise DataError(f"unknown GLUE task {name!r}: expected one of {sorted(GLUE_TASKS)}") from None


def load_glue(task: str, split: str, *, data_dir: str | Path | None = None) -> TextClassificationSplit:
    """Load ``split`` of GLUE ``task`` from the local data directory if one is set, else from the hub."""
    spec = glue_task(task)
    if split not in ("train", "validation", "test"):
        raise DataError(f"unknown split {split!r}: expected 'train', 'validation' or 'test'")
    filename = spec.local_files.get(split, f"{split}.tsv")
    relative = f"glue/{spec.name}/{filename}"
    what, hub_name = f"GLUE {spec.name} {split}", f"glue/{spec.name}"
    root = resolve_data_dir(data_dir)
    if root is not None:
        return _read_tsv(spec, split, local_file(root, relative, what, hub_name))
    return from_hub(lambda: _read_hub(spec, split), what, relative, hub_name)


def _label_id(spec: GlueTask, value: str | None, where: str) -> int:
    if value is None:
        return UNLABELLED
    if value.lstrip("-").isdigit():
        label = int(value)
        if label not in range(spec.num_labels):
            raise DataError(f"{where}: label {label} outside 0..{spec.num_labels - 1}")
        return label
    if value in spec.label_names:
        return spec.label_names.index(value)
    raise DataError(f"{where}: label {value!r} is neither an id nor one of {spec.label_names}")


def _read_tsv(spec: GlueTask, split: str, path: Path) -> TextClassificationSplit:
    columns: list[list[str]] = [[] for _ in spec.local_text_columns]
    labels: list[int] = []
    with path.open(encoding="utf-8-sig", newline="") as handle:  # utf-8-sig drops MRPC's BOM
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in spec.local_text_columns if c not in (reader.fieldnames or ())]
        if missing:
            raise DataError(f"{path}: expected columns {list(spec.local_text_columns)} in the header, "
                            f"found {reader.fieldnames}; is this the download_glue_data tsv of {spec.name}?")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or None in row.values():  # DictReader's marks for extra / missing fields
                raise DataError(f"{where}: expected {len(reader.fieldnames)} tab-separated fields as in the "
                                f"header, found a different count; the file is malformed")
            for out, col in zip(columns, spec.local_text_columns, strict=True):
                out.append(row[col])
            labels.append(_label_id(spec, row.get(spec.local_label_column), where))
    second = tuple(columns[1]) if spec.is_pair else None
    return TextClassificationSplit(spec, split, tuple(columns[0]), second, np.asarray(labels, np.int32),
                                   f"local:{path}")


def _read_hub(spec: GlueTask, split: str) -> TextClassificationSplit:
    import datasets

    rows = datasets.load_dataset("glue", spec.name, split=split)
    texts = [tuple(rows[c]) for c in spec.hub_text_columns]
    return TextClassificationSplit(spec, split, texts[0], texts[1] if spec.is_pair else None,
                                   np.asarray(rows["label"], np.int32), f"hub:glue/{spec.name}")
