"""Data: GLUE (SST-2, MRPC, QNLI) and WikiText-2 loaders, the two tokenizers, fixed-shape batches.

Every loader reads the local data directory given by ``data_dir=`` or ``$QSLM_DATA_DIR`` (layout of
shared/data) and otherwise the Hugging Face hub; missing data raises one :class:`~qslm_jax.errors.DataError`
naming both ways to provide it.
"""

from qslm_jax.data.classification import ClassificationDataset, encode_classification
from qslm_jax.data.glue import GLUE_TASKS, GlueTask, TextClassificationSplit, load_glue
from qslm_jax.data.language_model import (
    PerplexityWindows,
    lm_training_batches,
    strided_windows,
    wikitext_windows,
)
from qslm_jax.data.sources import DATA_DIR_ENV, resolve_data_dir
from qslm_jax.data.tokenizer import TextTokenizer, bert_tokenizer, gpt_neox_tokenizer
from qslm_jax.data.wikitext import join_rows, load_wikitext_rows

__all__ = [
    "DATA_DIR_ENV",
    "GLUE_TASKS",
    "ClassificationDataset",
    "GlueTask",
    "PerplexityWindows",
    "TextClassificationSplit",
    "TextTokenizer",
    "bert_tokenizer",
    "encode_classification",
    "gpt_neox_tokenizer",
    "join_rows",
    "lm_training_batches",
    "load_glue",
    "load_wikitext_rows",
    "resolve_data_dir",
    "strided_windows",
    "wikitext_windows",
]
