"""Knowledge-distillation losses for the spiking BERT student (spikingbert.md, "Teacher, tokenizer, KD";
extreme_kd.md, "KD pipeline").

* internal-layer KD: ``sum_m MSE(fit_dense(tap_m), h_teacher[g(m)]) + sum_k MSE(S_k, T_{g(k)})`` with a
  :class:`LayerMap` g (SpikingBERT's default for a 12-layer teacher: m -> 3m), attention scores pre-softmax
  with masked entries (``<= -100``) set to 0 on both sides;
* prediction-layer KD: soft cross-entropy between teacher and student logits at temperature tau;
* cross-entropy on the true labels.

Every loss averages over the batch with optional per-row weights ``valid`` (shape ``(B,)``, e.g. 0 for the
dummy rows that pad the last batch to a fixed size): ``sum_b w_b l_b / sum_b w_b``, 0 when no row is valid.
Token padding inside a row is not masked, as in the reference (masked attention entries are zeroed instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from qslm_jax.errors import ConfigError

MASKED_SCORE = -100.0  # attention scores at or below this are masked positions (mask adds -10000)


@dataclass(frozen=True)
class LayerMap:
    """Which teacher layer each student layer is distilled from.

    ``hidden[m]``: index into the teacher hidden states (0 = embedding output, l = output of layer l) for
    student tap m = 0..n_blocks. ``attention[k - 1]``: index into the teacher's per-layer attention scores
    (0-based, i.e. layer ``attention[k - 1] + 1``) for student block k = 1..n_blocks.
    """

    hidden: tuple[int, ...]
    attention: tuple[int, ...]

    def __post_init__(self):
        n = len(self.attention)
        if n < 1 or len(self.hidden) != n + 1 or min(self.hidden + self.attention) < 0:
            raise ConfigError(
                "a layer map needs n_blocks + 1 non-negative hidden indices and n_blocks >= 1 attention "
                f"indices, got hidden={self.hidden}, attention={self.attention}"
            )

    @property
    def n_blocks(self) -> int:
        """Number of student blocks (taps minus the embedding tap)."""
        return len(self.attention)

    @classmethod
    def uniform(cls, student_blocks: int = 4, teacher_layers: int = 12) -> LayerMap:
        """Map student tap m to teacher hidden state ``g(m) = ceil(m * teacher_layers / student_blocks)``.

        Block k distils the attention of teacher layer g(k), the last layer of the k-th of student_blocks
        equal groups. For 12 -> 4 this is the reference map (hidden 0, 3, 6, 9, 12; attention layers 3, 6,
        9, 12); a 4-layer teacher gives m -> m, a 6-layer teacher hidden 0, 2, 3, 5, 6.
        """
        if student_blocks < 1 or teacher_layers < 1:
            raise ConfigError(
                f"student_blocks and teacher_layers must be >= 1, got {student_blocks} and {teacher_layers}"
            )
        g = [-(-m * teacher_layers // student_blocks) for m in range(student_blocks + 1)]
        return cls(hidden=tuple(g), attention=tuple(layer - 1 for layer in g[1:]))


SPIKINGBERT_LAYER_MAP = LayerMap.uniform(4, 12)


def batch_mean(per_row: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """``sum_b w_b l_b / sum_b w_b`` over rows ``l_b`` with weights ``valid`` (all ones when None).

    Rows with weight 0 are ignored even when their loss is not finite; with no valid row the result is 0.
    """
    if valid is None:
        return jnp.mean(per_row)
    if jnp.shape(valid) != per_row.shape:
        raise ConfigError(
            f"valid must hold one weight per batch row, shape {per_row.shape}, got shape {jnp.shape(valid)}"
        )
    w = jnp.asarray(valid, per_row.dtype)
    total = jnp.sum(jnp.where(w > 0, w * per_row, 0.0))
    count = jnp.sum(w)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def _check_same_shape(student: jax.Array, teacher: jax.Array, what: str) -> None:
    if student.shape != teacher.shape:
        raise ConfigError(
            f"{what}: student shape {student.shape} differs from teacher shape {teacher.shape}; "
            "student and teacher need the same hidden size / number of heads (project the student first)"
        )


def mse(student: jax.Array, teacher: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Mean squared error over every element of the valid rows (torch ``MSELoss()`` if all are valid)."""
    _check_same_shape(student, teacher, "MSE")
    per_row = jnp.mean(jnp.square(student - teacher).reshape(student.shape[0], -1), axis=1)
    return batch_mean(per_row, valid)


