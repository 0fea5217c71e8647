"""SpikingBERT: parity with the reference PyTorch implementation (fixtures/spikingbert_H32_T16), training
gradients, structure (one scan over T, memory constant in T), weight-transform hook, feedback option."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.spikingbert import load_spikingbert, to_state_dict
from qslm_jax.equilibrium.implicit import SolveLog, fixed_point
from qslm_jax.errors import ConfigError
from qslm_jax.models.spikingbert import SpikingBERT, SpikingBERTConfig, clip_rate, is_encoder_kernel

FIXTURE = "spikingbert_H32_T16"


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    """(model loaded from the reference checkpoint, io.npz arrays, (ids, segments, mask))."""
    folder = fixtures_dir / FIXTURE
    io = dict(np.load(folder / "io.npz"))
    model = load_spikingbert(folder / "pytorch_model.bin", T=16, vth=1.0)
    inputs = tuple(jnp.asarray(io[k]) for k in ("input_ids", "segment_ids", "attention_mask"))
    return model, io, inputs


@pytest.fixture(scope="module")
def simulated(ref):
    model, _, inputs = ref
    graphdef, params = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        output = jax.jit(lambda p, *x: nnx.merge(graphdef, p).simulate(*x))(params, *inputs)
    return jax.tree.map(np.asarray, output)


def fixture_loss(output):
    """The fixture's loss: sum_m mean(rep_m^2) + sum_k mean(att_k^2, entries <= -100 zeroed) + mean(logits^2)."""
    loss = sum(jnp.mean(r ** 2) for r in output.reps)
    loss += sum(jnp.mean(jnp.where(a <= -100.0, 0.0, a) ** 2) for a in output.attention_scores)
    return loss + jnp.mean(output.logits ** 2)


def loss_and_grads(model, inputs, **kwargs):
    """Jitted value and gradient (w.r.t. every parameter) of :func:`fixture_loss` on the training path."""
    graphdef, params = nnx.split(model)

    def loss(p):
        return fixture_loss(nnx.merge(graphdef, p).train_forward(*inputs, **kwargs))

    return jax.jit(jax.value_and_grad(loss))(params)


def test_all_asrs_match_reference(ref, simulated):
    model, io, _ = ref
    T = model.config.T
    assert len(simulated.asrs) == 25
    total = differing = 0
    for layer, asr in enumerate(simulated.asrs):
        expected = io[f"asr_{layer}"]
        assert asr.shape == expected.shape, layer
        diff = np.abs(asr - expected)
        # a differing rate can only be one spike count away (a membrane landing on the other side of vth)
        assert diff.max() <= 1.0 / T + 1e-7, (layer, diff.max())
        total += diff.size
        differing += int((diff > 0).sum())
    print(f"ASR entries differing from the reference: {differing} of {total}")
    assert differing <= 0.001 * total


def test_logits_and_fit_dense_reps_match_reference(ref, simulated):
    _, io, _ = ref
    np.testing.assert_allclose(simulated.logits, io["eval_logits"], rtol=0, atol=1e-4)
    assert [t.shape for t in simulated.taps] == [io[f"asr_{l}"].shape for l in (0, 6, 12, 18, 24)]
    for m, tap in enumerate(simulated.taps):
        np.testing.assert_array_equal(tap, io[f"asr_{6 * m}"])
        np.testing.assert_allclose(simulated.reps[m], io[f"eval_fit_dense_rep_{m}"], rtol=0, atol=1e-4)


def test_summed_attention_scores_match_reference(ref, simulated):
    _, io, _ = ref
    for k, scores in enumerate(simulated.attention_scores):
        expected = io[f"attn_scores_sum_{k}"]
        # masked keys of the padded row carry T * -10000 (the mask is summed with the scores)
        assert expected.min() < -1e5
        np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4)


def test_surrogate_taps_match_reference(ref):
    model, io, inputs = ref
    with jax.default_matmul_precision("highest"):
        rates = model.steady_state(*inputs).rates
    for layer in (0, 6, 12, 18, 24):
        np.testing.assert_allclose(rates[layer], io[f"surrogate_tap_{layer}"], rtol=0, atol=1e-5)


