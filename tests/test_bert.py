"""BERT teacher: parity with HF transformers' PyTorch BERT (random tiny config, offline), conversion
strictness, config validation, the bert-base parameter count."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.bert import load_bert, save_bert
from converters.spikingbert import spikingbert_from_bert
from qslm_jax.errors import ConfigError, ConversionError
from qslm_jax.models.bert import BERT, HF_MASK_VALUE, BertConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HEADS = 4
INPUT_IDS = np.array([[2, 45, 17, 88, 3, 61, 9, 3], [2, 12, 70, 3, 0, 0, 0, 0]])
SEGMENT_IDS = np.array([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
ATTENTION_MASK = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]])


def hf_config(**overrides):
    return transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=37,
        max_position_embeddings=64, type_vocab_size=2, num_labels=3, initializer_range=0.3,
        layer_norm_eps=1e-12, attn_implementation="eager", **overrides,
    )


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(hf_config()).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def save_hf(model, directory, weights: str = "model.safetensors"):
    """``save_pretrained``; for ``pytorch_model.bin`` (transformers 5 writes only safetensors) the state
    dict is written with ``torch.save`` instead, as older transformers versions did."""
    model.save_pretrained(directory)
    if weights == "pytorch_model.bin":
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / weights)
    return directory / weights


def hf_reference(model):
    """HF outputs plus pre-softmax scores recomputed from hooked query/key projections."""
    projections = {}
    hooks = []
    for i, layer in enumerate(model.bert.encoder.layer):
        for name in ("query", "key"):
            module = getattr(layer.attention.self, name)
            hooks.append(module.register_forward_hook(
                lambda _m, _in, out, key=(i, name): projections.__setitem__(key, out.detach())))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(INPUT_IDS), token_type_ids=torch.tensor(SEGMENT_IDS),
                    attention_mask=torch.tensor(ATTENTION_MASK), output_hidden_states=True, output_attentions=True)
    for hook in hooks:
        hook.remove()
    b, length = INPUT_IDS.shape
    bias = torch.where(torch.tensor(ATTENTION_MASK, dtype=torch.bool), 0.0, torch.finfo(torch.float32).min)
    scores = []
    for i in range(len(model.bert.encoder.layer)):
        q, k = (projections[(i, n)].view(b, length, HEADS, -1).transpose(1, 2) for n in ("query", "key"))
        scores.append((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias[:, None, None, :]).numpy())
    return out, scores


def run_flax(model: BERT):
    with jax.default_matmul_precision("highest"):
        return model(jnp.asarray(INPUT_IDS), jnp.asarray(SEGMENT_IDS), jnp.asarray(ATTENTION_MASK))


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_sequence_classification_parity_with_hf(hf_model, tmp_path, weights):
    assert save_hf(hf_model, tmp_path, weights).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name != "config.json"] == [weights]
    model = load_bert(tmp_path)
    assert model.config.num_labels == 3 and model.config.num_layers == 2
    out, ref_scores = hf_reference(hf_model)
    ours = run_flax(model)

    np.testing.assert_allclose(ours.logits, out.logits.numpy(), rtol=0, atol=1e-5)
    assert len(ours.hidden_states) == len(out.hidden_states) == 3
    for got, want in zip(ours.hidden_states, out.hidden_states, strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
    assert len(ours.attention_scores) == 2
    for got, want_scores, want_probs in zip(ours.attention_scores, ref_scores, out.attentions, strict=True):
        assert got.shape == (2, HEADS, 8, 8)
        # masked keys hold ~finfo.min; compare them by value relative to it, the rest absolutely
        masked = np.broadcast_to(ATTENTION_MASK[:, None, None, :] == 0, got.shape)
        np.testing.assert_allclose(np.asarray(got)[~masked], want_scores[~masked], rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got)[masked], HF_MASK_VALUE, rtol=1e-6)
        np.testing.assert_allclose(jax.nn.softmax(got, axis=-1), want_probs.numpy(), rtol=0, atol=1e-5)
    # the weights are not trivial: attention is far from uniform
    assert float(out.attentions[0].max()) > 0.5


def test_save_bert_round_trips_and_transformers_reads_it(hf_model, tmp_path):
    """save_bert writes what load_bert and transformers read back to the same logits."""
    model = load_bert(save_hf(hf_model, tmp_path / "hf"))
    saved = save_bert(model, tmp_path / "ours")
    again = load_bert(saved)
    np.testing.assert_array_equal(run_flax(again).logits, run_flax(model).logits)
    reread = transformers.BertForSequenceClassification.from_pretrained(saved).eval()
    np.testing.assert_allclose(hf_reference(reread)[0].logits.numpy(), run_flax(model).logits, rtol=0, atol=1e-5)
    tiny_bert = BERT(dataclasses.replace(model.config, classifier_relu=True), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="relu"):
        save_bert(tiny_bert, tmp_path / "tiny")


def test_bert_model_layout_without_prefix_or_classifier(hf_model, tmp_path):
    base = hf_model.bert  # a BertModel: keys without the "bert." prefix, no classifier
    model = load_bert(save_hf(base, tmp_path))
    assert model.config.num_labels == 0 and model.classifier is None and model.config.pooler
    ours = run_flax(model)
    with torch.no_grad():
        out = base(input_ids=torch.tensor(INPUT_IDS), token_type_ids=torch.tensor(SEGMENT_IDS),
                   attention_mask=torch.tensor(ATTENTION_MASK))
    assert ours.logits is None
    np.testing.assert_allclose(ours.hidden_states[-1], out.last_hidden_state.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.pooled, out.pooler_output.numpy(), rtol=0, atol=1e-5)


def test_student_initialised_from_hf_directory(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    student = spikingbert_from_bert(tmp_path, T=4, num_layers=2)
    layer = hf_model.bert.encoder.layer[1]
    np.testing.assert_array_equal(student.blocks[1].key.kernel[...], layer.attention.self.key.weight.detach().numpy().T)
    np.testing.assert_array_equal(student.blocks[1].output_norm.bias[...], layer.output.LayerNorm.bias.detach().numpy())
    assert student.config.num_classes == 3 and student.config.heads == HEADS


def test_conversion_errors_name_the_problem(hf_model, tmp_path):
    from safetensors.numpy import save_file

    hf_model.save_pretrained(tmp_path)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    state.pop("bert.encoder.layer.1.attention.self.value.bias")
    state["bert.encoder.layer.1.attention.self.rotary.weight"] = np.zeros((2, 2), np.float32)
    state["bert.pooler.dense.weight"] = state["bert.pooler.dense.weight"][:, :16].copy()
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ConversionError) as err:
        load_bert(tmp_path)
    message = str(err.value)
    assert "missing keys ['encoder.layer.1.attention.self.value.bias']" in message
    assert "unexpected keys ['encoder.layer.1.attention.self.rotary.weight']" in message
    assert "pooler.dense.weight: expected (32, 32), found (32, 16)" in message

    (tmp_path / "config.json").unlink()
    with pytest.raises(ConversionError, match=r"expected config\.json"):
        load_bert(tmp_path)
    with pytest.raises(ConversionError, match="not found"):
        load_bert(tmp_path / "nowhere")


def test_unsupported_config_features_raise_config_error(hf_model, tmp_path):
    base = hf_config().to_dict()
    for change, needle in [({"hidden_act": "relu"}, "hidden_act='relu'"),
                           ({"position_embedding_type": "relative_key"}, "relative_key"),
                           ({"is_decoder": True}, "is_decoder")]:
        with pytest.raises(ConfigError, match=needle):
            BertConfig.from_hf_dict({**base, **change})
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_new"}))
    with pytest.raises(ConfigError, match="gelu_new"):
        load_bert(tmp_path)


def test_legacy_layer_norm_names_and_pretraining_heads(hf_model, tmp_path):
    save_hf(hf_model, tmp_path, "pytorch_model.bin")
    state = hf_model.state_dict()
    legacy = {}
    for key, value in state.items():
        if ".LayerNorm." in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        legacy[key] = value
    legacy["cls.predictions.bias"] = torch.zeros(99)
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    model = load_bert(tmp_path)
    np.testing.assert_array_equal(model.blocks[0].attention_norm.scale[...],
                                  state["bert.encoder.layer.0.attention.output.LayerNorm.weight"].numpy())


def test_bert_base_parameter_count():
    """bert-base-uncased as BertModel (with pooler) has 109,482,240 parameters."""
    model = nnx.eval_shape(lambda: BERT(BertConfig.preset("base"), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(params)) == 109_482_240
