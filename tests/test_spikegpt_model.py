"""SpikeGPT in Flax NNX: parity with the reference's stored outputs, the maths of its parts, presets,
gradients, and the functional split/merge path used by quantization."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.spikegpt import load_spikegpt
from qslm_jax.errors import ConfigError
from qslm_jax.models.spikegpt import PRESETS, SpikeGPT, SpikeGPTConfig, token_shift, wkv
from qslm_jax.neurons import spike

FIXTURES = ["spikegpt_L2_C64_V100", "spikegpt_L8_C32_V77"]
LOGIT_TOL = 1e-4  # the task's parity bound; observed max |diff| is ~2.4e-6
CURRENT_TOL = 5e-5  # LIF input currents (values of order 1-10); observed max |diff| is ~1e-5


def _jitted(model: SpikeGPT, fn):
    """``fn(model, *args)`` jitted as a pure function of the model's state (via nnx.split / nnx.merge)."""
    graphdef, state = nnx.split(model)
    pure = jax.jit(lambda s, *args: fn(nnx.merge(graphdef, s), *args))
    return lambda *args: pure(state, *args)


def _tiny(**overrides) -> SpikeGPT:
    return SpikeGPT(SpikeGPTConfig.preset("spikegpt-tiny", **overrides), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- parity with the PyTorch reference


@pytest.fixture(scope="module", params=FIXTURES)
def reference(request, fixtures_dir):
    folder = fixtures_dir / request.param
    return folder, dict(np.load(folder / "io.npz")), json.loads((folder / "summary.json").read_text())


@pytest.mark.parametrize("mode", ["gpt", "rnn"])
def test_logits_match_reference(reference, mode):
    folder, io, _ = reference
    model = load_spikegpt(folder / "tiny_random.pth", mode=mode)
    with jax.default_matmul_precision("highest"):
        logits = _jitted(model, SpikeGPT.__call__)(jnp.asarray(io["input_idx"]))
    assert logits.shape == io[f"logits_{mode}"].shape
    np.testing.assert_allclose(np.asarray(logits), io[f"logits_{mode}"], rtol=0, atol=LOGIT_TOL)


@pytest.mark.parametrize("mode", ["rnn", "gpt"])
def test_token_by_token_steps_match_reference(reference, mode):
    # model_run.py's RNN: one token at a time, the state carried between tokens (fixture logits_rnn)
    folder, io, _ = reference
    model = load_spikegpt(folder / "tiny_random.pth", mode=mode)
    idx = jnp.asarray(io["input_idx"])

    def token_by_token(m, tokens):
        def one(state, column):
            logits, state = m.step(column, state)
            return state, logits

        return jnp.swapaxes(jax.lax.scan(one, m.init_state(tokens.shape[0]), tokens.T)[1], 0, 1)

    with jax.default_matmul_precision("highest"):
        logits = _jitted(model, token_by_token)(idx)
    np.testing.assert_allclose(np.asarray(logits), io[f"logits_{mode}"], rtol=0, atol=LOGIT_TOL)


def test_gpt_mode_lif_spikes_identical_and_currents_close(reference):
    folder, io, summary = reference
    model = load_spikegpt(folder / "tiny_random.pth", mode="gpt")
    with jax.default_matmul_precision("highest"):
        trace = _jitted(model, SpikeGPT.lif_trace)(jnp.asarray(io["input_idx"]))
    assert set(trace) == {k for k in io if k.startswith("blocks_")}
    for name, value in trace.items():
        if name.endswith("_spk"):
            np.testing.assert_array_equal(np.asarray(value), io[name], err_msg=name)
        else:
            np.testing.assert_allclose(np.asarray(value), io[name], rtol=0, atol=CURRENT_TOL, err_msg=name)
    # the reference's printed spike rates (rounded to 4 decimals) are the means of these spikes
    _, rates = _jitted(model, lambda m, i: m(i, return_spike_rates=True))(jnp.asarray(io["input_idx"]))
    for i in range(model.config.n_layer):
        for j in (1, 2):
            expected = summary["spike_rates"][f"blocks.{i}.lif{j}.rate"]
            assert rates[i, j - 1] == pytest.approx(expected, abs=5e-5)


def test_rnn_mode_differs_from_gpt_mode_where_quirks_apply(fixtures_dir):
    # L8_V77 exercises the rescaling (blocks 6, 7): RNN and GPT logits differ (the reference: max 4.56)
    io = np.load(fixtures_dir / "spikegpt_L8_C32_V77" / "io.npz")
    assert np.abs(io["logits_gpt"] - io["logits_rnn"]).max() > 1.0
    gpt = load_spikegpt(fixtures_dir / "spikegpt_L8_C32_V77" / "tiny_random.pth", mode="gpt")
    rnn = load_spikegpt(fixtures_dir / "spikegpt_L8_C32_V77" / "tiny_random.pth", mode="rnn")
    assert (gpt.config.rescale_every, rnn.config.rescale_every) == (0, 6)
    assert gpt.config.binarize_embedding and rnn.config.binarize_embedding  # V == 77: both binarise


# ---------------------------------------------------------------- the parts


def _wkv_direct(w, u, k, v):
    """The WKV definition of spikegpt.md summed directly in float64 (no stabilisation)."""
    b, t_len, c = k.shape
    y = np.zeros((b, t_len, c))
    for t in range(t_len):
        num = np.exp(u + k[:, t]) * v[:, t]
        den = np.exp(u + k[:, t])
        for i in range(t):
            weight = np.exp((t - 1 - i) * w + k[:, i])
            num, den = num + weight * v[:, i], den + weight
        y[:, t] = num / den
    return y


def test_wkv_matches_direct_sum_including_large_exponents():
    rng = np.random.default_rng(0)
    shape = (2, 9, 5)
    w = -np.exp(rng.normal(size=5))
    u = rng.normal(size=5)
    k = rng.normal(scale=3.0, size=shape)
    k[0, 3] = 80.0  # e^80 overflows no float32 intermediate in the stable form
    v = rng.normal(size=shape)
    got, _ = wkv(*(jnp.asarray(a, jnp.float32) for a in (w, u, k, v)))
    np.testing.assert_allclose(np.asarray(got), _wkv_direct(w, u, k, v), rtol=2e-5, atol=2e-6)


def test_advancing_in_chunks_equals_one_pass(fixtures_dir):
    # the state after a chunk continues the sequence: two chunks of 8 tokens give the 16-token outputs
    folder = fixtures_dir / "spikegpt_L2_C64_V100"  # weights that fire
    model = load_spikegpt(folder / "tiny_random.pth", mode="rnn")
    idx = jnp.asarray(np.load(folder / "io.npz")["input_idx"])
    advance = _jitted(model, SpikeGPT.advance)
    whole, traces, final = advance(idx, model.init_state(2))
    state, pieces = model.init_state(2), []
    for chunk in (idx[:, :8], idx[:, 8:]):
        h, _, state = advance(chunk, state)
        pieces.append(h)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, rtol=0, atol=1e-4)
    for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(final), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert 0 < float(jnp.mean(traces[0].lif1_spk)) < 1  # the membranes carried across chunks do fire


