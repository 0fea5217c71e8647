"""``python -m experiments.bench generate``: tokens/s of :func:`qslm_jax.generate` (SpikeGPT as an RNN, O(1) per
token) against re-running the parallel forward over the whole buffer for every new token (quadratic), in one run.

Random weights of ``--preset`` (speed does not depend on them), a random prompt of ``--prompt-len`` tokens, the
same sampler (the reference's top-p rule, temperature 1, top-p 0.7) and the same keys in both variants, so they
draw the same tokens up to float rounding (``tokens_agree``). For every length the variants run round-robin
``--repeats`` times (medians reported); compilation is timed separately. ``per_token_growth``: seconds per new
token at the longest length over the shortest (about 1 for linear cost, the length ratio for quadratic).

The reference PyTorch RNN (``run.py``) cannot run here; the issue measured it at 268 tokens/s for 256 new
tokens on ``spikegpt-small`` on this CPU. When torch is installed, ``torch_head_matvec_tokens_per_s`` times
the one product every RNN step must make, ``head · x`` (V x C), in torch here and now: an upper bound of any
torch RNN's rate under the present load.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.timing import MIN_REPEATS, interleaved_seconds, summary, timed
from qslm_jax.generation import _generate, sample_nucleus
from qslm_jax.models.spikegpt import MODES, PRESETS, SpikeGPT, SpikeGPTConfig

TEMPERATURE, TOP_P = 1.0, 0.7
REFERENCE_RNN_TOKENS_PER_S = 268.0  # issue 17: src/model_run.py, spikegpt-small, 256 new tokens, this CPU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The generation benchmark's flags."""
    parser.add_argument("--preset", default="spikegpt-small", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--mode", default="rnn", choices=MODES, help="forward quirks (rnn: run.py's)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512], help="new tokens per call")
    parser.add_argument("--quadratic-lengths", type=int, nargs="*", default=[256, 512],
                        help="lengths at which the re-run-the-forward baseline is timed too")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="timed rounds (medians reported)")
    parser.add_argument("--seed", type=int, default=0)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate_by_rerunning(graphdef, params, prompt, key, *, max_new_tokens: int):
    """The quadratic way: for every new token, the parallel forward over the whole (zero-padded) buffer; the
    model is causal, so position t - 1 sees tokens 0 .. t - 1 only. Same sampler and keys as ``_generate``."""
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt.shape
    buffer = jnp.concatenate([prompt, jnp.zeros((batch, max_new_tokens), prompt.dtype)], axis=1)

    def one_token(i, buffer_and_keys):
        buffer, keys = buffer_and_keys
        h, _ = model.features(buffer)
        position = prompt_len + i
        logits = model.head(jax.lax.dynamic_index_in_dim(h, position - 1, axis=1, keepdims=False))
        token = sample_nucleus(keys[i], logits, TEMPERATURE, TOP_P)
        return jax.lax.dynamic_update_index_in_dim(buffer, token, position, axis=1), keys

    keys = jax.random.split(key, max_new_tokens)
    buffer, _ = jax.lax.fori_loop(0, max_new_tokens, one_token, (buffer, keys))
    return buffer[:, prompt_len:]


def _torch_head_rate(head_kernel: np.ndarray, tokens: int, repeats: int) -> float | None:
    """Median tokens/s of ``tokens`` torch mat-vec products ``W x`` (W: V x C), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    weight = torch.from_numpy(np.ascontiguousarray(head_kernel.T))
    x = torch.ones(weight.shape[1])
    seconds = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(tokens):
                x[:1] = (weight @ x)[:1] * 1e-9 + 1.0  # each product depends on the previous one
            seconds.append(time.perf_counter() - start)
    return tokens / float(np.median(seconds))


def run(args: argparse.Namespace) -> dict:
    """Time both generation paths at every length; return tokens/s, speed-ups and the growth per token."""
    config = SpikeGPTConfig.preset(args.preset).with_mode(args.mode)
    model = SpikeGPT(config, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model)
    prompt = jax.random.randint(jax.random.key(args.seed), (1, args.prompt_len), 2, config.vocab_size)
    key = jax.random.key(args.seed + 1)
    temperature, top_p = jnp.float32(TEMPERATURE), jnp.float32(TOP_P)
    results: dict = {"preset": args.preset, "mode": args.mode, "prompt_len": args.prompt_len,
                     "temperature": TEMPERATURE, "top_p": TOP_P, "repeats": args.repeats,
                     "devices": [str(d) for d in jax.devices()],
                     "reference_rnn_tokens_per_s_issue_17": REFERENCE_RNN_TOKENS_PER_S, "lengths": {}}
    for n in args.lengths:
        variants = {"rnn_step": lambda n=n: _generate(graphdef, params, prompt, key, temperature, top_p,
                                                      max_new_tokens=n)}
        if n in args.quadratic_lengths:
            variants["rerun_parallel_forward"] = lambda n=n: _generate_by_rerunning(graphdef, params, prompt, key,
                                                                                    max_new_tokens=n)
        first = {name: timed(fn) for name, fn in variants.items()}  # compiles
        seconds = interleaved_seconds(variants, args.repeats)
        row = {name: {**summary(seconds[name], n, "tokens"), "first_call_s": first[name][0]} for name in variants}
        if "rerun_parallel_forward" in row:
            tokens = [np.asarray(first[name][1]) for name in ("rnn_step", "rerun_parallel_forward")]
            row["tokens_agree"] = float(np.mean(tokens[0] == tokens[1]))
            row["speedup_vs_rerun"] = (row["rerun_parallel_forward"]["median_s"] / row["rnn_step"]["median_s"])
        row["vs_reference_rnn_issue_17"] = row["rnn_step"]["tokens_per_s"] / REFERENCE_RNN_TOKENS_PER_S
        results["lengths"][str(n)] = row
        print(f"{n} new tokens: RNN step {row['rnn_step']['tokens_per_s']:.0f} tokens/s"
              + (f", re-run forward {row['rerun_parallel_forward']['tokens_per_s']:.1f} tokens/s "
                 f"({row['speedup_vs_rerun']:.1f}x)" if "speedup_vs_rerun" in row else ""), flush=True)
    for name in ("rnn_step", "rerun_parallel_forward"):
        timed_lengths = [n for n in args.lengths if name in results["lengths"][str(n)]]
        if len(timed_lengths) > 1:
            short, long = min(timed_lengths), max(timed_lengths)
            per_token = [results["lengths"][str(n)][name]["median_s"] / n for n in (short, long)]
            results[f"per_token_growth_{name}"] = per_token[1] / per_token[0]
    head = np.asarray(params["head"]["kernel"][...])
    results["torch_head_matvec_tokens_per_s"] = _torch_head_rate(head, min(args.lengths), args.repeats)
    return results
