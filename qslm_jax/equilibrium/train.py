"""Knowledge-distillation training of 1 / 1.58-bit / fp32 SpikingBERT students (extreme_kd.md).

The pieces :mod:`experiments.extreme_kd` strings together, each usable on its own:

* :func:`quantize_encoder` - the student seen through the BitNet STE quantizers: every encoder Linear kernel
  becomes ``W_eff = Q(W)`` in value with ``dW_eff/dW = 1`` (extreme_kd.md "Quantizers"); embeddings,
  LayerNorms, biases, ``fit_dense``, feedback and classifier stay fp32;
* :class:`KDObjective` and :func:`kd_loss` - the per-phase loss: internal-layer KD (hidden states through
  ``fit_dense`` + attention scores), prediction-layer KD (soft cross-entropy at temperature tau) and/or
  cross-entropy on the labels, on the equilibrium training forward (implicit differentiation, no BPTT);
* :func:`teacher_targets` - the frozen BERT teacher's logits / mapped hidden states / attention scores added
  to every batch, so the student's training step only differentiates the student;
* :func:`load_task_data` - train and dev sets per GLUE task (QNLI has no local train split: see there);
* evaluation: :func:`evaluate_student` (accuracy, MRPC F1, spike rate per neuron layer),
  :func:`evaluate_teacher`, :func:`model_size` (bits and packed bytes) and :func:`energy_report` (accumulates
  vs multiply-accumulates and their 45 nm energy, via :mod:`qslm_jax.energy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qslm_jax.data import ClassificationDataset, TextClassificationSplit, encode_classification, load_glue
from qslm_jax.data.glue import glue_task
from qslm_jax.data.sources import resolve_data_dir
from qslm_jax.data.tokenizer import TextTokenizer
from qslm_jax.energy import LayerOps, estimate_energy
from qslm_jax.equilibrium.implicit import fixed_point
from qslm_jax.equilibrium.kd import LayerMap, batch_mean, cross_entropy, internal_kd_loss, soft_cross_entropy
from qslm_jax.errors import ConfigError
from qslm_jax.models.bert import BERT
from qslm_jax.models.spikingbert import (
    NEURONS_PER_BLOCK,
    FixedPointFn,
    SpikingBERT,
    SpikingBERTConfig,
    TrainOutput,
    is_encoder_kernel,
)
from qslm_jax.quant.memory import tensor_bytes
from qslm_jax.quant.quantizers import (
    BINARY,
    FP32,
    TERNARY,
    Level,
    binary_quantize,
    check_level,
    ternary_quantize,
)

Batch = Mapping[str, Any]
StudentForward = Callable[[SpikingBERT, Batch], TrainOutput]

STUDENT_LEVELS = (FP32, TERNARY, BINARY)
POSITIVE_CLASS = 1  # F1 is reported for class 1 ("equivalent" in MRPC), as GLUE does
SCALE_BITS = 32  # one fp32 scale per quantized tensor (beta or gamma)
HELD_OUT_FRACTION = 0.2  # share of dev kept for evaluation when a task has no local train split


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


def accuracy(logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Fraction of valid rows whose argmax matches the label."""
    return batch_mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32), valid)


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
        return sum(parts.values()), {**parts, "accuracy": accuracy(out.logits, batch["labels"], valid)}

    return loss_fn


def teacher_loss(teacher: BERT, batch: Batch):
    """Cross-entropy of a BERT classifier on the true labels (teacher fine-tuning); ``(loss, metrics)``."""
    logits = teacher(batch["input_ids"], batch["segment_ids"], batch["attention_mask"]).logits
    return cross_entropy(logits, batch["labels"], valid=batch["valid"]), {
        "accuracy": accuracy(logits, batch["labels"], batch["valid"])}


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


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class TaskData:
    """Encoded train and dev sets of one task, and a sentence on where they came from (for every report)."""

    train: ClassificationDataset
    dev: ClassificationDataset
    note: str


def _subset(split: TextClassificationSplit, rows: np.ndarray, name: str, how: str) -> TextClassificationSplit:
    return dataclasses.replace(
        split, split=name, first=tuple(split.first[i] for i in rows), labels=split.labels[rows],
        second=None if split.second is None else tuple(split.second[i] for i in rows),
        source=f"{split.source} ({how})",
    )


