"""Smoke tests of ``python -m experiments.bench candidates | forward | generate`` on tiny models (the real runs
are in the README)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import bench


@pytest.mark.slow
def test_candidates_benchmark_runs_and_agrees_with_the_loop(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(["candidates", "--preset", "spikegpt-tiny", "--n-layer", "1", "--n-embd", "16",
                          "--vocab", "50", "--ctx-len", "8", "--candidates", "4", "--chunks", "1", "4",
                          "--repeats", "1", "--json", str(out)])
    assert set(results["variants"]) == {"loop", "K=1", "K=4"}
    assert results["batch_shape"] == [4, 8] and results["eval_batches"] == 1
    for name in ("K=1", "K=4"):
        row = results["variants"][name]
        assert row["compilations"] == 1
        assert row["max_rel_diff_vs_loop"] < 1e-5  # same plans, same metric as the plain loop
        assert row["candidates_per_s"] > 0 and row["speedup_vs_loop"] > 0 and row["speedup_vs_K1"] > 0
    peaks = {name: row["peak_bytes"] for name, row in results["variants"].items()}
    assert 0 < peaks["K=1"] < peaks["K=4"]  # K stacked candidates need more memory
    assert results["variants"]["K=1"]["speedup_vs_K1"] == pytest.approx(1.0)
    assert json.loads(out.read_text()) == results
    assert "x vs the loop" in capsys.readouterr().out


@pytest.mark.slow
def test_forward_benchmark_reports_compile_time_medians_and_matmul_ratios():
    results = bench.main(["forward", "--preset", "spikegpt-tiny", "--batch", "2", "--seq", "8", "--repeats", "5"])
    assert len(results["forward_seconds"]) == 5 and results["compile_s"] > 0
    assert results["forward_gflops"] > 0 and results["ratio_to_xla_matmuls"] > 0
    torch_ratio = results["ratio_to_torch_matmuls"]
    assert torch_ratio is None or torch_ratio > 0


@pytest.mark.slow
def test_generate_benchmark_compares_the_rnn_with_rerunning_the_forward():
    results = bench.main(["generate", "--preset", "spikegpt-tiny", "--lengths", "4", "8", "--quadratic-lengths", "8",
                          "--torch-lengths", "8",
                          "--prompt-len", "3", "--repeats", "1"])
    assert {"rnn_step", "vs_reference_rnn_issue_17"} <= set(results["lengths"]["4"])
    assert "rerun_parallel_forward" not in results["lengths"]["4"]
    row = results["lengths"]["8"]
    assert row["tokens_agree"] == 1.0  # same sampler, same keys, same logits up to rounding
    assert row["rnn_step"]["tokens_per_s"] > 0 and row["speedup_vs_rerun"] > 0
    assert results["per_token_growth_rnn_step"] > 0
    if "torch_rnn_max_logit_diff" in results:  # the torch stand-in for the reference computes the same model
        assert results["torch_rnn_max_logit_diff"] < 1e-4 and row["speedup_vs_torch_rnn"] > 0


@pytest.mark.parametrize("fixture", ["spikegpt_L8_C32_V77", "spikegpt_L2_C64_V100"])
def test_the_torch_rnn_stand_in_computes_the_reference_rnn_logits(fixtures_dir, fixture):
    pytest.importorskip("torch")
    from flax import nnx

    from converters.spikegpt import load_spikegpt
    from experiments.bench_generate import TorchRNN

    io = np.load(fixtures_dir / fixture / "io.npz")
    model = load_spikegpt(fixtures_dir / fixture / "tiny_random.pth", mode="rnn")
    rnn = TorchRNN(nnx.to_pure_dict(nnx.state(model)), model.config)
    for row in range(len(io["input_idx"])):
        state = rnn.init_state()
        logits = np.stack([rnn.step(int(t), state).numpy() for t in io["input_idx"][row]])
        np.testing.assert_allclose(logits, io["logits_rnn"][row], rtol=0, atol=1e-4)
