"""Quantization plans: precision level per unit of the hierarchy (qslm.md sections 1 and 3).

A :class:`QuantPlan` is plain data (hashable, equal by value, JSON round trip). Precedence when resolving the level
of a module: module override > its block's override > global default. Module names are qualified
``"<block>/<module>"`` (e.g. ``"attention_3/att.key"``); the block of a module is the part before ``"/"``.
Which tensors a unit contains is the :class:`~qslm_jax.quant.hierarchy.Hierarchy`'s business.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qslm_jax.errors import ConfigError
from qslm_jax.quant.quantizers import FP32, Level, check_level


def _frozen_levels(mapping: Mapping[str, Any], what: str) -> Mapping[str, Level]:
    for name in mapping:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{what} names must be non-empty strings, found {name!r}")
    return MappingProxyType({name: check_level(mapping[name]) for name in sorted(mapping)})


def block_of(module: str) -> str:
    """The block of a qualified module name ``"<block>/<module>"``."""
    block, sep, local = module.partition("/")
    if not sep or not block or not local:
        raise ConfigError(f"module names are qualified as '<block>/<module>' (e.g. 'attention_0/att.key'), "
                          f"found {module!r}")
    return block


@dataclass(frozen=True)
class QuantPlan:
    """Bits per unit: module override > block override > global default.

    ``default``: global level (32 = fp32, untouched). ``blocks``: block name -> level. ``modules``: qualified
    module name -> level. Levels are those of :mod:`qslm_jax.quant.quantizers` (32, 16..2, 1.58, 1).
    """

    default: Level = FP32
    blocks: Mapping[str, Level] = field(default_factory=dict)
    modules: Mapping[str, Level] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "default", check_level(self.default))
        object.__setattr__(self, "blocks", _frozen_levels(self.blocks, "block"))
        object.__setattr__(self, "modules", _frozen_levels(self.modules, "module"))
        for module in self.modules:
            block_of(module)

    def __hash__(self) -> int:
        return hash((self.default, tuple(self.blocks.items()), tuple(self.modules.items())))

    def with_default(self, bits: Level) -> QuantPlan:
        """Same overrides, new global level."""
        return QuantPlan(bits, self.blocks, self.modules)

    def with_block(self, block: str, bits: Level) -> QuantPlan:
        """Plan with ``block`` overridden to ``bits`` (its module overrides are kept)."""
        return QuantPlan(self.default, {**self.blocks, block: bits}, self.modules)

    def with_module(self, module: str, bits: Level) -> QuantPlan:
        """Plan with the qualified ``module`` overridden to ``bits``."""
        return QuantPlan(self.default, self.blocks, {**self.modules, module: bits})

    def block_bits(self, block: str) -> Level:
        """Effective level of a block: its override, else the default."""
        return self.blocks.get(block, self.default)

    def module_bits(self, module: str) -> Level:
        """Effective level of a qualified module: its override, else its block's, else the default."""
        return self.modules.get(module, self.block_bits(block_of(module)))

    def normalized(self) -> QuantPlan:
        """Same effective levels without redundant overrides (block == default, module == its block's level)."""
        blocks = {b: q for b, q in self.blocks.items() if q != self.default}
        modules = {m: q for m, q in self.modules.items() if q != self.block_bits(block_of(m))}
        return QuantPlan(self.default, blocks, modules)

    def to_dict(self) -> dict[str, Any]:
        """``{"default": ..., "blocks": {...}, "modules": {...}}`` (sorted names)."""
        return {"default": self.default, "blocks": dict(self.blocks), "modules": dict(self.modules)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantPlan:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(data) - {"default", "blocks", "modules"}
        if unknown:
            raise ConfigError(f"a plan has the keys default/blocks/modules, found also {sorted(unknown)}")
        return cls(data.get("default", FP32), data.get("blocks", {}), data.get("modules", {}))

    def key(self) -> str:
        """Canonical JSON (sorted keys, no spaces): stable identifier for journals and de-duplication.

        Structural: two plans with the same effective levels but different redundant overrides have different
        keys; use ``plan.normalized().key()`` to de-duplicate by meaning.
        """
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        """Read a plan written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read a quantization plan (JSON) from {path}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"a plan file holds a JSON object, {path} holds {type(data).__name__}")
        return cls.from_dict(data)
