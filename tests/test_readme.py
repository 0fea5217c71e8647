"""The README's Python blocks run as written, and it names every preset and every entry point.

The blocks name the released files (``"SpikeGPT-216M.pth"``, ...), as a user would type them; the test runs each
block in a fresh namespace in an empty working directory with the small fixture checkpoints put in place of
exactly those quoted names (:data:`STAND_INS`), and nothing else changed.
"""

from __future__ import annotations

import re

import pytest
from flax import nnx

from converters.bert import save_bert
from experiments.inspect import MODELS
from qslm_jax.models.bert import BERT, BERT_PRESETS, BertConfig
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.quant.export import export_quantized
from qslm_jax.quant.plan import QuantPlan
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
# the file names the README uses -> what stands in for them here
STAND_INS = {
    '"SpikeGPT-216M.pth"': lambda paths: paths["spikegpt"],
    '"pytorch_model.bin"': lambda paths: paths["spikingbert"],
    '"bert-base-uncased"': lambda paths: paths["bert"],
    '"runs/tiered-spikegpt-small-a1/selection.safetensors"': lambda paths: paths["export"],
}


@pytest.fixture(scope="module")
def stand_in_paths(fixtures_dir, tmp_path_factory) -> dict[str, str]:
    """Fixture checkpoints, a small BERT directory and a quantized export of a random SST-2 spikegpt-micro."""
    root = tmp_path_factory.mktemp("readme")
    bert = BERT(BertConfig.preset("small", vocab_size=100, num_layers=2, num_labels=2), rngs=nnx.Rngs(0))
    micro = SpikeGPT(SpikeGPTConfig.preset("spikegpt-micro", n_classes=2), rngs=nnx.Rngs(0))
    return {"spikegpt": str(fixtures_dir / "spikegpt_L2_C64_V100" / "tiny_random.pth"),
            "spikingbert": str(fixtures_dir / "spikingbert_H32_T16" / "pytorch_model.bin"),
            "bert": str(save_bert(bert, root / "bert")),
            "export": str(export_quantized(micro, QuantPlan(4, blocks={"output": 8}), root / "sel.safetensors").path)}


def test_the_readme_has_python_blocks_and_every_stand_in_is_used():
    assert len(BLOCKS) >= 3
    for name in STAND_INS:
        assert any(name in block for block in BLOCKS), f"{name} is no longer in a README block: drop its stand-in"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs_as_written(index, stand_in_paths, data_dir, tmp_path, monkeypatch):
    code = BLOCKS[index]
    for name, path_of in STAND_INS.items():
        code = code.replace(name, repr(path_of(stand_in_paths)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QSLM_DATA_DIR", str(data_dir))
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": f"readme_block_{index}"})


def test_every_preset_and_entry_point_is_named():
    for model in MODELS:  # SpikeGPT presets and spikingbert-<preset>, as --model takes them
        assert f"`{model}`" in README, model
    for preset in BERT_PRESETS:
        assert f'BertConfig.preset("{preset}")' in README, preset
    entry_points = sorted(p.stem for p in (REPO_ROOT / "experiments").glob("*.py")
                          if 'if __name__ == "__main__":' in p.read_text())
    assert len(entry_points) >= 9
    for name in entry_points:
        assert f"python -m experiments.{name}" in README, name
