"""Fake quantization applied functionally to a parameter tree: ``quantize(params, bits) -> params``.

``params`` is ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``; ``bits`` is a tree of int32 level codes of the same
structure (:meth:`Hierarchy.bits_tree`). Both may be traced, so ``jax.vmap`` over a stacked bits tree evaluates many
plans with one compilation. Under the ``mse`` scheme the clipping ratios are computed once per tensor and level
(:func:`clip_ratio_table`) and passed in as data.
"""

from __future__ import annotations

import jax
from flax import nnx

from qslm_jax.errors import ConfigError
from qslm_jax.quant.hierarchy import Hierarchy, hierarchy_of
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import fake_quantize, mse_clip_ratios

ClipTable = dict[str, jax.Array] | None

_mse_clip_ratios = jax.jit(mse_clip_ratios, static_argnames=("symmetric", "channel_axis", "group_size"))


def _leaf(tree: dict, path: tuple) -> jax.Array:
    for key in path:
        tree = tree[key]
    return tree


def clip_ratio_table(params: dict, hierarchy: Hierarchy) -> ClipTable:
    """``{tensor name: clipping ratio by bit width (17,)}`` for every quantized tensor under the ``mse`` scheme
    (:func:`~qslm_jax.quant.quantizers.mse_clip_ratios`); ``None`` for min-max clipping (nothing to compute)."""
    if hierarchy.scheme.clipping != "mse":
        return None
    return {info.name: _mse_clip_ratios(_leaf(params, info.path), **hierarchy.quantizer_options(info))
            for info in hierarchy.tensors if hierarchy.quantized(info)}


def quantize_params(params: dict, bits: dict, hierarchy: Hierarchy, clip_ratios: ClipTable = None) -> dict:
    """Return ``params`` with every tensor the scheme quantizes replaced by its fake-quantized value.

    Tensors the scheme leaves fp32 are passed through untouched (no operation is traced for them).
    ``clip_ratios``: :func:`clip_ratio_table` of ``params`` (required by the ``mse`` scheme).
    """
    if hierarchy.scheme.clipping == "mse" and clip_ratios is None:
        raise ConfigError("the mse scheme needs the clipping ratios of the weights: pass "
                          "clip_ratios=clip_ratio_table(params, hierarchy), computed once before the search")
    out = jax.tree.map(lambda x: x, params)
    for info in hierarchy.tensors:
        if not hierarchy.quantized(info):
            continue
        *parents, leaf = info.path
        _leaf(out, parents)[leaf] = fake_quantize(
            _leaf(params, info.path), _leaf(bits, info.path), **hierarchy.quantizer_options(info),
            clip_ratios=None if clip_ratios is None else clip_ratios[info.name])
    return out


_quantize_jit = jax.jit(quantize_params, static_argnums=2)


def quantize_model(model: nnx.Module, plan: QuantPlan, hierarchy: Hierarchy | None = None) -> nnx.Module:
    """A fake-quantized copy of ``model`` under ``plan`` (the original is not modified)."""
    hierarchy = hierarchy or hierarchy_of(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    quantized = _quantize_jit(params, hierarchy.bits_tree(plan), hierarchy, clip_ratio_table(params, hierarchy))
    return nnx.merge(graphdef, quantized, rest)
