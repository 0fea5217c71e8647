"""``python -m experiments.bench forward``: SpikeGPT forward throughput against plain matmuls of the same shapes.

On random weights (no checkpoint) it times the jitted forward ``logits = model(idx)`` and a jitted function
doing only the model's Linear matmuls (same weights, one distinct random input per Linear, so no two products
can be merged). FLOPs are counted analytically: ``2 * in * out`` per token per Linear, LM head included
(element-wise work, the WKV and LIF scans are not counted). ``ratio`` = forward GFLOP/s / matmul GFLOP/s:
how close the model gets to its matmul-bound speed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from flax import nnx

from qslm_jax.models.spikegpt import PRESETS, SpikeGPT, SpikeGPTConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The forward benchmark's flags."""
    parser.add_argument("--preset", default="spikegpt216m", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--mode", default="gpt", choices=["gpt", "rnn"], help="forward quirks")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")


def _seconds(fn, *args, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def linear_kernels(state: nnx.State) -> list[jax.Array]:
    """The ``(in, out)`` kernels of every Linear used by the LM forward (the classifier excluded)."""
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
    return [w for path, w in flat.items() if path[-1] == "kernel" and path[0] != "classifier"]


def run(args: argparse.Namespace) -> dict:
    """Time the forward and the matched matmuls; return tokens/s, GFLOP/s of both and their ratio."""
    config = SpikeGPTConfig.preset(args.preset).with_mode(args.mode)
    key_tokens, key_inputs = jax.random.split(jax.random.key(args.seed))
    model = SpikeGPT(config, rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)
    del model
    tokens = args.batch * args.seq
    idx = jax.random.randint(key_tokens, (args.batch, args.seq), 0, config.vocab_size)

    forward = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))
    forward_times = _seconds(forward, state, idx, repeats=args.repeats)

    kernels = linear_kernels(state)
    keys = jax.random.split(key_inputs, len(kernels))
    inputs = [jax.random.normal(k, (tokens, w.shape[0]), w.dtype) for k, w in zip(keys, kernels, strict=True)]
    matmuls = jax.jit(lambda xs, ws: [x @ w for x, w in zip(xs, ws, strict=True)])
    matmul_times = _seconds(matmuls, inputs, kernels, repeats=args.repeats)

    flops = 2 * tokens * sum(int(w.shape[0]) * int(w.shape[1]) for w in kernels)
    forward_s, matmul_s = statistics.median(forward_times), statistics.median(matmul_times)
    results = {
        "preset": args.preset,
        "mode": args.mode,
        "batch": args.batch,
        "seq": args.seq,
        "devices": [str(d) for d in jax.devices()],
        "linear_layers": len(kernels),
        "gflop_per_forward": flops / 1e9,
        "forward_seconds": forward_times,
        "matmul_seconds": matmul_times,
        "tokens_per_second": tokens / forward_s,
        "forward_gflops": flops / forward_s / 1e9,
        "matmul_gflops": flops / matmul_s / 1e9,
        "ratio": matmul_s / forward_s,
    }
    print(
        f"{args.preset} ({args.mode}) batch {args.batch} x seq {args.seq}: {results['tokens_per_second']:.0f} "
        f"tokens/s, forward {results['forward_gflops']:.1f} GFLOP/s vs plain matmuls "
        f"{results['matmul_gflops']:.1f} GFLOP/s (ratio {results['ratio']:.2f})"
    )
    return results
