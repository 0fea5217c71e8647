"""Weight-memory accounting of a quantization plan (qslm.md section 2).

Bytes of one tensor at level q:

* q = 32 (fp32, including every 1-D tensor that is not quantized): ``4 * numel``;
* q in 2..16 and q = 1: ``ceil(numel * q / 8)`` (codes bit-packed) plus 8 bytes (fp32 scale + fp32 zero-point)
  per scale group (1 group per tensor, one per output channel with per-channel scales, or one per run of ``G``
  inputs of each output channel with group-wise scales; binary and ternary always 1);
* q = 1.58 (ternary): ``ceil(numel / 5)`` (5 trits per byte) plus 8 bytes.

This is exactly the payload that :mod:`qslm_jax.quant.export` writes. MB are 10^6 bytes (the paper's budgets).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qslm_jax.errors import ConfigError
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import FP32, Level, check_level, kind_of

if TYPE_CHECKING:
    from qslm_jax.quant.hierarchy import Hierarchy

MB = 1e6
GROUP_BYTES = 8  # fp32 scale + fp32 zero-point


def code_bytes(numel: int, level: Level) -> int:
    """Bytes of the packed integer codes of ``numel`` elements at a quantized ``level`` (not 32)."""
    kind = kind_of(level)
    if kind.packing == "trits":
        return -(-numel // 5)
    if kind.packing != "bits":
        raise ConfigError(f"level {level} is stored as fp32 (4 bytes per element), not as packed codes")
    return -(-numel * int(level) // 8)


def tensor_bytes(numel: int, level: Level, groups: int = 1) -> int:
    """Storage of one tensor: ``4 numel`` at fp32, else packed codes + ``8 * groups`` bytes of scales."""
    if check_level(level) == FP32:
        return 4 * numel
    return code_bytes(numel, level) + GROUP_BYTES * groups


@dataclass(frozen=True)
class MemoryReport:
    """Weight memory of a model under a plan: total, per block and per module (bytes), and vs fp32."""

    total_bytes: int
    fp32_bytes: int
    block_bytes: Mapping[str, int]
    module_bytes: Mapping[str, int]

    @property
    def total_mb(self) -> float:
        """Total in MB (10^6 bytes)."""
        return self.total_bytes / MB

    @property
    def fraction(self) -> float:
        """``M_q / M_0``."""
        return self.total_bytes / self.fp32_bytes

    @property
    def saved_percent(self) -> float:
        """Memory saved vs fp32, in percent: ``100 (1 - M_q / M_0)``."""
        return 100.0 * (1.0 - self.fraction)

    def to_dict(self) -> dict:
        """Plain dict (JSON)."""
        return {"total_bytes": self.total_bytes, "total_mb": self.total_mb, "fp32_bytes": self.fp32_bytes,
                "saved_percent": self.saved_percent, "block_bytes": dict(self.block_bytes),
                "module_bytes": dict(self.module_bytes)}


def memory_report(hierarchy: Hierarchy, plan: QuantPlan) -> MemoryReport:
    """Per-unit and total bytes of ``hierarchy``'s tensors at the levels ``plan`` gives them."""
    levels = hierarchy.levels(plan)
    blocks = dict.fromkeys(hierarchy.blocks, 0)
    modules = dict.fromkeys(hierarchy.modules, 0)
    for info in hierarchy.tensors:
        nbytes = tensor_bytes(info.numel, levels[info.path], hierarchy.groups(info, levels[info.path]))
        blocks[info.block] = blocks.get(info.block, 0) + nbytes  # fixed-level tensors may sit outside the tree
        if info.module:
            modules[info.module] = modules.get(info.module, 0) + nbytes
    return MemoryReport(sum(blocks.values()), hierarchy.fp32_bytes, blocks, modules)


def memory_bytes(hierarchy: Hierarchy, plan: QuantPlan) -> int:
    """Weight memory of ``hierarchy``'s model under ``plan``: ``sum over tensors of tensor_bytes`` (qslm.md
    section 2)."""
    return memory_report(hierarchy, plan).total_bytes


def format_table(hierarchy: Hierarchy, plan: QuantPlan | None = None) -> str:
    """The paper's Table I: every block and module with its parameter count and MB at fp32 (and under ``plan``)."""
    fp32 = memory_report(hierarchy, QuantPlan())
    quant = memory_report(hierarchy, plan) if plan is not None else None
    header = f"{'unit':<34}{'params':>14}{'MB fp32':>12}" + (f"{'MB plan':>12}" if quant else "")
    lines = [header, "-" * len(header)]

    def row(name: str, params: int, key: str, table: str) -> str:
        line = f"{name:<34}{params:>14,}{getattr(fp32, table)[key] / MB:>12.3f}"
        return line + (f"{getattr(quant, table)[key] / MB:>12.3f}" if quant else "")

    for block in hierarchy.blocks:
        lines.append(row(block, hierarchy.numel(block=block), block, "block_bytes"))
        for module in hierarchy.modules_of(block):
            lines.append(row("  " + module.partition("/")[2], hierarchy.numel(module=module), module,
                             "module_bytes"))
    for block in fp32.block_bytes:
        if block not in hierarchy.blocks:  # every tensor at a fixed level (with_fixed_levels)
            lines.append(row(f"{block} (fixed levels)", hierarchy.numel(block=block), block, "block_bytes"))
    lines.append("-" * len(header))
    total = f"{'total':<34}{hierarchy.numel():>14,}{fp32.total_mb:>12.3f}"
    lines.append(total + (f"{quant.total_mb:>12.3f}  ({quant.saved_percent:.1f}% saved)" if quant else ""))
    return "\n".join(lines)
