"""Operation-count energy estimate: published 45 nm figures, the interpolation rule, layer sums."""

from __future__ import annotations

import itertools
import math

import pytest

from qslm_jax.errors import ConfigError
from qslm_jax.qslm.energy import HOROWITZ_45NM_PJ, LayerOps, estimate_energy, op_energy_pj


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
    # spike-driven (AC) is cheaper than the same layer on real-valued input, and quantized cheaper than fp32
    assert LayerOps(64, 64, 0.3, 32).joules < LayerOps(64, 64, None, 32).joules
    dense = [LayerOps(64, 64, None, bits).joules for bits in (4, 8, 32)]
    assert dense[0] < dense[1] < dense[2]


def test_invalid_layers_are_rejected():
    with pytest.raises(ConfigError, match="spike rate"):
        LayerOps(10, 10, 1.5)
    with pytest.raises(ConfigError, match="features"):
        LayerOps(0, 10, None)
