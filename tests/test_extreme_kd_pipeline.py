"""``python -m experiments.extreme_kd`` end to end on 64 MRPC examples and a tiny model: outputs, teacher
export, refusals, and an interrupted run that resumes to the uninterrupted result."""

from __future__ import annotations

import json

import pytest

from experiments import tables
from experiments.extreme_kd import run
from qslm_jax.errors import ConfigError

TINY = ["--task", "mrpc", "--hidden", "16", "--heads", "2", "--blocks", "1", "--teacher-layers", "1",
        "--T", "4", "--max-length", "16", "--train-limit", "64", "--eval-limit", "32", "--batch-size", "8",
        "--eval-batch-size", "32", "--internal-steps", "4", "--steps", "3", "--checkpoint-every", "2",
        "--no-progress"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir):
    """A full run with a teacher trained here (4 steps) and a 1-bit student."""
    out = tmp_path_factory.mktemp("smoke")
    results = run([*TINY, "--data-dir", str(data_dir), "--train-teacher", "--teacher-steps", "4",
                    "--bits", "1", "--out", str(out)])
    return out, results


def test_pipeline_writes_results_curves_and_teacher(smoke):
    out, results = smoke
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    for stage in ("teacher", "internal", "prediction"):
        assert (out / f"curve_{stage}.png").stat().st_size > 0
    assert [r["step"] for r in results["history"]["internal"]] == [4]
    assert {"hidden_loss", "attention_loss"} <= results["history"]["internal"][0].keys()
    assert {"soft_ce", "ce"} <= results["history"]["prediction"][0].keys()
    assert (out / "teacher" / "config.json").exists() and (out / "teacher" / "model.safetensors").exists()

    dev = results["student"]["dev"]
    assert dev["examples"] == 32 and 0 <= dev["accuracy"] <= 100 and 0 <= dev["f1"] <= 100  # F1: MRPC
    assert len(dev["spike_rates"]) == 7 and all(0 <= r <= 1 for r in dev["spike_rates"])
    assert results["student"]["config"]["num_blocks"] == 1 and results["student"]["internal_kd"]
    size = results["student"]["model_size"]
    assert size["quantized_parameters"] == 4 * 16 * 16 + 2 * 16 * 64  # 1 block, hidden 16, intermediate 64
    assert size["bits"] < size["fp32_bits"]
    energy = results["student"]["energy"]
    assert energy["student"]["macs_per_token"] == 0 and energy["dense_bert_fp32"]["acs_per_token"] == 0
    assert "GLUE train" in results["data"] and "64 train / 32 eval" in results["data"] and results["seed"] == 0
    row = tables.main(["extreme-kd", str(out)]).splitlines()[2]
    assert row.startswith("| mrpc | 1 | yes | no | ") and f"{dev['accuracy']:.2f}% (F1 {dev['f1']:.1f})" in row


def test_rerun_resumes_the_run_in_out_and_other_settings_are_refused(smoke, data_dir, capsys):
    out, results = smoke
    base = [*TINY, "--data-dir", str(data_dir), "--train-teacher", "--teacher-steps", "4", "--out", str(out)]
    with pytest.raises(ConfigError, match=r"other settings.*another --out"):
        run([*base, "--bits", "1.58"])
    capsys.readouterr()
    again = run([*base, "--bits", "1"])  # the same command: every stage resumes at its last step
    assert f"resuming the run in {out}" in capsys.readouterr().out
    assert again["history"] == results["history"] and again["student"]["dev"] == results["student"]["dev"]


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_uninterrupted_result(smoke, data_dir, tmp_path):
    teacher = smoke[0] / "teacher"
    args = [*TINY, "--data-dir", str(data_dir), "--teacher", str(teacher), "--bits", "1.58"]
    straight = run([*args, "--out", str(tmp_path / "a")])
    assert straight["teacher"]["dev"] == smoke[1]["teacher"]["dev"]  # the exported teacher loads back

    # 4 internal-KD steps and 1 of the prediction stage, then an "interruption"
    stopped = run([*args, "--out", str(tmp_path / "b"), "--stop-after", "5"])
    assert stopped["status"] == "interrupted" and not (tmp_path / "b" / "results.json").exists()
    resumed = run([*args, "--out", str(tmp_path / "b")])  # the same command without --stop-after
    assert resumed["history"] == straight["history"]
    assert resumed["student"] == straight["student"]


@pytest.mark.slow
def test_feedback_student_trains_through_the_implicit_fixed_point(smoke, data_dir, tmp_path):
    """--feedback: one forward and one adjoint solve per training step, their statistics in results.json; the
    feedback Linear counts in the model size and, reading the last layer's spikes, in the accumulates."""
    args = [*TINY, "--data-dir", str(data_dir), "--teacher", str(smoke[0] / "teacher"), "--bits", "1",
            "--feedback", "--feedback-scale", "0.5", "--gradient-at", "surrogate", "--out", str(tmp_path)]
    results = run(args)
    feedback = results["student"]["feedback"]
    assert results["student"]["config"]["feedback"] and feedback["solver"] == "anderson"
    for stage, steps in (("internal", 4), ("prediction", 3)):
        stats = feedback["stages"][stage]
        for kind in ("forward", "adjoint"):
            assert stats[kind]["solves"] == steps and len(stats[kind]["residuals"]) == steps
            assert 0 <= stats[kind]["unconverged"] <= steps and stats[kind]["iterations_max"] <= 50
        assert stats["forward"]["iterations_max"] >= 1  # the surrogate's own fixed point is not the SNN's rate
    without = smoke[1]["student"]
    assert results["student"]["model_size"]["parameters"] == without["model_size"]["parameters"] + 16 * 16
    assert results["student"]["energy"]["student"]["spike_driven_layers"] == \
        without["energy"]["student"]["spike_driven_layers"] + 1
    assert all(0 <= r <= 1 for r in results["student"]["dev"]["spike_rates"])
    unconverged = sum(feedback["stages"][stage]["adjoint"]["unconverged"] for stage in ("internal", "prediction"))
    row = tables.main(["extreme-kd", str(tmp_path)]).splitlines()[2]
    assert row.startswith(f"| mrpc | 1 | yes | yes ({unconverged} of 7 adjoint solves unconverged) | ")
