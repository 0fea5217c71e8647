"""`python -m experiments.tiered` end to end on a micro model with random weights (pipeline checks)."""

from __future__ import annotations

import json

import pytest

from experiments import tables, tiered

COMMON = ["--model", "spikegpt-micro", "--init", "random", "--levels", "32,8,4,2", "--no-progress"]


def _run(tmp_path, *extra):
    code = tiered.main([*COMMON, "--out", str(tmp_path), *extra])
    return code, json.loads((tmp_path / "report.json").read_text())


def test_sst2_search_writes_every_output_and_compiles_once(tmp_path, data_dir):
    code, report = _run(tmp_path, "--task", "sst2", "--eval-limit", "48", "--const-a", "100",
                        "--const-m-frac", "0.9")
    assert code == 0
    for name in ("report.json", "candidates.csv", "sensitivity.csv", "pareto.png", "sensitivity.png",
                 "summary.md", "selection.safetensors", "journal.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert report["compilations"] <= 4  # chunk sizes 8, 4, 2, 1: each compiled once, reused by every call
    cost = report["cost"]
    assert cost["padding"] == 0 and cost["slots"] == cost["evaluations"] + cost["discarded"]
    assert report["baseline"]["memory_bytes"] == report["fp32_bytes"]
    sel = report["selection"]
    assert sel["feasible"] and sel["memory_bytes"] <= 0.9 * report["fp32_bytes"]
    assert report["export"]["payload_bytes"] == sel["memory_bytes"]  # the real file holds what was accounted
    assert set(report["alpha_ablation"]) == {"0.0", "0.25", "0.5", "1.0", "2.0"}
    # with a 100-point allowance nothing fails: the global phase reaches the lowest level
    assert report["search"]["global_level"] == 2
    rows = report["candidates"]
    assert all({"plan", "memory_bytes", "memory_fraction", "metric", "feasible", "score"} <= set(r) for r in rows)
    assert report["power"]["measured"] is False and "not measured" in report["power"]["note"]
    assert report["energy_estimate"]["selection"]["joules_per_token"] < \
        report["energy_estimate"]["baseline"]["joules_per_token"]
    # the README table row is built from this report
    table = tables.main(["qslm", str(tmp_path)]).splitlines()
    assert len(table) == 3 and table[2].count("|") == table[0].count("|")
    assert f"{sel['memory_bytes'] / 1e6:.2f} MB" in table[2] and "(first 48 examples)" in table[2]
    assert f"+ {report['evaluations']} new (" in table[2]


def test_rerun_resumes_from_the_journal(tmp_path, data_dir):
    args = ("--task", "sst2", "--eval-limit", "32", "--const-a", "3", "--const-m-frac", "0.5")
    _, first = _run(tmp_path, *args)
    _, second = _run(tmp_path, *args)
    assert first["evaluations"] > 0
    assert second["evaluations"] == 0
    assert second["baseline"] == first["baseline"]
    assert [c["metric"] for c in second["candidates"]] == [c["metric"] for c in first["candidates"]]


def test_infeasible_constraints_exit_2_with_closest_candidates(tmp_path, data_dir, capsys):
    code, report = _run(tmp_path, "--task", "wikitext2", "--eval-limit", "300", "--const-a", "0",
                        "--const-m", "0.001")
    assert code == 2
    assert report["selection"] is None
    assert report["no_feasible"]["closest"]
    assert "no candidate meets both constraints" in (tmp_path / "summary.md").read_text()


def test_case_flag_scales_the_budget_to_the_model(tmp_path, data_dir):
    code, report = _run(tmp_path, "--case", "b2", "--eval-limit", "200")
    assert report["config"]["task"] == "wikitext2" and report["config"]["const_a"] == 4.0
    assert report["config"]["const_m_mb"] == pytest.approx(400 * report["fp32_bytes"] / 1e6 / 861.597696)
    assert code in (0, 2)
    assert report["config"]["case"] == "b2"
    # another case of the same model and task reuses the journal: its constraints are not in the fingerprint
    journal = tmp_path / "journal.jsonl"
    code_b3, report_b3 = _run(tmp_path / "b3", "--case", "b3", "--eval-limit", "200", "--journal", str(journal))
    assert code_b3 in (0, 2) and report_b3["config"]["case"] == "b3"
    assert report_b3["journal_hits"] >= 1


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert tiered.main(["--model", "spikegpt216m", "--task", "sst2", "--out", str(tmp_path)]) == 1
    assert "experiments.finetune" in capsys.readouterr().err
    assert tiered.main(["--case", "a1", "--task", "wikitext2", "--out", str(tmp_path)]) == 1


def test_sensitivity_cli_table_and_heatmap(tmp_path, data_dir):
    from experiments import sensitivity

    code = sensitivity.main(["--model", "spikegpt-micro", "--init", "random", "--levels", "32,4,2", "--task",
                             "sst2", "--eval-limit", "32", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert list(report["table"]) == ["input", "attention_0", "attention_1", "output"]
    assert all(set(row) == {"4", "2"} for row in report["table"].values())
    assert sorted(report["order_least_sensitive_first"]) == sorted(report["table"])
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    assert report["compilations"] == 2  # the baseline alone (size 1), then the 8 plans of the table
