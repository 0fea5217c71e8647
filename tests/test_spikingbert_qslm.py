"""QSLM on SpikingBERT: the registry entry's unit tree and op counts, the tiered CLI on GLUE tasks with random
weights, an extreme-KD student whose 1/1.58-bit kernels keep their level, and the embedded default's training."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import inspect, tiered
from qslm_jax.equilibrium.student import quantize_encoder
from qslm_jax.errors import ConfigError
from qslm_jax.finetune.finetuning import Recipe, finetune, initial_model, recipe_for
from qslm_jax.finetune.warm_start import WarmStart, bert_of_shape
from qslm_jax.model_io import load_model, save_model
from qslm_jax.models.loading import STUDENT_BITS, STUDENT_DIR, load_for_task
from qslm_jax.models.registry import SPIKINGBERT, preset_family
from qslm_jax.qslm.pipeline import search_hierarchy
from qslm_jax.qslm.settings import QSLMSettings
from qslm_jax.quant.apply import quantize_model
from qslm_jax.quant.memory import memory_report
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import TERNARY
from qslm_jax.tasks.task import get_task
from qslm_jax.training import TrainConfig

MICRO = "spikingbert-micro"


def test_spikingbert_small_is_the_extreme_kd_student_shape(capsys):
    result = inspect.main(["--model", "spikingbert-small", "--n-classes", "2"])
    assert result["family"] == "spikingbert"
    assert [b["block"] for b in result["blocks"]] == ["embeddings", "encoder_0", "encoder_1", "encoder_2",
                                                     "encoder_3", "head"]
    assert [m["module"] for m in result["blocks"][1]["modules"]] == [
        f"encoder_0/{m}" for m in ("query", "key", "value", "attention_output", "intermediate", "output")]
    config = SPIKINGBERT.config("spikingbert-small")
    assert (config.num_blocks, config.hidden, config.T, config.vocab) == (4, 128, 16, 30522)
    assert "encoder_3" in capsys.readouterr().out


def _student_dir(tmp_path, bits=TERNARY):
    """An experiments.extreme_kd output directory: results.json naming the level, the student saved beside it."""
    model = SPIKINGBERT.build(SPIKINGBERT.config(MICRO, n_classes=2), seed=3)
    save_model(model, tmp_path / STUDENT_DIR)
    (tmp_path / "results.json").write_text(json.dumps({"task": "sst2", "bits": bits}))
    return model


def test_extreme_kd_student_keeps_its_kernels_and_the_search_covers_the_rest(tmp_path):
    student = _student_dir(tmp_path)
    model, description = load_for_task(str(tmp_path), get_task("sst2"))
    assert description[STUDENT_BITS] == TERNARY
    hierarchy = search_hierarchy(model, QSLMSettings(const_a=1.0, const_m_mb=1.0), description)
    assert hierarchy.blocks == ("embeddings", "head")  # every encoder kernel is fixed: the blocks leave the tree
    kernels = [t for t in hierarchy.tensors if t.fixed == TERNARY]
    assert len(kernels) == 2 * 6 and all(t.path[-1] == "kernel" and t.path[0] == "blocks" for t in kernels)
    report = memory_report(hierarchy, QuantPlan(8))
    encoder_vectors = sum(t.numel for t in hierarchy.tensors if t.block == "encoder_0" and t.fixed != TERNARY)
    expected = sum(-(-t.numel // 5) + 8 for t in kernels if t.block == "encoder_0") + 4 * encoder_vectors
    assert report.block_bytes["encoder_0"] == expected  # 5 trits per byte + one scale, under any plan
    # the quantized model the search scores is the student's own BitNet forward
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, 30522)
    mask = np.ones((2, 12), np.int32)
    searched = quantize_model(model, QuantPlan(), hierarchy).simulate(ids, None, mask).logits
    own = quantize_encoder(student, TERNARY).simulate(ids, None, mask).logits
    np.testing.assert_allclose(np.asarray(searched), np.asarray(own), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["qnli", "mrpc"])
def test_tiered_cli_on_a_random_spikingbert(tmp_path, data_dir, task, capsys):
    args = ["--model", MICRO, "--init", "random", "--task", task, "--eval-limit", "8", "--levels", "32,4",
            "--const-a", "100", "--const-m-frac", "0.6", "--chunk-size", "2", "--no-progress", "--data-dir",
            str(data_dir), "--out", str(tmp_path / "run")]
    assert tiered.main(args) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(report["sensitivity"]["table"]) == ["embeddings", "encoder_0", "encoder_1", "head"]
    assert "bert-base-uncased" in report["config"]["protocol"]
    energy = report["energy_estimate"]["baseline"]
    assert energy["spike_driven_layers"] == 2 * 8 and energy["macs_per_token"] == 0  # every Linear reads spikes
    assert len(energy["spike_rates"]) == SPIKINGBERT.config(MICRO).num_neuron_layers
    f1 = report["report_split"].get("f1")
    assert (f1 is not None) == (task == "mrpc")  # GLUE reports F1 for MRPC only
    if f1 is not None:
        assert set(f1) >= {"baseline", "selection"} and all(0.0 <= v <= 100.0 for v in f1.values())


def test_tiered_cli_on_an_extreme_kd_student(tmp_path, data_dir):
    _student_dir(tmp_path / "kd")
    args = ["--model", str(tmp_path / "kd"), "--task", "sst2", "--eval-limit", "8", "--levels", "32,4",
            "--const-a", "100", "--const-m-frac", "0.9", "--chunk-size", "2", "--no-progress", "--data-dir",
            str(data_dir), "--selection-split", "same", "--out", str(tmp_path / "run")]
    assert tiered.main(args) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(report["sensitivity"]["table"]) == ["embeddings", "head"]
    assert report["config"]["model"][STUDENT_BITS] == TERNARY
    assert report["baseline"]["memory_bytes"] < report["fp32_bytes"]  # the ternary kernels, even at "fp32"


def test_embedded_default_recipe_trains_a_spikingbert(tmp_path, data_dir):
    """The embedded default's training path (equilibrium training on the task's loss), two steps."""
    task = get_task("sst2")
    assert preset_family("spikingbert-small").embedded_preset == "spikingbert-small"
    recipe = recipe_for(SPIKINGBERT, task)
    short = Recipe(TrainConfig(steps=2, learning_rate=1e-3, warmup_steps=1, checkpoint_every=0), 8, 8,
                   recipe.train_data)
    model = SPIKINGBERT.build(SPIKINGBERT.config(MICRO, n_classes=2), seed=0)
    before = np.asarray(nnx.state(model, nnx.Param)["classifier"]["kernel"].get_value())
    metrics = finetune(model, task, short, tmp_path, data_dir=data_dir, eval_limit=8, progress=False)
    assert metrics["steps_done"] == 2 and 0.0 <= metrics["metric"] <= 100.0
    assert (tmp_path / "model" / "model.json").is_file()
    from qslm_jax.model_io import load_model

    after = np.asarray(nnx.state(load_model(tmp_path / "model"), nnx.Param)["classifier"]["kernel"].get_value())
    assert not np.allclose(before, after)  # gradients reached the weights through the implicit forward


def test_the_embedded_recipe_warm_starts_from_a_bert_of_the_students_shape(tmp_path, data_dir):
    """The SpikingBERT recipe trains a BERT of the student's shape first (two steps here) and copies its
    embeddings and layers into the spiking blocks; a second call reuses the trained BERT."""
    task = get_task("sst2")
    assert recipe_for(SPIKINGBERT, task).warm_start is not None
    config = SPIKINGBERT.config(MICRO, n_classes=2)
    short = TrainConfig(steps=2, learning_rate=1e-3, warmup_steps=1, checkpoint_every=0)
    recipe = Recipe(short, 8, 64, "SST-2 (test)", warm_start=WarmStart(short, 8))
    model = initial_model(SPIKINGBERT, config, task, recipe, tmp_path, data_dir=data_dir, progress=False)
    assert model.config == config
    bert = load_model(tmp_path / "warm_start" / "model")
    assert json.loads((tmp_path / "warm_start" / "metrics.json").read_text())["steps_done"] == 2
    fresh = bert_of_shape(config)  # the trained BERT moved away from its initialisation ...
    assert not np.allclose(np.asarray(fresh.blocks[0].intermediate.kernel.get_value()),
                           np.asarray(bert.blocks[0].intermediate.kernel.get_value()))
    for got, want in ((model.embeddings, bert.embeddings), (model.blocks[1], bert.blocks[1])):  # ... and was copied
        for a, b in zip(jax.tree.leaves(nnx.state(got, nnx.Param)), jax.tree.leaves(nnx.state(want, nnx.Param)),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = initial_model(SPIKINGBERT, config, task, recipe, tmp_path, data_dir=data_dir, progress=False)
    np.testing.assert_array_equal(np.asarray(again.blocks[0].query.kernel.get_value()),
                                  np.asarray(model.blocks[0].query.kernel.get_value()))
    with pytest.raises(ConfigError, match="initialises a SpikingBERT"):
        initial_model(preset_family("spikegpt-micro"), None, task, recipe, tmp_path)