def test_init_state_shapes_and_values():
    model = _tiny()
    state = model.init_state(3)
    assert len(state) == model.config.n_layer
    assert {leaf.shape for leaf in jax.tree.leaves(state)} == {(3, 32)}
    assert state[0].att.wkv.exponent.max() == np.float32(-1e38) and float(state[1].lif2.max()) == 0.0


def test_token_shift_hand_example():
    h = jnp.arange(12.0).reshape(1, 3, 4)
    np.testing.assert_array_equal(token_shift(h), [[[0, 0, 0, 0], [0, 1, 2, 3], [4, 5, 6, 7]]])


@pytest.mark.parametrize("x", [-1.2, -0.25, 0.0, 0.4, 2.0])
def test_spike_surrogate_gradient_is_atan_derivative(x):
    # ATan with alpha = 2: d/dx = (alpha/2) / (1 + (pi/2 * alpha * x)^2) = 1 / (1 + (pi x)^2)
    assert jax.grad(spike)(jnp.float32(x)) == pytest.approx(1.0 / (1.0 + (math.pi * x) ** 2), rel=1e-6)


def test_binarised_embedding_gradient_is_surrogate_of_embedding():
    model = _tiny()
    graphdef, state = nnx.split(model)
    idx = jnp.array([[3, 7]])

    def first_ln0_input_sum(s):  # sum of H(emb[idx]) reaches the embedding through the surrogate only
        m = nnx.merge(graphdef, s)
        return spike(m.emb(idx)).sum()

    grads = jax.grad(first_ln0_input_sum)(state)
    table = model.emb.embedding[...]
    expected = np.zeros(table.shape, np.float32)
    for token in (3, 7):
        expected[token] = 1.0 / (1.0 + (math.pi * np.asarray(table[token])) ** 2)
    np.testing.assert_allclose(np.asarray(grads["emb"]["embedding"][...]), expected, rtol=1e-6)


