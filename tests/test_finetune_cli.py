"""`python -m experiments.finetune`: trains, saves, reports; a killed run resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import finetune
from qslm_jax.model_io import load_model
from tests.conftest import REPO_ROOT

ARGS = ["--model", "spikegpt-micro", "--task", "sst2", "--batch-size", "8", "--eval-limit", "24",
        "--checkpoint-every", "4", "--no-progress"]


def _params(directory):
    return jax.tree.leaves(nnx.state(load_model(directory / "model")))


def test_finetune_trains_saves_and_reports(tmp_path, data_dir):
    metrics = finetune.main([*ARGS, "--steps", "6", "--out", str(tmp_path)])
    assert 0.0 <= metrics["metric"] <= 100.0 and metrics["steps_done"] == 6
    assert json.loads((tmp_path / "metrics.json").read_text())["metric"] == metrics["metric"]
    assert (tmp_path / "curve.png").is_file()
    assert load_model(tmp_path / "model").config.n_classes == 2


def test_wikitext_finetune_reports_ngram_baselines(tmp_path, data_dir):
    metrics = finetune.main(["--model", "spikegpt-micro", "--task", "wikitext2", "--steps", "3", "--batch-size",
                             "4", "--eval-limit", "200", "--no-progress", "--out", str(tmp_path)])
    assert metrics["baselines"]["bigram"] < metrics["baselines"]["unigram"]
    assert metrics["metric"] > 1.0


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, data_dir):
    steps = ["--steps", "24"]
    finetune.main([*ARGS, *steps, "--out", str(tmp_path / "straight")])

    killed = tmp_path / "killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.finetune", *ARGS, *steps, "--out", str(killed)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not any(p.name.isdigit() and int(p.name) >= 8 for p in (killed / "train").glob("*")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()

    resumed = finetune.main([*ARGS, *steps, "--out", str(killed)])
    assert resumed["resumed_from_step"] >= 8
    for a, b in zip(_params(tmp_path / "straight"), _params(killed), strict=True):
        np.testing.assert_array_equal(a, b)
