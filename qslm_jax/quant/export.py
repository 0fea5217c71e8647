"""Export of a quantized model as packed integer codes + scales/zero-points in a safetensors file.

For every tensor at a quantized level the file holds ``<name>:codes`` (uint8, the codes packed to the real width:
b-bit codes bit-packed little-endian, so 4-bit codes two per byte and binary 8 per byte; ternary 5 trits per byte in
base 3), ``<name>:scale`` and ``<name>:zero_point`` (float32, one per scale group). fp32 tensors are stored as they
are under ``<name>``. The safetensors metadata holds the format tag, the plan, the scheme, the model config and
every tensor's path, shape, level and channel axis as JSON.

Reloading dequantizes with the same formula as the fake-quant path, ``(codes - zp) * scale`` in float32, so the
weights are bit-identical to :func:`~qslm_jax.quant.apply.quantize_model`; the payload is exactly the bytes that
:mod:`qslm_jax.quant.memory` counts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from qslm_jax.errors import ConversionError
from qslm_jax.quant.hierarchy import Hierarchy, hierarchy_of, param_shapes
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import FP32, TERNARY, QuantScheme, dequantize, level_code, quant_grid

FORMAT = "qslm-jax-quantized/1"
_CHUNK = 1 << 20  # elements packed at a time (a multiple of 8, so chunks end on byte boundaries)
_TRIT_WEIGHTS = np.array([1, 3, 9, 27, 81], np.uint8)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bit-pack unsigned ``bits``-bit codes, little-endian: bit k of code i is stream bit ``i*bits + k``."""
    codes = np.asarray(codes, np.uint32).ravel()
    shifts = np.arange(bits, dtype=np.uint32)
    parts = [np.packbits(((codes[s:s + _CHUNK, None] >> shifts) & 1).astype(np.uint8).ravel(), bitorder="little")
             for s in range(0, len(codes), _CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` for ``n`` codes (uint32)."""
    weights = np.left_shift(np.uint32(1), np.arange(bits, dtype=np.uint32))
    step = _CHUNK * bits // 8
    parts = []
    for i, s in enumerate(range(0, n, _CHUNK)):
        count = min(_CHUNK, n - s)
        planes = np.unpackbits(packed[i * step:(i + 1) * step], count=count * bits, bitorder="little")
        parts.append(planes.reshape(count, bits).astype(np.uint32) @ weights)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint32)


def pack_trits(codes: np.ndarray) -> np.ndarray:
    """Pack codes in {0, 1, 2} five per byte: ``byte = sum_i c_i 3^i`` (3^5 = 243 <= 256)."""
    codes = np.asarray(codes, np.uint8).ravel()
    padded = np.concatenate([codes, np.zeros(-len(codes) % 5, np.uint8)]).reshape(-1, 5)
    return (padded * _TRIT_WEIGHTS).sum(axis=1, dtype=np.uint8)


def unpack_trits(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_trits` for ``n`` codes."""
    digits = (np.asarray(packed, np.uint8)[:, None] // _TRIT_WEIGHTS) % 3
    return digits.ravel()[:n].astype(np.uint32)


def _pack(codes: np.ndarray, level) -> np.ndarray:
    return pack_trits(codes) if level == TERNARY else pack_bits(codes, int(level))


def _unpack(packed: np.ndarray, level, n: int) -> np.ndarray:
    return unpack_trits(packed, n) if level == TERNARY else unpack_bits(packed, int(level), n)


_grid = jax.jit(quant_grid, static_argnames=("symmetric", "channel_axis"))


def _config_dict(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return config


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_quantized` wrote: file size, payload (codes + scales + fp32 tensors), the memory the
    accounting predicts (equal to the payload) and header bytes. Path-like (the file)."""

    path: Path
    file_bytes: int
    payload_bytes: int
    memory_bytes: int

    def __fspath__(self) -> str:
        """Path-like: ``Path(export_quantized(...))`` is the written file."""
        return str(self.path)

    @property
    def header_bytes(self) -> int:
        """safetensors header (JSON with tensor table and metadata)."""
        return self.file_bytes - self.payload_bytes


def export_quantized(model: nnx.Module, plan: QuantPlan, path: str | Path, *, hierarchy: Hierarchy | None = None,
                     config: Any = None) -> ExportSummary:
    """Write ``model`` quantized under ``plan`` to the safetensors file ``path`` (codes packed to their width).

    ``config`` (default ``model.config``) is stored as JSON metadata beside the plan and scheme.
    """
    hierarchy = hierarchy or hierarchy_of(model)
    levels = hierarchy.levels(plan)
    flat = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors, table = {}, {}
    for info in hierarchy.tensors:
        level, w = levels[info.path], flat[info.path]
        axis = hierarchy.channel_axis(info)
        groups = hierarchy.groups(info, level)
        table[info.name] = {"path": list(info.path), "shape": list(info.shape), "level": level,
                            "channel_axis": axis if groups > 1 else None}
        if level == FP32:
            tensors[info.name] = np.ascontiguousarray(w, np.float32)
            continue
        codes, scale, zero_point = _grid(w, level_code(level), symmetric=hierarchy.scheme.symmetric,
                                         channel_axis=axis)
        tensors[f"{info.name}:codes"] = _pack(np.asarray(codes, np.uint32), level)
        for key, value in (("scale", scale), ("zero_point", zero_point)):
            tensors[f"{info.name}:{key}"] = np.asarray(value, np.float32).ravel()[:groups].copy()
    metadata = {"format": FORMAT, "plan": plan.key(), "scheme": json.dumps(hierarchy.scheme.to_dict()),
                "config": json.dumps(_config_dict(config if config is not None else getattr(model, "config", None))),
                "family": hierarchy.family, "tensors": json.dumps(table)}
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    payload = sum(t.nbytes for t in tensors.values())
    return ExportSummary(path, path.stat().st_size, payload, hierarchy.memory_bytes(plan))


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """A reloaded export: dequantized parameters (pure nested dict, float32), plan, scheme and model config."""

    params: dict
    plan: QuantPlan
    scheme: QuantScheme
    config: Any

    def apply_to(self, model: nnx.Module) -> nnx.Module:
        """A copy of ``model`` (same architecture) carrying these parameters."""
        expected, found = param_shapes(model), param_shapes(self.params)
        if expected != found:
            diff = sorted(set(expected.items()) ^ set(found.items()), key=str)[:6]
            raise ConversionError(f"the export does not fit this model: parameters differ in {diff}; build the "
                                  f"model from the export's config ({self.config})")
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        return nnx.merge(graphdef, self.params, rest)


def load_quantized(path: str | Path) -> QuantizedCheckpoint:
    """Read an :func:`export_quantized` file and dequantize every tensor: ``(codes - zp) * scale`` (float32)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            metadata = json.loads(handle.read(header_len)).get("__metadata__", {})
        arrays = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as err:
        raise ConversionError(f"cannot read a quantized export from {path}: {err}") from err
    if metadata.get("format") != FORMAT:
        raise ConversionError(f"{path} is not a {FORMAT} export (format tag {metadata.get('format')!r}); "
                              "write it with qslm_jax.quant.export.export_quantized")
    params: dict = {}
    for name, entry in json.loads(metadata["tensors"]).items():
        shape, level, axis = tuple(entry["shape"]), entry["level"], entry["channel_axis"]
        if level == FP32:
            value = arrays[name]
        else:
            n = int(np.prod(shape, dtype=np.int64))
            codes = _unpack(arrays[f"{name}:codes"], level, n).reshape(shape)
            bshape = [1] * len(shape)
            if axis is not None:
                bshape[axis] = -1
            scale, zero_point = (arrays[f"{name}:{k}"].reshape(bshape) for k in ("scale", "zero_point"))
            value = np.asarray(dequantize(codes, scale, zero_point))
        node = params
        for key in entry["path"][:-1]:
            node = node.setdefault(key, {})
        node[entry["path"][-1]] = value
    return QuantizedCheckpoint(params, QuantPlan.from_dict(json.loads(metadata["plan"])),
                               QuantScheme(**json.loads(metadata["scheme"])), json.loads(metadata["config"]))

