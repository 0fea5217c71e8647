"""``python -m experiments.bench quantize``: cost of fake-quantizing the weights of K candidates, per candidate.

On random weights of the SpikeGPT tensors of ``--blocks`` at the ``--preset`` shape (default: one attention block
and the embedding of SpikeGPT-216M) it compiles ``jit(vmap(quantize_params))`` over K stacked candidates (a mix
of uniform, ternary and binary levels, what a search evaluates) and reports, per candidate:

* XLA's cost analysis (``flops``, ``bytes accessed``) and memory analysis (temporary bytes) of the compiled
  function: machine-independent counts of the work done;
* the best wall-clock time of ``--repeats`` calls (compilation excluded).

``--scheme``/``--group-size`` choose the quantizer (:class:`~qslm_jax.quant.quantizers.QuantScheme`); under ``mse``
the one-off clipping table (:func:`~qslm_jax.quant.apply.clip_ratio_table`) is timed separately
(``calibration_s``, compilation included): it is computed once before a search, not per candidate.

``scale`` = bytes accessed per candidate / fp32 bytes of the quantized weights: 2 would be one read of the
weights and one write of the result. ``relative_error`` (per candidate level) is ``sum ||W - Wq||^2 / sum ||W||^2``
over the quantized tensors (random Gaussian weights: a proxy, trained weights have heavier tails).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.quant.apply import clip_ratio_table, quantize_params
from qslm_jax.quant.hierarchy import Hierarchy, param_shapes
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import QuantScheme

MIXED_LEVELS = (8, 1.58, 4, 1, 2, 16, 6, 3)  # one level per candidate, cycled: every quantizer kind occurs




def _subset(preset: str, blocks: list[str], scheme: QuantScheme) -> tuple[Hierarchy, dict]:
    """Hierarchy (under ``scheme``) and random fp32 parameters of the tensors of ``blocks`` (shapes of ``preset``)."""
    abstract = nnx.eval_shape(lambda: SpikeGPT(SpikeGPTConfig.preset(preset), rngs=nnx.Rngs(0)))
    full = Hierarchy.from_shapes(param_shapes(abstract))
    shapes = {t.path: t.shape for t in full.tensors if t.block in blocks}
    hierarchy = Hierarchy.from_shapes(shapes, family=full.family, scheme=scheme)
    rng = np.random.default_rng(0)
    params: dict = {}
    for path, shape in shapes.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = rng.standard_normal(shape, np.float32) * np.float32(0.02)
    return hierarchy, params


def _best_seconds(fn, *args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def _relative_errors(hierarchy: Hierarchy, params: dict, quantized: dict) -> list[float]:
    """Per candidate: ``sum ||W - Wq||^2 / sum ||W||^2`` over the tensors the scheme quantizes."""
    num, den = 0.0, 0.0
    for info in hierarchy.tensors:
        if hierarchy.quantized(info):
            w, wq = params, quantized
            for key in info.path:
                w, wq = w[key], wq[key]
            num = num + np.sum(np.square(np.asarray(wq, np.float64) - w), axis=tuple(range(1, wq.ndim)))
            den += float(np.sum(np.square(w, dtype=np.float64)))
    return [float(e) for e in num / den]


def run(args: argparse.Namespace) -> dict:
    """Compile and time the batched quantizer for every K; return per-candidate flops, bytes and seconds."""
    hierarchy, params = _subset(args.preset, args.blocks, QuantScheme.preset(args.scheme, args.group_size))
    quantized_numel = sum(t.numel for t in hierarchy.tensors if hierarchy.quantized(t))
    start = time.perf_counter()
    clip = jax.block_until_ready(clip_ratio_table(params, hierarchy))
    calibration_s = time.perf_counter() - start
    fn = jax.jit(lambda p, c, bits: jax.vmap(lambda b: quantize_params(p, b, hierarchy, c))(bits))
    results: dict = {"preset": args.preset, "blocks": args.blocks, "scheme": hierarchy.scheme.to_dict(),
                     "quantized_weights": quantized_numel, "fp32_bytes_quantized": 4 * quantized_numel,
                     "calibration_s": calibration_s if clip is not None else None,
                     "devices": [str(d) for d in jax.devices()], "per_K": {}}
    for k in args.candidates:
        plans = [QuantPlan(MIXED_LEVELS[i % len(MIXED_LEVELS)]) for i in range(k)]
        bits = hierarchy.stacked_bits(plans)
        compiled = fn.lower(params, clip, bits).compile()
        cost, memory = compiled.cost_analysis(), compiled.memory_analysis()
        quantized = jax.block_until_ready(compiled(params, clip, bits))  # warm-up
        seconds = _best_seconds(compiled, params, clip, bits, repeats=args.repeats)
        errors = _relative_errors(hierarchy, params, quantized)
        accessed = cost.get("bytes accessed", float("nan")) / k
        results["per_K"][f"K={k}"] = {
            "flops_per_candidate": cost.get("flops", float("nan")) / k,
            "bytes_accessed_per_candidate": accessed,
            "scale": accessed / (4 * quantized_numel),
            "temp_bytes_per_candidate": memory.temp_size_in_bytes / k,
            "seconds_per_candidate": seconds / k,
            "relative_error": dict(zip([str(p.default) for p in plans], errors, strict=True)),
        }
    if clip is not None:
        print(f"mse clipping table: {calibration_s:.1f} s once (compilation included)")
    for name, row in results["per_K"].items():
        print(f"{name:>5}: {row['flops_per_candidate'] / 1e6:9.1f} MFLOP, {row['scale']:5.2f} x weight bytes "
              f"accessed, {row['temp_bytes_per_candidate'] / 1e6:8.1f} MB temporaries, "
              f"{row['seconds_per_candidate'] * 1e3:8.1f} ms per candidate")
    return results
