"""``python -m experiments.inspect``: Table I of the 216M preset from shapes, with and without a plan."""

from __future__ import annotations

import json

import pytest

from experiments import inspect as inspect_cli
from qslm_jax.quant.plan import QuantPlan


def test_table_of_216m(capsys, tmp_path):
    result = inspect_cli.main(["--model", "spikegpt216m", "--json", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert "20 blocks, 126 modules, 330 tensors" in out
    assert result["params"] == 215_399_424 and result["fp32_bytes"] == 861_597_696
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:] if line.strip()}
    assert rows["input"][1] == "38,614,272" and rows["input"][2] == "154.457"
    assert rows["attention_17"][1] == "7,676,160" and rows["attention_17"][2] == "30.705"
    assert rows["total"][2] == "861.598"
    assert sum(1 for line in out.splitlines() if line.strip().startswith("ffn.key")) == 18
    assert json.loads((tmp_path / "t.json").read_text()) == result
    assert [m["module"] for m in result["blocks"][1]["modules"]][:2] == ["attention_0/att.key",
                                                                        "attention_0/att.value"]


def test_plan_column_and_bert(capsys, tmp_path):
    QuantPlan(4).save(tmp_path / "plan.json")
    result = inspect_cli.main(["--model", "spikegpt216m", "--plan", str(tmp_path / "plan.json")])
    assert result["plan_memory"]["total_bytes"] == 108_243_712
    assert "108.244" in capsys.readouterr().out.splitlines()[-1]
    bert = inspect_cli.main(["--model", "spikingbert-tiny"])
    assert [b["block"] for b in bert["blocks"]] == ["embeddings", *(f"encoder_{i}" for i in range(4)), "head"]


def test_unknown_model_is_rejected():
    with pytest.raises(SystemExit):
        inspect_cli.main(["--model", "gpt2"])
