"""Unit hierarchy from parameter paths: SpikeGPT (real model and the 216M preset from shapes), SpikingBERT, specs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from qslm_jax.errors import ConfigError
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.models.spikingbert import SpikingBERT, SpikingBERTConfig
from qslm_jax.quant.hierarchy import Hierarchy, hierarchy_of
from qslm_jax.quant.memory import memory_bytes
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import TERNARY, QuantScheme, level_code

SPIKEGPT_MODULES = ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.value", "ffn.receptance")


@pytest.fixture(scope="module")
def tiny():
    return SpikeGPT(SpikeGPTConfig.preset("spikegpt-tiny", n_classes=2), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def abstract_216m():
    return nnx.eval_shape(lambda: SpikeGPT(SpikeGPTConfig.preset("spikegpt216m"), rngs=nnx.Rngs(0)))


def _names(h: Hierarchy, block: str, module: str | None = None) -> set[str]:
    return {t.name for t in h.tensors if t.block == block and (module is None or t.module == module)}


def test_spikegpt_blocks_and_modules(tiny):
    h = hierarchy_of(tiny)
    assert h.family == "spikegpt"
    assert h.blocks == ("input", "attention_0", "attention_1", "output")
    assert h.modules_of("attention_1") == tuple(f"attention_1/{m}" for m in SPIKEGPT_MODULES)
    assert h.modules_of("input") == () and h.modules_of("output") == ()
    assert _names(h, "input") == {"emb.embedding", "ln0.scale", "ln0.bias"}
    assert _names(h, "output") == {"ln_out.scale", "ln_out.bias", "head.kernel", "classifier.kernel"}
    assert _names(h, "attention_0", "attention_0/ffn.value") == {"blocks.0.ffn.value.kernel"}
    # LayerNorms and time_* vectors belong to the block, to no module, and are not weight matrices
    block_level = {t.name for t in h.tensors if t.block == "attention_0" and not t.module}
    assert block_level == {f"blocks.0.{n}" for n in ("ln1.scale", "ln1.bias", "ln2.scale", "ln2.bias",
                                                     "att.time_decay", "att.time_first", "att.time_mix_k",
                                                     "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k",
                                                     "ffn.time_mix_r")}
    assert all(not t.matrix for t in h.tensors if t.name in block_level)
    assert {t.name for t in h.tensors if t.matrix} == (
        {"emb.embedding", "head.kernel", "classifier.kernel"}
        | {f"blocks.{i}.{m}.kernel" for i in range(2) for m in SPIKEGPT_MODULES})
    assert h.numel() == tiny.config.num_params
    with pytest.raises(ConfigError, match="unknown block"):
        h.modules_of("attention_9")


def test_abstract_model_gives_the_same_tree(tiny):
    abstract = nnx.eval_shape(lambda: SpikeGPT(tiny.config, rngs=nnx.Rngs(0)))
    assert hierarchy_of(abstract) == hierarchy_of(tiny)
    assert hierarchy_of(nnx.state(tiny, nnx.Param)) == hierarchy_of(tiny)


def test_216m_tree_from_shapes_matches_the_checkpoint(abstract_216m, fixtures_dir):
    h = hierarchy_of(abstract_216m)
    keys = json.loads((fixtures_dir / "spikegpt216m_keys.json").read_text())["keys"]  # [[name, shape], ...]
    reference = sum(int(np.prod(shape)) for _, shape in keys)
    assert h.numel() == reference == 215_399_424
    assert len(h.blocks) == 20 and len(h.modules) == 18 * 7
    # spikegpt.md: input and output blocks 38.6M parameters each, every attention block 7.68M
    c, v = 768, 50277
    assert h.numel(block="input") == v * c + 2 * c
    assert h.numel(block="output") == v * c + 2 * c
    assert {h.numel(block=f"attention_{i}") for i in range(18)} == {13 * c * c + 11 * c}
    assert h.numel(module="attention_5/ffn.key") == 4 * c * c


def test_bits_tree_matches_state_structure_and_precedence(tiny):
    h = hierarchy_of(tiny)
    plan = QuantPlan(8).with_block("attention_1", 4).with_module("attention_1/att.key", 1.58)
    bits = h.bits_tree(plan)
    params = nnx.to_pure_dict(nnx.state(tiny, nnx.Param))
    assert jax.tree.structure(bits) == jax.tree.structure(params)
    assert all(leaf.dtype == np.int32 and leaf.shape == () for leaf in jax.tree.leaves(bits))
    assert bits["emb"]["embedding"] == 8
    assert bits["blocks"][1]["att"]["key"]["kernel"] == level_code(TERNARY)
    assert bits["blocks"][1]["att"]["value"]["kernel"] == 4
    assert bits["blocks"][0]["ffn"]["value"]["kernel"] == 8
    assert bits["blocks"][1]["ln1"]["scale"] == 32  # vectors stay fp32 by default
    all_tensors = h.with_scheme(QuantScheme.preset("all_tensors")).bits_tree(plan)
    assert all_tensors["blocks"][1]["ln1"]["scale"] == 4 and all_tensors["ln0"]["bias"] == 8


def test_stacked_bits(tiny):
    h = hierarchy_of(tiny)
    stacked = h.stacked_bits([QuantPlan(8), QuantPlan(2), QuantPlan(32).with_block("output", 1)])
    np.testing.assert_array_equal(stacked["head"]["kernel"], [8, 2, 1])
    np.testing.assert_array_equal(stacked["blocks"][0]["att"]["key"]["kernel"], [8, 2, 32])
    assert all(leaf.shape == (3,) for leaf in jax.tree.leaves(stacked))


def test_plans_naming_unknown_units_are_rejected(tiny):
    h = hierarchy_of(tiny)
    with pytest.raises(ConfigError, match="attention_7"):
        h.levels(QuantPlan(8, {"attention_7": 4}))
    with pytest.raises(ConfigError, match="input/emb"):
        h.bits_tree(QuantPlan(8, modules={"input/emb": 4}))  # input has no modules


def test_spikingbert_tree():
    model = nnx.eval_shape(lambda: SpikingBERT(SpikingBERTConfig.preset("tiny"), rngs=nnx.Rngs(0)))
    h = hierarchy_of(model)
    assert h.family == "spikingbert"
    assert h.blocks == ("embeddings", "encoder_0", "encoder_1", "encoder_2", "encoder_3", "head")
    assert h.modules_of("encoder_2") == tuple(f"encoder_2/{m}" for m in (
        "query", "key", "value", "attention_output", "intermediate", "output"))
    assert {t.name.split(".")[0] for t in h.tensors if t.block == "head"} == {"feedback", "fit_dense", "classifier"}
    assert {t.name for t in h.tensors if t.module == "encoder_0/query"} == {"blocks.0.query.kernel",
                                                                           "blocks.0.query.bias"}
    assert not any(t.matrix for t in h.tensors if t.name.endswith("bias"))


def test_from_spec():
    h = Hierarchy.from_spec({"input": 100, "attention_0": {"att.key": 64, "ffn.key": 256}, "output": 80},
                            vectors={"attention_0": 10})
    assert h.blocks == ("input", "attention_0", "output")
    assert h.modules_of("attention_0") == ("attention_0/att.key", "attention_0/ffn.key")
    assert h.numel() == 100 + 64 + 256 + 80 + 10
    assert h.fp32_bytes == 4 * 510
    # 8 bits: one byte per weight + 8 bytes of scale/zero-point per weight tensor; vectors stay fp32
    assert memory_bytes(h, QuantPlan(8)) == 500 + 4 * 8 + 4 * 10
    plan = QuantPlan(8).with_module("attention_0/ffn.key", 2)
    assert memory_bytes(h, plan) == 100 + 64 + 256 // 4 + 80 + 4 * 8 + 40


def test_unknown_families_and_paths():
    with pytest.raises(ConfigError, match="model family"):
        Hierarchy.from_shapes({("encoder", "kernel"): (4, 4)})
    with pytest.raises(ConfigError, match="matches no unit"):
        Hierarchy.from_shapes({("emb", "embedding"): (4, 4), ("pos_emb",): (4,)}, family="spikegpt")
    with pytest.raises(ConfigError, match="unknown model family"):
        Hierarchy.from_shapes({("emb", "embedding"): (4, 4)}, family="gpt2")
