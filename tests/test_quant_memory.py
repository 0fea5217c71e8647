"""Memory accounting (qslm.md section 2) on the SpikeGPT-216M preset, from shapes only."""

from __future__ import annotations

import pytest
from flax import nnx

from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.quant.hierarchy import Hierarchy, hierarchy_of
from qslm_jax.quant.memory import MB, code_bytes, format_table, memory_bytes, memory_report, tensor_bytes
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import QuantScheme

C, V, L = 768, 50277, 18
MATRIX_NUMEL = 2 * V * C + L * 13 * C * C  # emb, head, and per block 4 C^2 (att) + 9 C^2 (ffn key/rec/value)
VECTOR_NUMEL = 4 * C + L * 11 * C  # ln0, ln_out; per block ln1, ln2, time_decay/first, 3 + 2 time_mix
MATRICES = 2 + 7 * L


@pytest.fixture(scope="module")
def h216():
    return hierarchy_of(nnx.eval_shape(lambda: SpikeGPT(SpikeGPTConfig.preset("spikegpt216m"), rngs=nnx.Rngs(0))))


def test_fp32_total(h216):
    assert MATRIX_NUMEL + VECTOR_NUMEL == 215_399_424
    assert h216.fp32_bytes == 4 * 215_399_424 == 861_597_696
    assert memory_bytes(h216, QuantPlan()) == 861_597_696


@pytest.mark.parametrize("bits", [8, 4])
def test_uniform_totals_by_hand(h216, bits):
    # 215,244,288 weights at bits/8 bytes + 8 bytes scale/zero-point for each of the 128 matrices
    # + 155,136 vector elements at fp32: 8 bits -> 215,865,856; 4 bits -> 108,243,712
    expected = MATRIX_NUMEL * bits // 8 + 8 * MATRICES + 4 * VECTOR_NUMEL
    assert expected == {8: 215_865_856, 4: 108_243_712}[bits]
    report = memory_report(h216, QuantPlan(bits))
    assert report.total_bytes == memory_bytes(h216, QuantPlan(bits)) == expected
    assert report.saved_percent == pytest.approx(100 * (1 - expected / 861_597_696))
    assert report.total_mb == expected / 1e6


def test_per_channel_adds_a_scale_per_output_row(h216):
    # PyTorch rows: emb V, head V; per block att 4 C, ffn.key 4C, ffn.receptance C, ffn.value C -> 7680
    rows = 2 * V + L * (4 * C + 4 * C + C + C)
    per_channel = h216.with_scheme(QuantScheme.preset("per_channel"))
    assert memory_bytes(per_channel, QuantPlan(8)) == MATRIX_NUMEL + 8 * rows + 4 * VECTOR_NUMEL == 217_775_184


@pytest.mark.parametrize("group_size", [128, 100])
def test_group_wise_scales_per_run_of_inputs(h216, group_size):
    # a scale per output channel and run of G inputs: kernels (in, out) ceil(in/G) * out, emb (V, C) V ceil(C/G)
    g = -(-C // group_size)
    per_block = 4 * g * C + g * 4 * C + g * C + -(-4 * C // group_size) * C  # att, ffn.key/receptance/value
    groups = 2 * g * V + L * per_block
    grouped = h216.with_scheme(QuantScheme.preset("minmax", group_size=group_size))
    assert memory_bytes(grouped, QuantPlan(4)) == MATRIX_NUMEL // 2 + 8 * groups + 4 * VECTOR_NUMEL
    # binary and ternary keep one scale per tensor
    assert memory_bytes(grouped, QuantPlan(1)) == memory_bytes(h216, QuantPlan(1))


def test_units_sum_to_total_and_vectors_option(h216):
    plan = QuantPlan(16).with_block("input", 8).with_module("attention_4/ffn.key", 2)
    report = memory_report(h216, plan)
    assert sum(report.block_bytes.values()) == report.total_bytes
    block = report.block_bytes["attention_4"]
    assert sum(report.module_bytes[m] for m in h216.modules_of("attention_4")) + 4 * 11 * C == block
    assert report.module_bytes["attention_4/ffn.key"] == 4 * C * C // 4 + 8
    assert report.block_bytes["input"] == V * C + 8 + 4 * 2 * C
    everything = h216.with_scheme(QuantScheme.preset("all_tensors"))
    # quantizing the vectors too: every tensor at 8 bits, 8 bytes per tensor (330 tensors)
    assert memory_bytes(everything, QuantPlan(8)) == 215_399_424 + 8 * 330


def test_extreme_levels_by_hand():
    h = Hierarchy.from_spec({"encoder_0": {"query": 1000, "key": 999}})
    assert memory_bytes(h, QuantPlan(1)) == 125 + 125 + 16  # ceil(999 / 8) = 125
    assert memory_bytes(h, QuantPlan(1.58)) == 200 + 200 + 16  # 5 trits per byte
    assert memory_bytes(h, QuantPlan(3)) == 375 + 375 + 16  # ceil(2997 / 8) = 375
    assert code_bytes(10, 1.58) == 2 and tensor_bytes(10, 32) == 40


def test_table_lists_every_unit(h216):
    table = format_table(h216, QuantPlan(4))
    lines = table.splitlines()
    assert len(lines) == 2 + 20 + 126 + 2
    assert any(line.startswith("input") and "38,614,272" in line and "154.457" in line for line in lines)
    assert lines[-1].startswith("total") and f"{861_597_696 / MB:.3f}" in lines[-1]
    assert f"{108_243_712 / MB:.3f}" in lines[-1]
