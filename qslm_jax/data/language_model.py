"""Language-model batches: strided perplexity windows (qslm.md section 4) and random training windows.

Perplexity protocol (spikegpt.md "Downstream tasks"): for a token stream ``x_0 .. x_{N-1}`` the N-1 tokens
``x_1 .. x_{N-1}`` are each predicted exactly once. Window k starts at ``b = k * stride`` and feeds
``x[b : b + ctx_len]``; its targets are ``x[b + 1 : b + ctx_len + 1]``; ``score_mask`` is 1 only on targets no
earlier window scored (the first window scores all of its targets, later ones the last ``stride``), so every
scored prediction after the first window has at least ``ctx_len - stride`` tokens of context.
``PPL = exp(sum(score_mask * NLL) / sum(score_mask))`` (the QSLM paper's Eq. 2).
The last window is right-padded (pad id, mask 0); padding is only ever to the right of scored positions, which
a causal model never looks at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qslm_jax.data.tokenizer import TextTokenizer
from qslm_jax.data.wikitext import JOINS, join_rows, load_wikitext_rows
from qslm_jax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]


@dataclass(frozen=True, eq=False)
class PerplexityWindows:
    """All evaluation windows: ``idx``, ``targets`` (W, ctx_len) int32 and ``score_mask`` (W, ctx_len)
    float32."""

    idx: np.ndarray
    targets: np.ndarray
    score_mask: np.ndarray
    num_tokens: int
    ctx_len: int
    stride: int
    pad_id: int
    protocol: str  # one sentence stating text, tokenizer and window rule: print it in every report

    @property
    def scored_tokens(self) -> int:
        """Number of scored predictions: always ``num_tokens - 1``."""
        return int(self.score_mask.sum())

    def num_batches(self, batch_size: int) -> int:
        """Number of batches :meth:`batches` yields."""
        return -(-len(self.idx) // batch_size)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """``{"idx", "targets", "score_mask"}`` of ``batch_size`` windows; the last batch is filled with
        all-padding windows whose ``score_mask`` is 0. Fewer windows than ``batch_size`` make one batch of
        just those (no forward pass over padding)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, found {batch_size}")
        batch_size = min(batch_size, len(self.idx))
        arrays = {"idx": (self.idx, self.pad_id), "targets": (self.targets, self.pad_id),
                  "score_mask": (self.score_mask, 0)}
        for start in range(0, len(self.idx), batch_size):
            fill = max(start + batch_size - len(self.idx), 0)
            yield {name: np.concatenate([a[start:start + batch_size],
                                         np.full((fill, self.ctx_len), value, a.dtype)])
                   for name, (a, value) in arrays.items()}


def strided_windows(tokens: np.ndarray, ctx_len: int, *, stride: int | None = None, pad_id: int = 1,
                    text_description: str = "token stream") -> PerplexityWindows:
    """Cut ``tokens`` into the strided perplexity windows described in the module docstring.

    ``stride`` defaults to ``ctx_len // 2``; ``text_description`` opens the protocol string.
    """
    tokens = np.asarray(tokens, np.int32)
    stride = ctx_len // 2 if stride is None else stride
    if not 1 <= stride <= ctx_len:
        raise ConfigError(f"stride must be in 1..ctx_len={ctx_len}, found {stride}")
    n = len(tokens)
    if n < 2:
        raise DataError(f"perplexity needs at least 2 tokens, found {n}")
    padded = np.concatenate([tokens, np.full(ctx_len + 1, pad_id, np.int32)])
    positions = np.arange(ctx_len)
    idx, targets, masks = [], [], []
    scored_until, begin = 0, 0  # targets x_1 .. x_{scored_until} are already scored
    while scored_until < n - 1:
        target_pos = begin + 1 + positions
        masks.append(((target_pos > scored_until) & (target_pos <= n - 1)).astype(np.float32))
        idx.append(padded[begin:begin + ctx_len])
        targets.append(padded[begin + 1:begin + ctx_len + 1])
        scored_until = min(begin + ctx_len, n - 1)
        begin += stride
    protocol = (f"{text_description}: {n} tokens; windows of ctx_len {ctx_len} advanced by stride {stride} "
                f"({len(idx)} windows), each scoring only targets no earlier window scored (the first scores "
                f"all), "
                f"{n - 1} predicted tokens; PPL = exp(mean NLL over them)")
    return PerplexityWindows(np.stack(idx), np.stack(targets), np.stack(masks), n, ctx_len, stride, pad_id,
                             protocol)


def wikitext_windows(split: str, tokenizer: TextTokenizer, ctx_len: int, *, stride: int | None = None,
                     join: str = "hf", data_dir: str | Path | None = None) -> PerplexityWindows:
    """WikiText-2 raw ``split`` tokenized as one text (``join``: see :mod:`qslm_jax.data.wikitext`) and cut
    into strided perplexity windows; the protocol string names the split, source, join and tokenizer."""
    rows, source = load_wikitext_rows(split, data_dir=data_dir)
    text = join_rows(rows, join)
    description = f"WikiText-2 raw {split} ({source}), text = {JOINS[join]}, {tokenizer.name} tokenizer"
    return strided_windows(tokenizer.encode(text), ctx_len, stride=stride, pad_id=tokenizer.pad_id,
                           text_description=description)


def lm_training_batches(tokens: np.ndarray, ctx_len: int, batch_size: int, seed: int = 0
                        ) -> Callable[[int], Batch]:
    """``batch_at(step)`` for LM training: ``batch_size`` random contiguous windows ``idx = x[s : s +
    ctx_len]``, ``targets = x[s + 1 : s + ctx_len + 1]``, starts ``s`` uniform, drawn from ``(seed, step)`` (a
    pure function of the step, as :func:`qslm_jax.training.train` expects)."""
    tokens = np.asarray(tokens, np.int32)
    if len(tokens) < ctx_len + 1:
        raise DataError(f"LM training needs at least ctx_len + 1 = {ctx_len + 1} tokens, found {len(tokens)}")
    offsets = np.arange(ctx_len)

    def batch_at(step: int) -> Batch:
        starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - ctx_len, size=batch_size)
        rows = starts[:, None] + offsets
        return {"idx": tokens[rows], "targets": tokens[rows + 1]}

    return batch_at
