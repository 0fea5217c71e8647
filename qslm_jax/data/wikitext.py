"""WikiText-2 raw (``wikitext-2-raw-v1``) validation/test text, from the HF hub or the local ``.raw`` files.

The two sources hold the same rows: the local ``wiki.{valid,test}.raw`` is the HF split written one row per
line, an empty HF row as a line holding one space (shared/data/PROVENANCE.md), so the rows are rebuilt exactly
from either. Two ways of turning rows into one text (:data:`JOINS`, always stated in the protocol string):

* ``"hf"`` (default): the rows joined with "\\n\\n", as the Hugging Face perplexity guide does;
* ``"raw"``: the original ``.raw`` file as one string (= every row, an empty one written as " \\n").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qslm_jax.data.sources import from_hub, local_file, resolve_data_dir
from qslm_jax.errors import ConfigError, DataError

LOCAL_FILES = {"validation": "wikitext-2-raw/wiki.valid.raw", "test": "wikitext-2-raw/wiki.test.raw"}
JOINS = {"hf": "HF rows joined with '\\n\\n'", "raw": "the raw file read as one string"}
HUB_NAME = "wikitext/wikitext-2-raw-v1"


def load_wikitext_rows(split: str, *, data_dir: str | Path | None = None) -> tuple[list[str], str]:
    """The HF rows of ``split`` ("validation" or "test") and their source ("local:<path>" or "hub:...")."""
    if split not in LOCAL_FILES:
        raise DataError(f"WikiText-2 split {split!r} is not available here: expected one of "
                        f"{sorted(LOCAL_FILES)} (the train split is not in shared/data; see PROVENANCE.md)")
    relative, what = LOCAL_FILES[split], f"WikiText-2 raw {split}"
    root = resolve_data_dir(data_dir)
    if root is not None:
        path = local_file(root, relative, what, HUB_NAME)
        return rows_from_raw(path.read_text(encoding="utf-8")), f"local:{path}"
    return from_hub(lambda: _hub_rows(split), what, relative, HUB_NAME), f"hub:{HUB_NAME}"


def _hub_rows(split: str) -> list[str]:
    import datasets

    return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def rows_from_raw(text: str) -> list[str]:
    """Invert the ``.raw`` layout: each line is a row (its "\\n" restored), a line of one space an empty
    row."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return ["" if line == " " else line + "\n" for line in lines]


def join_rows(rows: Sequence[str], join: str = "hf") -> str:
    """The evaluation text: ``"hf"`` = rows joined with "\\n\\n"; ``"raw"`` = the ``.raw`` file's string."""
    if join == "hf":
        return "\n\n".join(rows)
    if join == "raw":
        return "".join(row or " \n" for row in rows)
    raise ConfigError(f"unknown join {join!r}: expected one of {sorted(JOINS)}")
