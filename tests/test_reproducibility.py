"""Same command, same seed, same machine: bit-identical trained parameters, also while processes compete for
the cores (the README's numbers rest on this)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = """
import hashlib, json, sys
import jax, numpy as np
from flax import nnx
from qslm_jax.finetune.finetuning import RECIPES, Recipe, finetune
from qslm_jax.models.loading import random_model
from qslm_jax.tasks.task import get_task
from qslm_jax.training import TrainConfig
task = get_task("sst2")
recipe = Recipe(TrainConfig(steps=12, learning_rate=2e-3, warmup_steps=2, checkpoint_every=0), 8, 16,
                RECIPES["spikegpt"]["sst2"].train_data)
metrics = finetune(random_model("spikegpt-micro", task), task, recipe, sys.argv[1], eval_limit=16, progress=False)
from qslm_jax.model_io import load_model
leaves = jax.tree.leaves(nnx.state(load_model(sys.argv[1] + "/model")))
digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in leaves)).hexdigest()
print(json.dumps({"params": digest, "metric": metrics["metric"]}))
"""


@pytest.mark.slow
def test_two_concurrent_runs_train_bit_identical_models(tmp_path, data_dir):
    """Two processes run the same fine-tuning at once (each competing with the other for both cores)."""
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / name)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
