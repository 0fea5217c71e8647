"""Timing for the benchmarks: variants run round-robin, so a shared, loaded CPU slows them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of ``fn()`` until its result is ready (``jax.block_until_ready``), and the result."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def interleaved_seconds(variants: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of every call: round ``r`` runs each variant once, in order, for ``r = 1 .. repeats``."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            seconds[name].append(timed(fn)[0])
    return seconds


def summary(seconds: list[float], work: float, unit: str) -> dict:
    """The median of ``seconds``, every time, and ``work / median`` as ``{unit}_per_s``."""
    median = statistics.median(seconds)
    return {"median_s": median, "seconds": seconds, f"{unit}_per_s": work / median}
