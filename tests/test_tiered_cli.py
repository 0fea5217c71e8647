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
                 "summary.md", "selection.safetensors"):
        assert (tmp_path / name).is_file(), name
    # the journal lives outside the case folder, named by its setup; the report split has its own
    journals = sorted(p.name for p in (tmp_path.parent / "journals").glob("sst2-*.jsonl"))
    assert [n.split("-")[1] for n in journals] == ["report", "selection"]
    held = report["report_split"]
    assert held["split"] == "report" and "GLUE sst2 validation" in held["protocol"] and held["eval_items"] == 48
    assert "held out of training for selection" in report["config"]["protocol"]
    assert set(held["metrics"]) >= {"baseline", "selection"}
    # the export alone reproduces both of the report's metrics of the selection
    from experiments import evaluate

    for split, expected in (("report", held["metrics"]["selection"]), ("selection", report["selection"]["metric"])):
        scored = evaluate.evaluate_export(tmp_path / "selection.safetensors", "sst2", eval_limit=48, split=split)
        assert scored["metric"] == expected, split
    # chunk sizes 8, 4, 2, 1: each compiled once, reused by every call (both splits are one batch of 48 here)
    assert report["compilations"] <= 4
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
    # uncertainty: every candidate's bootstrap interval and paired change vs fp32 (the baseline: exactly 0)
    assert report["intervals"]["level"] == 0.95 and report["intervals"]["unit"].startswith("sentence")
    assert rows[0]["phase"] == "baseline" and rows[0]["delta_ci"] == [0.0, 0.0]
    assert all(r["metric_ci"][0] <= r["metric_ci"][1] and r["delta_ci"][0] <= r["delta_ci"][1] for r in rows)
    assert report["baseline"]["metric_ci"] == rows[0]["metric_ci"] and "delta_ci" in sel
    assert held["intervals"]["baseline"]["delta_ci"] == [0.0, 0.0] and "metric_ci" in held["intervals"]["selection"]
    assert "95% paired bootstrap" in (tmp_path / "summary.md").read_text()
    import csv

    with (tmp_path / "candidates.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [[float(r["delta_ci_low"]), float(r["delta_ci_high"])] for r in csv_rows] == [r["delta_ci"] for r in rows]
    assert [float(r["metric_ci_high"]) for r in csv_rows] == [r["metric_ci"][1] for r in rows]
    assert report["power"]["measured"] is False and "not measured" in report["power"]["note"]
    assert report["energy_estimate"]["selection"]["joules_per_token"] < \
        report["energy_estimate"]["baseline"]["joules_per_token"]
    # the README table row is built from this report
    table = tables.main(["qslm", str(tmp_path)]).splitlines()
    assert len(table) == 3 and table[2].count("|") == table[0].count("|")
    assert f"{sel['memory_bytes'] / 1e6:.2f} MB" in table[2] and "(first 48 examples)" in table[2]
    assert f"+ {report['evaluations']} new (" in table[2]
    low, high = held["intervals"]["selection"]["delta_ci"]
    assert f"(change [{low:+.2f}, {high:+.2f}])" in table[2]
    strategies = tables.main(["strategies", str(tmp_path)]).splitlines()
    assert len(strategies) == 3 and "| tiered | asymmetric per-tensor |" in strategies[2]
    assert f"| {report['cost']['evaluations']} | {report['cost']['slots']} (" in strategies[2]


def test_rerun_resumes_from_the_journal_and_keeps_each_invocations_cost(tmp_path, data_dir):
    args = ("--task", "sst2", "--eval-limit", "32", "--const-a", "3", "--const-m-frac", "0.5")
    _, first = _run(tmp_path, *args)
    _, second = _run(tmp_path, *args)
    assert first["evaluations"] > 0
    assert second["evaluations"] == 0
    assert second["baseline"] == first["baseline"]
    assert [c["metric"] for c in second["candidates"]] == [c["metric"] for c in first["candidates"]]
    assert [run["evaluations"] for run in second["invocations"]] == [first["evaluations"], 0]
    assert second["report_split"] == first["report_split"]  # the held-out intervals included
    # intervals recomputed from the journaled per-example statistics: identical
    assert [(c["metric_ci"], c["delta_ci"]) for c in second["candidates"]] == \
        [(c["metric_ci"], c["delta_ci"]) for c in first["candidates"]]
    # --confidence judges by the interval; the journal serves it (the level is not in its fingerprint)
    _, strict = _run(tmp_path, *args, "--confidence", "0.9")
    assert strict["config"]["confidence"] == 0.9 and strict["intervals"]["level"] == 0.9
    assert strict["journal"]["path"] == first["journal"]["path"]
    base = strict["baseline"]["metric"]
    for cand in (c for c in strict["candidates"] if not c["after_stop"]):
        assert cand["ok"] == (base - cand["metric"] <= 3 and -cand["delta_ci"][0] <= 3)


def test_infeasible_constraints_exit_3_with_closest_candidates_and_no_stale_export(tmp_path, data_dir, capsys):
    code, _ = _run(tmp_path, "--task", "wikitext2", "--eval-limit", "300", "--const-a", "1000",
                   "--const-m-frac", "0.9")
    assert code == 0 and (tmp_path / "selection.safetensors").is_file()
    code, report = _run(tmp_path, "--task", "wikitext2", "--eval-limit", "300", "--const-a", "0",
                        "--const-m", "0.001")
    assert code == 3 and report["intervals"]["unit"].startswith("window of")
    assert report["selection"] is None
    assert report["no_feasible"]["closest"]
    assert "no candidate meets both constraints" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "selection.safetensors").exists()
    assert "second half" in _run(tmp_path / "again", "--task", "wikitext2", "--eval-limit", "300",
                                 "--const-a", "1000", "--const-m-frac", "0.9")[1]["report_split"]["protocol"]


