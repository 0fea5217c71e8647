"""Evaluation of KD students and teachers (extreme_kd.md): accuracy and MRPC F1 (:mod:`qslm_jax.tasks.scores`),
spike rates, model size in bits and packed bytes, and the operation-count energy estimate (:mod:`qslm_jax.energy`
on the SpikingBERT family's op counts)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qslm_jax.data import ClassificationDataset
from qslm_jax.energy import LayerOps, estimate_energy
from qslm_jax.equilibrium.student import quantize_encoder, student_level
from qslm_jax.models.bert import BERT
from qslm_jax.models.registry import spikingbert_layer_ops
from qslm_jax.models.spikingbert import SpikingBERT, SpikingBERTConfig, is_encoder_kernel
from qslm_jax.quant.memory import tensor_bytes
from qslm_jax.quant.quantizers import FP32, Level
from qslm_jax.tasks.scores import classification_counts, classification_metrics

SCALE_BITS = 32  # one fp32 scale per quantized tensor (beta or gamma)


def _sum_over_batches(stats_fn, state, dataset: ClassificationDataset, batch_size: int, progress: bool,
                      what: str) -> dict[str, np.ndarray]:
    """Run jitted ``stats_fn(state, batch)`` over every batch and add its statistics up in float64."""
    totals: dict[str, np.ndarray] = {}
    batches: Iterator = dataset.batches(batch_size)
    for batch in tqdm(batches, total=dataset.num_batches(batch_size), desc=what, disable=not progress,
                      unit="batch", leave=False):
        for key, value in stats_fn(state, batch).items():
            totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
    return totals


def evaluate_student(model: SpikingBERT, dataset: ClassificationDataset, bits: Level, *, batch_size: int = 64,
                     progress: bool = True) -> dict[str, Any]:
    """Eval-mode IF simulation of the (quantized) student over ``dataset``.

    Returns accuracy and positive-class F1 (percent), ``spike_rates``: per neuron layer l, the average spiking
    rate ``mean over real tokens of valid examples and over neurons of (1/T) sum_t s_l[t]``, their
    neuron-weighted mean ``mean_spike_rate``, and ``tokens_per_example`` (average real length).
    """
    level = student_level(bits)
    graphdef, state = nnx.split(model)

    @jax.jit
    def stats(state, batch):
        out = quantize_encoder(nnx.merge(graphdef, state), level).simulate(
            batch["input_ids"], batch["segment_ids"], batch["attention_mask"])
        tokens = batch["attention_mask"] * batch["valid"][:, None]
        spikes = jnp.stack([jnp.sum(jnp.mean(a, axis=-1) * tokens) for a in out.asrs])
        return {**classification_counts(out.logits, batch["labels"], batch["valid"]),
                "spike_sum": spikes, "tokens": jnp.sum(tokens)}

    totals = _sum_over_batches(stats, state, dataset, batch_size, progress, "eval student")
    rates = totals["spike_sum"] / max(totals["tokens"], 1.0)
    widths = np.asarray(model.config.layer_widths, np.float64)
    return {**classification_metrics(totals), "spike_rates": rates.tolist(),
            "mean_spike_rate": float(np.sum(rates * widths) / np.sum(widths)),
            "tokens_per_example": float(totals["tokens"] / max(totals["examples"], 1.0))}


def evaluate_teacher(model: BERT, dataset: ClassificationDataset, *, batch_size: int = 64,
                     progress: bool = True) -> dict[str, Any]:
    """Accuracy and positive-class F1 (percent) of the BERT teacher over ``dataset``."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def stats(state, batch):
        out = nnx.merge(graphdef, state)(batch["input_ids"], batch["segment_ids"], batch["attention_mask"])
        return classification_counts(out.logits, batch["labels"], batch["valid"])

    totals = _sum_over_batches(stats, state, dataset, batch_size, progress, "eval teacher")
    return classification_metrics(totals)


def _inference_params(model: SpikingBERT) -> Iterator[tuple[tuple, int]]:
    """(path, size) of the parameters inference needs: not ``fit_dense`` (KD only), nor an unused feedback."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] == "fit_dense" or (path[0] == "feedback" and not model.config.feedback):
            continue
        yield tuple(path), int(np.prod(var.get_value().shape))


def model_size(model: SpikingBERT, bits: Level) -> dict[str, Any]:
    """Size of the inference model with its encoder kernels at ``bits``.

    ``bits``: ``sum numel * level`` (1.58 per ternary weight) plus one fp32 scale per quantized tensor, 32
    bits per fp32 element; ``storage_bytes``: the packed layout of :func:`qslm_jax.quant.memory.tensor_bytes`
    (1-bit codes, 5 trits per byte, 8 bytes of scale/zero-point per tensor); ``fp32_bits`` and ``compression``
    against the all-fp32 model. ``fit_dense`` (a KD projection) and an unused feedback layer are not counted.
    """
    level = student_level(bits)
    total_bits = fp32_bits = storage = 0.0
    quantized = params = 0
    for path, n in _inference_params(model):
        params += n
        fp32_bits += 32 * n
        if level != FP32 and is_encoder_kernel(path):
            quantized += n
            total_bits += n * level + SCALE_BITS
            storage += tensor_bytes(n, level)
        else:
            total_bits += 32 * n
            storage += 4 * n
    return {"bits": total_bits, "megabytes": total_bits / 8e6, "storage_bytes": int(storage),
            "fp32_bits": fp32_bits, "compression": fp32_bits / total_bits, "parameters": params,
            "quantized_parameters": quantized}


def student_layer_ops(config: SpikingBERTConfig, spike_rates: Sequence[float], tokens: int,
                      bits: Level) -> list[LayerOps]:
    """The student's synaptic operations per token: the SpikingBERT family's op counts
    (:func:`qslm_jax.models.registry.spikingbert_layer_ops`) with every encoder kernel at ``bits``."""
    level = student_level(bits)
    return spikingbert_layer_ops(config, lambda unit: FP32 if unit == "head" else level, spike_rates=spike_rates,
                                 tokens=tokens)


def dense_layer_ops(config: SpikingBERTConfig, tokens: int) -> list[LayerOps]:
    """The encoder operations of a non-spiking fp32 BERT of the student's shape (no feedback):
    multiply-accumulates, once per token."""
    return spikingbert_layer_ops(config, lambda unit: FP32, spike_rates=None, tokens=tokens)


def energy_report(config: SpikingBERTConfig, spike_rates: Sequence[float], tokens_per_example: float,
                  bits: Level) -> dict[str, Any]:
    """Operation counts and 45 nm energy (:func:`qslm_jax.energy.estimate_energy`) per token and per
    example of the spiking student vs a dense fp32 BERT of the same shape.

    An example has ``tokens_per_example`` tokens (the average real length); attention, whose per-token cost
    grows with the sequence, is counted at that length rounded to a whole number of positions.
    """
    length = max(round(tokens_per_example), 1)
    student = estimate_energy(student_layer_ops(config, spike_rates, length, bits),
                              tokens_per_sample=tokens_per_example)
    dense = estimate_energy(dense_layer_ops(config, length), tokens_per_sample=tokens_per_example)
    return {"student": student.to_dict(), "dense_bert_fp32": dense.to_dict(),
            "energy_ratio_dense_over_student": dense.joules_per_token / student.joules_per_token
            if student.joules_per_token else None}