def test_every_parameter_gets_a_finite_nonzero_gradient():
    model = _tiny(n_classes=2)
    graphdef, state = nnx.split(model)
    idx = jax.random.randint(jax.random.key(1), (2, 12), 0, model.config.vocab_size)
    labels = jnp.array([0, 1])

    def loss(s):
        m = nnx.merge(graphdef, s)
        logits = m(idx[:, :-1])
        lm = -jnp.take_along_axis(jax.nn.log_softmax(logits), idx[:, 1:, None], axis=-1).mean()
        cls = -jnp.take_along_axis(jax.nn.log_softmax(m.classify(idx)), labels[:, None], axis=-1).mean()
        return lm + cls

    grads = jax.jit(jax.grad(loss))(state)
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(grads))
    assert len(flat) == len(nnx.traversals.flatten_mapping(nnx.to_pure_dict(state)))
    for path, g in flat.items():
        g = np.asarray(g)
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, path


# ---------------------------------------------------------------- config, presets, shapes


def test_216m_preset_has_the_released_parameter_count():
    config = SpikeGPTConfig.preset("spikegpt216m")
    abstract = nnx.eval_shape(lambda: SpikeGPT(config, rngs=nnx.Rngs(0)))
    sizes = [x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))]
    assert sum(sizes) == 215_399_424 == config.num_params
    assert len(sizes) == 330  # one array per checkpoint key
    with_classifier = SpikeGPTConfig.preset("spikegpt216m", n_classes=2)
    assert with_classifier.num_params == 215_399_424 + 2 * 768


def test_presets_and_unknown_preset():
    assert {"spikegpt216m", "spikegpt-small", "spikegpt-tiny"} <= set(PRESETS)
    c = SpikeGPTConfig.preset("spikegpt216m")
    assert (c.n_layer, c.n_embd, c.vocab_size, c.ctx_len, c.ffn_dim) == (18, 768, 50277, 1024, 3072)
    with pytest.raises(ConfigError, match="spikegpt216m"):
        SpikeGPTConfig.preset("spikegpt-huge")
    with pytest.raises(ConfigError, match="n_embd"):
        SpikeGPTConfig(n_layer=1, n_embd=0, vocab_size=10, ctx_len=8)


def test_modes_set_the_reference_quirk_flags():
    base = SpikeGPTConfig.preset("spikegpt216m")
    assert (base.with_mode("gpt").binarize_embedding, base.with_mode("gpt").rescale_every) == (True, 0)
    assert (base.with_mode("rnn").binarize_embedding, base.with_mode("rnn").rescale_every) == (False, 6)
    chars = SpikeGPTConfig(n_layer=12, n_embd=8, vocab_size=77, ctx_len=8).with_mode("rnn")
    assert chars.binarize_embedding
    # 2^-(i // 6) on the output projections; halve after blocks 5 and 11
    assert [chars.output_scale(i) for i in (0, 5, 6, 11)] == [1.0, 1.0, 0.5, 0.5]
    assert [i for i in range(12) if chars.halves_after(i)] == [5, 11]
    with pytest.raises(ConfigError, match="gpt"):
        base.with_mode("cuda")


