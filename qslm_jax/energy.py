"""Model-based energy estimate from operation counts (qslm.md section 4, the addition to measured power).

A Linear layer ``in -> out`` costs per token:

* on real-valued input: ``in * out`` multiply-accumulates (MAC = one multiply + one add);
* on binary spikes with firing rate r: ``r * in * out`` accumulates (AC = one add: a spike selects a weight).

Operation energies are the 45 nm, 0.9 V figures of M. Horowitz, "Computing's energy problem (and what we can
do about it)", ISSCC 2014, pp. 10-14 (:data:`HOROWITZ_45NM_PJ`). Operands are taken at the weight bit width
(activations assumed quantized alike; wider accumulators are not modelled): 32 bits = fp32 (float add 0.9 pJ,
float multiply 3.7 pJ); below 32 bits = integer arithmetic. Integer widths between the published points
(add: 8, 16, 32 bits; multiply: 8, 32 bits) are interpolated log-log (a power law between neighbours); below
8 bits an adder scales linearly with the width (ripple carry) and a multiplier quadratically (array
multiplier), from the 8-bit figure. An estimate of arithmetic only: memory traffic is not counted.

Per sample = per token x the tokens of a sample (:func:`mean_tokens_per_sample`: the real, unpadded tokens
of a sentence, or every position of a language-modelling window). Which layers are spike-driven is the
model's business: a Linear is counted as accumulates only when its input really is spikes (SpikingBERT: every
encoder Linear reads the previous IF layer's spikes; SpikeGPT: none, its Linear layers read LayerNorm outputs
and other real values).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from qslm_jax.errors import ConfigError

PJ = 1e-12
HOROWITZ_45NM_PJ: Mapping[str, Mapping[int, float]] = MappingProxyType({
    "int_add": MappingProxyType({8: 0.03, 16: 0.05, 32: 0.1}),
    "int_mult": MappingProxyType({8: 0.2, 32: 3.1}),
    "float_add": MappingProxyType({16: 0.4, 32: 0.9}),
    "float_mult": MappingProxyType({16: 1.1, 32: 3.7}),
})
SMALL_WIDTH_EXPONENT = {"add": 1.0, "mult": 2.0}  # energy ~ width^k below the smallest published width
FP32_BITS = 32


def op_energy_pj(op: str, bits: float) -> float:
    """Energy (pJ) of one ``op`` ("add" or "mult") with ``bits``-wide operands (module docstring rule)."""
    if op not in SMALL_WIDTH_EXPONENT:
        raise ConfigError(f"unknown operation {op!r}: expected 'add' or 'mult'")
    if not bits > 0:
        raise ConfigError(f"bit width must be positive, found {bits}")
    if bits >= FP32_BITS:
        return HOROWITZ_45NM_PJ[f"float_{op}"][FP32_BITS]
    table = sorted(HOROWITZ_45NM_PJ[f"int_{op}"].items())
    low_bits, low_pj = table[0]
    if bits <= low_bits:
        return low_pj * (bits / low_bits) ** SMALL_WIDTH_EXPONENT[op]
    # the neighbouring published widths b0 < bits <= b1 (the tables end at 32 > bits)
    (b0, e0), (b1, e1) = next(pair for pair in itertools.pairwise(table) if bits <= pair[1][0])
    return e0 * (bits / b0) ** (math.log(e1 / e0) / math.log(b1 / b0))


@dataclass(frozen=True)
class LayerOps:
    """One Linear layer as the estimate sees it.

    ``input_spike_rate``: None for real-valued input (MACs), else the firing rate in [0, 1] of its binary
    input (ACs). ``calls``: how often the layer runs per token (e.g. time steps).
    """

    in_features: int
    out_features: int
    input_spike_rate: float | None
    weight_bits: float = FP32_BITS
    name: str = ""
    calls: int = 1

    def __post_init__(self):
        rate = self.input_spike_rate
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ConfigError(f"layer {self.name or '?'}: spike rate must be in [0, 1], found {rate}")
        if min(self.in_features, self.out_features, self.calls) < 1:
            raise ConfigError(f"layer {self.name or '?'}: in/out features and calls must be >= 1, found "
                              f"{self.in_features}, {self.out_features}, {self.calls}")

    @property
    def macs(self) -> float:
        """Multiply-accumulates per token (0 on spiking input)."""
        if self.input_spike_rate is not None:
            return 0.0
        return float(self.in_features * self.out_features * self.calls)

    @property
    def acs(self) -> float:
        """Accumulates per token (0 on real-valued input)."""
        if self.input_spike_rate is None:
            return 0.0
        return self.input_spike_rate * self.in_features * self.out_features * self.calls

    @property
    def joules(self) -> float:
        """Energy per token: ``MACs (E_mult + E_add) + ACs E_add`` at the weight bit width."""
        add = op_energy_pj("add", self.weight_bits)
        return (self.macs * (op_energy_pj("mult", self.weight_bits) + add) + self.acs * add) * PJ


@dataclass(frozen=True)
class EnergyEstimate:
    """Operation counts and estimated energy per token, and per sample of ``tokens_per_sample`` tokens
    (an average, so not necessarily whole)."""

    joules_per_token: float
    tokens_per_sample: float
    macs_per_token: float
    acs_per_token: float
    per_layer: tuple[tuple[str, float], ...]  # (name, joules per token)
    spike_driven: tuple[str, ...] = ()  # names of the layers counted as accumulates

    @property
    def macs_per_sample(self) -> float:
        """Multiply-accumulates of one sample."""
        return self.macs_per_token * self.tokens_per_sample

    @property
    def acs_per_sample(self) -> float:
        """Accumulates of one sample."""
        return self.acs_per_token * self.tokens_per_sample

    @property
    def joules_per_sample(self) -> float:
        """Energy of one sample (``tokens_per_sample`` tokens)."""
        return self.joules_per_token * self.tokens_per_sample

    def to_dict(self) -> dict:
        """Plain dict for reports, with the rule it follows."""
        return {"joules_per_token": self.joules_per_token, "joules_per_sample": self.joules_per_sample,
                "tokens_per_sample": self.tokens_per_sample, "macs_per_token": self.macs_per_token,
                "acs_per_token": self.acs_per_token, "macs_per_sample": self.macs_per_sample,
                "acs_per_sample": self.acs_per_sample, "per_layer": dict(self.per_layer),
                "spike_driven_layers": len(self.spike_driven),
                "dense_layers": len(self.per_layer) - len(self.spike_driven),
                "model": "45 nm operation energies (Horowitz, ISSCC 2014) at the weight bit width; layers "
                         "whose input is spikes count accumulates at the input spike rate, the others "
                         "multiply-accumulates; arithmetic only, memory traffic not counted"}


def estimate_energy(layers: Iterable[LayerOps | Sequence], *, tokens_per_sample: float) -> EnergyEstimate:
    """Sum the per-token energy of ``layers`` (:class:`LayerOps` or tuples ``(in_features, out_features,
    input_spike_rate or None, weight_bits)``); per-sample figures are ``tokens_per_sample`` times those."""
    if not (math.isfinite(tokens_per_sample) and tokens_per_sample > 0):
        raise ConfigError(f"tokens_per_sample must be a positive number, found {tokens_per_sample!r}: pass "
                          "the average tokens of a sample (mean_tokens_per_sample)")
    records = [layer if isinstance(layer, LayerOps) else LayerOps(*layer) for layer in layers]
    names = [r.name or f"layer_{i}" for i, r in enumerate(records)]
    per_layer = tuple((name, r.joules) for name, r in zip(names, records, strict=True))
    spike_driven = tuple(name for name, r in zip(names, records, strict=True) if r.input_spike_rate is not None)
    return EnergyEstimate(sum(j for _, j in per_layer), float(tokens_per_sample), sum(r.macs for r in records),
                          sum(r.acs for r in records), per_layer, spike_driven)


def mean_tokens_per_sample(batches: Iterable[Mapping[str, np.ndarray]], ids_key: str) -> float:
    """Average tokens per sample over ``batches``: ``sum(attention_mask * valid) / sum(valid)``.

    ``batch[ids_key]`` is (B, L); without an ``attention_mask`` every one of the L positions counts (a
    language-modelling window), without ``valid`` every row is a sample. Raises ConfigError when there are
    no samples.
    """
    tokens = samples = 0.0
    for batch in batches:
        ids = np.asarray(batch[ids_key])
        mask = np.asarray(batch.get("attention_mask", np.ones(ids.shape)), np.float64)
        valid = np.asarray(batch.get("valid", np.ones(ids.shape[0])), np.float64)
        tokens += float(np.sum(mask * valid[:, None]))
        samples += float(np.sum(valid))
    if samples <= 0:
        raise ConfigError("mean_tokens_per_sample needs at least one valid sample, found none: pass the "
                          "evaluation batches")
    return tokens / samples
