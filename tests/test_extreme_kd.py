"""Extreme-quantization KD training (qslm_jax.equilibrium.student / evaluation): the STE-quantized student,
losses, metrics, model size and operation counts, and task data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qslm_jax.data import bert_tokenizer
from qslm_jax.equilibrium.evaluation import dense_layer_ops, model_size, student_layer_ops
from qslm_jax.equilibrium.student import KDObjective, kd_loss, quantize_encoder, student_level
from qslm_jax.errors import ConfigError
from qslm_jax.models.spikingbert import SpikingBERT, SpikingBERTConfig, is_encoder_kernel
from qslm_jax.tasks.data import load_glue_splits
from qslm_jax.tasks.scores import classification_counts, classification_metrics

CONFIG = SpikingBERTConfig.preset("tiny", num_blocks=2, T=8)


def _set_kernels(model: SpikingBERT, new_value) -> None:
    """Replace every encoder kernel ``W`` of ``model`` by ``new_value(path, W)``."""
    updates = [(path, new_value(tuple(path), var.get_value()))
               for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)) if is_encoder_kernel(path)]
    nnx.update(model, nnx.from_flat_state(updates))


def _student(seed: int = 0) -> SpikingBERT:
    model = SpikingBERT(CONFIG, rngs=nnx.Rngs(seed))
    _set_kernels(model, lambda _, w: 6.0 * w)  # larger kernels, so that neurons fire and gradients flow
    return model


def _batch(batch_size: int = 3, length: int = 8) -> dict:
    key = jax.random.key(1)
    ids = jax.random.randint(key, (batch_size, length), 1, CONFIG.vocab)
    mask = jnp.ones((batch_size, length), jnp.int32).at[0, -2:].set(0)
    return {"input_ids": ids, "segment_ids": jnp.zeros_like(ids), "attention_mask": mask,
            "labels": jnp.arange(batch_size) % CONFIG.num_classes, "valid": jnp.ones(batch_size)}


def _flat(state) -> dict:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize(("bits", "levels"), [(1, 2), (1.58, 3)])
def test_quantized_encoder_kernels_take_two_or_three_values(bits, levels):
    model = _student()
    latent = _flat(nnx.state(model, nnx.Param))
    seen = _flat(nnx.state(quantize_encoder(model, bits), nnx.Param))
    kernels = [p for p in latent if is_encoder_kernel(p)]
    assert len(kernels) == 6 * CONFIG.num_blocks
    for path in kernels:
        w, values = latent[path], np.unique(seen[path])
        assert len(values) == levels, path
        scale = np.float32(np.mean(np.abs(w)))  # beta (binary) and gamma (ternary) are both mean|W|
        expected = [-scale, scale] if levels == 2 else [-scale, 0.0, scale]
        np.testing.assert_allclose(values, expected, rtol=1e-6)
    for path in latent.keys() - set(kernels):  # embeddings, LayerNorms, biases, fit_dense, classifier: fp32
        np.testing.assert_array_equal(seen[path], latent[path])
    assert quantize_encoder(model, 32) is model


def test_binary_signs_follow_the_centred_weights():
    model = _student()
    path = ("blocks", 0, "value", "kernel")
    w = _flat(nnx.state(model, nnx.Param))[path]
    wq = _flat(nnx.state(quantize_encoder(model, 1), nnx.Param))[path]
    np.testing.assert_array_equal(np.sign(wq), np.where(w - w.mean() > 0, 1.0, -1.0))


def _with_kernels_replaced(model: SpikingBERT, bits) -> SpikingBERT:
    """A plain fp32 model whose encoder kernels hold the quantized values (no STE involved)."""
    copy = nnx.clone(model)
    quantized = _flat(nnx.state(quantize_encoder(model, bits), nnx.Param))
    _set_kernels(copy, lambda path, _: jnp.asarray(quantized[path]))
    return copy


@pytest.mark.parametrize("bits", [1, 1.58])
def test_forward_pass_runs_on_the_quantized_kernels(bits):
    model, batch = _student(), _batch()
    args = (batch["input_ids"], batch["segment_ids"], batch["attention_mask"])
    # Op by op (not jitted): two differently compiled programs may round the +-beta current sums differently,
    # and binary kernels make exact threshold ties (an IF-network property) likely enough to flip a spike.
    viewed = quantize_encoder(model, bits).simulate(*args)
    direct = _with_kernels_replaced(model, bits).simulate(*args)
    np.testing.assert_array_equal(viewed.logits, direct.logits)
    for a, b in zip(viewed.asrs, direct.asrs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bits", [1, 1.58])
def test_ste_passes_gradients_to_the_latent_weights_unchanged(bits):
    """The VJP of the quantized view is the identity: dL/dW_latent = dL/dW_eff for every parameter."""
    model = _student()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def view(p):
        return nnx.state(quantize_encoder(nnx.merge(graphdef, p, rest), bits), nnx.Param)

    out, vjp = jax.vjp(view, params)
    cotangent = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), out)
    (back,) = vjp(cotangent)
    expected, got = _flat(cotangent), _flat(back)
    assert expected.keys() == got.keys()
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=str(path))


@pytest.mark.parametrize("bits", [1, 1.58])
def test_kd_training_gradient_reaches_every_latent_kernel(bits):
    model, batch = _student(), _batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = kd_loss(KDObjective.preset("ce"), bits)
    grads = _flat(jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch)[0]))(params))
    kernels = [p for p in grads if is_encoder_kernel(p)]
    assert len(kernels) == 6 * CONFIG.num_blocks
    for path in kernels:
        assert np.all(np.isfinite(grads[path])) and np.any(grads[path] != 0), path


def test_kd_loss_terms_and_weights():
    model, batch = _student(), _batch()
    batch = {**batch, "teacher_logits": jnp.array([[2.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])}
    graphdef, state = nnx.split(model)

    def run(objective):
        return jax.jit(lambda s: kd_loss(objective, 1.58)(nnx.merge(graphdef, s), batch))(state)

    kd, kd_parts = run(KDObjective.preset("kd", temperature=2.0))
    ce, ce_parts = run(KDObjective.preset("ce"))
    both, parts = run(KDObjective(soft_ce=0.5, ce=2.0, temperature=2.0))
    np.testing.assert_allclose(both, 0.5 * kd + 2.0 * ce, rtol=1e-6)
    assert set(parts) == {"soft_ce", "ce", "accuracy"} and set(kd_parts) == {"soft_ce", "accuracy"}
    assert 0.0 <= float(ce_parts["accuracy"]) <= 1.0


def test_objective_and_level_validation():
    with pytest.raises(ConfigError, match="at least one term"):
        KDObjective()
    with pytest.raises(ConfigError, match="temperature"):
        KDObjective(soft_ce=1.0, temperature=0.0)
    with pytest.raises(ConfigError, match="unknown KD objective"):
        KDObjective.preset("mse")
    assert KDObjective.preset("internal").uses_teacher and not KDObjective.preset("ce").uses_teacher
    with pytest.raises(ConfigError, match=r"students are fp32, 1\.58-bit or 1-bit"):
        student_level(4)


def test_accuracy_and_f1_by_hand():
    # predictions 1 1 0 0 1 0 (row 5 is a dummy row); labels 1 0 0 1 1 1
    logits = jnp.array([[0, 1], [0, 1], [1, 0], [1, 0], [0, 1], [1, 0]], jnp.float32)
    labels = jnp.array([1, 0, 0, 1, 1, 1])
    valid = jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)
    totals = {k: float(v) for k, v in classification_counts(logits, labels, valid).items()}
    assert totals == {"correct": 3.0, "examples": 5.0, "tp": 2.0, "fp": 1.0, "fn": 1.0}
    metrics = classification_metrics(totals)
    assert metrics["accuracy"] == pytest.approx(60.0)
    assert metrics["f1"] == pytest.approx(100 * 4 / 6)  # 2tp / (2tp + fp + fn)


def test_model_size_counts_bits_by_hand():
    model = _student()
    c = CONFIG
    kernel = 4 * c.hidden**2 + 2 * c.hidden * c.intermediate  # per block
    others = ((c.vocab + c.max_positions + c.type_vocab) * c.hidden + 2 * c.hidden  # embeddings + LN
              + c.num_blocks * (4 * c.hidden + c.intermediate + c.hidden + 4 * c.hidden)  # biases + 2 LNs
              + c.hidden * c.num_classes + c.num_classes)  # classifier (fit_dense, feedback not counted)
    fp32 = model_size(model, 32)
    assert fp32["parameters"] == c.num_blocks * kernel + others
    assert fp32["bits"] == 32 * fp32["parameters"] and fp32["compression"] == 1.0
    for bits in (1, 1.58):
        size = model_size(model, bits)
        assert size["quantized_parameters"] == c.num_blocks * kernel
        assert size["bits"] == pytest.approx(c.num_blocks * (kernel * bits + 6 * 32) + 32 * others)
    assert model_size(model, 1)["storage_bytes"] == 4 * others + c.num_blocks * (
        sum(-(-n // 8) + 8 for n in [c.hidden**2] * 4 + [c.hidden * c.intermediate] * 2))


def test_operation_counts_at_full_firing_equal_T_times_dense():
    """With every layer firing at rate 1, each spiking operation happens T times as often as the dense MAC."""
    ones = [1.0] * CONFIG.num_neuron_layers
    spiking, dense = student_layer_ops(CONFIG, ones, 8, 1.58), dense_layer_ops(CONFIG, 8)
    for s, d in zip(spiking, dense, strict=True):
        assert s.name == d.name and s.acs == CONFIG.T * d.macs and s.macs == 0
    assert {s.weight_bits for s in spiking if s.name.endswith(("scores", "context"))} == {32}
    assert {s.weight_bits for s in spiking if s.name.endswith("value")} == {1.58}
    half = student_layer_ops(CONFIG, [0.5] * CONFIG.num_neuron_layers, 8, 1.58)
    assert sum(s.acs for s in half) == pytest.approx(0.5 * sum(s.acs for s in spiking))


def test_qnli_trains_on_a_fixed_split_of_dev(data_dir):
    tokenizer = bert_tokenizer(data_dir=data_dir)
    data = load_glue_splits("qnli", tokenizer, data_dir=data_dir, max_length=128)
    again = load_glue_splits("qnli", tokenizer, data_dir=data_dir, max_length=128, train_limit=100,
                           eval_limit=50)
    assert (len(data.train), len(data.dev)) == (4370, 1093)  # 5463 dev examples, 20% held out
    assert "split" in data.note and "seed 0" in data.note
    train_rows = {row.tobytes() for row in data.train.inputs["input_ids"]}
    assert not any(row.tobytes() in train_rows for row in data.dev.inputs["input_ids"])
    assert (len(again.train), len(again.dev)) == (100, 50)
    np.testing.assert_array_equal(again.train.inputs["input_ids"], data.train.inputs["input_ids"][:100])
