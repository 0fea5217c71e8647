"""Quantization core: quantizers (levels as data), unit hierarchy, plans, memory accounting, export."""

from qslm_jax.quant.apply import quantize_model, quantize_params
from qslm_jax.quant.hierarchy import Hierarchy, TensorInfo, hierarchy_of
from qslm_jax.quant.memory import MB, MemoryReport, memory_report
from qslm_jax.quant.plan import QuantPlan
from qslm_jax.quant.quantizers import BINARY, FP32, KINDS, LEVELS, TERNARY, QuantScheme, fake_quantize, kind_of

__all__ = [
    "BINARY", "FP32", "KINDS", "LEVELS", "MB", "TERNARY", "Hierarchy", "MemoryReport", "QuantPlan", "QuantScheme",
    "TensorInfo", "fake_quantize", "hierarchy_of", "kind_of", "memory_report", "quantize_model", "quantize_params",
]
