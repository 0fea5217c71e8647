"""Knowledge-distillation training of 1 / 1.58-bit / fp32 SpikingBERT students (extreme_kd.md): the student side.

* :func:`quantize_encoder` - the student seen through the BitNet STE quantizers: every encoder Linear kernel
  becomes ``W_eff = Q(W)`` in value with ``dW_eff/dW = 1`` (extreme_kd.md "Quantizers"); embeddings,
  LayerNorms, biases, ``fit_dense``, feedback and classifier stay fp32;
* :class:`KDObjective` and :func:`kd_loss` - the per-phase loss: internal-layer KD (hidden states through
  ``fit_dense`` + attention scores), prediction-layer KD (soft cross-entropy at temperature tau) and/or
  cross-entropy on the labels, on the equilibrium training forward (implicit differentiation, no BPTT).

The teacher's side is :mod:`qslm_jax.equilibrium.teacher`, evaluation and size / energy accounting
:mod:`qslm_jax.equilibrium.evaluation`, the data :func:`qslm_jax.tasks.data.load_glue_splits`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
from flax import nnx

from qslm_jax.equilibrium.implicit import fixed_point
from qslm_jax.equilibrium.kd import LayerMap, cross_entropy, internal_kd_loss, soft_cross_entropy
from qslm_jax.errors import ConfigError
from qslm_jax.models.spikingbert import FixedPointFn, SpikingBERT, TrainOutput, is_encoder_kernel
from qslm_jax.quant.quantizers import BINARY, FP32, TERNARY, Level, binary_quantize, check_level, ternary_quantize
from qslm_jax.tasks.scores import batch_accuracy

Batch = Mapping[str, Any]
StudentForward = Callable[[SpikingBERT, Batch], TrainOutput]

STUDENT_LEVELS = (FP32, TERNARY, BINARY)


def student_level(bits: Level | str) -> Level:
    """``bits`` as a student precision level: 32 (fp32), 1.58 (ternary) or 1 (binary); else ConfigError."""
    level = check_level(bits)
    if level not in STUDENT_LEVELS:
        raise ConfigError(f"extreme-quantization students are fp32, 1.58-bit or 1-bit, found bits={bits!r}: "
                          "use 32, 1.58 or 1 (other widths belong to the QSLM post-training search)")
    return level


def quantize_encoder(model: SpikingBERT, bits: Level) -> SpikingBERT:
    """A view of ``model`` whose encoder Linear kernels are BitNet-quantized, with straight-through gradients.

    1-bit: ``mean|W| * sign(W - mean W)``; 1.58-bit: ``mean|W| * clip(round(W / (mean|W| + eps)), -1, 1)``
    (per tensor, extreme_kd.md "Quantizers"). The forward value is exactly the quantized kernel and the
    gradient reaches the latent fp32 kernel unchanged (``W_eff = W + stop_gradient(Q(W) - W)``). At 32 bits
    the model itself is returned. Call it inside the differentiated function, so that the optimizer updates
    the latent W.
    """
    level = student_level(bits)
    if level == FP32:
        return model
    quantize = binary_quantize if level == BINARY else ternary_quantize
    graphdef, state = nnx.split(model)
    state = nnx.map_state(
        lambda path, var: var.replace(quantize(var.get_value())) if is_encoder_kernel(path) else var, state
    )
    return nnx.merge(graphdef, state)


@dataclass(frozen=True)
class KDObjective:
    """The loss of one training phase (extreme_kd.md "KD pipeline", steps 2 and 3):

    ``L = [internal] (sum_m MSE(fit_dense(tap_m), h_T[g(m)]) + sum_k MSE(S_k, T_g(k)))
    + soft_ce * SCE(student, teacher; tau) + ce * CE(student, labels)``.
    """

    internal: bool = False
    soft_ce: float = 0.0
    ce: float = 0.0
    temperature: float = 1.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "internal": {"internal": True},
        "kd": {"soft_ce": 1.0},
        "ce": {"ce": 1.0},
        "kd+ce": {"soft_ce": 1.0, "ce": 1.0},
    }

    def __post_init__(self):
        if self.soft_ce < 0 or self.ce < 0 or not self.temperature > 0:
            raise ConfigError(f"KD weights must be >= 0 and the temperature > 0, found soft_ce="
                              f"{self.soft_ce}, ce={self.ce}, temperature={self.temperature}")
        if not (self.internal or self.soft_ce or self.ce):
            raise ConfigError("a KD objective needs at least one term: internal=True, soft_ce > 0 or ce > 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> KDObjective:
        """``internal`` (internal-layer KD), ``kd`` (soft cross-entropy), ``ce`` (labels), ``kd+ce``."""
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown KD objective {name!r}: expected one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def uses_teacher(self) -> bool:
        """True when the loss needs teacher outputs in the batch."""
        return self.internal or self.soft_ce > 0


def implicit_forward(student: SpikingBERT, batch: Batch, gradient_at: str = "equilibrium",
                     feedback_solve: FixedPointFn = fixed_point) -> TrainOutput:
    """Equilibrium training forward: the IF simulation gives the value, the steady-state surrogate the
    gradient (implicit differentiation; with ``config.feedback`` the feedback fixed point is solved by
    ``feedback_solve``, by default :func:`~qslm_jax.equilibrium.implicit.fixed_point`, whose backward solves
    the adjoint; bind its solver, tolerance and :class:`~qslm_jax.equilibrium.implicit.SolveLog` with
    ``functools.partial``).

    ``gradient_at="equilibrium"`` (default) linearises the surrogate at the SNN's rates of every layer;
    ``"surrogate"`` along the surrogate's own forward pass, as the reference implementation does (see
    :meth:`SpikingBERT.train_forward`).
    """
    return student.train_forward(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                                 fixed_point=feedback_solve, gradient_at=gradient_at)


def kd_loss(objective: KDObjective, bits: Level, forward: StudentForward = implicit_forward):
    """``loss_fn(student, batch) -> (loss, metrics)`` for :func:`qslm_jax.training.train`.

    The student runs with :func:`quantize_encoder` kernels through ``forward`` (default: implicit
    differentiation; :func:`qslm_jax.equilibrium.memory.bptt_forward` for BPTT). The batch holds the data
    fields and, when the objective uses them, the :func:`teacher_targets` (hidden states and attention scores
    already selected by the layer map, so student tap m pairs with ``teacher_hidden[m]``).
    """
    level = student_level(bits)

    def loss_fn(student: SpikingBERT, batch: Batch):
        out = forward(quantize_encoder(student, level), batch)
        valid = batch["valid"]
        parts: dict[str, jax.Array] = {}
        if objective.internal:
            blocks = len(out.attention_scores)
            _, parts = internal_kd_loss(out.reps, out.attention_scores, batch["teacher_hidden"],
                                        batch["teacher_scores"], LayerMap.uniform(blocks, blocks),
                                        valid=valid)
        if objective.soft_ce:
            parts["soft_ce"] = objective.soft_ce * soft_cross_entropy(
                out.logits, batch["teacher_logits"], objective.temperature, valid=valid)
        if objective.ce:
            parts["ce"] = objective.ce * cross_entropy(out.logits, batch["labels"], valid=valid)
        return sum(parts.values()), {**parts, "accuracy": batch_accuracy(out.logits, batch["labels"], valid)}

    return loss_fn


