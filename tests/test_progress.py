"""Progress bars of the search and of long batched calls: every bar has a total (so an ETA), and ends at it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
from flax import nnx
from tqdm.auto import tqdm

from qslm_jax.data import strided_windows
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.qslm import progress
from qslm_jax.qslm.evaluator import Evaluator
from qslm_jax.qslm.metrics import Perplexity
from qslm_jax.qslm.search import sensitivity_plans, sensitivity_table, tiered_search
from tests.conftest import REPO_ROOT
from tests.test_search import DAMAGE, LEVELS, DamageModel, small_hierarchy


class RecordedBar(tqdm):
    """A bar that renders into a string (even when stderr is not a terminal) and is remembered."""

    made: ClassVar[list[RecordedBar]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "file": io.StringIO(), "disable": False, "mininterval": 0})
        RecordedBar.made.append(self)


@pytest.fixture
def bars(monkeypatch):
    RecordedBar.made = []
    monkeypatch.setattr(progress, "tqdm", RecordedBar)
    return RecordedBar.made


def test_tiered_search_shows_units_per_phase_and_candidates_per_unit(bars):
    hierarchy = small_hierarchy()
    model = DamageModel(hierarchy, DAMAGE)
    order = ("output", "attention_1", "input", "attention_0")
    shown = progress.SearchProgress(hierarchy, LEVELS, order=order)
    result = tiered_search(hierarchy, model, levels=LEVELS, const_a=2.0, const_m=1.0, higher_is_better=True,
                           order=order, on_evaluated=shown)
    shown.close()

    phases = {b.desc: b for b in bars if b.desc.startswith("tiered ")}
    assert {name: (b.total, b.n) for name, b in phases.items()} == {
        "tiered global": (1, 1), "tiered block": (4, 4), "tiered module": (4, 4)}
    units = [b for b in bars if not b.desc.startswith("tiered ")]
    reached = [c for c in result.candidates if c.phase != "baseline"]
    assert [b.desc for b in units] == list(dict.fromkeys(c.unit for c in reached))
    for bar in units:
        assert bar.total == sum(1 for q in LEVELS if q <= max(c.level for c in reached if c.unit == bar.desc))
        assert 1 <= bar.n <= bar.total
    assert sum(b.n for b in units) == len(reached)  # every evaluated candidate counted once
    for bar in bars:
        assert bar.total is not None and "<" in str(bar)  # rendered with a remaining time


def test_a_batched_call_shows_its_plans_chunk_by_chunk(bars):
    config = SpikeGPTConfig.preset("spikegpt-tiny")
    model = SpikeGPT(config, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(2, config.vocab_size, 60)
    batches = list(strided_windows(tokens, 16, stride=8).batches(4))
    evaluator = Evaluator(model, Perplexity(), chunk_size=3)
    done: list[int] = []

    def evaluate(plans, on_chunk):
        return evaluator(plans, batches, on_chunk=lambda n: (done.append(n), on_chunk(n)))

    levels = (8, 4, 2, 1)  # 4 blocks x 4 levels = 16 plans, in chunks of at most 3
    table = sensitivity_table(evaluator.hierarchy, progress.with_progress(evaluate, "sensitivity"), levels)
    n = len(sensitivity_plans(evaluator.hierarchy, levels))
    assert len(table) * len(levels) == n and n % 3  # the last chunk is padded or smaller
    assert len(done) == len(evaluator.split(n)) and all(1 <= k <= 3 for k in done) and sum(done) == n
    (bar,) = bars
    assert bar.desc == "sensitivity" and bar.total == bar.n == n and "<" in str(bar)


_NOISY_BAR = """
import warnings
from absl import logging as absl_logging
from tqdm import tqdm
from experiments.common import configure_logging
configure_logging()
with tqdm(total=2, mininterval=0) as bar:
    bar.update(1)
    warnings.warn("noisy third-party warning")
    absl_logging.warning("Waiting for previous save to complete took 0.1 seconds")
    bar.update(1)
"""


def test_third_party_warnings_stay_out_of_the_bar():
    """With the entry points' logging, a Python warning is written above the bar on lines of its own (the bar
    is redrawn below it) and orbax/absl's routine warnings are not shown."""
    done = subprocess.run([sys.executable, "-c", _NOISY_BAR], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    assert "previous save" not in done.stderr
    lines = done.stderr.replace("\r", "\n").splitlines()
    assert any(line.endswith("UserWarning: noisy third-party warning") for line in lines)
    assert not any("noisy" in line and "|" in line for line in lines)  # never on the bar's line
    assert lines[-1].lstrip().startswith("100%")  # the bar redrawn after it, finished
