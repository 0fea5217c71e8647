"""``python -m experiments.bench generate``: tokens/s of :func:`qslm_jax.generate` (SpikeGPT as an RNN, O(1) per
token) against re-running the parallel forward over the whole buffer for every new token (quadratic), in one run.

Random weights of ``--preset`` (speed does not depend on them), a random prompt of ``--prompt-len`` tokens, the
same sampler (the reference's top-p rule, temperature 1, top-p 0.7) and the same keys in both variants, so they
draw the same tokens up to float rounding (``tokens_agree``). For every length the variants run round-robin
``--repeats`` times (medians reported); compilation is timed separately. ``per_token_growth``: seconds per new
token at the longest length over the shortest (about 1 for linear cost, the length ratio for quadratic).

The reference PyTorch RNN (``run.py``) cannot run here; the issue measured it at 268 tokens/s for 256 new
tokens on ``spikegpt-small`` on this CPU. When torch is installed, the variant ``torch_rnn`` runs in the same
rounds: the same model as a PyTorch RNN stepped from Python with the reference's sort-based sampler
(:class:`TorchRNN`, written from spikegpt.md), a stand-in for the reference under the same load;
``torch_rnn_max_logit_diff`` checks that it computes the same logits as :meth:`SpikeGPT.step`
(``--torch-lengths``: where it is timed; it runs torch on one thread, see :meth:`TorchRNN.generate`).
"""

from __future__ import annotations

import argparse
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.timing import interleaved_seconds, summary, timed
from qslm_jax.generation import _generate, sample_nucleus
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig

TEMPERATURE, TOP_P = 1.0, 0.7
REFERENCE_RNN_TOKENS_PER_S = 268.0  # issue 17: src/model_run.py, spikegpt-small, 256 new tokens, this CPU




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


class TorchRNN:
    """The same SpikeGPT as a PyTorch RNN stepped from Python one token at a time, with the reference's sort-based
    top-p sampler: how ``src/model_run.py`` + ``run.py`` generate (written here from spikegpt.md, not their code;
    same weights, same config quirks). A stand-in for the reference's speed on this machine in this run."""

    def __init__(self, params: dict, config: SpikeGPTConfig):
        import torch

        self.torch, self.config = torch, config
        as_tensor = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
        self.p = jax.tree.map(as_tensor, params)
        self.blocks = [self.p["blocks"][i] for i in range(config.n_layer)]
        self.decay = [-torch.exp(b["att"]["time_decay"]) for b in self.blocks]

    def _ln(self, x, ln):
        return self.torch.nn.functional.layer_norm(x, x.shape[-1:], ln["scale"], ln["bias"], 1e-5)

    @staticmethod
    def _lif(v, current):
        h = v + (current - v) / 2.0
        s = (h >= 1.0).float()
        return h * (1.0 - s), s

    def init_state(self) -> list[dict]:
        """Per block: token-shift inputs, WKV (aa, bb, pp = -1e30) and the two LIF membranes, all zero."""
        zeros = self.torch.zeros(self.config.n_embd)
        return [{"att_x": zeros, "aa": zeros, "bb": zeros, "pp": zeros - 1e30, "ffn_x": zeros, "v1": zeros,
                 "v2": zeros} for _ in range(self.config.n_layer)]

    def step(self, token: int, state: list[dict]):
        """Logits ``(V,)`` after ``token``; updates ``state`` in place."""
        torch, p, cfg = self.torch, self.p, self.config
        x = p["emb"]["embedding"][token]
        x = self._ln((x >= 0).float() if cfg.binarize_embedding else x, p["ln0"])
        for i, (b, st) in enumerate(zip(self.blocks, state, strict=True)):
            att, ffn, scale = b["att"], b["ffn"], cfg.output_scale(i)
            h = self._ln(x, b["ln1"])
            mixed = {m: h * att[f"time_mix_{m}"] + st["att_x"] * (1 - att[f"time_mix_{m}"]) for m in "kvr"}
            st["att_x"] = h
            r = torch.sigmoid(mixed["r"] @ att["receptance"]["kernel"])
            k, v = mixed["k"] @ att["key"]["kernel"], mixed["v"] @ att["value"]["kernel"]
            ww = att["time_first"] + k
            q = torch.maximum(st["pp"], ww)
            e1, e2 = torch.exp(st["pp"] - q), torch.exp(ww - q)
            y = (e1 * st["aa"] + e2 * v) / (e1 * st["bb"] + e2)
            ww = st["pp"] + self.decay[i]
            q = torch.maximum(ww, k)
            e1, e2 = torch.exp(ww - q), torch.exp(k - q)
            st["aa"], st["bb"], st["pp"] = e1 * st["aa"] + e2 * v, e1 * st["bb"] + e2, q
            st["v1"], s1 = self._lif(st["v1"], ((r * y) @ att["output"]["kernel"]) * scale)
            x = x + s1
            h = self._ln(x, b["ln2"])
            xk = h * ffn["time_mix_k"] + st["ffn_x"] * (1 - ffn["time_mix_k"])
            xr = h * ffn["time_mix_r"] + st["ffn_x"] * (1 - ffn["time_mix_r"])
            st["ffn_x"] = h
            kv = (torch.square(torch.relu(xk @ ffn["key"]["kernel"])) @ ffn["value"]["kernel"]) * scale
            st["v2"], s2 = self._lif(st["v2"], torch.sigmoid(xr @ ffn["receptance"]["kernel"]) * kv)
            x = x + s2
            if cfg.halves_after(i):
                x = x / 2
        return self._ln(x, p["ln_out"]) @ p["head"]["kernel"]

    def sample(self, logits):
        """The reference's ``sample_logits``: sort, cumulative cutoff, ``p^(1/T)``, ``torch.multinomial``."""
        torch = self.torch
        probs = torch.softmax(logits, dim=-1)
        sorted_probs, _ = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1).numpy()
        cutoff = float(sorted_probs[np.argmax(cumulative > TOP_P)])
        probs[probs < cutoff] = 0
        return int(torch.multinomial(probs.pow(1.0 / TEMPERATURE), num_samples=1)[0])

    def generate(self, prompt: list[int], n: int) -> list[int]:
        """``n`` sampled tokens after ``prompt``, one Python-level step per token (prompt included).

        Runs torch on one thread: on a loaded 2-core CPU its two OpenMP threads spin against the other jobs
        (measured here: 1.2 s per step with two threads, 8 ms with one)."""
        threads = self.torch.get_num_threads()
        self.torch.set_num_threads(1)
        try:
            with self.torch.no_grad():
                state = self.init_state()
                for token in prompt:
                    logits = self.step(token, state)
                out = []
                for _ in range(n):
                    out.append(self.sample(logits))
                    logits = self.step(out[-1], state)
        finally:
            self.torch.set_num_threads(threads)
        return out


