"""Operation-count energy estimate: published 45 nm figures, the interpolation rule, layer sums."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from flax import nnx

from qslm_jax.energy import HOROWITZ_45NM_PJ, LayerOps, estimate_energy, mean_tokens_per_sample, op_energy_pj
from qslm_jax.equilibrium.evaluation import energy_report
from qslm_jax.errors import ConfigError
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.models.spikingbert import SpikingBERTConfig
from qslm_jax.qslm.energy_estimate import model_energy
from qslm_jax.quant.hierarchy import hierarchy_of
from qslm_jax.quant.plan import QuantPlan


def test_published_points_are_returned_exactly():
    # Horowitz, ISSCC 2014 (45 nm): int add 8/16/32 bit 0.03/0.05/0.1 pJ, int mult 8/32 bit 0.2/3.1 pJ,
    # fp32 add 0.9 pJ, fp32 mult 3.7 pJ.
    for bits, pj in HOROWITZ_45NM_PJ["int_add"].items():
        if bits < 32:
            assert op_energy_pj("add", bits) == pytest.approx(pj)
    assert op_energy_pj("mult", 8) == pytest.approx(0.2)
    assert op_energy_pj("add", 32) == 0.9 and op_energy_pj("mult", 32) == 3.7


def test_interpolation_rule():
    # below 8 bits: add ~ width, mult ~ width^2 from the 8-bit figures
    assert op_energy_pj("add", 4) == pytest.approx(0.03 / 2)
    assert op_energy_pj("mult", 4) == pytest.approx(0.2 / 4)
    assert op_energy_pj("mult", 1.58) == pytest.approx(0.2 * (1.58 / 8) ** 2)
    # between published points: power law, e.g. mult 16 = 0.2 * 2^(log(3.1/0.2)/log(4)) = sqrt(0.2 * 3.1)
    assert op_energy_pj("mult", 16) == pytest.approx(math.sqrt(0.2 * 3.1))
    assert op_energy_pj("add", 12) == pytest.approx(0.03 * 1.5 ** (math.log(0.05 / 0.03) / math.log(2)))
    ints = [op_energy_pj(op, b) for op in ("add", "mult") for b in range(1, 32)]
    adds, mults = ints[:31], ints[31:]
    assert all(x < y for x, y in itertools.pairwise(adds))
    assert all(x < y for x, y in itertools.pairwise(mults))
    with pytest.raises(ConfigError):
        op_energy_pj("div", 8)
    with pytest.raises(ConfigError):
        op_energy_pj("add", 0)


def test_layer_sums_macs_and_accumulates():
    dense = LayerOps(100, 10, None, 32, name="dense")  # 1000 MACs at fp32: 1000 * (3.7 + 0.9) pJ
    spiking = LayerOps(100, 10, 0.2, 8, name="spiking")  # 0.2 * 1000 = 200 ACs at 8 bit: 200 * 0.03 pJ
    est = estimate_energy([dense, spiking, (100, 10, None, 8)], tokens_per_sample=16)
    assert est.macs_per_token == 2000 and est.acs_per_token == pytest.approx(200)
    expected = (1000 * 4.6 + 200 * 0.03 + 1000 * (0.2 + 0.03)) * 1e-12
    assert est.joules_per_token == pytest.approx(expected)
    assert est.joules_per_sample == pytest.approx(16 * expected)
    assert dict(est.per_layer)["spiking"] == pytest.approx(6e-12)
    assert "layer_2" in est.to_dict()["per_layer"]
    assert est.spike_driven == ("spiking",) and est.to_dict()["dense_layers"] == 2
    assert est.macs_per_sample == 16 * 2000 and est.acs_per_sample == pytest.approx(16 * 200)
    # spike-driven (AC) is cheaper than the same layer on real-valued input, and quantized cheaper than fp32
    assert LayerOps(64, 64, 0.3, 32).joules < LayerOps(64, 64, None, 32).joules
    dense = [LayerOps(64, 64, None, bits).joules for bits in (4, 8, 32)]
    assert dense[0] < dense[1] < dense[2]


def test_invalid_layers_are_rejected():
    with pytest.raises(ConfigError, match="spike rate"):
        LayerOps(10, 10, 1.5)
    with pytest.raises(ConfigError, match="features"):
        LayerOps(0, 10, None)
    with pytest.raises(ConfigError, match="tokens_per_sample"):
        estimate_energy([LayerOps(4, 4, None)], tokens_per_sample=0)


def test_tokens_per_sample_counts_real_tokens_of_valid_rows():
    sentences = {"input_ids": np.ones((3, 5)), "valid": np.array([1.0, 1.0, 0.0]),
                 "attention_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])}
    more = {"input_ids": np.ones((1, 5)), "attention_mask": np.array([[1, 1, 1, 1, 0]])}
    assert mean_tokens_per_sample([sentences, more], "input_ids") == pytest.approx((3 + 5 + 4) / 3)
    windows = {"idx": np.zeros((2, 32))}  # language modelling: every position of a window is a token
    assert mean_tokens_per_sample([windows], "idx") == 32
    with pytest.raises(ConfigError, match="valid sample"):
        mean_tokens_per_sample([{**sentences, "valid": np.zeros(3)}], "input_ids")


@pytest.mark.parametrize("feedback", [False, True])
def test_spiking_bert_energy_by_hand(feedback):
    """One block, H = 4, intermediate 8, T = 2, 1.58-bit kernels, 3.4 tokens per example (attention on 3)."""
    config = SpikingBERTConfig(hidden=4, heads=2, intermediate=8, vocab=10, max_positions=8, T=2,
                               num_blocks=1, feedback=feedback)
    rates = [0.5, 0.25, 0.75, 0.5, 0.5, 0.25, 0.5]  # embedding, key, value, attention, self-out, inter, out
    report = energy_report(config, rates, 3.4, 1.58)
    student, dense = report["student"], report["dense_bert_fp32"]
    # accumulates per token, T * rate of the input layer * in * out:
    # query/key/value 2*0.5*16 = 16 each, scores 2*0.25*4*3 = 6, context 2*0.75*3*4 = 18,
    # attention output 2*0.5*16 = 16, intermediate 2*0.5*4*8 = 32, output 2*0.25*8*4 = 16 (+ feedback 2*0.5*16)
    ternary_acs, fp32_acs = 16 * 3 + 16 + 32 + 16, 6 + 18 + (16 if feedback else 0)
    assert student["acs_per_token"] == pytest.approx(ternary_acs + fp32_acs) and student["macs_per_token"] == 0
    assert student["tokens_per_sample"] == 3.4
    assert student["acs_per_sample"] == pytest.approx(3.4 * (ternary_acs + fp32_acs))
    assert student["spike_driven_layers"] == (9 if feedback else 8) and student["dense_layers"] == 0
    joules = (ternary_acs * 0.03 * 1.58 / 8 + fp32_acs * 0.9) * 1e-12  # add energy: 1.58 bit ~ width, fp32
    assert student["joules_per_token"] == pytest.approx(joules)
    assert student["joules_per_sample"] == pytest.approx(3.4 * joules)
    # the dense fp32 BERT: 3*16 + 4*3 + 3*4 + 16 + 32 + 32 = 152 MACs per token at 3.7 + 0.9 pJ
    assert dense["macs_per_token"] == 152 and dense["acs_per_token"] == 0 and dense["spike_driven_layers"] == 0
    assert dense["joules_per_sample"] == pytest.approx(3.4 * 152 * 4.6e-12)
    assert report["energy_ratio_dense_over_student"] == pytest.approx(152 * 4.6e-12 / joules)


def test_spikegpt_energy_counts_the_tokens_of_a_sample():
    """SpikeGPT's Linear layers read real values: MACs only; per sample = per token x tokens."""
    model = SpikeGPT(SpikeGPTConfig(n_layer=1, n_embd=4, vocab_size=10, ctx_len=8, n_classes=2), rngs=nnx.Rngs(0))
    estimate = model_energy(model, QuantPlan(), hierarchy_of(model), classify=True, tokens_per_sample=23.5)
    c = 4
    macs = 4 * c * c + c * 4 * c + c * c + 4 * c * c  # att key/value/receptance/output, ffn key/receptance/value
    assert estimate["macs_per_token"] == macs and estimate["acs_per_token"] == 0
    assert estimate["spike_driven_layers"] == 0 and estimate["tokens_per_sample"] == 23.5
    assert estimate["joules_per_sample"] == pytest.approx(23.5 * macs * 4.6e-12)
