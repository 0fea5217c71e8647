"""Ctrl-C in any entry point: exit status 130, one line saying how to resume, no traceback."""

from __future__ import annotations

import pytest

from experiments import evaluate, extreme_kd, finetune, sensitivity, tiered


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(("module", "work", "argv", "hint"), [
    (tiered, "_run", [], "Rerun the same command to resume (training from its last checkpoint, evaluations"),
    (sensitivity, "_run", [], "Rerun the same command to resume (training from its last checkpoint"),
    (finetune, "_run", [], "Rerun the same command to resume from the last checkpoint."),
    (extreme_kd, "_check_run_settings", ["--train-teacher"], "Rerun the same command to resume from the stage"),
    (evaluate, "evaluate_export", ["x.safetensors", "--task", "sst2"], "interrupted."),
])
def test_ctrl_c_ends_with_130_and_the_resume_hint(module, work, argv, hint, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(module, work, _interrupt)
    assert module.main([*argv, "--out", str(tmp_path)] if module is not evaluate else argv) == 130
    err = capsys.readouterr().err
    assert "interrupted." in err and hint in err and "Traceback" not in err