def test_state_holds_only_params_with_the_contract_paths():
    model = _tiny(n_classes=3)
    state = nnx.state(model)
    assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
    paths = set(nnx.traversals.flatten_mapping(nnx.to_pure_dict(state)))
    assert {("emb", "embedding"), ("ln0", "scale"), ("blocks", 1, "att", "time_mix_k"),
            ("blocks", 0, "ffn", "value", "kernel"), ("head", "kernel"), ("classifier", "kernel")} <= paths
    assert model.blocks[0].att.time_mix_k.shape == (32,)
    assert model.blocks[0].ffn.key.kernel.shape == (32, 128)


# ---------------------------------------------------------------- functional path, classification, rates


def test_split_merge_under_jit_and_vmap_matches_separate_calls():
    model = _tiny()
    graphdef, state = nnx.split(model)
    idx = jax.random.randint(jax.random.key(2), (2, 6), 0, 100)
    # candidate 1: LM head halved, output projections doubled (a stand-in for a quantized copy)
    halved = jax.tree.map(lambda a: a, state)
    halved["head"]["kernel"][...] = state["head"]["kernel"][...] * 0.5
    for i in range(model.config.n_layer):
        kernel = state["blocks"][i]["att"]["output"]["kernel"][...]
        halved["blocks"][i]["att"]["output"]["kernel"][...] = kernel * 2
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), state, halved)

    def forward(s):
        return nnx.merge(graphdef, s)(idx)

    batched = jax.jit(jax.vmap(forward))(stacked)
    one, two = jax.jit(forward)(state), jax.jit(forward)(halved)
    assert not np.allclose(one, two)
    np.testing.assert_allclose(batched[0], one, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batched[1], two, rtol=1e-6, atol=1e-6)
    # the original model is untouched by the functional edits
    np.testing.assert_array_equal(model.head.kernel[...], state["head"]["kernel"][...])


def test_classify_ignores_right_padding_and_needs_a_classifier():
    model = _tiny(n_classes=2)
    classify = _jitted(model, SpikeGPT.classify)
    tokens = jnp.array([[5, 9, 2, 7]])
    padded = jnp.array([[5, 9, 2, 7, 1, 1, 1]])
    mask = jnp.array([[1, 1, 1, 1, 0, 0, 0]])
    unpadded = classify(tokens, jnp.ones((1, 4)))
    np.testing.assert_allclose(classify(padded, mask), unpadded, rtol=1e-5, atol=1e-6)
    # the pooled vector is the masked mean of ln_out(x), then the classifier
    pooled_then_classified = _jitted(model, lambda m, i: m.classifier(m.features(i)[0].mean(axis=1)))(tokens)
    np.testing.assert_allclose(classify(tokens, None), pooled_then_classified, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="n_classes"):
        _tiny().classify(tokens)


def test_spike_rates_are_means_of_the_traced_spikes_with_padding_excluded():
    model = _tiny(n_classes=2)
    idx = jax.random.randint(jax.random.key(3), (2, 10), 0, 100)
    mask = jnp.array([[1] * 10, [1] * 6 + [0] * 4])
    _, rates = _jitted(model, lambda m, i: m(i, return_spike_rates=True))(idx)
    trace = _jitted(model, SpikeGPT.lif_trace)(idx)
    assert rates.shape == (2, 2)
    assert rates[1, 0] == pytest.approx(float(trace["blocks_1_lif1_spk"].mean()), abs=1e-7)
    _, masked = _jitted(model, lambda m, i, k: m.classify(i, k, return_spike_rates=True))(idx, mask)
    spk = np.asarray(trace["blocks_0_lif2_spk"])
    expected = (spk[0].sum() + spk[1, :6].sum()) / (16 * spk.shape[-1])
    assert masked[0, 1] == pytest.approx(expected, abs=1e-7)
