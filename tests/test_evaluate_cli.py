"""`python -m experiments.evaluate`: the export alone reproduces the search's metric of its plan exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from experiments import evaluate
from qslm_jax.models.registry import SPIKEGPT
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.qslm.evaluator import evaluate_candidates
from qslm_jax.quant.export import export_quantized
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.tasks.data import load_task_data
from qslm_jax.tasks.metrics import metric_of
from qslm_jax.tasks.task import TASKS, get_task

# mixed levels: a global default, a block override and a module override below it
PLAN = QuantPlan(4, blocks={"attention_0": 3}, modules={"attention_1/att.key": 2})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random spikegpt-micro with an SST-2 classifier, exported under PLAN."""
    model = SpikeGPT(SpikeGPTConfig.preset("spikegpt-micro", n_classes=2), rngs=nnx.Rngs(5))
    path = tmp_path_factory.mktemp("export") / "selection.safetensors"
    export_quantized(model, PLAN, path)
    return model, path


def _search_metric(model, task_name, eval_limit, batch_size, data_dir) -> float:
    """The metric the search assigns to PLAN: fake-quant inside the batched evaluator on the original model."""
    task = get_task(task_name)
    data = load_task_data(task, ctx_len=model.config.ctx_len, eval_batch_size=batch_size, eval_limit=eval_limit,
                          data_dir=data_dir, with_train=False)
    return evaluate_candidates(model, [PLAN], data.eval_batches, metric_of(task, SPIKEGPT), chunk_size=8)[0]


@pytest.mark.slow
@pytest.mark.parametrize(("task_name", "eval_limit", "batch_size"), [("wikitext2", 300, 8), ("sst2", 100, 64)])
def test_json_metric_equals_the_search_metric_exactly(exported, data_dir, capsys, task_name, eval_limit, batch_size):
    model, path = exported
    assert evaluate.main([str(path), "--task", task_name, "--eval-limit", str(eval_limit), "--json",
                          "--data-dir", str(data_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == _search_metric(model, task_name, eval_limit, batch_size, data_dir)
    assert result["task"] == task_name and result["metric_name"] == TASKS[task_name].metric_name
    assert result["file_bytes"] == path.stat().st_size
    assert QuantPlan.from_dict(result["plan"]) == PLAN
    assert f"first {eval_limit}" in result["protocol"]  # the protocol says what was scored


@pytest.mark.slow
def test_text_output_names_metric_plan_and_size(exported, data_dir, capsys):
    _, path = exported
    assert evaluate.main([str(path), "--task", "sst2", "--eval-limit", "16", "--eval-batch-size", "16",
                          "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "accuracy (%) = " in out and '"default": 4' in out and " MB on disk" in out


def _error_of(capsys, *argv) -> str:
    assert evaluate.main([str(a) for a in argv]) == 1
    return capsys.readouterr().err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    err = _error_of(capsys, tmp_path / "nope.safetensors", "--task", "sst2")
    assert "no quantized export at" in err and "selection.safetensors" in err


def test_a_file_that_is_not_an_export_is_refused(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    assert "cannot read a quantized export" in _error_of(capsys, junk, "--task", "sst2")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(plain))
    assert "is not a qslm-jax-quantized/2 export" in _error_of(capsys, plain, "--task", "sst2")


def test_unknown_task_and_missing_classifier_are_clear_errors(exported, tmp_path, capsys):
    _, path = exported
    assert "unknown task 'mnli'" in _error_of(capsys, path, "--task", "mnli")
    lm = SpikeGPT(SpikeGPTConfig.preset("spikegpt-tiny"), rngs=nnx.Rngs(0))
    lm_path = export_quantized(lm, QuantPlan(8), tmp_path / "lm.safetensors").path
    err = _error_of(capsys, lm_path, "--task", "sst2")
    assert "needs a 2-class classifier" in err and "none" in err


def test_help_is_fast_and_names_every_task():
    # --help must not import jax: run it in a fresh interpreter and check what it loaded
    code = ("import sys; from experiments import evaluate\n"
            "try:\n    evaluate.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('JAX' if 'jax' in sys.modules else 'NOJAX')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NOJAX")
    assert all(name in out for name in TASKS)
    parser = evaluate.build_parser()
    assert all(action.help for action in parser._actions)
