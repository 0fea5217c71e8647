"""Training-step memory vs T (qslm_jax.equilibrium.memory): implicit differentiation stays flat, BPTT
grows; the BPTT simulation is the IF network of SpikingBERT with surrogate gradients."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.spikingbert import load_spikingbert
from experiments.extreme_kd_memory import run
from qslm_jax.equilibrium.memory import StepMemory, bptt_forward, compiled_memory, format_memory_table
from qslm_jax.models.spikingbert import SpikingBERT, SpikingBERTConfig, is_encoder_kernel


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """The memory CLI on a tiny one-block model at T = 8 and 32."""
    out = tmp_path_factory.mktemp("memory")
    result = run(["--T", "8", "32", "--hidden", "32", "--heads", "4", "--blocks", "1", "--vocab", "100",
                   "--batch-size", "2", "--max-length", "8", "--out", str(out)])
    return out, {(r["T"], r["method"]): r for r in result["rows"]}


def test_implicit_memory_is_flat_in_T_and_bptt_grows(table):
    _, rows = table
    implicit = [rows[T, "implicit"]["temp_bytes"] for T in (8, 32)]
    bptt = [rows[T, "bptt"]["temp_bytes"] for T in (8, 32)]
    assert rows[32, "bptt"]["temp_bytes"] > rows[32, "implicit"]["temp_bytes"]
    assert max(implicit) <= 1.05 * min(implicit)
    assert bptt[1] > 2.5 * bptt[0]  # ~linear in T: 4x the steps
    assert rows[32, "bptt"]["peak_bytes"] > rows[32, "implicit"]["peak_bytes"]


def test_memory_cli_writes_json_and_plot(table):
    out, rows = table
    saved = json.loads((out / "memory.json").read_text())
    assert len(saved["rows"]) == 4 and (out / "memory_vs_T.png").stat().st_size > 0
    lines = format_memory_table(list(rows.values())).splitlines()
    assert len(lines) == 2 + 2 and "bptt / implicit peak" in lines[0] and lines[3].startswith("| 32 |")


def test_compiled_memory_reads_xla_analysis():
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    mem = compiled_memory(lambda a: jnp.sum(jnp.sin(a) @ a), x)
    assert isinstance(mem, StepMemory) and mem.argument_bytes == 256 * 256 * 4 and mem.output_bytes == 4
    assert mem.peak_bytes == mem.argument_bytes + mem.output_bytes + mem.temp_bytes - mem.alias_bytes


def test_bptt_simulation_reproduces_the_if_network(fixtures_dir):
    """The surrogate-gradient simulation's forward values equal SpikingBERT.simulate on the fixture."""
    folder = fixtures_dir / "spikingbert_H32_T16"
    io = dict(np.load(folder / "io.npz"))
    model = load_spikingbert(folder / "pytorch_model.bin", T=16)
    batch = {k: jnp.asarray(io[k]) for k in ("input_ids", "segment_ids", "attention_mask")}
    with jax.default_matmul_precision("highest"):
        bptt = bptt_forward(model, batch)
        ref = model.simulate(batch["input_ids"], batch["segment_ids"], batch["attention_mask"])
    for got, want in zip(bptt.taps, ref.taps, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(ref.taps[-1]), io["asr_24"])
    np.testing.assert_allclose(bptt.logits, io["eval_logits"], rtol=1e-5, atol=1e-5)
    for got, summed in zip(bptt.attention_scores, ref.attention_scores, strict=True):
        np.testing.assert_allclose(got * 16, summed, rtol=1e-5, atol=1e-3)


def test_bptt_gradients_flow_through_time():
    config = SpikingBERTConfig.preset("tiny", num_blocks=1, T=4)
    model = SpikingBERT(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.arange(1, 9)[None]
    batch = {"input_ids": ids, "segment_ids": jnp.zeros_like(ids), "attention_mask": jnp.ones_like(ids)}
    loss = jax.jit(jax.grad(lambda p: jnp.sum(bptt_forward(nnx.merge(graphdef, p), batch).logits ** 2)))
    kernels = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(loss(params))
               if is_encoder_kernel(p)}
    assert len(kernels) == 6 and all(np.all(np.isfinite(g)) for g in kernels.values())
    assert sum(np.any(g != 0) for g in kernels.values()) >= 5  # the surrogate reaches (almost) every layer
    # with feedback the previous step's last-layer spikes enter the embedding neuron: BPTT reaches W_fb too
    fb_graphdef, fb_params = nnx.split(SpikingBERT(dataclasses.replace(config, feedback=True), rngs=nnx.Rngs(0)),
                                       nnx.Param)
    fb_grads = jax.grad(lambda p: jnp.sum(bptt_forward(nnx.merge(fb_graphdef, p), batch).logits ** 2))(fb_params)
    feedback_grad = np.asarray(fb_grads["feedback"]["kernel"].get_value())
    assert np.all(np.isfinite(feedback_grad)) and np.any(feedback_grad != 0)
