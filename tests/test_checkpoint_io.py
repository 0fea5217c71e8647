"""Reading checkpoints safely: formats, hub offline behaviour, strict key/shape checks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from converters.checkpoint_io import check_keys_and_shapes, read_state_dict
from qslm_jax.errors import ConversionError


def test_safetensors_and_mapping_sources_agree(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    save_file(tensors, tmp_path / "m.safetensors")
    from_file = read_state_dict(tmp_path / "m.safetensors")
    from_mapping = read_state_dict(tensors)
    assert from_file.keys() == from_mapping.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(from_file[key], value)


def test_torch_pickle_source(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.arange(3, dtype=torch.float32)}, tmp_path / "m.pth")
    np.testing.assert_array_equal(read_state_dict(tmp_path / "m.pth")["w"], [0.0, 1.0, 2.0])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.pth", None, "not found"),
        ("weights.npy", b"x", "unknown checkpoint type"),
        ("broken.safetensors", b"\x00\x01garbage", "cannot read safetensors"),
    ],
)
def test_bad_files_raise_conversion_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConversionError, match=message):
        read_state_dict(path)


def test_non_tensor_entry_is_refused():
    with pytest.raises(ConversionError, match="expected a tensor"):
        read_state_dict({"w": "not a tensor"})


def test_hub_source_offline_fails_fast_with_local_path_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ConversionError, match="pass its local path") as info:
        read_state_dict("hf://owner/some-repo/model.pth")
    assert time.monotonic() - start < 10
    assert "model.pth" in str(info.value)


def test_malformed_hub_source():
    with pytest.raises(ConversionError, match="hf://<owner>/<repo>/<filename>"):
        read_state_dict("hf://only-owner")


def test_check_keys_and_shapes_lists_every_problem():
    found = {"a": np.zeros((2, 3)), "b": np.zeros(4), "extra": np.zeros(1)}
    expected = {"a": (3, 2), "b": (4,), "gone": (5,)}
    with pytest.raises(ConversionError) as info:
        check_keys_and_shapes(found, expected, what="toy checkpoint")
    text = str(info.value)
    assert "missing keys ['gone']" in text
    assert "unexpected keys ['extra']" in text
    assert "a: expected (3, 2), found (2, 3)" in text
    check_keys_and_shapes({"b": np.zeros(4)}, {"b": (4,)}, what="ok")  # no error when everything matches


def test_non_finite_tensors_are_refused_by_name(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"good": np.ones(3, np.float32), "bad": np.array([1.0, np.inf, np.nan], np.float32),
               "ids": np.arange(3)}
    save_file(tensors, tmp_path / "m.safetensors")
    with pytest.raises(ConversionError, match=r"non-finite weights: bad \(2 of 3 non-finite\)"):
        read_state_dict(tmp_path / "m.safetensors")