def test_training_gradients_match_reference(ref):
    """Every parameter's gradient of the fixture loss (training path) vs the stored ``grad__*`` arrays.

    Tolerance per array: max |g - g_ref| <= 1e-4 * max |g_ref|. float32 summation-order differences are
    absolute errors of the size of the summed terms, so they scale with the array's magnitude, while an
    elementwise relative test is ill-posed on the many (near-)zero entries (rates clipped at 0 or 1).
    """
    model, io, inputs = ref
    with jax.default_matmul_precision("highest"):
        loss, grads = loss_and_grads(model, inputs)
    np.testing.assert_allclose(float(loss), float(io["train_loss"]), rtol=1e-5)
    grads = to_state_dict(model, grads)
    reference = {k.removeprefix("grad__"): v for k, v in io.items() if k.startswith("grad__")}
    # the feedback layer is disabled, so the reference stores no gradient for it and ours is exactly 0
    assert set(grads) - set(reference) == {"network_s25.fc.weight"}
    assert not np.any(grads["network_s25.fc.weight"])
    assert set(reference) <= set(grads)
    worst = 0.0
    for key, expected in reference.items():
        assert grads[key].shape == expected.shape, key
        err = np.abs(grads[key] - expected).max() / np.abs(expected).max()
        worst = max(worst, err)
        assert err <= 1e-4, (key, err)
    print(f"worst gradient error relative to the array's max-abs: {worst:.2e}")
    # padding_idx = 0: the pad row gets no gradient although the second sequence contains pad tokens
    assert (np.asarray(inputs[0]) == 0).any()
    assert not np.any(grads["network_x.word_embeddings.weight"][0])


