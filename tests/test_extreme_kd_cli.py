"""Refusals of ``experiments.extreme_kd`` and ``experiments.extreme_kd_memory``: bad flag values end with
``error: ...`` and exit status 1 before any data is loaded or model built; argparse usage errors exit 2."""

from __future__ import annotations

import pytest

from experiments import extreme_kd, extreme_kd_memory

BASE = ["--task", "sst2", "--train-teacher", "--data-dir", "/nonexistent/data"]  # nothing is ever read


@pytest.mark.parametrize(("flags", "message"), [
    (["--steps", "-1"], "--steps to be an integer >= 0, found -1"),
    (["--internal-steps", "-5"], "--internal-steps to be an integer >= 0"),
    (["--teacher-steps", "-2"], "--teacher-steps to be an integer >= 0"),
    (["--seed", "-3"], "--seed to be an integer >= 0"),
    (["--batch-size", "0"], "--batch-size to be an integer >= 1, found 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size to be an integer >= 1"),
    (["--T", "0"], "--T to be an integer >= 1"),
    (["--train-limit", "0"], "--train-limit to be an integer >= 1"),
    (["--eval-limit", "-1"], "--eval-limit to be an integer >= 1"),
    (["--lr", "nan"], "--lr to be a finite number > 0, found nan"),
    (["--lr", "0"], "--lr to be a finite number > 0"),
    (["--internal-lr", "inf"], "--internal-lr to be a finite number > 0, found inf"),
    (["--teacher-lr=-1e-3"], "--teacher-lr to be a finite number > 0"),
    (["--warmup-fraction", "1.5"], "--warmup-fraction to be a number in [0, 1]"),
    (["--feedback-tol", "-1"], "--feedback-tol to be a finite number >= 0"),
    (["--feedback-max-iter", "0"], "--feedback-max-iter to be an integer >= 1"),
])
def test_bad_flag_values_exit_1_with_a_message(flags, message, capsys, tmp_path):
    out = tmp_path / "run"
    assert extreme_kd.main([*BASE, *flags, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: expected ") and message in err and "Traceback" not in err
    assert not out.exists()  # refused before the run directory was made


def test_library_errors_are_reported_not_raised(capsys, tmp_path):
    (tmp_path / "settings.json").write_text("{}")  # an existing run in --out: ConfigError from the library
    assert extreme_kd.main([*BASE, "--out", str(tmp_path)]) == 1
    assert "another --out" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--task", "sst2"], ["--train-teacher", "--steps", "ten"],
                                  ["--train-teacher", "--bits", "2"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        extreme_kd.main(argv)
    assert exit_info.value.code == 2 and "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [(["--T", "8", "0"], "--T to be an integer >= 1, found 0"),
                                                (["--batch-size", "0"], "--batch-size to be an integer >= 1")])
def test_memory_cli_refuses_bad_sizes(flags, message, capsys):
    assert extreme_kd_memory.main(flags) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("module", [extreme_kd, extreme_kd_memory])
def test_every_flag_has_a_help_string(module):
    actions = [a for a in module.build_parser()._actions if a.dest != "help"]
    assert actions and all(a.help for a in actions), [a.dest for a in actions if not a.help]
