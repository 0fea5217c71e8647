"""Benchmark: what the batched (vmapped) evaluation of quantization candidates buys, step by step.

``python -m experiments.bench candidates`` builds a SpikeGPT with random weights at the embedded default's shape
(``spikegpt-small``: 4 blocks, 128 channels, the 50,277-token GPT-NeoX vocabulary), a fixed evaluation set
(strided perplexity windows of random tokens) and ``--candidates`` different mixed-precision plans, and times, in
one interleaved run (``--repeats`` rounds, each variant once per round; medians reported):

* ``loop``: the plain way, one candidate at a time: re-quantize the model (``quantize_model``, jitted), then the
  jitted forward over every batch, one host sync per batch;
* ``K=1``: the :class:`~qslm_jax.qslm.evaluator.Evaluator` with one candidate per compiled call (quantization
  inside the traced function, a ``lax.scan`` over the batches, one sync per candidate);
* ``K=4``, ``K=16``: the same compiled function ``vmap``-ped over K candidates per call.

``K=1 / loop`` is what compiling the whole evaluation buys; ``K / K=1`` is what ``vmap`` itself buys. Compilation
(first call) is timed separately; memory is XLA's analysis of each compiled function (``peak_bytes``: arguments +
outputs + temporaries), so the cost of K stacked logit tensors is visible.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx

from experiments.timing import interleaved_seconds, summary, timed
from qslm_jax.data import strided_windows
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.qslm.evaluator import Evaluator, stack_batches
from qslm_jax.qslm.metrics import Perplexity
from qslm_jax.quant.apply import quantize_model
from qslm_jax.quant.hierarchy import hierarchy_of
from qslm_jax.quant.plan import QuantPlan

LEVELS = (16, 12, 8, 6, 4, 3, 2)




def candidate_plans(hierarchy, n: int, seed: int) -> list[QuantPlan]:
    """``n`` distinct mixed-precision plans: a random level per block (what a search evaluates)."""
    rng = np.random.default_rng(seed)
    plans: list[QuantPlan] = []
    while len(plans) < n:
        plan = QuantPlan(int(rng.choice(LEVELS)), {b: int(rng.choice(LEVELS)) for b in hierarchy.blocks})
        if plan not in plans:
            plans.append(plan)
    return plans


_METRIC = Perplexity()
_batch_stats = nnx.jit(lambda model, batch: _METRIC.batch_stats(model, batch))


def _one_at_a_time(model, plans, batches, hierarchy) -> list[float]:
    """The plain loop: for each plan, re-quantize the whole model, then evaluate it with the jitted forward."""
    out = []
    for plan in plans:
        quantized = quantize_model(model, plan, hierarchy)
        totals = [jax.device_get(_batch_stats(quantized, b)) for b in batches]
        out.append(_METRIC.finalize({k: sum(float(t[k]) for t in totals) for k in totals[0]}))
    return out


def _peak_bytes(analysis) -> int:
    """Arguments + outputs + temporaries (minus aliased buffers) of one compiled call."""
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


def _config(args: argparse.Namespace) -> SpikeGPTConfig:
    overrides = {name: value for name, value in (("n_layer", args.n_layer), ("n_embd", args.n_embd),
                                                 ("vocab_size", args.vocab), ("ctx_len", args.ctx_len))
                 if value is not None}
    return SpikeGPTConfig.preset(args.preset, **overrides)


def run(args: argparse.Namespace) -> dict:
    """Time every variant interleaved; return candidates/s, compile time, peak memory and the speed-ups."""
    config = _config(args)
    model = SpikeGPT(config, rngs=nnx.Rngs(args.seed))
    hierarchy = hierarchy_of(model)
    ctx = config.ctx_len
    n_tokens = args.tokens or ctx + 1 + (args.batch_size - 1) * (ctx // 2)  # exactly one batch of windows
    tokens = np.random.default_rng(args.seed).integers(2, config.vocab_size, n_tokens)
    batches = list(strided_windows(tokens, ctx, stride=ctx // 2).batches(args.batch_size))
    plans = candidate_plans(hierarchy, args.candidates, args.seed)
    n = len(plans)
    results: dict = {"config": config.__dict__, "params": hierarchy.numel(), "eval_batches": len(batches),
                     "batch_shape": list(batches[0]["idx"].shape), "candidates": n, "repeats": args.repeats,
                     "devices": [str(d) for d in jax.devices()], "variants": {}}

    variants = {"loop": lambda: _one_at_a_time(model, plans, batches, hierarchy)}
    evaluators = {f"K={k}": Evaluator(model, Perplexity(), hierarchy=hierarchy, chunk_size=k) for k in args.chunks}
    for name, evaluator in evaluators.items():
        variants[name] = lambda ev=evaluator: ev(plans, batches)
    first = {name: timed(fn) for name, fn in variants.items()}  # compiles every variant
    expected = np.array(first["loop"][1])
    seconds = interleaved_seconds(variants, args.repeats)

    stacked = stack_batches(batches)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, batch: _METRIC.batch_stats(nnx.merge(graphdef, s), batch))
    loop_analysis = forward.lower(state, batches[0]).compile().memory_analysis()
    for name in variants:
        row = {**summary(seconds[name], n, "candidates"), "first_call_s": first[name][0]}
        if name == "loop":
            row["peak_bytes"] = _peak_bytes(loop_analysis) + hierarchy.fp32_bytes  # + the re-quantized copy
        else:
            evaluator = evaluators[name]
            row["peak_bytes"] = _peak_bytes(evaluator.memory_analysis(evaluator.chunk_size(n), stacked))
            row["compilations"] = evaluator.compilations
            row["max_rel_diff_vs_loop"] = float(np.max(np.abs(np.array(first[name][1]) / expected - 1)))
        results["variants"][name] = row
    loop_s = results["variants"]["loop"]["median_s"]
    k1_s = results["variants"].get("K=1", {}).get("median_s")
    for name, row in results["variants"].items():
        row["speedup_vs_loop"] = loop_s / row["median_s"]
        if k1_s is not None:
            row["speedup_vs_K1"] = k1_s / row["median_s"]
        print(f"{name:>6}: {row['candidates_per_s']:7.2f} candidates/s (median of {args.repeats}), "
              f"{row['speedup_vs_loop']:5.2f}x vs the loop"
              + (f", {row['speedup_vs_K1']:5.2f}x vs K=1" if k1_s is not None else "")
              + f", compile+first call {row['first_call_s']:.1f} s, peak {row['peak_bytes'] / 1e9:.2f} GB")
    return results
