"""QuantPlan: precedence, value semantics, JSON round trip, validation."""

from __future__ import annotations

import json

import pytest

from qslm_jax.errors import ConfigError
from qslm_jax.quant.plan import QuantPlan, block_of
from qslm_jax.quant.quantizers import TERNARY


def test_precedence_module_over_block_over_default():
    plan = QuantPlan(8).with_block("attention_3", 6).with_module("attention_3/att.key", 4)
    assert plan.block_bits("input") == 8
    assert plan.block_bits("attention_3") == 6
    assert plan.module_bits("attention_3/att.key") == 4
    assert plan.module_bits("attention_3/att.value") == 6  # inherits its block's override
    assert plan.module_bits("attention_2/att.key") == 8  # inherits the default
    # a module override survives changes of its block and of the default
    assert plan.with_block("attention_3", 2).with_default(16).module_bits("attention_3/att.key") == 4
    assert plan.with_default(16).block_bits("attention_3") == 6


def test_default_plan_is_fp32():
    assert QuantPlan().default == 32 and QuantPlan().module_bits("output/head") == 32


def test_hashable_and_equal_by_value():
    a = QuantPlan(8, {"b": 4, "a": 6}, {"a/x": 2})
    b = QuantPlan(8).with_block("a", 6).with_block("b", 4).with_module("a/x", 2)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != a.with_module("a/x", 3)
    with pytest.raises(AttributeError):
        a.default = 4
    with pytest.raises(TypeError):
        a.blocks["c"] = 2


def test_key_is_canonical_and_json_round_trips(tmp_path):
    a = QuantPlan(8, {"b": 4, "a": 6}, {"a/x": TERNARY})
    b = QuantPlan(8, {"a": 6, "b": 4}, {"a/x": 1.58})
    assert a.key() == b.key() == '{"blocks":{"a":6,"b":4},"default":8,"modules":{"a/x":1.58}}'
    assert QuantPlan.from_dict(json.loads(a.key())) == a
    a.save(tmp_path / "plan.json")
    assert QuantPlan.load(tmp_path / "plan.json") == a


def test_normalized_drops_only_redundant_overrides():
    plan = QuantPlan(8, {"a": 8, "b": 4}, {"a/x": 8, "b/y": 8, "b/z": 4})
    norm = plan.normalized()
    assert norm == QuantPlan(8, {"b": 4}, {"b/y": 8})
    for unit in ("a/x", "b/y", "b/z", "c/w"):
        assert norm.module_bits(unit) == plan.module_bits(unit)


@pytest.mark.parametrize("bad", [
    lambda: QuantPlan(7.5),
    lambda: QuantPlan(8, {"a": 0}),
    lambda: QuantPlan(8, modules={"no_block_part": 4}),
    lambda: QuantPlan(8, modules={"a/": 4}),
    lambda: QuantPlan.from_dict({"default": 8, "extra": 1}),
])
def test_invalid_plans_raise_config_error(bad):
    with pytest.raises(ConfigError):
        bad()


def test_block_of_and_unreadable_file(tmp_path):
    assert block_of("attention_0/att.key") == "attention_0"
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        QuantPlan.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="cannot read"):
        QuantPlan.load(tmp_path / "missing.json")