def test_case_flag_scales_the_budget_to_the_model(tmp_path, data_dir):
    code, report = _run(tmp_path, "--case", "b2", "--eval-limit", "200")
    assert report["config"]["task"] == "wikitext2" and report["config"]["const_a"] == 4.0
    assert report["config"]["const_m_mb"] == pytest.approx(400 * report["fp32_bytes"] / 1e6 / 861.597696)
    assert code in (0, 3)
    assert report["config"]["case"] == "b2"
    # another case of the same model and task reuses the journal: its constraints are not in the fingerprint
    code_b3, report_b3 = _run(tmp_path / "b3", "--case", "b3", "--eval-limit", "200",
                              "--journal", report["journal"]["path"])
    assert code_b3 in (0, 3) and report_b3["config"]["case"] == "b3"
    assert report_b3["journal_hits"] >= 1
    assert not (tmp_path / "b3" / "journal.jsonl").exists()


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert tiered.main(["--model", "spikegpt216m", "--task", "sst2", "--out", str(tmp_path)]) == 1
    assert "experiments.finetune" in capsys.readouterr().err
    assert tiered.main(["--case", "a1", "--task", "wikitext2", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--const-a", "-1"], "const_a=-1.0"),
    (["--const-m", "0"], "const_m_mb=0.0"),
    (["--const-m-frac", "-0.5"], "--const-m-frac must be > 0"),
    (["--alpha", "-1"], "alpha=-1.0"),
    (["--eval-limit", "0"], "eval_limit=0"),
    (["--eval-limit", "-5"], "eval_limit=-5"),
    (["--eval-batch-size", "0"], "eval_batch_size=0"),
    (["--chunk-size", "0"], "chunk_size=0"),
    (["--devices", "64"], "only 1 local device"),
    (["--levels", "32,33"], "precision level must be one of"),
])
def test_bad_flags_are_refused_up_front(tmp_path, capsys, flags, message):
    """Checked before any model is loaded or evaluated (the embedded default is not even trained)."""
    import time

    started = time.perf_counter()
    code = tiered.main(["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *flags])
    assert code == 1 and time.perf_counter() - started < 10
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--const-a", "nan"], ["--const-m", "nan"], ["--alpha", "inf"],
                                   ["--levels", "32,x"], ["--no-such-flag"], ["--confidence", "1.5"],
                                   ["--confidence", "x"], ["--confidence", "0"]])
def test_malformed_flags_are_usage_errors_with_status_2(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        tiered.main(["--out", str(tmp_path), *flags])
    assert exit_info.value.code == 2


def test_sensitivity_cli_table_and_heatmap(tmp_path, data_dir):
    from experiments import sensitivity

    code = sensitivity.main(["--model", "spikegpt-micro", "--init", "random", "--levels", "32,4,2", "--task",
                             "sst2", "--eval-limit", "32", "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 0  # its journal: tmp_path/journals, not shared with the other tests' searches
    tmp_path = tmp_path / "out"
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert list(report["table"]) == ["input", "attention_0", "attention_1", "output"]
    assert all(set(row) == {"4", "2"} for row in report["table"].values())
    assert sorted(report["order_least_sensitive_first"]) == sorted(report["table"])
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    assert report["compilations"] == 2  # the baseline alone (size 1), then the 8 plans of the table


def test_a_journal_is_refused_after_its_data_changed_in_place(tmp_path, data_dir, capsys):
    """Same path, other content: the fingerprint covers the evaluation batches, so stale metrics are not
    reused."""
    local = tmp_path / "data"
    local.mkdir()
    for entry in data_dir.iterdir():
        if entry.name != "glue":
            (local / entry.name).symlink_to(entry.resolve())
    (local / "glue" / "sst2").mkdir(parents=True)
    dev = local / "glue" / "sst2" / "dev.tsv"
    dev.write_text((data_dir / "glue" / "sst2" / "dev.tsv").read_text())
    args = ["--task", "sst2", "--eval-limit", "16", "--const-a", "100", "--const-m-frac", "0.9",
            "--selection-split", "same", "--data-dir", str(local), "--journal", str(tmp_path / "j.jsonl")]
    code, first = _run(tmp_path / "first", *args)
    assert code == 0 and first["evaluations"] > 0
    lines = dev.read_text().splitlines(keepends=True)
    header, row = lines[0], lines[1].rstrip("\n").split("\t")
    row[-1] = "1" if row[-1] == "0" else "0"  # flip the first sentence's label, same path
    dev.write_text(header + "\t".join(row) + "\n" + "".join(lines[2:]))
    assert tiered.main([*COMMON, "--out", str(tmp_path / "second"), *args]) == 1
    err = capsys.readouterr().err
    assert "written for a different setup" in err and "data_sha256" in err
