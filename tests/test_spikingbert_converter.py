"""SpikingBERT checkpoint conversion: config inference, strictness, round trip, full-size shapes,
general-KD checkpoints, students initialised from BERT."""

from __future__ import annotations

import fractions
import logging
import shutil

import numpy as np
import pytest
from flax import nnx

from converters.bert import expected_shapes
from converters.spikingbert import (
    canonical_keys,
    load_spikingbert,
    spikingbert_from_bert,
    teacher_layers,
    to_state_dict,
)
from qslm_jax.errors import ConfigError, ConversionError
from qslm_jax.models.bert import BERT, BertConfig
from qslm_jax.models.spikingbert import SpikingBERT, SpikingBERTConfig

FIXTURE = "spikingbert_H32_T16"
ALIAS_PREFIXES = ("snn_func.", "snn_ide_conv.", "snn_func_copy.", "pooler_layer.")


@pytest.fixture(scope="module")
def checkpoint(fixtures_dir):
    return fixtures_dir / FIXTURE / "pytorch_model.bin"


@pytest.fixture(scope="module")
def state_dict(checkpoint):
    from converters.checkpoint_io import read_state_dict

    return read_state_dict(checkpoint)


def canonical(state_dict):
    return {k: v for k, v in state_dict.items() if not k.startswith(ALIAS_PREFIXES)}


def spec_shapes(H: int, I: int, V: int, P: int, C: int, *, pooler: bool) -> dict[str, tuple[int, ...]]:
    """Canonical keys and shapes written out from spikingbert.md's "Checkpoint format" table."""
    shapes = {
        "network_x.word_embeddings.weight": (V, H), "network_x.position_embeddings.weight": (P, H),
        "network_x.token_type_embeddings.weight": (2, H),
        "network_x.LayerNorm.weight": (H,), "network_x.LayerNorm.bias": (H,),
        "network_s25.fc.weight": (H, H), "fit_dense.weight": (H, H), "fit_dense.bias": (H,),
        "classification.weight": (C, H), "classification.bias": (C,),
    }
    if pooler:
        shapes.update({"pooler_layer.dense.weight": (H, H), "pooler_layer.dense.bias": (H,)})
    for b in range(4):
        j = 6 * b
        for k, name, (out, inp) in [(1, "dense", (H, H)), (2, "dense", (H, H)), (3, "query", (H, H)),
                                    (4, "dense", (H, H)), (5, "dense", (I, H)), (6, "dense", (H, I))]:
            shapes[f"network_s{j + k}.{name}.weight"] = (out, inp)
            shapes[f"network_s{j + k}.{name}.bias"] = (out,)
        for k in (4, 6):
            shapes[f"network_s{j + k}.LayerNorm.weight"] = (H,)
            shapes[f"network_s{j + k}.LayerNorm.bias"] = (H,)
    return shapes


def test_config_inferred_from_shapes_and_config_json(checkpoint):
    model = load_spikingbert(checkpoint, T=16)
    c = model.config
    # fixture: hidden 32, 4 heads (config.json), intermediate 64, vocab 100, 64 positions, 3 classes
    assert (c.hidden, c.heads, c.intermediate, c.vocab, c.max_positions, c.type_vocab, c.num_classes) == (
        32, 4, 64, 100, 64, 2, 3)
    assert c.num_blocks == 4 and c.T == 16 and c.vth == 1.0 and not c.feedback


def test_round_trip_reproduces_the_canonical_tensors(checkpoint, state_dict):
    model = load_spikingbert(checkpoint, T=16)
    exported = to_state_dict(model)
    expected = canonical(state_dict)
    assert set(exported) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    # the Flax kernel is the transposed PyTorch weight
    np.testing.assert_array_equal(model.blocks[1].value.kernel[...], state_dict["network_s8.dense.weight"].T)
    np.testing.assert_array_equal(model.blocks[2].query.kernel[...], state_dict["network_s15.query.weight"].T)


