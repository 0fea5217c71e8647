"""Export of a quantized model as packed integer codes + scales/zero-points in a safetensors file.

For every tensor at a quantized level the file holds ``<name>:codes`` (uint8, the codes packed to the real width:
b-bit codes bit-packed little-endian, so 4-bit codes two per byte and binary 8 per byte; ternary 5 trits per byte in
base 3), ``<name>:scale`` and ``<name>:zero_point`` (float32, one per scale group, in the row-major order of the
scale grid :func:`~qslm_jax.quant.quantizers.grid_shape`). fp32 tensors are stored as they are under ``<name>``.
The safetensors metadata holds the format tag, the plan, the scheme, the model config, every tensor's path, shape,
level and channel axis as JSON, and the SHA-256 of the tensors (:func:`payload_digest`).

:func:`load_quantized` trusts nothing of this before checking it against the file (header, table, checksum,
finiteness), so a corrupt, truncated or forged file is a :class:`~qslm_jax.errors.ConversionError`, never an
out-of-memory or silently wrong weights.

Reloading dequantizes with the same formula as the fake-quant path, ``(codes - zp) * scale`` in float32, so the
weights are bit-identical to :func:`~qslm_jax.quant.apply.quantize_model`; the payload is exactly the bytes that
:mod:`qslm_jax.quant.memory` counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from converters.checkpoint_io import check_finite
from qslm_jax.errors import ConfigError, ConversionError
from qslm_jax.quant.apply import clip_ratio_table
from qslm_jax.quant.hierarchy import Hierarchy, hierarchy_of, param_shapes
from qslm_jax.quant.memory import code_bytes, memory_bytes
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import (
    FP32,
    Level,
    QuantScheme,
    check_level,
    dequantize_grid,
    grid_shape,
    kind_of,
    level_code,
    quant_grid,
)

FORMAT = "qslm-jax-quantized/2"  # /2: tensors checksummed (metadata "sha256")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
DTYPE_BYTES = {"U8": 1, "F32": 4}  # the dtypes an export holds: packed codes, fp32 scales and tensors
TRIT_BYTE_MAX = 3**5 - 1  # largest byte of five packed trits
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


def _pack(codes: np.ndarray, level: Level) -> np.ndarray:
    return pack_trits(codes) if kind_of(level).packing == "trits" else pack_bits(codes, int(level))


def _unpack(packed: np.ndarray, level: Level, n: int) -> np.ndarray:
    return unpack_trits(packed, n) if kind_of(level).packing == "trits" else unpack_bits(packed, int(level), n)


_grid = jax.jit(quant_grid, static_argnames=("symmetric", "channel_axis", "group_size"))


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
    clip_ratios = clip_ratio_table(nnx.to_pure_dict(nnx.state(model, nnx.Param)), hierarchy)
    tensors, table = {}, {}
    for info in hierarchy.tensors:
        level, w = levels[info.path], flat[info.path]
        options = hierarchy.quantizer_options(info)
        groups = hierarchy.groups(info, level)
        table[info.name] = {"path": list(info.path), "shape": list(info.shape), "level": level,
                            "channel_axis": options["channel_axis"] if groups > 1 else None}
        if level == FP32:
            tensors[info.name] = np.ascontiguousarray(w, np.float32)
            continue
        codes, scale, zero_point = _grid(w, level_code(level), **options,
                                         clip_ratios=None if clip_ratios is None else clip_ratios[info.name])
        tensors[f"{info.name}:codes"] = _pack(np.asarray(codes, np.uint32), level)
        for key, value in (("scale", scale), ("zero_point", zero_point)):
            tensors[f"{info.name}:{key}"] = np.asarray(value, np.float32).ravel()[:groups].copy()
    metadata = {"format": FORMAT, "plan": plan.key(), "scheme": json.dumps(hierarchy.scheme.to_dict()),
                "config": json.dumps(_config_dict(config if config is not None else getattr(model, "config", None))),
                "family": hierarchy.family, "tensors": json.dumps(table), "sha256": payload_digest(tensors)}
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    payload = sum(t.nbytes for t in tensors.values())
    return ExportSummary(path, path.stat().st_size, payload, memory_bytes(hierarchy, plan))


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


def payload_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the tensors of an export: name, dtype, shape and bytes of each, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _fail(path: Path, problem: str) -> ConversionError:
    return ConversionError(f"{path} is not a valid {FORMAT} export: {problem}; re-export the model with "
                           "qslm_jax.quant.export.export_quantized (the file is corrupt, truncated or edited)")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The safetensors tensor table and metadata of ``path``, checked against the file size before any tensor
    is read: known dtypes, shapes of non-negative integers, ``data_offsets`` that tile the payload exactly
    (contiguous, no overlap, ending at the end of the file) and byte counts equal to ``numel * itemsize``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            header_len = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or header_len > min(size - 8, MAX_HEADER_BYTES):
                raise _fail(path, f"the header length field says {header_len:,} bytes but the file has "
                                  f"{size:,} bytes (at most {MAX_HEADER_BYTES:,} of header)")
            header = json.loads(handle.read(header_len))
    except OSError as err:
        raise ConversionError(f"cannot read a quantized export from {path}: {err}") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise _fail(path, f"the header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise _fail(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "the metadata is not a mapping of strings")
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
            found = entry.get("dtype") if isinstance(entry, dict) else entry
            raise _fail(path, f"tensor {name!r} has dtype {found!r}, expected one of {sorted(DTYPE_BYTES)}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _fail(path, f"tensor {name!r} has shape {shape!r}, expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise _fail(path, f"tensor {name!r} has data_offsets {offsets!r}, expected [begin, end]")
        spans.append((offsets[0], offsets[1], math.prod(shape) * DTYPE_BYTES[entry["dtype"]], name))
    payload, end = size - 8 - header_len, 0
    for begin, stop, nbytes, name in sorted(spans):
        if begin != end or stop - begin != nbytes or stop > payload:
            raise _fail(path, f"tensor {name!r} ({nbytes:,} bytes by its dtype and shape) lies at bytes "
                              f"[{begin:,}, {stop:,}] but the previous tensor ends at {end:,} and the payload "
                              f"has {payload:,}")
        end = stop
    if end != payload:
        raise _fail(path, f"the tensors cover {end:,} bytes but the payload has {payload:,}")
    return header, metadata


def _expected_tensors(path: Path, table: Any, scheme: QuantScheme) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{file tensor name: (dtype, shape)}`` that the export's tensor table implies (each entry checked)."""
    if not isinstance(table, dict):
        raise _fail(path, "the metadata 'tensors' is not a JSON object")
    expected, paths = {}, set()
    for name, entry in table.items():
        if not isinstance(entry, dict) or set(entry) != {"path", "shape", "level", "channel_axis"}:
            raise _fail(path, f"tensor entry {name!r} is {entry!r}, expected path/shape/level/channel_axis")
        shape, tensor_path, axis = entry["shape"], entry["path"], entry["channel_axis"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _fail(path, f"tensor {name!r} has shape {shape!r}, expected a list of non-negative integers")
        if (not isinstance(tensor_path, list) or not tensor_path
                or not all(isinstance(k, str) or _is_count(k) for k in tensor_path)):
            raise _fail(path, f"tensor {name!r} has the state path {tensor_path!r}")
        if tuple(tensor_path) in paths:
            raise _fail(path, f"the state path {tensor_path} occurs twice")
        paths.add(tuple(tensor_path))
        try:
            level = check_level(entry["level"])
        except ConfigError as err:
            raise _fail(path, f"tensor {name!r}: {err}") from err
        if axis is not None and not (_is_count(axis) and axis < len(shape)):
            raise _fail(path, f"tensor {name!r} of shape {shape} has channel axis {axis!r}")
        if level == FP32:
            expected[name] = ("F32", tuple(shape))
            continue
        numel = math.prod(shape)
        if axis is not None and kind_of(level).per_tensor:
            raise _fail(path, f"tensor {name!r} at level {level} has a channel axis, but that level has one scale")
        try:
            groups = math.prod(_grid_shape(shape, axis, scheme))
        except ConfigError as err:
            raise _fail(path, f"tensor {name!r}: {err}") from err
        expected[f"{name}:codes"] = ("U8", (code_bytes(numel, level),))
        expected[f"{name}:scale"] = expected[f"{name}:zero_point"] = ("F32", (groups,))
    return expected


def _check_tensor_table(path: Path, header: dict, expected: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise _fail(path, f"missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, (dtype, shape) in expected.items():
        found = (header[name]["dtype"], tuple(header[name]["shape"]))
        if found != (dtype, shape):
            raise _fail(path, f"tensor {name!r} is {found[0]} {list(found[1])}, but its level and shape call "
                              f"for {dtype} {list(shape)}")


def _parse_json(path: Path, metadata: dict[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError) as err:
        raise _fail(path, f"the metadata {key!r} is missing or not JSON ({err})") from err


def load_quantized(path: str | Path) -> QuantizedCheckpoint:
    """Read an :func:`export_quantized` file and dequantize every tensor: ``(codes - zp) * scale`` (float32).

    Nothing is trusted before it is checked: the safetensors header against the file size (:func:`read_header`),
    the export's tensor table against the header (every level valid, packed code bytes = ``code_bytes(numel,
    level)``, one scale and zero-point per scale group), then the tensors against the SHA-256 in the metadata;
    scales, zero-points and fp32 tensors must be finite and scales non-negative. Any failure is a
    :class:`ConversionError` naming the problem.
    """
    path = Path(path)
    header, metadata = read_header(path)
    if metadata.get("format") != FORMAT:
        raise ConversionError(f"{path} is not a {FORMAT} export (format tag {metadata.get('format')!r}); "
                              "write it with qslm_jax.quant.export.export_quantized")
    try:
        scheme = QuantScheme(**_parse_json(path, metadata, "scheme"))
        plan = QuantPlan.from_dict(_parse_json(path, metadata, "plan"))
    except (TypeError, ConfigError) as err:
        raise _fail(path, f"the scheme or plan is invalid ({err})") from err
    table = _parse_json(path, metadata, "tensors")
    _check_tensor_table(path, header, _expected_tensors(path, table, scheme))
    try:
        arrays = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ConversionError(f"cannot read a quantized export from {path}: {err}") from err
    if metadata.get("sha256") != payload_digest(arrays):
        raise _fail(path, f"the tensors' SHA-256 {payload_digest(arrays)[:16]}... differs from the one recorded "
                          f"at export ({str(metadata.get('sha256'))[:16]}...)")
    check_finite({k: v for k, v in arrays.items() if v.dtype == np.float32}, what=f"export {path}")
    params: dict = {}
    for name, entry in table.items():
        shape, level, axis = tuple(entry["shape"]), check_level(entry["level"]), entry["channel_axis"]
        value = arrays[name] if level == FP32 else _dequantize_entry(path, arrays, name, shape, level, axis, scheme)
        node = params
        for key in entry["path"][:-1]:
            node = node.setdefault(key, {})
        node[entry["path"][-1]] = value
    return QuantizedCheckpoint(params, plan, scheme, _parse_json(path, metadata, "config"))


def _dequantize_entry(path: Path, arrays: dict, name: str, shape: tuple[int, ...], level: Level,
                      axis: int | None, scheme: QuantScheme) -> np.ndarray:
    packed, scale, zero_point = (arrays[f"{name}:{k}"] for k in ("codes", "scale", "zero_point"))
    if np.any(scale < 0):
        raise _fail(path, f"tensor {name!r} has negative scales")
    if kind_of(level).packing == "trits" and np.any(packed > TRIT_BYTE_MAX):
        raise _fail(path, f"tensor {name!r} has ternary bytes above {TRIT_BYTE_MAX} (5 trits per byte)")
    codes = _unpack(packed, level, math.prod(shape)).reshape(shape)
    grid = _grid_shape(shape, axis, scheme)
    group_size = scheme.group_size if axis is not None else None
    return np.asarray(dequantize_grid(codes, scale.reshape(grid), zero_point.reshape(grid), channel_axis=axis,
                                      group_size=group_size))


def _grid_shape(shape: tuple[int, ...], axis: int | None, scheme: QuantScheme) -> tuple[int, ...]:
    """Scale grid of an exported tensor: per tensor without a channel axis, else the scheme's groups."""
    return grid_shape(tuple(shape), axis, scheme.group_size if axis is not None else None)
