"""``python -m experiments.bench forward``: SpikeGPT forward throughput against plain matmuls of the same shapes.

On random weights (no checkpoint) it times the jitted forward ``logits = model(idx)`` and the model's Linear
matmuls alone (same weights, one distinct random input per Linear, so no two products can be merged), once as
one jitted XLA function and, when torch is installed, once in torch (``torch.no_grad``, its default threads).
All three run interleaved, ``--repeats`` rounds after a warm-up; medians are reported, and the forward's first
call (tracing + compilation) is timed separately. FLOPs are counted analytically: ``2 * in * out`` per token
per Linear, LM head included (element-wise work, the WKV and LIF scans are not counted).
``ratio_to_xla_matmuls`` = forward GFLOP/s / XLA matmul GFLOP/s (how close the model gets to its matmul-bound
speed), ``ratio_to_torch_matmuls`` the same against torch's matmul rate.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx

from experiments.timing import interleaved_seconds, summary, timed
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig


def linear_kernels(state: nnx.State) -> list[jax.Array]:
    """The ``(in, out)`` kernels of every Linear used by the LM forward (the classifier excluded)."""
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
    return [w for path, w in flat.items() if path[-1] == "kernel" and path[0] != "classifier"]


def _torch_matmuls(inputs: list[jax.Array], kernels: list[jax.Array]):
    """A function running the same products in torch, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    xs = [torch.from_numpy(np.array(x)) for x in inputs]
    ws = [torch.from_numpy(np.array(w)) for w in kernels]

    def products():
        with torch.no_grad():
            return [x @ w for x, w in zip(xs, ws, strict=True)]

    return products


def run(args: argparse.Namespace) -> dict:
    """Time the forward and the matched matmuls; return tokens/s, GFLOP/s of each and the ratios."""
    config = SpikeGPTConfig.preset(args.preset).with_mode(args.mode)
    key_tokens, key_inputs = jax.random.split(jax.random.key(args.seed))
    model = SpikeGPT(config, rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)
    del model
    tokens = args.batch * args.seq
    idx = jax.random.randint(key_tokens, (args.batch, args.seq), 0, config.vocab_size)
    forward = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))

    kernels = linear_kernels(state)
    keys = jax.random.split(key_inputs, len(kernels))
    inputs = [jax.random.normal(k, (tokens, w.shape[0]), w.dtype) for k, w in zip(keys, kernels, strict=True)]
    matmuls = jax.jit(lambda xs, ws: [x @ w for x, w in zip(xs, ws, strict=True)])
    variants = {"forward": lambda: forward(state, idx), "xla_matmuls": lambda: matmuls(inputs, kernels)}
    torch_products = _torch_matmuls(inputs, kernels)
    if torch_products is not None:
        variants["torch_matmuls"] = torch_products
    first = {name: timed(fn)[0] for name, fn in variants.items()}
    seconds = interleaved_seconds(variants, args.repeats)

    flops = 2 * tokens * sum(int(w.shape[0]) * int(w.shape[1]) for w in kernels)
    rows = {name: summary(seconds[name], flops / 1e9, "gflop") for name in variants}
    forward_s = rows["forward"]["median_s"]
    results = {
        "preset": args.preset, "mode": args.mode, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
        "devices": [str(d) for d in jax.devices()], "linear_layers": len(kernels), "gflop_per_forward": flops / 1e9,
        "compile_s": first["forward"], "forward_seconds": seconds["forward"],
        "xla_matmul_seconds": seconds["xla_matmuls"], "torch_matmul_seconds": seconds.get("torch_matmuls"),
        "tokens_per_second": tokens / forward_s,
        "forward_gflops": rows["forward"]["gflop_per_s"], "xla_matmul_gflops": rows["xla_matmuls"]["gflop_per_s"],
        "torch_matmul_gflops": rows["torch_matmuls"]["gflop_per_s"] if torch_products else None,
        "ratio_to_xla_matmuls": rows["xla_matmuls"]["median_s"] / forward_s,
        "ratio_to_torch_matmuls": rows["torch_matmuls"]["median_s"] / forward_s if torch_products else None,
    }
    torch_text = (f", torch matmuls {results['torch_matmul_gflops']:.1f} GFLOP/s (ratio "
                  f"{results['ratio_to_torch_matmuls']:.2f})" if torch_products else "")
    print(f"{args.preset} ({args.mode}) batch {args.batch} x seq {args.seq}: {results['tokens_per_second']:.0f} "
          f"tokens/s (median of {args.repeats}; compile {results['compile_s']:.1f} s), forward "
          f"{results['forward_gflops']:.1f} GFLOP/s vs XLA matmuls {results['xla_matmul_gflops']:.1f} GFLOP/s "
          f"(ratio {results['ratio_to_xla_matmuls']:.2f}){torch_text}")
    return results