def _check_layers(layer_map: LayerMap, n_student: int, n_teacher: int, indices: tuple[int, ...], what: str):
    if n_student != len(indices) or max(indices) >= n_teacher:
        raise ConfigError(
            f"{what}: the layer map {layer_map} needs {len(indices)} student entries and more than "
            f"{max(indices)} teacher entries, got {n_student} and {n_teacher}; build a matching map with "
            "LayerMap.uniform(student_blocks=<student depth>, teacher_layers=<teacher depth>)"
        )


def hidden_state_loss(
    student_taps: Sequence[jax.Array],
    teacher_hidden: Sequence[jax.Array],
    layer_map: LayerMap = SPIKINGBERT_LAYER_MAP,
    *,
    fit_dense: Callable[[jax.Array], jax.Array] | None = None,
    valid: jax.Array | None = None,
) -> jax.Array:
    """``sum_m MSE(fit_dense(tap_m), teacher_hidden[g(m)])`` (spikingbert.md hidden loss).

    ``student_taps``: the n_blocks + 1 tapped student outputs ``(B, L, H)``; ``fit_dense``: the KD
    projection W_s (None when the taps are already projected); ``teacher_hidden``: the embedding output, then
    every layer's output.
    """
    _check_layers(layer_map, len(student_taps), len(teacher_hidden), layer_map.hidden, "hidden-state KD")
    project = fit_dense if fit_dense is not None else (lambda h: h)
    pairs = zip(student_taps, layer_map.hidden, strict=True)
    return sum(mse(project(tap), teacher_hidden[t], valid) for tap, t in pairs)


def mask_scores(scores: jax.Array) -> jax.Array:
    """Attention scores with masked entries (``<= -100``, where the -10000 mask was added) replaced by 0."""
    return jnp.where(scores <= MASKED_SCORE, 0.0, scores)


def attention_loss(
    student_scores: Sequence[jax.Array],
    teacher_scores: Sequence[jax.Array],
    layer_map: LayerMap = SPIKINGBERT_LAYER_MAP,
    *,
    valid: jax.Array | None = None,
) -> jax.Array:
    """``sum_k MSE(mask(S_k), mask(T_{g(k)}))`` on pre-softmax scores ``(B, heads, L, L)`` (spikingbert.md).

    ``student_scores``: one entry per student block; ``teacher_scores``: one per teacher layer.
    """
    _check_layers(layer_map, len(student_scores), len(teacher_scores), layer_map.attention, "attention KD")
    return sum(
        mse(mask_scores(s), mask_scores(teacher_scores[t]), valid)
        for s, t in zip(student_scores, layer_map.attention, strict=True)
    )


def internal_kd_loss(
    student_taps: Sequence[jax.Array],
    student_scores: Sequence[jax.Array],
    teacher_hidden: Sequence[jax.Array],
    teacher_scores: Sequence[jax.Array],
    layer_map: LayerMap = SPIKINGBERT_LAYER_MAP,
    *,
    fit_dense: Callable[[jax.Array], jax.Array] | None = None,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Internal-layer KD (extreme_kd.md step 2): hidden-state plus attention loss; ``(total, parts)``."""
    parts = {
        "hidden_loss": hidden_state_loss(
            student_taps, teacher_hidden, layer_map, fit_dense=fit_dense, valid=valid
        ),
        "attention_loss": attention_loss(student_scores, teacher_scores, layer_map, valid=valid),
    }
    return parts["hidden_loss"] + parts["attention_loss"], parts


def soft_cross_entropy(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    *,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Prediction-layer KD: ``mean_{b,c} [-softmax(t_b / tau)_c * log_softmax(s_b / tau)_c]``.

    The mean runs over the batch and the C classes, as in the reference (TinyBERT's ``soft_cross_entropy``),
    so it is the usual per-example soft cross-entropy divided by C; there is no tau^2 factor.
    """
    _check_same_shape(student_logits, teacher_logits, "soft cross-entropy")
    if not temperature > 0:
        raise ConfigError(f"the KD temperature must be > 0, got {temperature!r}")
    log_p_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    p_teacher = jax.nn.softmax(teacher_logits / temperature, axis=-1)
    return batch_mean(-jnp.mean(p_teacher * log_p_student, axis=-1), valid)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, valid: jax.Array | None = None) -> jax.Array:
    """Cross-entropy on the true labels, ``mean_b -log softmax(logits_b)[y_b]`` (torch CrossEntropyLoss)."""
    if labels.shape != logits.shape[:-1]:
        raise ConfigError(
            f"labels must have shape {logits.shape[:-1]} (one class id per row), got {labels.shape}"
        )
    return batch_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), valid)
