"""Supplementary language-model training text: the public sentences of the local GLUE files.

WikiText-2 train is not available here (``shared/data/PROVENANCE.md``), so the WikiText-2 default can also learn
from the other English text on disk: the questions and Wikipedia sentences of QNLI (validation and test) and the
news sentences of MRPC (train, validation and test). Labels are never read. Each distinct text is kept once, and
any that shares a run of :data:`OVERLAP_WORDS` lower-cased words with the evaluation text is dropped, so no
WikiText-2 test passage reaches training (5 QNLI sentences match on 2026-12-02 data: Doctor Who, the Rhine, ...).
"""

from __future__ import annotations

import re
from pathlib import Path

from qslm_jax.data.glue import load_glue

OVERLAP_WORDS = 8
SOURCES = (("qnli", "validation"), ("qnli", "test"), ("mrpc", "train"), ("mrpc", "validation"), ("mrpc", "test"))


def word_ngrams(text: str, n: int = OVERLAP_WORDS) -> set[tuple[str, ...]]:
    """The set of runs of ``n`` consecutive lower-cased ``\\w+`` words of ``text``."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def glue_sentences(exclude_text: str, *, data_dir: str | Path | None = None) -> tuple[list[str], str]:
    """The distinct GLUE texts of :data:`SOURCES` (both sides of every pair, sorted) that share no
    :data:`OVERLAP_WORDS`-word run with ``exclude_text``, and a sentence saying what they are."""
    banned = word_ngrams(exclude_text)
    texts: set[str] = set()
    for task, split in SOURCES:
        rows = load_glue(task, split, data_dir=data_dir)
        texts.update(t.strip() for t in rows.first + (rows.second or ()))
    kept = sorted(t for t in texts if t and not word_ngrams(t) & banned)
    dropped = len([t for t in texts if t]) - len(kept)
    names = ", ".join(f"{task} {split}" for task, split in SOURCES)
    return kept, (f"the {len(kept)} distinct texts of GLUE {names} (labels unused; {dropped} sharing an "
                  f"{OVERLAP_WORDS}-word run with the evaluation text left out)")
