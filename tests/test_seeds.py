"""Spread over seeds and the paired test of the paper's extreme-KD claims (qslm_jax.equilibrium.seeds and
``experiments.tables extreme-kd-seeds``), on hand-computed cases."""

import json
import math

import pytest

from experiments import tables
from qslm_jax.equilibrium.seeds import compare_paired, summarize
from qslm_jax.errors import ConfigError

T_975_2 = 4.302652729911275  # Student's t quantile 0.975 at 2 degrees of freedom (tables)


def test_summary_is_the_mean_and_the_sample_std():
    summary = summarize([80.0, 82.0, 81.0])
    assert summary.mean == pytest.approx(81.0) and summary.std == pytest.approx(1.0) and summary.n == 3
    assert str(summary) == "81.00 ± 1.00"
    assert summarize([79.5]).std == 0.0 and "one seed" in str(summarize([79.5]))
    with pytest.raises(ConfigError):
        summarize([80.0, math.nan])


def test_paired_interval_and_verdicts_by_hand():
    unresolved = compare_paired({0: 80.0, 1: 82.0, 2: 81.0}, {0: 78.0, 1: 79.0, 2: 80.0})  # d = 2, 3, 1
    half = T_975_2 * 1.0 / math.sqrt(3)
    assert unresolved.mean_difference == pytest.approx(2.0)
    assert unresolved.interval == pytest.approx((2.0 - half, 2.0 + half))
    assert unresolved.verdict == "not resolved"
    holds = compare_paired({0: 82.0, 1: 82.5, 2: 83.0}, {0: 80.0, 1: 80.0, 2: 80.0})  # d = 2, 2.5, 3: sd 0.5
    assert holds.interval[0] == pytest.approx(2.5 - T_975_2 * 0.5 / math.sqrt(3)) and holds.verdict == "holds"
    assert compare_paired({0: 70.0, 1: 70.5}, {0: 80.0, 1: 80.0, 7: 1.0}).verdict == "contradicted"
    assert compare_paired({0: 70.0, 1: 70.5}, {0: 80.0, 1: 80.0, 7: 1.0}).seeds == (0, 1)  # seed 7 is unpaired
    single = compare_paired({3: 81.0}, {3: 80.0})
    assert single.interval is None and single.verdict == "not resolved"
    with pytest.raises(ConfigError, match="no seed in common"):
        compare_paired({0: 1.0}, {1: 1.0})


def _results(tmp_path, name, *, bits, internal, seed, accuracy, f1=None, task="mrpc"):
    dev = {"accuracy": accuracy, **({"f1": f1} if f1 is not None else {})}
    results = {"task": task, "bits": bits, "seed": seed,
               "teacher": {"dev": {"accuracy": 85.0}},
               "student": {"internal_kd": internal, "feedback": None, "dev": dev}}
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(results))
    return str(tmp_path / name)


def test_seed_table_groups_runs_and_states_each_claim(tmp_path):
    runs = [_results(tmp_path, f"r{bits}-{internal}-{seed}", bits=bits, internal=internal, seed=seed,
                     accuracy=acc, f1=acc + 10)
            for bits, internal, accs in ((1.58, True, (82.0, 82.5, 83.0)), (1, True, (80.0, 80.0, 80.0)),
                                         (1.58, False, (80.0, 82.0, 81.0)))
            for seed, acc in enumerate(accs)]
    table = tables.main(["extreme-kd-seeds", *runs])
    assert "| mrpc | 1.58 | yes | no | 0, 1, 2 | 82.50 ± 0.50 | 92.50 ± 0.50 | 85.00 ± 0.00 |" in table
    assert "| mrpc | 1 | yes | no | 0, 1, 2 | 80.00 ± 0.00 |" in table
    claims = [line for line in table.splitlines() if line.startswith("- ")]
    assert len(claims) == 4  # (1.58 vs 1, 1.58 with vs without internal KD) x (accuracy, F1)
    assert any(line.startswith("- 1.58-bit >= 1-bit") and "dev accuracy +2.50" in line
               and line.endswith(": holds") for line in claims)
    assert any(line.startswith("- internal-layer KD recovers points") and "dev accuracy +1.50" in line
               and line.endswith(": not resolved") for line in claims)
    with pytest.raises(ConfigError, match="two runs of mrpc 1-bit with internal KD with seed 0"):
        tables.main(["extreme-kd-seeds", runs[3], _results(tmp_path, "dup", bits=1, internal=True, seed=0,
                                                           accuracy=1.0)])


@pytest.mark.parametrize("level", ["1", "0", "-0.5", "nan", "ninety"])
def test_seed_table_refuses_a_bad_level_before_reading_any_run(tmp_path, level, capsys):
    # a single run has no pair to compare, yet the level is still checked (usage error, nothing read)
    with pytest.raises(SystemExit) as exit_info:
        tables.main(["extreme-kd-seeds", "--level", level, str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "expected a level in (0, 1)" in capsys.readouterr().err
