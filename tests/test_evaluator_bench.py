"""Smoke test of ``python -m experiments.bench candidates`` on a tiny model (the real run is in the report)."""

from __future__ import annotations

import json

from experiments import bench


def test_candidates_benchmark_runs_and_agrees_with_the_baseline(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(["candidates", "--n-layer", "1", "--n-embd", "16", "--vocab", "50", "--ctx-len", "8",
                          "--tokens", "30", "--candidates", "4", "--chunks", "1", "4", "--repeats", "1",
                          "--json", str(out)])
    assert set(results["variants"]) == {"K=1", "K=4"}
    for row in results["variants"].values():
        assert row["compilations"] == 1
        assert row["max_rel_diff_vs_baseline"] < 1e-5  # same plans, same metric as one call per candidate
        assert row["candidates_per_s"] > 0 and row["speedup_vs_one_at_a_time"] > 0
    assert results["candidates"] == 4 and results["baseline"]["candidates_per_s"] > 0
    assert json.loads(out.read_text()) == results
    assert "x vs one call per candidate" in capsys.readouterr().out
