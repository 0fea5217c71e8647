"""Peak memory of one SpikingBERT training step: implicit differentiation vs BPTT (extreme_kd.md, "Why
equilibrium training").

Memory comes from XLA's own accounting of the compiled step, ``jax.jit(step).lower(*args).compile()
.memory_analysis()``: no step is run, so any size (even the full 768-wide model) can be measured from abstract
shapes. The step is the one :func:`qslm_jax.training.train` runs: KD loss, gradient, clipped AdamW update.

* implicit: :func:`qslm_jax.equilibrium.student.implicit_forward` - the T-step IF simulation runs without
  gradients (only running sums are kept) and the gradient comes from the steady-state surrogate at the
  equilibrium, so memory is flat in T;
* BPTT: :func:`bptt_forward` - the same simulation with the ATan surrogate spike
  (:func:`qslm_jax.neurons.spike`) differentiated through the ``lax.scan`` over time, which stores every
  step's activations: memory grows linearly in T.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qslm_jax.equilibrium.student import Batch, KDObjective, StudentForward, implicit_forward, kd_loss
from qslm_jax.errors import ConfigError
from qslm_jax.models.spikingbert import SpikingBERT, SpikingBERTConfig, TrainOutput
from qslm_jax.quant.quantizers import Level
from qslm_jax.training import TrainConfig

MIB = 2**20


def bptt_forward(student: SpikingBERT, batch: Batch) -> TrainOutput:
    """Training forward by back-propagation through time over the IF simulation (surrogate gradients).

    :meth:`SpikingBERT.simulate_rates` with ``surrogate_spikes=True``: per step and layer ``u += I_l[t];
    s = spike(u - vth); u -= vth * s`` with the ATan surrogate derivative ``1 / (1 + (pi x)^2)``; taps are the
    ASRs ``(1/T) sum_t s_l[t]`` differentiated through all T steps, and the attention scores for KD are the
    pre-softmax scores averaged over T.
    """
    asrs, score_sums = student.simulate_rates(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                                              surrogate_spikes=True)
    taps = tuple(asrs[l] for l in student.config.tap_layers)
    reps, logits = student.heads(taps)
    return TrainOutput(logits, taps, reps, tuple(s / student.config.T for s in score_sums))


METHODS: dict[str, StudentForward] = {"implicit": implicit_forward, "bptt": bptt_forward}


@dataclass(frozen=True)
class StepMemory:
    """XLA's memory accounting of one compiled step (bytes).

    ``peak_bytes = arguments + outputs + temporaries - aliased`` (aliased: donated buffers reused for outputs)
    is what the step needs resident at its peak.
    """

    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    code_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries - aliased bytes."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def compiled_memory(fn, *args) -> StepMemory:
    """Compile ``jax.jit(fn)`` for ``args`` (arrays or ``jax.ShapeDtypeStruct``); read its memory analysis."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    if stats is None:
        raise ConfigError(f"the {jax.default_backend()} backend gives no compiled memory analysis: "
                          "measure on CPU or GPU")
    return StepMemory(stats.temp_size_in_bytes, stats.argument_size_in_bytes, stats.output_size_in_bytes,
                      stats.alias_size_in_bytes, stats.generated_code_size_in_bytes)


def abstract_kd_batch(config: SpikingBERTConfig, batch_size: int, length: int) -> dict:
    """Shapes of a training batch with the targets of a teacher shaped like the student (layer map m -> m)."""
    c, b = config, batch_size

    def spec(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype)

    tokens = spec((b, length), jnp.int32)
    return {"input_ids": tokens, "segment_ids": tokens, "attention_mask": tokens,
            "labels": spec((b,), jnp.int32), "valid": spec((b,)),
            "teacher_logits": spec((b, c.num_classes)),
            "teacher_hidden": tuple(spec((b, length, c.hidden)) for _ in range(c.num_blocks + 1)),
            "teacher_scores": tuple(spec((b, c.heads, length, length)) for _ in range(c.num_blocks))}


def step_memory(config: SpikingBERTConfig, method: str, *, batch_size: int, length: int, bits: Level = 32,
                objective: KDObjective | None = None) -> StepMemory:
    """Memory of one training step (``objective`` default: internal-layer KD plus prediction KD) with the
    student's gradient from ``method`` ("implicit" or "bptt"), for a batch of ``batch_size`` x ``length``."""
    if method not in METHODS:
        raise ConfigError(f"unknown gradient method {method!r}: expected one of {sorted(METHODS)}")
    objective = objective or KDObjective(internal=True, soft_ce=1.0)
    loss_fn = kd_loss(objective, bits, METHODS[method])
    tx = TrainConfig().optimizer()
    model = nnx.eval_shape(lambda: SpikingBERT(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(params, opt_state, rest, batch):
        (loss, _), grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch),
                                              has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return compiled_memory(step, params, jax.eval_shape(tx.init, params), rest,
                           abstract_kd_batch(config, batch_size, length))


def memory_vs_T(config: SpikingBERTConfig, Ts: Sequence[int], *,
                methods: Sequence[str] = ("implicit", "bptt"), batch_size: int, length: int,
                bits: Level = 32) -> list[dict]:
    """One row per (T, method): ``{"T", "method", "peak_mib", "temp_mib", **StepMemory fields}``."""
    rows = []
    for T in Ts:
        for method in methods:
            mem = step_memory(SpikingBERTConfig(**{**asdict(config), "T": T}), method, batch_size=batch_size,
                              length=length, bits=bits)
            rows.append({"T": T, "method": method, "peak_bytes": mem.peak_bytes,
                         "peak_mib": mem.peak_bytes / MIB, "temp_mib": mem.temp_bytes / MIB, **asdict(mem)})
    return rows


def format_memory_table(rows: Sequence[dict]) -> str:
    """Markdown table: T, then peak and temporary MiB per method, and the BPTT / implicit peak ratio."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_t: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_t.setdefault(r["T"], {})[r["method"]] = r
    head = ["T"] + [f"{m} {kind} MiB" for m in methods for kind in ("peak", "temp")]
    ratio = {"implicit", "bptt"} <= set(methods)
    head += ["bptt / implicit peak"] if ratio else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for T, per in sorted(by_t.items()):
        cells = [str(T)] + [f"{per[m][k]:.2f}" for m in methods for k in ("peak_mib", "temp_mib")]
        if ratio:
            cells.append(f"{per['bptt']['peak_bytes'] / per['implicit']['peak_bytes']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
