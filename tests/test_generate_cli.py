"""``python -m experiments.generate`` on a saved micro model, plain and with a quantized export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from experiments import generate as generate_cli
from qslm_jax.errors import ConfigError
from qslm_jax.model_io import save_model
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.quant.export import export_quantized
from qslm_jax.quant.plan import QuantPlan


@pytest.mark.slow
def test_generate_cli_continues_a_prompt_with_a_saved_and_a_quantized_model(tmp_path, data_dir, capsys):
    model = SpikeGPT(SpikeGPTConfig.preset("spikegpt-micro"), rngs=nnx.Rngs(0))
    saved = save_model(model, tmp_path / "micro")
    export = export_quantized(model, QuantPlan(2), tmp_path / "micro-2bit.safetensors").path
    common = ["--model", str(saved), "--prompt", "The tower is", "--max-new-tokens", "6", "--temperature", "0",
              "--data-dir", str(data_dir), "--mode", "rnn"]
    plain = generate_cli.main([*common, "--json", str(tmp_path / "out.json")])
    assert plain["prompt_ids"] and len(plain["new_ids"]) == 6
    assert plain["config"]["rescale_every"] == 6 and not plain["config"]["binarize_embedding"]
    assert capsys.readouterr().out.startswith("The tower is" + plain["text"])
    assert json.loads((tmp_path / "out.json").read_text()) == plain
    quantized = generate_cli.main([*common, "--quantized", str(export)])
    assert quantized["model"]["quantized"] == str(export)
    # 2-bit weights are a different model: its greedy continuation differs from the fp32 one
    assert not np.array_equal(quantized["new_ids"], plain["new_ids"])


@pytest.mark.slow
def test_generate_cli_refuses_a_model_of_another_vocabulary(tmp_path, data_dir):
    saved = save_model(SpikeGPT(SpikeGPTConfig.preset("spikegpt-tiny"), rngs=nnx.Rngs(0)), tmp_path / "tiny")
    with pytest.raises(ConfigError, match="GPT-NeoX"):
        generate_cli.main(["--model", str(saved), "--data-dir", str(data_dir)])
