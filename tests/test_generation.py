"""Generation: the reference's top-p rule, exact weighted sampling, and generate() against a re-run parallel
forward (what generation cost before the RNN mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qslm_jax
from qslm_jax.errors import ConfigError, DataError
from qslm_jax.generation import nucleus_mask, sample_nucleus, sample_weighted
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig


def _reference_cutoff_mask(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The reference's ``sample_logits`` cutoff: sort descending, first cumulative sum above top_p."""
    sorted_probs = np.sort(probs)[::-1]
    cutoff = sorted_probs[np.argmax(np.cumsum(sorted_probs) > top_p)]
    return probs >= cutoff


@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.7, 0.9, 0.999])
def test_nucleus_mask_is_the_reference_cutoff(top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(6, 300)).astype(np.float32)
    logits[1, :40] = logits[1, 0]  # ties at the top: all kept or none
    logits[2] = 0.0  # uniform
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    got = np.asarray(nucleus_mask(jnp.asarray(probs), top_p))
    for row in range(len(probs)):
        np.testing.assert_array_equal(got[row], _reference_cutoff_mask(probs[row], top_p), err_msg=str(row))
    assert got.sum(axis=1).min() >= 1


def test_nucleus_mask_keeps_everything_at_top_p_one():
    probs = jax.nn.softmax(jnp.asarray(np.random.default_rng(1).normal(size=(2, 50)), jnp.float32))
    assert bool(nucleus_mask(probs, 1.0).all())


def test_weighted_sampling_frequencies_and_never_a_zero_weight():
    weights = jnp.asarray([[0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.5]])
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_weighted(k, weights, rows=4)[0]))(keys))
    counts = np.bincount(draws, minlength=12)
    assert counts[np.asarray(weights[0]) == 0].sum() == 0
    expected = np.asarray(weights[0]) / float(weights.sum()) * len(draws)
    # each frequency within 5 binomial standard deviations of its expectation
    np.testing.assert_array_less(np.abs(counts - expected), 5 * np.sqrt(expected + 1))


def test_sample_nucleus_greedy_at_zero_temperature_and_inside_the_nucleus():
    logits = jnp.asarray(np.random.default_rng(2).normal(scale=3.0, size=(4, 200)), jnp.float32)
    key = jax.random.key(3)
    sample = jax.jit(sample_nucleus)
    np.testing.assert_array_equal(sample(key, logits, 0.0, 0.7), jnp.argmax(logits, axis=-1))
    keep = np.asarray(nucleus_mask(jax.nn.softmax(logits), 0.5))
    assert keep.sum(axis=1).min() > 1 and keep.sum(axis=1).max() < 200
    tokens = np.asarray(jax.vmap(lambda k: sample(k, logits, 1.3, 0.5))(jax.random.split(key, 200)))
    assert keep[np.arange(4), tokens].all()
    assert len(np.unique(tokens)) > 4  # it samples, not only the argmax


@pytest.fixture(scope="module")
def micro_model():
    config = SpikeGPTConfig(n_layer=2, n_embd=16, vocab_size=60, ctx_len=32).with_mode("rnn")
    return SpikeGPT(config, rngs=nnx.Rngs(0))


def _greedy_by_parallel_forward(model: SpikeGPT, prompt: np.ndarray, n: int) -> np.ndarray:
    """Greedy continuation re-running the whole parallel forward for every new token (quadratic): the
    model is causal, so the logits at position t of a zero-padded buffer depend on tokens 0..t only."""
    buffer = np.zeros(len(prompt) + n, np.int32)
    buffer[:len(prompt)] = prompt
    forward = nnx.jit(lambda m, idx: m(idx)[0])
    for t in range(len(prompt), len(buffer)):
        buffer[t] = int(jnp.argmax(forward(model, jnp.asarray(buffer[None]))[t - 1]))
    return buffer[len(prompt):]


@pytest.mark.slow
def test_greedy_generation_equals_rerunning_the_parallel_forward(micro_model):
    prompt = np.array([3, 17, 42, 5])
    got = qslm_jax.generate(micro_model, prompt, 12, temperature=0.0)
    np.testing.assert_array_equal(got, _greedy_by_parallel_forward(micro_model, prompt, 12))


@pytest.mark.slow
def test_generation_is_seeded_batched_and_in_the_vocabulary(micro_model):
    prompts = np.array([[3, 17, 42], [9, 9, 1]])
    a = qslm_jax.generate(micro_model, prompts, 16, temperature=1.5, top_p=0.95, seed=7)
    b = qslm_jax.generate(micro_model, prompts, 16, temperature=1.5, top_p=0.95, seed=7)
    c = qslm_jax.generate(micro_model, prompts, 16, temperature=1.5, top_p=0.95, seed=8)
    assert a.shape == (2, 16) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert a.min() >= 0 and a.max() < micro_model.config.vocab_size


def test_generation_refuses_bad_inputs(micro_model):
    with pytest.raises(DataError, match="non-empty"):
        qslm_jax.generate(micro_model, np.zeros((1, 0), np.int32), 4)
    with pytest.raises(DataError, match=r"\[0, 60\)"):
        qslm_jax.generate(micro_model, [1, 60], 4)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        qslm_jax.generate(micro_model, [1, 2], 0)
    with pytest.raises(ConfigError, match="temperature"):
        qslm_jax.generate(micro_model, [1, 2], 4, temperature=-1.0)
