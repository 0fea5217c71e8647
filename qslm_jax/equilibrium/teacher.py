"""The BERT teacher of knowledge distillation (extreme_kd.md): its fine-tuning loss, the targets it adds to every
batch, and the shape checks a student must pass against it."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from qslm_jax.equilibrium.kd import LayerMap, cross_entropy
from qslm_jax.equilibrium.student import Batch
from qslm_jax.errors import ConfigError
from qslm_jax.models.bert import BERT
from qslm_jax.models.spikingbert import SpikingBERTConfig
from qslm_jax.tasks.scores import batch_accuracy


def teacher_loss(teacher: BERT, batch: Batch):
    """Cross-entropy of a BERT classifier on the true labels (teacher fine-tuning); ``(loss, metrics)``."""
    logits = teacher(batch["input_ids"], batch["segment_ids"], batch["attention_mask"]).logits
    return cross_entropy(logits, batch["labels"], valid=batch["valid"]), {
        "accuracy": batch_accuracy(logits, batch["labels"], batch["valid"])}


def teacher_targets(teacher: BERT, layer_map: LayerMap, *, internal: bool = True,
                    predictions: bool = True) -> Callable[[Batch], dict]:
    """``add(batch) -> batch + teacher outputs`` (one jitted, gradient-free BERT forward per batch).

    Adds, when ``predictions``, ``teacher_logits`` (B, C) and, when ``internal``, ``teacher_hidden`` (the
    hidden states ``layer_map.hidden`` selects, (B, L, H) each) and ``teacher_scores`` (the pre-softmax
    attention scores of the layers ``layer_map.attention`` selects, (B, heads, L, L) each).
    """
    if predictions and teacher.classifier is None:
        raise ConfigError("the teacher has no classification head, so prediction-layer KD has no targets: "
                          "fine-tune it on the task first (or distil with the 'ce' objective only)")
    depth = teacher.config.num_layers
    if max(layer_map.hidden) > depth or max(layer_map.attention) >= depth:
        raise ConfigError(f"layer map {layer_map} reaches past the teacher's {depth} layers: build it with "
                          f"LayerMap.uniform(student_blocks, {depth})")
    graphdef, state = nnx.split(teacher)

    @jax.jit
    def run(state, input_ids, segment_ids, attention_mask):
        out = nnx.merge(graphdef, state)(input_ids, segment_ids, attention_mask)
        targets = {"teacher_logits": out.logits} if predictions else {}
        if internal:
            targets["teacher_hidden"] = tuple(out.hidden_states[i] for i in layer_map.hidden)
            targets["teacher_scores"] = tuple(out.attention_scores[i] for i in layer_map.attention)
        return targets

    def add(batch: Batch) -> dict:
        return {**batch, **run(state, batch["input_ids"], batch["segment_ids"], batch["attention_mask"])}

    return add


def check_internal_kd_shapes(config: SpikingBERTConfig, teacher: BERT) -> None:
    """Internal-layer KD compares (B, L, H) hidden states and (B, heads, L, L) scores: the student's hidden
    size and head count must equal the teacher's (``fit_dense`` is H -> H); else ConfigError."""
    tc = teacher.config
    if (config.hidden, config.heads) != (tc.hidden_size, tc.num_heads):
        raise ConfigError(
            f"internal-layer KD needs the student's hidden size and heads to equal the teacher's, found "
            f"student {config.hidden}/{config.heads} and teacher {tc.hidden_size}/{tc.num_heads}: use the "
            "teacher's shape (--hidden/--heads) or distil the predictions only (--no-internal-kd)"
        )


def check_student_teacher_io(config: SpikingBERTConfig, teacher: BERT, num_labels: int) -> None:
    """Student, teacher and task must agree on the vocabulary and number of classes."""
    tc = teacher.config
    if tc.vocab_size != config.vocab or tc.num_labels != num_labels or config.num_classes != num_labels:
        raise ConfigError(
            f"expected teacher and student with the tokenizer's vocabulary and the task's {num_labels} "
            f"classes, found teacher vocab {tc.vocab_size} / {tc.num_labels} labels and student vocab "
            f"{config.vocab} / {config.num_classes} classes: use a teacher fine-tuned on this task"
        )

