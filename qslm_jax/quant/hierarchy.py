"""Network model analysis: the unit tree (global > blocks > modules) of a model (qslm.md section 1).

The tree is derived from the model's parameter paths by per-family rules (:class:`FamilyRules`), never hard-coded
per checkpoint. The rules of each family live in its entry of the model-family registry
(:mod:`qslm_jax.models.registry`), which registers them here (:func:`register_rules`); this module holds only the
structure. A tensor may have a *fixed* level (:meth:`Hierarchy.with_fixed_levels`: e.g. the 1/1.58-bit kernels of
an extreme-KD student): it keeps that level under every plan, and units left with nothing to quantize leave the
tree, so a search covers only the rest.

A tensor is a *weight matrix* (quantizable) when at least two of its dimensions exceed 1 (Linear kernels,
embeddings, head, classifier); other tensors are vectors, fp32 unless the scheme quantizes vectors too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flax import nnx

from qslm_jax.errors import ConfigError
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import FP32, Level, QuantScheme, check_level, grid_shape, kind_of, level_code

Path = tuple[str | int, ...]
DEFAULT_SCHEME = QuantScheme()  # asymmetric min-max, per tensor, vectors fp32


@dataclass(frozen=True)
class TensorInfo:
    """One parameter tensor: its state path, shape, unit and how it may be quantized.

    ``module`` is the qualified module name or ``""`` for block-level tensors; ``channel_axis`` is the output-channel
    axis for per-channel scales (``None``: per tensor only).
    """

    path: Path
    shape: tuple[int, ...]
    block: str
    module: str = ""
    matrix: bool = True
    channel_axis: int | None = None
    fixed: Level | None = None  # a level kept under every plan (None: the plan decides)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def name(self) -> str:
        """Dotted path, e.g. ``blocks.3.att.key.kernel``."""
        return ".".join(str(p) for p in self.path)


@dataclass(frozen=True)
class FamilyRules:
    """How parameter paths of one model family map to blocks and modules.

    ``top_level``: first path element -> block (for non-repeated parts). ``repeated``: the list of repeated blocks
    (paths ``(repeated, i, ...)`` belong to block ``f"{prefix}{i}"``). ``modules``: sub-paths after the index that
    form a module, named by joining them with dots. ``anchor``: a top-level name that identifies the family.
    ``before``/``after``: blocks ordered before/after the repeated ones.
    """

    name: str
    anchor: str
    top_level: Mapping[str, str]
    repeated: str
    prefix: str
    modules: tuple[tuple[str, ...], ...]
    before: tuple[str, ...]
    after: tuple[str, ...]

    def matches(self, first_names: set) -> bool:
        """Whether every top-level name is covered by these rules and the anchor is present."""
        return self.anchor in first_names and first_names <= {*self.top_level, self.repeated}

    def assign(self, path: Path) -> tuple[str, str]:
        """(block, qualified module or "") of a parameter path."""
        head = path[0]
        if head in self.top_level:
            return self.top_level[head], ""
        if head == self.repeated and len(path) > 2 and isinstance(path[1], int):
            block = f"{self.prefix}{path[1]}"
            for sub in self.modules:
                if tuple(path[2:2 + len(sub)]) == sub and len(path) > 2 + len(sub):
                    return block, f"{block}/{'.'.join(sub)}"
            return block, ""
        raise ConfigError(f"parameter {'.'.join(map(str, path))} matches no unit of the {self.name} hierarchy; "
                          f"extend the rules of its entry in qslm_jax/models/registry.py")

    def module_rank(self, module: str) -> int:
        """Position of a qualified module in :attr:`modules` (-1 for block-level tensors)."""
        local = tuple(module.partition("/")[2].split(".")) if module else None
        return self.modules.index(local) if local in self.modules else -1

    def block_order(self, blocks: set[str]) -> tuple[str, ...]:
        """Blocks in model order: ``before``, repeated blocks by index, ``after`` (only those present)."""
        repeated = sorted((b for b in blocks if b.startswith(self.prefix) and b[len(self.prefix):].isdigit()),
                          key=lambda b: int(b[len(self.prefix):]))
        return tuple(b for b in (*self.before, *repeated, *self.after) if b in blocks)


FAMILIES: dict[str, FamilyRules] = {}  # family name -> rules, filled by the model-family registry


def register_rules(rules: FamilyRules) -> None:
    """Make ``rules`` known to :func:`hierarchy_of` (called by :func:`qslm_jax.models.registry.register_family`)."""
    FAMILIES[rules.name] = rules


def _is_matrix(shape: tuple[int, ...]) -> bool:
    return sum(d > 1 for d in shape) >= 2


def _channel_axis(path: Path, shape: tuple[int, ...]) -> int | None:
    """Output-channel axis: last axis of a Linear ``kernel`` (in, out); axis 0 of an ``embedding`` (V, C)."""
    if not _is_matrix(shape):
        return None
    return len(shape) - 1 if path[-1] == "kernel" else 0


@dataclass(frozen=True)
class Hierarchy:
    """Blocks, modules and tensors of a model, plus the scheme that says how they are quantized.

    Built by :func:`hierarchy_of` (a model or an abstract state, no weights needed), :meth:`from_shapes` (path ->
    shape) or :meth:`from_spec` (a plain description, for tests of the search).
    """

    blocks: tuple[str, ...]
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    scheme: QuantScheme = DEFAULT_SCHEME
    family: str = "custom"

    def __post_init__(self):
        unknown = {t.block for t in self.tensors if t.fixed is None} - set(self.blocks)
        if unknown:
            raise ConfigError(f"tensors refer to blocks {sorted(unknown)} that are not in {self.blocks}")
        modules: dict[str, list[str]] = {b: [] for b in self.blocks}
        for t in self.tensors:
            if t.module and t.fixed is None and t.module not in modules[t.block]:
                modules[t.block].append(t.module)
        object.__setattr__(self, "_modules", {b: tuple(m) for b, m in modules.items()})

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_shapes(cls, shapes: Mapping[Path, Sequence[int]], *, family: str | None = None,
                    scheme: QuantScheme = DEFAULT_SCHEME) -> Hierarchy:
        """Hierarchy of a parameter tree given as ``{state path: shape}`` (family detected from the paths)."""
        if not shapes:
            raise ConfigError("cannot build a hierarchy from an empty parameter tree")
        rules = _family_rules(shapes, family)
        tensors = []
        for path, shape in shapes.items():
            shape = tuple(int(d) for d in shape)
            block, module = rules.assign(path)
            tensors.append(TensorInfo(tuple(path), shape, block, module, _is_matrix(shape),
                                      _channel_axis(path, shape)))
        blocks = rules.block_order({t.block for t in tensors})
        tensors.sort(key=lambda t: (blocks.index(t.block), rules.module_rank(t.module)))  # model order
        return cls(blocks, tuple(tensors), scheme, rules.name)

    @classmethod
    def from_spec(cls, weights: Mapping[str, int | Mapping[str, int]], vectors: Mapping[str, int] | None = None,
                  *, scheme: QuantScheme = DEFAULT_SCHEME) -> Hierarchy:
        """Hierarchy from a plain description (no model): block -> weight numel, or block -> {module -> numel};
        ``vectors``: block -> numel of its 1-D fp32 tensors. Block order is the order of ``weights``.

        Example: ``from_spec({"input": 1000, "attention_0": {"att.key": 64}, "output": 1000}, {"attention_0": 8})``.
        """
        tensors = []
        for block, spec in weights.items():
            items = spec.items() if isinstance(spec, Mapping) else [("", spec)]
            for local, numel in items:
                local = local.partition("/")[2] if local.startswith(f"{block}/") else local
                module = f"{block}/{local}" if local else ""
                path = (block, local, "weight") if local else (block, "weight")
                tensors.append(TensorInfo(path, (int(numel),), block, module, matrix=True))
        for block, numel in (vectors or {}).items():
            tensors.append(TensorInfo((block, "vectors"), (int(numel),), block, matrix=False))
        return cls(tuple(weights), tuple(tensors), scheme)

    def with_scheme(self, scheme: QuantScheme) -> Hierarchy:
        """The same tree under another quantization scheme."""
        return replace(self, scheme=scheme)

    def with_fixed_levels(self, levels: Mapping[Path, Level]) -> Hierarchy:
        """The tree with the tensors at ``levels``'s paths kept at those levels under every plan.

        A module or block left without a tensor the scheme would quantize (its weight matrices all fixed) leaves
        the tree, its other tensors fixed at fp32, so no search spends evaluations on a unit that cannot change.
        Raises :class:`ConfigError` for a path the model does not have.
        """
        unknown = sorted(".".join(map(str, p)) for p in set(levels) - {t.path for t in self.tensors})
        if unknown:
            raise ConfigError(f"fixed levels name tensors this {self.family} model does not have: {unknown[:5]}")
        tensors = [replace(t, fixed=check_level(levels[t.path])) if t.path in levels else t for t in self.tensors]

        def free(unit) -> bool:
            return any(t.fixed is None and self.quantized(t) for t in tensors if unit(t))

        live_blocks = tuple(b for b in self.blocks if free(lambda t, b=b: t.block == b))
        live_modules = {t.module for t in tensors if t.module and free(lambda u, m=t.module: u.module == m)}
        tensors = [t if t.fixed is not None or (t.block in live_blocks and (not t.module or t.module in live_modules))
                   else replace(t, fixed=FP32) for t in tensors]
        return replace(self, blocks=live_blocks, tensors=tuple(tensors))

    @property
    def fixed_levels(self) -> dict[str, Level]:
        """Dotted name -> level of every tensor with a fixed level (journals, reports)."""
        return {t.name: t.fixed for t in self.tensors if t.fixed is not None}

    # --- the tree -----------------------------------------------------------------------------------------------

    def modules_of(self, block: str) -> tuple[str, ...]:
        """Qualified module names of a block, in model order (``()`` for blocks without modules)."""
        if block not in self._modules:
            raise ConfigError(f"unknown block {block!r}; the blocks are {self.blocks}")
        return self._modules[block]

    @property
    def modules(self) -> tuple[str, ...]:
        """Every qualified module name, block by block."""
        return tuple(m for b in self.blocks for m in self._modules[b])

    def numel(self, *, block: str | None = None, module: str | None = None) -> int:
        """Parameter count of the whole model, one block or one module."""
        return sum(t.numel for t in self.tensors
                   if (block is None or t.block == block) and (module is None or t.module == module))

    def validate(self, plan: QuantPlan) -> None:
        """Raise :class:`ConfigError` if ``plan`` names blocks or modules this model does not have."""
        bad_blocks = sorted(set(plan.blocks) - set(self.blocks))
        bad_modules = sorted(set(plan.modules) - set(self.modules))
        if bad_blocks or bad_modules:
            raise ConfigError(f"plan names unknown units: blocks {bad_blocks}, modules {bad_modules}; this "
                              f"{self.family} model has blocks {self.blocks} and modules like "
                              f"{self.modules[:3]}")

    # --- resolution ---------------------------------------------------------------------------------------------

    def quantized(self, info: TensorInfo) -> bool:
        """Whether the scheme quantizes this tensor at all (weight matrices; vectors only if asked)."""
        return info.matrix or self.scheme.quantize_vectors

    def level_of(self, info: TensorInfo, plan: QuantPlan) -> Level:
        """Effective level of one tensor: its module's, else its block's (32 if the scheme leaves it fp32)."""
        if info.fixed is not None:
            return info.fixed
        if not self.quantized(info):
            return FP32
        return plan.module_bits(info.module) if info.module else plan.block_bits(info.block)

    def levels(self, plan: QuantPlan) -> dict[Path, Level]:
        """Effective level of every tensor (validated plan), keyed by state path."""
        self.validate(plan)
        return {t.path: self.level_of(t, plan) for t in self.tensors}

    def channel_axis(self, info: TensorInfo) -> int | None:
        """Axis of per-channel (or per-group) scales under this scheme (``None``: per-tensor)."""
        return info.channel_axis if self.scheme.channelwise and info.matrix else None

    def quantizer_options(self, info: TensorInfo) -> dict:
        """The static keyword arguments of :func:`~qslm_jax.quant.quantizers.fake_quantize` for this tensor."""
        axis = self.channel_axis(info)
        return {"symmetric": self.scheme.symmetric, "channel_axis": axis,
                "group_size": self.scheme.group_size if axis is not None else None}

    def groups(self, info: TensorInfo, level: Level) -> int:
        """Number of scale/zero-point groups of a tensor at ``level`` (binary/ternary are always per tensor)."""
        if kind_of(level).per_tensor:
            return 1
        options = self.quantizer_options(info)
        return math.prod(grid_shape(info.shape, options["channel_axis"], options["group_size"]))

    def bits_tree(self, plan: QuantPlan) -> dict:
        """Nested dict of int32 level codes with the structure of ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``."""
        tree: dict = {}
        for path, level in self.levels(plan).items():
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = np.int32(level_code(level))
        return tree

    def stacked_bits(self, plans: Sequence[QuantPlan]) -> dict:
        """Bits trees of several plans stacked along a new leading axis (int32 arrays of shape ``(K,)``)."""
        if not plans:
            raise ConfigError("need at least one plan to stack")
        trees = [self.bits_tree(p) for p in plans]
        return _map_trees(lambda *leaves: np.stack(leaves).astype(np.int32), trees)

    @property
    def fp32_bytes(self) -> int:
        """Memory with every tensor at 32 bits (``4 * numel``; :mod:`qslm_jax.quant.memory` does the rest)."""
        return 4 * self.numel()


def _map_trees(fn, trees: list[dict]) -> dict:
    first = trees[0]
    return {k: _map_trees(fn, [t[k] for t in trees]) if isinstance(first[k], dict) else fn(*(t[k] for t in trees))
            for k in first}


def _family_rules(shapes: Mapping[Path, Any], family: str | None) -> FamilyRules:
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
        return FAMILIES[family]
    first_names = {path[0] for path in shapes}
    for rules in FAMILIES.values():
        if rules.matches(first_names):
            return rules
    raise ConfigError(f"cannot tell the model family from the top-level parameters {sorted(first_names)}; "
                      f"known families: {sorted(FAMILIES)} (pass family=... or register the family: "
                      "qslm_jax.models.registry.register_family)")


def param_shapes(model_or_state: Any) -> dict[Path, tuple[int, ...]]:
    """``{state path: shape}`` of the ``nnx.Param`` leaves of a model, an abstract model (``nnx.eval_shape``),
    an ``nnx.State`` or a pure nested dict."""
    if isinstance(model_or_state, nnx.Module):
        model_or_state = nnx.state(model_or_state, nnx.Param)
    if isinstance(model_or_state, nnx.State):
        return {tuple(path): tuple(var.shape) for path, var in nnx.to_flat_state(model_or_state)}
    if isinstance(model_or_state, Mapping):
        out = {}
        for key, value in model_or_state.items():
            if isinstance(value, Mapping):
                out.update({(key, *sub): shape for sub, shape in param_shapes(value).items()})
            else:
                out[(key,)] = tuple(np.shape(value))
        return out
    raise ConfigError(f"expected an nnx.Module, nnx.State or nested dict of parameters, "
                      f"found {type(model_or_state).__name__}")


def hierarchy_of(model_or_state: Any, *, family: str | None = None,
                 scheme: QuantScheme = DEFAULT_SCHEME) -> Hierarchy:
    """The :class:`Hierarchy` of a model (real or abstract) or of its parameter state; no weights are read."""
    return Hierarchy.from_shapes(param_shapes(model_or_state), family=family, scheme=scheme)
