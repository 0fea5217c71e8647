"""Text generation with SpikeGPT as the RNN it is: O(1) work per new token.

:func:`generate` runs the prompt through :meth:`SpikeGPT.advance` in one parallel pass (prefill), then a
``lax.scan`` of :meth:`SpikeGPT.step` over the new tokens, each one sampled by :func:`sample_nucleus`, all in one
jit-compiled function (compiled once per model structure, prompt shape and ``max_new_tokens``; temperature,
top-p and seed are traced, so changing them does not recompile).

Sampling follows the reference's ``sample_logits`` (RWKV-LM ``src/utils.py``, used by SpikeGPT's ``run.py``):
``p = softmax(logits)``; the cutoff is the probability of the first token, in descending order, at which the
cumulative probability exceeds ``top_p``; tokens with ``p < cutoff`` are dropped (ties at the cutoff are kept);
the rest are sampled with weights ``p^(1/temperature)``. Two deliberate differences: ``top_p >= 1`` keeps every
token (the reference then keeps only the most likely one, since no cumulative sum exceeds 1), and
``temperature == 0`` is greedy decoding (argmax).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qslm_jax.errors import ConfigError, DataError
from qslm_jax.models.spikegpt import SpikeGPT

# float32 probabilities lie in [0, 1], whose bit patterns (as int32) are below 2^30: 31 halvings find the cutoff
_CUTOFF_BISECTIONS = 31


def nucleus_mask(probs: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """The tokens the reference's top-p rule keeps: ``p >= c`` with ``c`` the largest value such that
    ``sum(p[p >= c]) > top_p`` (over the last axis; every token when ``top_p >= 1``).

    ``c`` is found by bisection on the float32 bit patterns of ``p`` (monotone in ``p`` for ``p >= 0``), so it is
    exactly one of the probabilities, in ``O(V log)`` work without a sort.
    """
    bits = jax.lax.bitcast_convert_type(probs.astype(jnp.float32), jnp.int32)

    def mass_from(threshold):
        return jnp.sum(jnp.where(bits >= threshold[..., None], probs, 0.0), axis=-1)

    def halve(_, bounds):  # invariant: mass_from(hi) <= top_p; mass_from(lo) > top_p unless lo == 0
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        above = mass_from(mid) > top_p
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo = jnp.zeros(bits.shape[:-1], jnp.int32)
    # unrolled: XLA fuses the passes (2.6x faster than a loop on CPU; a sort of V = 50277 is 60x slower)
    lo, _ = jax.lax.fori_loop(0, _CUTOFF_BISECTIONS, halve, (lo, bits.max(axis=-1) + 1), unroll=True)
    return (bits >= lo[..., None]) | (top_p >= 1.0)


def sample_weighted(key: jax.Array, weights: jax.Array, rows: int = 256) -> jax.Array:
    """One index per row of ``weights`` (``(B, V)``, ``>= 0``, each row with a positive entry), drawn with
    probability ``w_i / sum(w)``: inverse-CDF sampling with one uniform ``U`` per row, in two levels.

    The V weights are cut into ``rows`` groups: the group whose cumulative mass first exceeds ``U * sum(w)`` is
    found from the group sums, the index inside it from the group's own cumulative sums. Never returns an index
    of weight 0. (Same distribution as ``jax.random.categorical(key, log w)``, which draws V Gumbel variates
    per row: 100x slower on a CPU for V = 50277.)
    """
    batch, vocab = weights.shape
    width = -(-vocab // rows)
    grouped = jnp.pad(weights, ((0, 0), (0, rows * width - vocab))).reshape(batch, rows, width)
    group_mass = grouped.sum(axis=-1)
    cumulative = jnp.cumsum(group_mass, axis=-1)
    total = cumulative[:, -1]
    target = jnp.minimum(jax.random.uniform(key, (batch,)) * total, jnp.nextafter(total, 0.0))
    group = jnp.sum(cumulative <= target[:, None], axis=-1)  # the first group with cumulative mass > target
    before = jnp.where(group > 0, jnp.take_along_axis(cumulative, jnp.maximum(group - 1, 0)[:, None], -1)[:, 0], 0)
    inside = jnp.cumsum(jnp.take_along_axis(grouped, group[:, None, None], axis=1)[:, 0], axis=-1)
    rest = jnp.clip(target - before, 0.0, jnp.nextafter(inside[:, -1], 0.0))
    return group * width + jnp.sum(inside <= rest[:, None], axis=-1)


def sample_nucleus(key: jax.Array, logits: jax.Array, temperature: float | jax.Array,
                   top_p: float | jax.Array) -> jax.Array:
    """One token id per row of ``logits`` (``(..., V)``): keep :func:`nucleus_mask` of ``softmax(logits)``, then
    draw with weights ``p^(1/temperature)``; ``temperature == 0`` gives ``argmax(logits)``."""
    shifted = logits.astype(jnp.float32) - logits.max(axis=-1, keepdims=True)  # log p + const, max 0
    exp_shifted = jnp.exp(shifted)
    # materialise p once (measured ~15% faster per generated token than letting XLA fuse it into every pass)
    probs = jax.lax.optimization_barrier(exp_shifted / exp_shifted.sum(axis=-1, keepdims=True))
    keep = nucleus_mask(probs, top_p)
    safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
    # p^(1/T) up to a constant factor; the most likely token is always kept and has weight 1
    weights = jnp.where(keep, jnp.exp(shifted / safe_temperature), 0.0)
    flat = weights.reshape(-1, weights.shape[-1])
    sampled = sample_weighted(key, flat).reshape(weights.shape[:-1])
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(graphdef, params, prompt, key, temperature, top_p, *, max_new_tokens: int):
    """Prefill ``prompt`` ``(B, T)``, then sample ``max_new_tokens`` tokens ``(B, N)`` step by step."""
    model = nnx.merge(graphdef, params)
    h, _, state = model.advance(prompt, model.init_state(prompt.shape[0]))
    logits = model.head(h[:, -1])

    def one_token(carry, step_key):
        logits, state = carry
        token = sample_nucleus(step_key, logits, temperature, top_p)
        logits, state = model.step(token, state)
        return (logits, state), token

    _, tokens = jax.lax.scan(one_token, (logits, state), jax.random.split(key, max_new_tokens))
    return tokens.T


def generate(model: SpikeGPT, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_p: float = 0.7,
             seed: int = 0) -> np.ndarray:
    """``max_new_tokens`` token ids sampled after ``prompt_ids`` (``(T,)`` or a batch ``(B, T)`` of equal-length
    prompts), shaped ``(N,)`` or ``(B, N)``.

    The prompt runs in parallel (:meth:`SpikeGPT.advance`), then every new token is one :meth:`SpikeGPT.step`:
    the cost is linear in ``T + N``. Sampling is :func:`sample_nucleus` (the reference's ``sample_logits``;
    ``temperature=0``: greedy). The model generates in its own mode (``with_mode("rnn")`` for ``run.py``'s
    quirks); the same ``seed`` gives the same tokens.
    """
    prompt = np.asarray(prompt_ids)
    single = prompt.ndim == 1
    prompt = prompt[None] if single else prompt
    vocab = model.config.vocab_size
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not np.issubdtype(prompt.dtype, np.integer):
        raise DataError(f"prompt_ids must be a non-empty (T,) or (B, T) array of integer token ids, found shape "
                        f"{prompt.shape} of {prompt.dtype}: tokenize the prompt first (it needs at least one token)")
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise DataError(f"prompt token ids must lie in [0, {vocab}) (the model's vocabulary), found "
                        f"{prompt.min()}..{prompt.max()}: use the model's tokenizer")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, found {max_new_tokens}")
    if not (temperature >= 0 and top_p >= 0):  # also refuses NaN
        raise ConfigError(f"expected temperature >= 0 and top_p >= 0, found temperature={temperature}, "
                          f"top_p={top_p}")
    graphdef, params = nnx.split(model)
    tokens = _generate(graphdef, params, jnp.asarray(prompt, jnp.int32), jax.random.key(seed),
                       jnp.float32(temperature), jnp.float32(top_p), max_new_tokens=max_new_tokens)
    tokens = np.asarray(tokens)
    return tokens[0] if single else tokens