def test_clip_rate_gradient_is_one_on_the_closed_interval():
    x = jnp.array([-0.5, 0.0, 0.5, 1.0, 1.5])
    np.testing.assert_array_equal(clip_rate(x), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(jax.grad(lambda v: clip_rate(v).sum())(x), [0.0, 1.0, 1.0, 1.0, 0.0])


def test_simulation_is_a_single_scan_over_T():
    config = SpikingBERTConfig.preset("tiny", T=7)
    model = SpikingBERT(config, rngs=nnx.Rngs(0))
    ids = jnp.ones((1, 5), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda i: model.simulate(i))(ids)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    assert scans[0].params["length"] == config.T


def small_model(**overrides) -> SpikingBERT:
    """A randomly initialised model of the fixture's width (fewer blocks keep compilation short)."""
    return SpikingBERT(SpikingBERTConfig.preset("tiny", **overrides), rngs=nnx.Rngs(1))


def _train_step_temp_bytes(T: int, gradient_at: str) -> int:
    model = small_model(num_blocks=1, T=T)
    graphdef, state = nnx.split(model)
    ids = jnp.ones((2, 8), jnp.int32)

    def loss(s):
        return fixture_loss(nnx.merge(graphdef, s).train_forward(ids, gradient_at=gradient_at))

    return jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("gradient_at", ["surrogate", "equilibrium"])
def test_training_memory_does_not_grow_with_T(gradient_at):
    assert _train_step_temp_bytes(32, gradient_at) <= _train_step_temp_bytes(2, gradient_at)


class _SurrogateRatesSNN(SpikingBERT):
    """A SpikingBERT whose 'simulation' returns the surrogate's own rates (an SNN at the surrogate's point)."""

    def simulate_rates(self, input_ids, segment_ids=None, attention_mask=None, *, surrogate_spikes=False):
        rates, scores = self.steady_state(input_ids, segment_ids, attention_mask)
        return rates, scores


def test_equilibrium_gradient_point_keeps_the_snn_value_and_moves_the_linearisation(ref):
    """gradient_at="equilibrium": taps keep the SNN's value; the gradient is the surrogate's, linearised at
    the SNN's rates. Where the SNN's rates equal the surrogate's the two gradient points must agree exactly;
    on the reference model (T = 16) they do not, since its rates differ from the surrogate's."""
    model, _, inputs = ref
    with jax.default_matmul_precision("highest"):
        at_eq = model.train_forward(*inputs, gradient_at="equilibrium")
        simulated = model.simulate(*inputs)
        for got, want in zip(at_eq.taps, simulated.taps, strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(at_eq.logits, simulated.logits)
        surrogate_grads = to_state_dict(model, loss_and_grads(model, inputs)[1])
        eq_grads = to_state_dict(model, loss_and_grads(model, inputs, gradient_at="equilibrium")[1])
        twin = _SurrogateRatesSNN(model.config, rngs=nnx.Rngs(0))
        nnx.update(twin, nnx.state(model))
        twin_surrogate = to_state_dict(twin, loss_and_grads(twin, inputs)[1])
        twin_eq = to_state_dict(twin, loss_and_grads(twin, inputs, gradient_at="equilibrium")[1])
    for key, expected in twin_surrogate.items():
        np.testing.assert_allclose(twin_eq[key], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(),
                                   err_msg=key)
    differing = [k for k in surrogate_grads if not np.allclose(eq_grads[k], surrogate_grads[k], rtol=1e-2)]
    assert "network_s1.dense.weight" in differing and len(differing) > len(surrogate_grads) // 2
    with pytest.raises(ConfigError, match="gradient_at"):
        model.train_forward(*inputs, gradient_at="midway")


def _ste_sign(w):
    """A 1-bit quantizer with straight-through gradient (the shape of the extreme-KD weight transform)."""
    return w + jax.lax.stop_gradient(jnp.mean(jnp.abs(w)) * jnp.where(w > 0, 1.0, -1.0) - w)


def test_model_runs_from_transformed_state_under_jit_and_grad():
    model = small_model(num_blocks=2, T=4)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(0), (2, 6), 1, 100)
    encoder_kernels = [p for p, _ in nnx.to_flat_state(params) if is_encoder_kernel(p)]
    assert len(encoder_kernels) == 6 * 2

    def transform(p):
        return nnx.map_state(lambda path, v: v.replace(_ste_sign(v.get_value())) if is_encoder_kernel(path)
                             else v, p)

    @jax.jit
    def loss_of_latent(p):
        return fixture_loss(nnx.merge(graphdef, transform(p), rest).train_forward(ids))

    loss, grads = jax.value_and_grad(loss_of_latent)(params)

    # the same model with the quantized kernels written in directly gives the same loss, and by the STE
    # the gradient w.r.t. the latent kernels equals the gradient w.r.t. the quantized ones
    quantized = nnx.merge(graphdef, jax.lax.stop_gradient(transform(params)), rest)
    direct_loss, direct_grads = loss_and_grads(quantized, (ids,))
    np.testing.assert_allclose(loss, direct_loss, rtol=1e-6)
    flat, direct = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(direct_grads))
    for path in encoder_kernels:  # two compilations: float32 fusion differences, relative to the max-abs
        got, want = flat[path].get_value(), direct[path].get_value()
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), path
    assert any(np.any(flat[p].get_value()) for p in encoder_kernels)
    # and the simulation really uses the transformed weights: not the latent model's result
    latent_logits = model.simulate(ids).logits
    assert not np.allclose(quantized.simulate(ids).logits, latent_logits)


@pytest.mark.parametrize("gradient_at", ["surrogate", "equilibrium"])
def test_feedback_with_zero_weights_equals_the_feed_forward_network(gradient_at):
    model = small_model(num_blocks=1, T=8)
    inputs = (jax.random.randint(jax.random.key(3), (2, 6), 1, 100),)
    with_fb = SpikingBERT(dataclasses.replace(model.config, feedback=True), rngs=nnx.Rngs(0))
    nnx.update(with_fb, nnx.state(model))
    with_fb.feedback.kernel[...] = jnp.zeros_like(with_fb.feedback.kernel[...])
    a = model.simulate(*inputs)
    b = with_fb.simulate(*inputs)
    assert 0 < np.mean(a.asrs[-1]) < 1
    for x, y in zip(a.asrs, b.asrs, strict=True):
        np.testing.assert_array_equal(x, y)

    with pytest.raises(ConfigError, match="fixed_point"):
        with_fb.train_forward(*inputs)

    calls = []

    def unrolled_fixed_point(g, z0, params):
        """Plain iteration differentiated by unrolling (a stand-in for the implicit solver)."""
        calls.append(z0)
        z = z0
        for _ in range(3):
            z = g(z, params)
        return z0 + (z - jax.lax.stop_gradient(z))

    def grads_of(m, **kwargs):
        return to_state_dict(m, loss_and_grads(m, inputs, gradient_at=gradient_at, **kwargs)[1])

    with jax.default_matmul_precision("highest"):
        expected = grads_of(model)
        got = grads_of(with_fb, fixed_point=unrolled_fixed_point)
    assert calls[0].shape == a.asrs[-1].shape
    feedback_key = "network_s7.fc.weight"
    for key in set(expected) - {feedback_key}:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # with zero feedback weights z still enters f, so the feedback kernel gets a (generally non-zero) gradient
    assert not np.any(expected[feedback_key])
    assert np.any(got[feedback_key])


