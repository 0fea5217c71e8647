"""The operation-count energy estimate of a model under a plan (qslm.md section 4, beside measured power): the
model family's per-layer operation counts (:mod:`qslm_jax.models.registry`) at the levels the plan (and any fixed
level) gives each unit, priced by :func:`qslm_jax.energy.estimate_energy`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qslm_jax.energy import estimate_energy
from qslm_jax.models.registry import LevelOf, family_of
from qslm_jax.quant.hierarchy import Hierarchy
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import FP32


def unit_levels(hierarchy: Hierarchy, plan: QuantPlan) -> LevelOf:
    """``level(unit)``: the level of the weight matrix of a qualified module or of a block's own matrices under
    ``plan`` (a fixed level wins; fp32 for a unit without a weight matrix)."""

    def level(unit: str):
        owned = [t for t in hierarchy.tensors if t.matrix and (t.module == unit or (t.block == unit and not t.module))]
        return hierarchy.level_of(owned[0], plan) if owned else FP32

    return level


def model_energy(model: Any, plan: QuantPlan, hierarchy: Hierarchy, *, classify: bool, tokens_per_sample: float,
                 spike_rates: Sequence[float] | None = None) -> dict[str, Any]:
    """Operation counts and energy per token and per sample of ``tokens_per_sample`` tokens of ``model`` under
    ``plan``. Spike-driven layers (SpikingBERT) count accumulates at ``spike_rates`` (the rates of every neuron
    layer); attention, whose per-token cost grows with the sequence, at ``tokens_per_sample`` rounded to whole
    positions. Rates given are reported alongside (``spike_rates``)."""
    family = family_of(model)
    layers = family.layer_ops(model.config, unit_levels(hierarchy, plan), spike_rates=spike_rates,
                              tokens=max(round(tokens_per_sample), 1), classify=classify)
    estimate = estimate_energy(layers, tokens_per_sample=tokens_per_sample).to_dict()
    if spike_rates is not None:
        estimate["spike_rates"] = np.asarray(spike_rates).tolist()
    return estimate
