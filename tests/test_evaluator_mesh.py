"""The evaluator's 2-D mesh (candidates x model): parameters sharded over the model axis, same metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flax import nnx

from qslm_jax.errors import ConfigError
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.qslm.evaluator import Evaluator
from qslm_jax.qslm.metrics import Perplexity

REPO = Path(__file__).resolve().parent.parent

TWO_D = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from qslm_jax.data import strided_windows
    from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
    from qslm_jax.qslm.evaluator import Evaluator
    from qslm_jax.qslm.metrics import Perplexity
    from qslm_jax.quant.plan import QuantPlan
    assert jax.device_count() == 4, jax.devices()
    model = SpikeGPT(SpikeGPTConfig.preset("spikegpt-tiny"), rngs=nnx.Rngs(0))
    batches = list(strided_windows(np.random.default_rng(0).integers(2, 100, 150), 16, stride=8).batches(4))
    plans = [QuantPlan(q) for q in (32, 16, 8, 6, 4, 3, 2, 1.58, 1)] + [QuantPlan(8, {"attention_0": 2})]
    flat = Evaluator(model, Perplexity(), chunk_size=4)
    grid = Evaluator(model, Perplexity(), chunk_size=4, model_axis_size=2)
    assert (flat.candidate_devices, grid.candidate_devices) == (4, 2)
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(grid._params)}
    assert any("model" in s for s in specs), specs  # the weights are split over the model axis
    shard = max(leaf.addressable_shards[0].data.size / leaf.size for leaf in jax.tree.leaves(grid._params)
                if "model" in str(leaf.sharding.spec))
    assert shard == 0.5, shard
    a, b = flat(plans, batches), grid(plans, batches)
    np.testing.assert_allclose(b, a, rtol=1e-5)
    print("SAME", len(plans), max(abs(x / y - 1) for x, y in zip(a, b)))
""")


def test_a_2d_mesh_shards_the_parameters_and_gives_the_1d_metrics():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", TWO_D], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SAME 10" in proc.stdout


def test_a_model_axis_that_does_not_divide_the_devices_is_refused():
    model = SpikeGPT(SpikeGPTConfig.preset("spikegpt-tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="model_axis_size"):
        Evaluator(model, Perplexity(), model_axis_size=3)  # 3 divides neither 1, 2 nor 4 devices
    with pytest.raises(ConfigError, match="model_axis_size"):
        Evaluator(model, Perplexity(), model_axis_size=0)
