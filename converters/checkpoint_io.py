"""Reading reference checkpoints safely, and strict key/shape checks shared by every converter.

Sources a converter accepts:

* a path to a PyTorch pickle (``.pth`` / ``.pt`` / ``.bin``), read with ``torch.load(weights_only=True)``
  (torch imported lazily; a pickle holding anything but tensors and plain containers is refused, never run);
* a path to a ``.safetensors`` file (read without torch);
* ``hf://<repo_id>/<filename>``, downloaded with ``huggingface_hub`` (offline: fails at once, saying how to
  pass a local path instead);
* an in-memory mapping ``name -> tensor`` (numpy arrays, torch tensors or jax arrays).

Everything comes back as ``dict[str, np.ndarray]``; a floating-point tensor holding NaN or Inf is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qslm_jax.errors import ConversionError

HF_PREFIX = "hf://"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def resolve_hub_source(source: str) -> Path:
    """Download ``hf://<owner>/<repo>/<filename>`` with ``huggingface_hub`` and return the local path.

    Offline (``HF_HUB_OFFLINE=1``) or without network it raises :class:`ConversionError` naming the file
    and how to pass a local path instead, without waiting on retries.
    """
    rest = source[len(HF_PREFIX):]
    parts = rest.split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise ConversionError(f"expected 'hf://<owner>/<repo>/<filename>', found {source!r}")
    repo_id, filename = f"{parts[0]}/{parts[1]}", parts[2]
    how_to = (
        f"Download '{filename}' from https://huggingface.co/{repo_id} on a machine with network access "
        f"and pass its local path instead of {source!r}."
    )
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub is a core dependency
        raise ConversionError(f"huggingface_hub is not installed. {how_to}") from err
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline, etag_timeout=5))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        state = "offline (HF_HUB_OFFLINE=1), not in the local cache" if offline else "could not be downloaded"
        raise ConversionError(f"checkpoint '{filename}' of hub repo '{repo_id}' {state}. {how_to}") from err


def _torch_load(path: Path) -> Any:
    try:
        import torch
    except ImportError as err:
        raise ConversionError(
            f"reading the PyTorch checkpoint {path} needs torch: pip install 'qslm-jax[convert]' "
            "(or convert it to .safetensors elsewhere and pass that file)"
        ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it holds objects other than tensors, which are refused (never unpickled) for safety"
        raise ConversionError(f"cannot read PyTorch checkpoint {path}: {reason}") from err


def _to_numpy(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return np.asarray(value)
    raise ConversionError(f"entry {name!r} is a {type(value).__name__}, expected a tensor")


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Read a flat ``name -> array`` state dict from any supported ``source`` (see module docstring).

    Raises :class:`ConversionError` for missing, truncated or unsafe files and for non-tensor entries.
    """
    if isinstance(source, Mapping):
        raw = source
    else:
        text = os.fspath(source)
        path = resolve_hub_source(text) if text.startswith(HF_PREFIX) else Path(text)
        if not path.is_file():
            raise ConversionError(f"checkpoint file not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.numpy import load_file

            try:
                raw = load_file(path)
            except (SafetensorError, OSError, ValueError) as err:
                raise ConversionError(f"cannot read safetensors checkpoint {path}: {err}") from err
        elif path.suffix in PICKLE_SUFFIXES:
            raw = _torch_load(path)
        else:
            raise ConversionError(
                f"unknown checkpoint type {path.suffix!r} for {path}: expected .safetensors or one of "
                f"{', '.join(PICKLE_SUFFIXES)}"
            )
        if not isinstance(raw, Mapping):
            raise ConversionError(f"{path} holds a {type(raw).__name__}, expected a state dict of tensors")
    arrays = {str(k): _to_numpy(str(k), v) for k, v in raw.items()}
    check_finite(arrays, what="checkpoint" if isinstance(source, Mapping) else f"checkpoint {os.fspath(source)}")
    return arrays


def check_finite(arrays: Mapping[str, Any], *, what: str) -> None:
    """Raise :class:`ConversionError` naming every floating-point array of ``arrays`` that holds NaN or Inf
    (a diverged training run or a corrupt file must not load as a model)."""
    bad = []
    for name, value in arrays.items():
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad.append(f"{name} ({int(np.count_nonzero(~np.isfinite(array)))} of {array.size} non-finite)")
    if bad:
        raise ConversionError(f"{what} holds non-finite weights: {', '.join(sorted(bad)[:10])}"
                              f"{f' and {len(bad) - 10} more' if len(bad) > 10 else ''}; the weights are "
                              "corrupt or come from a diverged run")


def check_keys_and_shapes(
    found: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], *, what: str
) -> None:
    """Raise :class:`ConversionError` unless ``found`` has exactly the ``expected`` keys and shapes.

    The message lists every missing key, every unexpected key and every shape mismatch (so a user sees the
    whole problem at once); nothing is loaded when anything is wrong.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(
        f"{k}: expected {tuple(expected[k])}, found {tuple(found[k].shape)}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes [{'; '.join(wrong)}]")
    if problems:
        raise ConversionError(f"{what} does not match: " + "; ".join(problems))