def test_full_size_parameter_count_matches_canonical_keys():
    config = SpikingBERTConfig.preset("full", num_classes=2)
    model = nnx.eval_shape(lambda: SpikingBERT(config, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    count = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(params))
    with_pooler = spec_shapes(768, 3072, 30522, 512, 2, pooler=True)
    without_pooler = spec_shapes(768, 3072, 30522, 512, 2, pooler=False)
    # the reference checkpoint's ~53.96M includes pooler_layer, which it re-creates at load and never uses
    assert sum(int(np.prod(s)) for s in with_pooler.values()) == 53_961_218
    assert count == sum(int(np.prod(s)) for s in without_pooler.values()) == 53_370_626
    assert expected_shapes(params, canonical_keys(model)) == without_pooler


def test_missing_extra_and_misshapen_keys_are_named(state_dict):
    good = canonical(state_dict)
    missing = {k: v for k, v in good.items() if k != "network_s9.query.bias"}
    with pytest.raises(ConversionError, match=r"missing keys \['network_s9.query.bias'\]"):
        load_spikingbert(missing, T=4, num_heads=4)
    extra = {**good, "network_s9.key.weight": good["network_s9.query.weight"]}
    with pytest.raises(ConversionError, match=r"unexpected keys \['network_s9.key.weight'\]"):
        load_spikingbert(extra, T=4, num_heads=4)
    wrong = {**good, "network_s6.dense.weight": good["network_s6.dense.weight"].T}
    with pytest.raises(ConversionError, match=r"network_s6.dense.weight: expected \(32, 64\), found \(64, 32\)"):
        load_spikingbert(wrong, T=4, num_heads=4)
    with pytest.raises(ConversionError, match=r"network_x\.word_embeddings\.weight"):
        load_spikingbert({k: v for k, v in good.items() if not k.startswith("network_x.word")}, T=4, num_heads=4)


def test_aliases_and_pooler_are_ignored(state_dict):
    model = load_spikingbert(canonical(state_dict), T=4, num_heads=4)
    with_aliases = load_spikingbert(state_dict, T=4, num_heads=4)
    for key, value in to_state_dict(model).items():
        np.testing.assert_array_equal(to_state_dict(with_aliases)[key], value)


def test_heads_come_from_config_json_or_argument(state_dict, checkpoint, tmp_path):
    with pytest.raises(ConversionError, match="pass num_heads"):
        load_spikingbert(canonical(state_dict), T=4)
    lonely = tmp_path / "pytorch_model.bin"
    shutil.copy(checkpoint, lonely)
    with pytest.raises(ConversionError, match="pass num_heads"):
        load_spikingbert(lonely, T=4)
    assert load_spikingbert(lonely, T=4, num_heads=8).config.heads == 8
    with pytest.raises(ConversionError, match=r"contradicts config\.json"):
        load_spikingbert(checkpoint, T=4, num_heads=8)


def test_non_tensor_pickle_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "pytorch_model.bin"
    torch.save({"network_x.word_embeddings.weight": torch.zeros(3, 2), "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ConversionError, match="objects other than tensors"):
        load_spikingbert(path, T=4, num_heads=1)


def test_general_kd_checkpoint_gets_a_fresh_classifier(state_dict, caplog):
    general = {k: v for k, v in canonical(state_dict).items() if not k.startswith("classification.")}
    with caplog.at_level(logging.WARNING, logger="converters.spikingbert"):
        model = load_spikingbert(general, T=4, num_heads=4, num_classes=5)
    assert "no classification" in caplog.text and "freshly initialised" in caplog.text
    assert model.classifier.kernel[...].shape == (32, 5)
    exported = to_state_dict(model)
    for key, value in general.items():
        np.testing.assert_array_equal(exported[key], value)
    with pytest.raises(ConversionError, match="num_classes=5 was requested"):
        load_spikingbert(canonical(state_dict), T=4, num_heads=4, num_classes=5)


def test_teacher_layer_selection():
    assert teacher_layers(12, 4, "uniform") == (2, 5, 8, 11)
    assert teacher_layers(4, 4, "uniform") == (0, 1, 2, 3)
    assert teacher_layers(12, 4, "first") == (0, 1, 2, 3)
    assert teacher_layers(6, 4, [5, 4, 3, 2]) == (5, 4, 3, 2)
    with pytest.raises(ConfigError, match="need 4 teacher layers"):
        teacher_layers(3, 4, "first")
    with pytest.raises(ConfigError, match="expected 'uniform'"):
        teacher_layers(12, 4, "every-other")


def test_student_from_bert_copies_embeddings_and_chosen_layers():
    teacher = BERT(BertConfig(vocab_size=50, hidden_size=16, num_layers=8, num_heads=2, intermediate_size=24,
                              max_positions=20, num_labels=3), rngs=nnx.Rngs(0))
    student = spikingbert_from_bert(teacher, T=8, vth=0.5)
    assert student.config.num_classes == 3 and student.config.vth == 0.5 and student.config.T == 8
    for name in ("word", "position", "token_type"):
        np.testing.assert_array_equal(getattr(student.embeddings, name).embedding[...],
                                      getattr(teacher.embeddings, name).embedding[...])
    np.testing.assert_array_equal(student.embeddings.layer_norm.scale[...], teacher.embeddings.layer_norm.scale[...])
    for block, layer in zip(student.blocks, (1, 3, 5, 7), strict=True):
        for (path, s), (_, t) in zip(nnx.to_flat_state(nnx.state(block, nnx.Param)),
                                     nnx.to_flat_state(nnx.state(teacher.blocks[layer], nnx.Param)), strict=True):
            np.testing.assert_array_equal(s.get_value(), t.get_value(), err_msg=str(path))
    first = spikingbert_from_bert(teacher, T=8, layers="first", num_classes=2)
    assert first.config.num_classes == 2
    np.testing.assert_array_equal(first.blocks[3].output.kernel[...], teacher.blocks[3].output.kernel[...])
