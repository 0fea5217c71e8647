"""Fake quantization applied functionally to a parameter tree: ``quantize(params, bits) -> params``.

``params`` is ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``; ``bits`` is a tree of int32 level codes of the same
structure (:meth:`Hierarchy.bits_tree`). Both may be traced, so ``jax.vmap`` over a stacked bits tree evaluates many
plans with one compilation.
"""

from __future__ import annotations

import jax
from flax import nnx

from qslm_jax.quant.hierarchy import Hierarchy, hierarchy_of
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import fake_quantize


def quantize_params(params: dict, bits: dict, hierarchy: Hierarchy) -> dict:
    """Return ``params`` with every tensor the scheme quantizes replaced by its fake-quantized value.

    Tensors the scheme leaves fp32 are passed through untouched (no operation is traced for them).
    """
    out = jax.tree.map(lambda x: x, params)
    for info in hierarchy.tensors:
        if not hierarchy.quantized(info):
            continue
        *parents, leaf = info.path
        src, dst, code = params, out, bits
        for key in parents:
            src, dst, code = src[key], dst[key], code[key]
        dst[leaf] = fake_quantize(src[leaf], code[leaf], symmetric=hierarchy.scheme.symmetric,
                                  channel_axis=hierarchy.channel_axis(info))
    return out


_quantize_jit = jax.jit(quantize_params, static_argnums=2)


def quantize_model(model: nnx.Module, plan: QuantPlan, hierarchy: Hierarchy | None = None) -> nnx.Module:
    """A fake-quantized copy of ``model`` under ``plan`` (the original is not modified)."""
    hierarchy = hierarchy or hierarchy_of(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    quantized = _quantize_jit(nnx.to_pure_dict(params), hierarchy.bits_tree(plan), hierarchy)
    return nnx.merge(graphdef, quantized, rest)

