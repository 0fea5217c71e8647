"""Benchmark: batched (vmapped) evaluation of quantization candidates vs one call per candidate.

``python -m experiments.bench candidates`` builds a small SpikeGPT with random weights and a fixed evaluation set
(strided perplexity windows of random tokens), makes ``--candidates`` different plans, and measures candidates per
second of

* the :class:`~qslm_jax.qslm.evaluator.Evaluator` with K = 1, 4, 16 candidates per compiled call (quantization
  inside the traced function, ``vmap`` over the K candidates);
* the baseline: one candidate at a time, re-quantizing the model each time (``quantize_model``, jitted) and then
  running the jitted forward pass over the same batches.

Compilation is timed separately (one warm-up call per variant) and excluded from the rates.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qslm_jax.data import strided_windows
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.qslm.evaluator import Evaluator
from qslm_jax.qslm.metrics import Perplexity
from qslm_jax.quant.apply import quantize_model
from qslm_jax.quant.hierarchy import hierarchy_of
from qslm_jax.quant.plan import QuantPlan

LEVELS = (16, 12, 8, 6, 4, 3, 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m experiments.bench candidates``."""
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--ctx-len", type=int, default=64, help="window length (stride = half of it)")
    parser.add_argument("--tokens", type=int, default=257, help="length of the random token stream")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=16, help="plans evaluated by every variant")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16], help="K: candidates per call")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions (best is reported)")
    parser.add_argument("--seed", type=int, default=0)


def candidate_plans(hierarchy, n: int, seed: int) -> list[QuantPlan]:
    """``n`` distinct mixed-precision plans: a random level per block (what a search evaluates)."""
    rng = np.random.default_rng(seed)
    plans: list[QuantPlan] = []
    while len(plans) < n:
        plan = QuantPlan(int(rng.choice(LEVELS)), {b: int(rng.choice(LEVELS)) for b in hierarchy.blocks})
        if plan not in plans:
            plans.append(plan)
    return plans


def _best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


_METRIC = Perplexity()
_batch_stats = nnx.jit(lambda model, batch: _METRIC.batch_stats(model, batch))


def _one_at_a_time(model, plans, batches, hierarchy) -> list[float]:
    """Baseline: for each plan, re-quantize the whole model, then evaluate it with the jitted forward pass."""
    out = []
    for plan in plans:
        quantized = quantize_model(model, plan, hierarchy)
        totals = [jax.device_get(_batch_stats(quantized, b)) for b in batches]
        out.append(_METRIC.finalize({k: sum(float(t[k]) for t in totals) for k in totals[0]}))
    return out


def run(args: argparse.Namespace) -> dict:
    """Time every variant; return candidates/s and the speed-up of each K over the one-at-a-time baseline."""
    config = SpikeGPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab, ctx_len=args.ctx_len)
    model = SpikeGPT(config, rngs=nnx.Rngs(args.seed))
    hierarchy = hierarchy_of(model)
    tokens = np.random.default_rng(args.seed).integers(2, args.vocab, args.tokens)
    batches = list(strided_windows(tokens, args.ctx_len, stride=args.ctx_len // 2).batches(args.batch_size))
    plans = candidate_plans(hierarchy, args.candidates, args.seed)
    n = len(plans)
    results: dict = {"config": config.__dict__, "params": hierarchy.numel(), "eval_batches": len(batches),
                     "batch_shape": list(batches[0]["idx"].shape), "candidates": n,
                     "devices": [str(d) for d in jax.devices()], "variants": {}}

    start = time.perf_counter()
    _one_at_a_time(model, plans[:1], batches, hierarchy)  # warm-up: compiles the quantizer and the forward pass
    baseline_compile = time.perf_counter() - start
    baseline = _best_time(lambda: _one_at_a_time(model, plans, batches, hierarchy), args.repeats)
    results["baseline"] = {"seconds": baseline, "candidates_per_s": n / baseline,
                           "compile_s": baseline_compile}
    expected = _one_at_a_time(model, plans, batches, hierarchy)

    for k in tqdm(args.chunks, desc="K"):
        evaluator = Evaluator(model, Perplexity(), hierarchy=hierarchy, chunk_size=k)
        start = time.perf_counter()
        evaluator(plans[:k], batches)
        compile_s = time.perf_counter() - start
        seconds = _best_time(lambda ev=evaluator: ev(plans, batches), args.repeats)
        got = evaluator(plans, batches)
        results["variants"][f"K={k}"] = {
            "seconds": seconds, "candidates_per_s": n / seconds, "compile_s": compile_s,
            "speedup_vs_one_at_a_time": baseline / seconds, "compilations": evaluator.compilations,
            "max_rel_diff_vs_baseline": float(np.max(np.abs(np.array(got) / np.array(expected) - 1))),
        }
    for name, row in results["variants"].items():
        print(f"{name:>6}: {row['candidates_per_s']:8.2f} candidates/s, "
              f"{row['speedup_vs_one_at_a_time']:5.2f}x vs one call per candidate "
              f"({results['baseline']['candidates_per_s']:.2f}/s)")
    return results
