"""`python -m experiments.finetune`: trains, saves, reports; a killed run resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import finetune
from qslm_jax.finetune.finetuning import VECTOR_EXTENSIONS, cpu_info
from qslm_jax.model_io import load_model
from tests.conftest import REPO_ROOT

ARGS = ["--model", "spikegpt-micro", "--task", "sst2", "--batch-size", "8", "--eval-limit", "24",
        "--checkpoint-every", "4", "--no-progress"]


def _finetune(argv):
    assert finetune.main(argv) == 0
    out = argv[argv.index("--out") + 1]
    return json.loads((Path(out) / "metrics.json").read_text())


def _params(directory):
    return jax.tree.leaves(nnx.state(load_model(directory / "model")))


def test_finetune_trains_saves_and_reports(tmp_path, data_dir):
    metrics = _finetune([*ARGS, "--steps", "6", "--out", str(tmp_path)])
    assert 0.0 <= metrics["metric"] <= 100.0 and metrics["steps_done"] == 6
    assert metrics["machine"]["cpu_cores"] >= 1 and "cpu_model" in metrics["machine"]
    assert metrics["machine"]["vector_extension"] in (*VECTOR_EXTENSIONS, None)
    assert (tmp_path / "curve.png").is_file()
    assert load_model(tmp_path / "model").config.n_classes == 2


def test_wikitext_finetune_reports_ngram_baselines(tmp_path, data_dir):
    metrics = _finetune(["--model", "spikegpt-micro", "--task", "wikitext2", "--steps", "3", "--batch-size",
                             "4", "--eval-limit", "200", "--no-progress", "--out", str(tmp_path)])
    assert metrics["baselines"]["bigram"] < metrics["baselines"]["unigram"]
    assert metrics["metric"] > 1.0
    # the full split (both halves) is scored too: more windows than the report half, its own protocol
    full = metrics["full_split"]
    assert full["metric"] > 1.0 and full["metric"] != metrics["metric"]
    assert "half" not in full["protocol"] and "half" in metrics["protocol"]
    # the embedded recipe trains on WikiText-2 valid followed by the public GLUE sentences
    assert metrics["recipe"]["lm_train_text"] == "wikitext2-valid+glue" and "GLUE" in metrics["recipe"]["train_data"]
    assert "GLUE sentences" in metrics["baselines"]["note"]
    assert int(metrics["baselines"]["note"].split("(")[1].split()[0]) > 800_000  # tokens the n-grams counted


def test_wikitext_trains_on_wikitext_valid_alone_when_asked(tmp_path, data_dir, capsys):
    metrics = _finetune(["--model", "spikegpt-micro", "--task", "wikitext2", "--lm-train-text",
                         "wikitext2-valid", "--steps", "2", "--batch-size", "2", "--eval-limit", "100",
                         "--no-progress", "--out", str(tmp_path / "valid")])
    assert metrics["recipe"]["train_data"] == "WikiText-2 raw valid"
    assert "GLUE" not in metrics["baselines"]["note"]
    assert int(metrics["baselines"]["note"].split("(")[1].split()[0]) < 300_000  # wiki.valid.raw: 217k tokens
    assert finetune.main([*ARGS, "--lm-train-text", "wikitext2-valid+glue", "--out", str(tmp_path / "c")]) == 1
    assert "--lm-train-text is for language modelling" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, data_dir):
    steps = ["--steps", "24"]
    _finetune([*ARGS, *steps, "--out", str(tmp_path / "straight")])

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

    resumed = _finetune([*ARGS, *steps, "--out", str(killed)])
    assert resumed["resumed_from_step"] >= 8
    for a, b in zip(_params(tmp_path / "straight"), _params(killed), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "-1"], "learning_rate=-1.0"),
    (["--steps", "-3"], "steps=-3"),
    (["--batch-size", "0"], "--batch-size to be an integer >= 1, found 0"),
    (["--eval-limit", "0"], "--eval-limit to be an integer >= 1, found 0"),
])
def test_bad_training_flags_are_refused_before_any_work(tmp_path, capsys, flags, message):
    started = time.perf_counter()
    assert finetune.main([*ARGS, *flags, "--out", str(tmp_path)]) == 1
    assert time.perf_counter() - started < 10
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_nan_learning_rate_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune.main([*ARGS, "--lr", "nan", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "finite" in capsys.readouterr().err


def test_a_model_without_the_task_head_needs_new_head(tmp_path, capsys, data_dir):
    from qslm_jax.model_io import save_model
    from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig

    lm = save_model(SpikeGPT(SpikeGPTConfig.preset("spikegpt-micro"), rngs=nnx.Rngs(0)), tmp_path / "lm")
    base = ["--model", str(lm), "--task", "sst2", "--batch-size", "4", "--eval-limit", "8", "--steps", "2",
            "--no-progress"]
    assert finetune.main([*base, "--out", str(tmp_path / "refused")]) == 1
    assert "--new-head" in capsys.readouterr().err
    assert _finetune([*base, "--new-head", "--out", str(tmp_path / "ok")])["steps_done"] == 2


def test_a_model_with_a_smaller_vocabulary_than_the_data_is_refused(tmp_path, capsys, data_dir):
    import dataclasses

    from qslm_jax.model_io import save_model
    from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
    config = dataclasses.replace(SpikeGPTConfig.preset("spikegpt-micro", n_classes=2), vocab_size=100)
    small = save_model(SpikeGPT(config, rngs=nnx.Rngs(0)), tmp_path / "v100")
    assert finetune.main(["--model", str(small), "--task", "sst2", "--batch-size", "4", "--eval-limit", "8",
                          "--steps", "2", "--no-progress", "--out", str(tmp_path / "out")]) == 1
    assert "vocabulary has 100 entries" in capsys.readouterr().err


def test_a_pretrained_checkpoint_gets_spikegpts_fine_tuning_recipe_and_flags_override_it():
    from experiments.finetune import _recipe_from, build_parser
    from qslm_jax.tasks.task import get_task

    def recipe(*argv):
        return _recipe_from(build_parser().parse_args(list(argv)), get_task("wikitext2"))

    scratch = recipe("--model", "spikegpt216m", "--task", "wikitext2")
    assert scratch.train.learning_rate == 2e-3  # random weights: the embedded default's recipe
    pretrained = recipe("--model", "spikegpt216m", "--checkpoint", "SpikeGPT-216M.pth", "--task", "wikitext2")
    assert (pretrained.train.learning_rate, pretrained.batch_size, pretrained.train.warmup_steps) == (3e-6, 12, 0)
    assert recipe("--model", "SpikeGPT-216M.pth").train.learning_rate == 3e-6  # a reference file is pretrained
    flags = recipe("--model", "x.pth", "--lr", "1e-5", "--steps", "7", "--batch-size", "4", "--warmup", "2")
    assert (flags.train.learning_rate, flags.train.steps, flags.batch_size, flags.train.warmup_steps) == \
        (1e-5, 7, 4, 2)


def test_a_saved_spikingbert_gets_its_familys_recipe_not_spikegpts(tmp_path):
    """The recipe follows the family a saved directory's model.json names (read before any weight)."""
    from experiments.finetune import _recipe_from, build_parser
    from qslm_jax.finetune.finetuning import RECIPES
    from qslm_jax.model_io import save_model
    from qslm_jax.models.loading import source_family
    from qslm_jax.models.registry import SPIKINGBERT
    from qslm_jax.tasks.task import get_task

    save_model(SPIKINGBERT.build(SPIKINGBERT.config("spikingbert-micro", n_classes=2), seed=0), tmp_path / "sb")
    assert source_family(str(tmp_path / "sb")) is SPIKINGBERT
    assert source_family("spikegpt-small", str(tmp_path / "sb")) is SPIKINGBERT  # the weights decide
    recipe = _recipe_from(build_parser().parse_args(["--model", str(tmp_path / "sb"), "--task", "mrpc"]),
                          get_task("mrpc"))
    assert recipe.train == RECIPES["spikingbert"]["mrpc"].train  # no pretrained SpikingBERT recipe: its own


def test_cpu_info_reads_the_first_processor_and_tolerates_no_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
                       "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    model, flags = cpu_info(cpuinfo)
    assert model == "Example CPU 9000" and {"avx2", "fma"} <= flags and "avx512f" not in flags
    assert cpu_info(tmp_path / "absent") == (None, set())