def _torch_rnn(params: dict, config: SpikeGPTConfig) -> TorchRNN | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    return TorchRNN(params, config)


def run(args: argparse.Namespace) -> dict:
    """Time both generation paths at every length; return tokens/s, speed-ups and the growth per token."""
    config = SpikeGPTConfig.preset(args.preset).with_mode(args.mode)
    model = SpikeGPT(config, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model)
    prompt = jax.random.randint(jax.random.key(args.seed), (1, args.prompt_len), 2, config.vocab_size)
    key = jax.random.key(args.seed + 1)
    temperature, top_p = jnp.float32(TEMPERATURE), jnp.float32(TOP_P)
    torch_rnn, prompt_list = _torch_rnn(nnx.to_pure_dict(params), config), prompt[0].tolist()
    results: dict = {"preset": args.preset, "mode": args.mode, "prompt_len": args.prompt_len,
                     "temperature": TEMPERATURE, "top_p": TOP_P, "repeats": args.repeats,
                     "devices": [str(d) for d in jax.devices()],
                     "reference_rnn_tokens_per_s_issue_17": REFERENCE_RNN_TOKENS_PER_S, "lengths": {}}
    for n in args.lengths:
        variants = {"rnn_step": lambda n=n: _generate(graphdef, params, prompt, key, temperature, top_p,
                                                      max_new_tokens=n)}
        if torch_rnn is not None and n in args.torch_lengths:
            variants["torch_rnn"] = lambda n=n: torch_rnn.generate(prompt_list, n)
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
        if "torch_rnn" in row:
            row["speedup_vs_torch_rnn"] = row["torch_rnn"]["median_s"] / row["rnn_step"]["median_s"]
        results["lengths"][str(n)] = row
        print(f"{n} new tokens: RNN step {row['rnn_step']['tokens_per_s']:.0f} tokens/s"
              + (f", re-run forward {row['rerun_parallel_forward']['tokens_per_s']:.1f} tokens/s "
                 f"({row['speedup_vs_rerun']:.1f}x)" if "speedup_vs_rerun" in row else "")
              + (f", torch RNN {row['torch_rnn']['tokens_per_s']:.0f} tokens/s ({row['speedup_vs_torch_rnn']:.1f}x)"
                 if "torch_rnn" in row else ""), flush=True)
    for name in ("rnn_step", "rerun_parallel_forward", "torch_rnn"):
        timed_lengths = [n for n in args.lengths if name in results["lengths"][str(n)]]
        if len(timed_lengths) > 1:
            short, long = min(timed_lengths), max(timed_lengths)
            per_token = [results["lengths"][str(n)][name]["median_s"] / n for n in (short, long)]
            results[f"per_token_growth_{name}"] = per_token[1] / per_token[0]
    if torch_rnn is not None:
        model_logits = _jitted_step(graphdef, params, prompt[:, :1])[0]
        torch_logits = torch_rnn.step(prompt_list[0], torch_rnn.init_state()).numpy()
        results["torch_rnn_max_logit_diff"] = float(np.max(np.abs(np.asarray(model_logits) - torch_logits)))
    return results


@partial(jax.jit, static_argnames="graphdef")
def _jitted_step(graphdef, params, tokens):
    model = nnx.merge(graphdef, params)
    return model.step(tokens[:, 0], model.init_state(tokens.shape[0]))[0]