def load_task_data(task: str, tokenizer: TextTokenizer, *, data_dir: str | Path | None = None,
                   max_length: int, train_limit: int | None = None, eval_limit: int | None = None,
                   split_seed: int = 0) -> TaskData:
    """Train and dev (GLUE validation) sets of ``task``, tokenized to ``max_length``.

    A task whose local data has no train split (QNLI in shared/data: dev and unlabelled test only) is trained
    on a fixed random 80% of dev (permutation with ``split_seed``) and evaluated on the remaining 20%; the
    returned ``note`` says so, and must go into every report. ``train_limit`` / ``eval_limit`` keep the first
    N examples of each set (in file order; in permutation order for a split dev).
    """
    spec = glue_task(task)
    dev = load_glue(task, "validation", data_dir=data_dir)
    if resolve_data_dir(data_dir) is not None and "train" not in spec.local_files:
        order = np.random.default_rng(split_seed).permutation(len(dev))
        cut = len(dev) - round(HELD_OUT_FRACTION * len(dev))
        how = f"split of dev with seed {split_seed}"
        train = _subset(dev, order[:cut], "train", f"first {cut} of a {how}")
        dev = _subset(dev, order[cut:], "validation", f"last {len(order) - cut} of a {how}")
        note = (f"{task}: no train split in the local data, so training uses {cut} dev examples and "
                f"evaluation the other {len(order) - cut} (random split with seed {split_seed}); not "
                "comparable with GLUE dev results")
    else:
        train = load_glue(task, "train", data_dir=data_dir)
        note = f"{task}: GLUE train for training, GLUE dev (validation) for evaluation"
    if train_limit is not None:
        train = _subset(train, np.arange(min(train_limit, len(train))), train.split, f"first {train_limit}")
    if eval_limit is not None:
        dev = _subset(dev, np.arange(min(eval_limit, len(dev))), dev.split, f"first {eval_limit}")
    return TaskData(encode_classification(train, tokenizer, max_length=max_length),
                    encode_classification(dev, tokenizer, max_length=max_length),
                    f"{note}; {len(train)} train / {len(dev)} eval examples")


# ----------------------------------------------------------------------------------------------- evaluation


def classification_counts(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """Additive counts over the valid rows: correct predictions, examples, and true/false positives and false
    negatives of class :data:`POSITIVE_CLASS` (for F1)."""
    pred = jnp.argmax(logits, axis=-1)
    w = valid.astype(jnp.float32)
    pos_pred, pos_true = pred == POSITIVE_CLASS, labels == POSITIVE_CLASS
    return {"correct": jnp.sum(w * (pred == labels)), "examples": jnp.sum(w),
            "tp": jnp.sum(w * (pos_pred & pos_true)), "fp": jnp.sum(w * (pos_pred & ~pos_true)),
            "fn": jnp.sum(w * (~pos_pred & pos_true))}


def classification_metrics(totals: Mapping[str, float]) -> dict[str, float]:
    """Accuracy ``100 correct / examples`` and F1 of the positive class ``100 * 2tp / (2tp + fp + fn)``
    (GLUE's MRPC F1; 0 when the class is never predicted nor present)."""
    tp, fp, fn = totals["tp"], totals["fp"], totals["fn"]
    return {"accuracy": 100.0 * totals["correct"] / max(totals["examples"], 1.0),
            "f1": 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "examples": int(totals["examples"])}


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


def _block_operations(config: SpikingBERTConfig, tokens: int) -> tuple[tuple[str, int, int, int, bool], ...]:
    """Per encoder block: (name, n_in, n_out, offset of the neuron layer feeding it, kernel quantized?)."""
    h, i = config.hidden, config.intermediate
    return (("query", h, h, 0, True), ("key", h, h, 0, True), ("value", h, h, 0, True),
            ("scores", h, tokens, 1, False), ("context", tokens, h, 2, False),
            ("attention_output", h, h, 3, True), ("intermediate", h, i, 4, True), ("output", i, h, 5, True))


def student_layer_ops(config: SpikingBERTConfig, spike_rates: Sequence[float], tokens: int,
                      bits: Level) -> list[LayerOps]:
    """The spiking encoder's synaptic operations per token, as :class:`qslm_jax.energy.LayerOps`.

    Every encoder Linear reads the spikes of the IF layer before it (spikingbert.md, "Architecture"), so it
    runs T times on binary input of rate r (that layer's ASR): ``T r n_in n_out`` accumulates at the kernel's
    bit width. Attention on ``tokens`` = L positions: ``q . k`` with spiking keys is ``T r_K H L`` and
    ``probabilities . v`` with spiking values ``T r_V L H`` accumulates on fp32 operands. With
    ``config.feedback`` the fp32 feedback Linear reads the last layer's spikes: ``T r_last H H`` more.
    Embeddings, LayerNorm, softmax, GELU and the classifier are not counted.
    """
    level = student_level(bits)
    ops = [LayerOps(n_in, n_out, spike_rates[NEURONS_PER_BLOCK * b + offset], level if quantized else FP32,
                    f"block{b}.{name}", config.T)
           for b in range(config.num_blocks)
           for name, n_in, n_out, offset, quantized in _block_operations(config, tokens)]
    if config.feedback:
        ops.append(LayerOps(config.hidden, config.hidden, spike_rates[-1], FP32, "feedback", config.T))
    return ops


def dense_layer_ops(config: SpikingBERTConfig, tokens: int) -> list[LayerOps]:
    """The encoder operations of a non-spiking fp32 BERT of the student's shape (no feedback):
    multiply-accumulates, once per token."""
    return [LayerOps(n_in, n_out, None, FP32, f"block{b}.{name}")
            for b in range(config.num_blocks)
            for name, n_in, n_out, _, _ in _block_operations(config, tokens)]


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