def _relative_error(got, want) -> float:
    """``||got - want|| / ||want||`` over all leaves of two gradient pytrees."""
    got, want = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (got, want))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _unrolled_fixed_point(iterations: int):
    """``z_{k+1} = g(z_k)`` from ``z_0``, differentiated through every iteration (the implicit solver's reference)."""
    def solve(g, z0, params):
        return jax.lax.fori_loop(0, iterations, lambda _, z: g(z, params), z0)
    return solve


@pytest.mark.slow
@pytest.mark.parametrize("gradient_at", ["equilibrium", "surrogate"])
def test_feedback_implicit_gradient_matches_the_unrolled_iteration(gradient_at):
    """Nonzero feedback: the implicit (adjoint) gradient of every parameter equals differentiation through 200
    iterations of the feedback fixed point, and the loop really changes the gradient."""
    model = small_model(num_blocks=1, T=8, feedback=True)
    model.feedback.kernel[...] = 0.2 * model.feedback.kernel[...]  # contractive, ~20 adjoint iterations
    inputs = (jax.random.randint(jax.random.key(3), (2, 6), 1, 100),)
    log = SolveLog()
    implicit = functools.partial(fixed_point, solver="anderson", tol=1e-6, max_iter=200, log=log)
    with jax.default_matmul_precision("highest"):
        loss, got = loss_and_grads(model, inputs, gradient_at=gradient_at, fixed_point=implicit)
        unrolled_loss, want = loss_and_grads(model, inputs, gradient_at=gradient_at,
                                             fixed_point=_unrolled_fixed_point(200))
        _, one_step = loss_and_grads(model, inputs, gradient_at=gradient_at, fixed_point=_unrolled_fixed_point(1))
    np.testing.assert_allclose(loss, unrolled_loss, rtol=1e-6)
    assert _relative_error(got, want) < 1e-4
    assert _relative_error(got["feedback"], want["feedback"]) < 1e-4
    assert np.any(np.asarray(want["feedback"]["kernel"].get_value()))
    assert _relative_error(one_step, want) > 1e-2  # the feedback loop matters for the gradient

    stats = log.summary()
    assert stats["adjoint"]["solves"] == 1 and stats["adjoint"]["unconverged"] == 0
    assert stats["adjoint"]["iterations_max"] > 2 and stats["adjoint"]["residual_max"] <= 1e-6
    forward = stats["forward"]
    assert forward["solves"] == 1 and forward["unconverged"] == 0
    # pinned to the SNN's rates, the forward solve starts on its fixed point; the surrogate's own one is elsewhere
    assert (forward["iterations_max"] == 0) == (gradient_at == "equilibrium")


def test_presets_and_config_validation():
    full = SpikingBERTConfig.preset("full")
    assert (full.hidden, full.heads, full.intermediate, full.vocab, full.max_positions) == (768, 12, 3072, 30522, 512)
    assert full.num_neuron_layers == 25 and full.tap_layers == (0, 6, 12, 18, 24)
    with pytest.raises(ConfigError, match="unknown SpikingBERT preset"):
        SpikingBERTConfig.preset("huge")
    with pytest.raises(ConfigError, match="multiple of heads"):
        SpikingBERTConfig(hidden=30, heads=4)
