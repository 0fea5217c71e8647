"""Batched evaluation of quantization candidates: ``jit(vmap(metric(quantize(params, bits_k), batches)))``.

One :class:`Evaluator` holds one compiled function per (batch shapes, chunk size): the K plans of a chunk become a
stacked bits pytree (int32 level codes, :meth:`Hierarchy.stacked_bits`), the parameters are fake-quantized inside
the traced function (``nnx.split`` -> :func:`quantize_params` -> ``nnx.merge``), the metric's additive statistics are
computed for every batch with ``lax.scan`` and the candidates are ``vmap``-ped.

Chunk sizes: with ``chunk_size`` K the compiled sizes are K and the powers of two below it (times the device count
D): K = 8 gives 8, 4, 2, 1. A list of n plans is cut into chunks of K, and the rest into the largest sizes that fit
(n = 8a + 4b + 2c + d), so no slot is padding (with D > 1 a rest below D is padded by repeating the last plan). A
search therefore costs at most ``len(chunk_sizes)`` compilations per batch shape (4 for K = 8), each compiled once
ahead of time (:meth:`Evaluator.prepare`, timed in ``compile_seconds``) and reused for every later call. ``calls``
and ``slots`` count the compiled calls and the candidate slots they computed (padding included). Why the extra
compilations pay: a compilation is paid once per size, a padded slot costs a whole candidate evaluation every
time it is computed (one chunk size of 8 left about 60% of the module-phase slots of case b1 as padding).
Not done: sharing the forward pass of the layers that all candidates of a call quantize alike (the prefix
before the first block they differ in); it would need the model split at a layer and the prefix activations of
every batch kept, and with the scheduled search's small calls it would save little.

With several devices the candidate axis is sharded over a 1-D mesh (``jit`` + ``NamedSharding``); parameters and
batches are replicated. The devices default to every process's (``jax.devices()``): in a multi-process run
(:mod:`qslm_jax.qslm.distributed`) one call spans every host, and its statistics come back replicated, so every
process gets every candidate's. With ``model_axis_size`` M the mesh is 2-D, ``(D/M candidates) x (M model)``:
each parameter is sharded over the model axis on its largest dimension that M divides (replicated if none),
so a candidate's weights take 1/M of a device (docs/scaling.md). The compiled function returns the metric's
statistics per example (``(K, n_batches, B)``, :meth:`Metric.example_stats`); on the host the padding rows (the
metric's ``count`` statistic 0) are dropped and the rest summed in float64, so e.g. perplexity over a split is
exactly ``exp(sum NLL / sum tokens)``, and the per-example statistics
(:class:`~qslm_jax.qslm.uncertainty.Evaluation`; a few thousand numbers per plan) serve the bootstrap intervals
without a second pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qslm_jax.errors import ConfigError, DataError
from qslm_jax.qslm.distributed import collectives
from qslm_jax.qslm.metrics import Metric
from qslm_jax.qslm.uncertainty import Evaluation
from qslm_jax.quant.apply import clip_ratio_table, quantize_params
from qslm_jax.quant.hierarchy import Hierarchy, hierarchy_of
from qslm_jax.quant.plan import QuantPlan

AXIS = "candidates"
MODEL_AXIS = "model"


def stack_batches(batches: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stack fixed-shape batches along a new leading axis (raises :class:`DataError` on differing shapes)."""
    batches = list(batches)
    if not batches:
        raise DataError("no batches to evaluate on")
    keys = set(batches[0])
    for i, batch in enumerate(batches):
        shapes = {k: np.shape(batch[k]) for k in batch}
        first = {k: np.shape(batches[0][k]) for k in batches[0]}
        if set(batch) != keys or shapes != first:
            raise DataError(f"batches must share keys and shapes (fixed-shape evaluation): batch 0 has {first}, "
                            f"batch {i} has {shapes}; pad the last batch (qslm_jax.data batches are padded)")
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in sorted(keys)}


def _totals(examples: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {k: float(v.sum()) for k, v in examples.items()}


class Evaluator:
    """Evaluates lists of :class:`QuantPlan` on fixed batches with one compiled, vmapped function.

    ``chunk_size``: the largest number of candidates per compiled call (rounded up to a multiple of the device
    count); the smaller compiled sizes are the powers of two below it (module docstring). ``memory_budget_bytes``
    (per device) caps the chunk at what fits by XLA's memory analysis of the one-candidate-per-device compile
    (one of the compiled sizes anyway); without either, a call evaluates all its plans at once, so lists of
    different lengths compile separately. ``devices`` default: every process's; ``model_axis_size`` M > 1
    shards the parameters over M devices per candidate group (module docstring).
    """

    def __init__(self, model: nnx.Module, metric: Metric, *, hierarchy: Hierarchy | None = None,
                 chunk_size: int | None = None, memory_budget_bytes: int | None = None,
                 devices: Sequence[jax.Device] | None = None, model_axis_size: int = 1):
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, found {chunk_size}")
        self.metric = metric
        self.hierarchy = hierarchy or hierarchy_of(model)
        self.devices = tuple(devices) if devices else tuple(jax.devices())
        if model_axis_size < 1 or len(self.devices) % model_axis_size:
            raise ConfigError(f"model_axis_size must be >= 1 and divide the {len(self.devices)} devices, found "
                              f"{model_axis_size}")
        self._chunk_size = chunk_size
        self._budget = memory_budget_bytes
        self._mesh = Mesh(np.array(self.devices).reshape(-1, model_axis_size), (AXIS, MODEL_AXIS))
        self._replicated = NamedSharding(self._mesh, P())
        self._sharded = NamedSharding(self._mesh, P(AXIS))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self._graphdef = graphdef
        self._params = jax.device_put(nnx.to_pure_dict(params), self._parameter_shardings(params))
        self._clip = jax.device_put(clip_ratio_table(self._params, self.hierarchy), self._replicated)  # mse scheme
        self._rest = jax.device_put(rest, self._replicated)
        self._fn = jax.jit(self._candidate_stats, out_shardings=self._replicated)
        self._chunk_by_shape: dict[Any, int] = {}
        self._compiled: dict[tuple[Any, int], Any] = {}  # (batch shapes, chunk) -> ahead-of-time executable
        self.calls = self.slots = 0  # compiled calls made and candidate slots they computed (padding included)
        self.compile_seconds = 0.0

    @property
    def candidate_devices(self) -> int:
        """The size of the mesh's candidate axis (devices / ``model_axis_size``): chunks are multiples of it."""
        return self._mesh.shape[AXIS]

    def _parameter_shardings(self, params: Any) -> Any:
        """Each parameter sharded over the model axis on its largest dimension that the axis size divides;
        replicated when none does (or with a model axis of 1)."""
        size = self._mesh.shape[MODEL_AXIS]

        def sharding(leaf):
            shape = np.shape(leaf)
            fits = [d for d in np.argsort(shape)[::-1] if size > 1 and shape[d] % size == 0]
            if not fits:
                return self._replicated
            spec = [None] * len(shape)
            spec[fits[0]] = MODEL_AXIS
            return NamedSharding(self._mesh, P(*spec))

        return jax.tree.map(sharding, nnx.to_pure_dict(params))

    def _candidate_stats(self, params: dict, clip: Any, rest: Any, bits: dict, batches: dict) -> dict:
        """Per-candidate, per-example statistics ``(K, n_batches, B)`` of the plans whose stacked bits are
        ``bits``."""

        def one(bits_k):
            quantized = quantize_params(params, bits_k, self.hierarchy, clip)

            def body(carry, batch):
                model = nnx.merge(self._graphdef, quantized, rest)
                return carry, self.metric.example_stats(model, batch)

            return jax.lax.scan(body, None, batches)[1]

        return jax.vmap(one)(bits)

    @property
    def compilations(self) -> int:
        """How many distinct compilations the candidate function holds (batch shapes x chunk sizes)."""
        return len(self._compiled)

    def chunk_size(self, n_plans: int, batches: dict | None = None) -> int:
        """The largest number of candidates per compiled call for a list of ``n_plans`` plans (a multiple of
        the device count)."""
        n_dev = self.candidate_devices
        chunk = self._chunk_size if self._chunk_size is not None else n_plans
        if self._budget is not None and batches is not None:
            chunk = min(self._budget_chunk(batches) * n_dev, chunk)
        return -(-chunk // n_dev) * n_dev

    def chunk_sizes(self, n_plans: int, batches: dict | None = None) -> tuple[int, ...]:
        """The compiled sizes a list of ``n_plans`` plans may use, largest first: :meth:`chunk_size` and the
        powers of two below it, times the device count."""
        n_dev = self.candidate_devices
        largest = self.chunk_size(n_plans, batches)
        sizes, size = {largest}, 1
        while size * n_dev < largest:
            sizes.add(size * n_dev)
            size *= 2
        return tuple(sorted(sizes, reverse=True))

    def split(self, n_plans: int, batches: dict | None = None) -> list[int]:
        """The chunk sizes the ``n_plans`` plans of one call are evaluated in: full chunks of the largest
        size, then the largest sizes that fit the rest; a rest below the smallest size is padded to it."""
        sizes, chunks, rest = self.chunk_sizes(n_plans, batches), [], n_plans
        for size in sizes:
            while rest >= size:
                chunks.append(size)
                rest -= size
        if rest:
            chunks.append(sizes[-1])
        return chunks

    def prepare(self, n_plans: int, batches: Iterable[Mapping[str, Any]] | dict) -> None:
        """Compile (ahead of time, timed into ``compile_seconds``) every chunk size a call with ``n_plans``
        plans on ``batches`` needs, so that the call itself only computes."""
        stacked = batches if isinstance(batches, dict) else jax.device_put(stack_batches(batches), self._replicated)
        for chunk in set(self.split(n_plans, stacked)):
            self._executable(chunk, stacked)

    def _executable(self, chunk: int, stacked: dict) -> Any:
        key = (tuple(sorted((k, v.shape) for k, v in stacked.items())), chunk)
        if key not in self._compiled:
            tic = time.perf_counter()
            bits = jax.device_put(self.hierarchy.stacked_bits([QuantPlan()] * chunk), self._sharded)
            self._compiled[key] = self._fn.lower(self._params, self._clip, self._rest, bits, stacked).compile()
            self.compile_seconds += time.perf_counter() - tic
        return self._compiled[key]

    def _budget_chunk(self, batches: dict) -> int:
        """Candidates per device that fit ``memory_budget_bytes`` (XLA's per-device memory analysis of one
        candidate per device)."""
        key = tuple(sorted((k, v.shape) for k, v in batches.items()))
        if key not in self._chunk_by_shape:
            stacked = jax.device_put(batches, self._replicated)
            analysis = self._executable(self.candidate_devices, stacked).memory_analysis()
            fixed = analysis.argument_size_in_bytes  # parameters, batches (replicated on every device)
            per_candidate = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
            if self._budget < fixed + per_candidate:
                raise ConfigError(f"memory_budget_bytes={self._budget:,} is below one candidate per device "
                                  f"({fixed:,} bytes of parameters and batches + {per_candidate:,} per "
                                  f"candidate); raise the budget or shard the parameters (model_axis_size)")
            self._chunk_by_shape[key] = (self._budget - fixed) // per_candidate
        return self._chunk_by_shape[key]

    def memory_analysis(self, chunk: int, batches: Mapping[str, Any]):
        """XLA's memory analysis (bytes of arguments, outputs, temporaries) of the candidate function for
        ``chunk`` candidates on stacked ``batches`` (:func:`stack_batches`); compiles it once more to find out."""
        bits = self.hierarchy.stacked_bits([QuantPlan()] * chunk)
        compiled = jax.jit(self._candidate_stats).lower(self._params, self._clip, self._rest, bits, batches).compile()
        return compiled.memory_analysis()

    def example_stats(self, plans: Sequence[QuantPlan], batches: Iterable[Mapping[str, Any]], *,
                      on_chunk: Callable[[int], object] | None = None) -> list[dict[str, np.ndarray]]:
        """The metric's statistics of every plan per example (float64 ``(n,)`` each; padding rows dropped),
        in the order of the batches' rows; ``on_chunk(n)`` after each compiled chunk, with the number of plans
        it computed (progress bars)."""
        if not plans:
            return []
        for plan in plans:
            self.hierarchy.validate(plan)
        stacked = jax.device_put(stack_batches(batches), self._replicated)
        chunks = self.split(len(plans), stacked)
        padded = list(plans) + [plans[-1]] * (sum(chunks) - len(plans))
        examples: list[dict[str, np.ndarray]] = []
        start = 0
        for chunk in chunks:
            bits = jax.device_put(self.hierarchy.stacked_bits(padded[start:start + chunk]), self._sharded)
            with collectives():
                out = jax.device_get(self._executable(chunk, stacked)(self._params, self._clip, self._rest, bits,
                                                                      stacked))
            rows = {k: np.asarray(v, np.float64).reshape(chunk, -1) for k, v in out.items()}
            real = rows[self.metric.count][0] > 0  # data-only: the same rows for every candidate
            examples.extend({k: v[i, real] for k, v in rows.items()} for i in range(chunk))
            if on_chunk is not None:
                on_chunk(min(chunk, len(plans) - start))
            start += chunk
            self.calls += 1
            self.slots += chunk
        return examples[:len(plans)]

    def stats(self, plans: Sequence[QuantPlan], batches: Iterable[Mapping[str, Any]], *,
              on_chunk: Callable[[int], object] | None = None) -> list[dict[str, float]]:
        """The metric's statistics of every plan, summed over all examples (float64)."""
        return [_totals(e) for e in self.example_stats(plans, batches, on_chunk=on_chunk)]

    def evaluations(self, plans: Sequence[QuantPlan], batches: Iterable[Mapping[str, Any]], *,
                    on_chunk: Callable[[int], object] | None = None) -> list[Evaluation]:
        """The metric of every plan with its per-example statistics, in the order of ``plans``."""
        return [Evaluation(self.metric.finalize(_totals(e)), e)
                for e in self.example_stats(plans, batches, on_chunk=on_chunk)]

    def __call__(self, plans: Sequence[QuantPlan], batches: Iterable[Mapping[str, Any]], *,
                 on_chunk: Callable[[int], object] | None = None) -> list[float]:
        """The metric of every plan over all batches, in the order of ``plans`` (``on_chunk``: as
        :meth:`example_stats`)."""
        return [e.metric for e in self.evaluations(plans, batches, on_chunk=on_chunk)]


def evaluate_candidates(model: nnx.Module, plans: Sequence[QuantPlan], batches: Iterable[Mapping[str, Any]],
                        metric: Metric, *, chunk_size: int | None = None, memory_budget_bytes: int | None = None,
                        devices: Sequence[jax.Device] | None = None) -> list[float]:
    """Metric of each plan (one-shot :class:`Evaluator`; keep an Evaluator to reuse its compilation)."""
    evaluator = Evaluator(model, metric, chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes,
                          devices=devices)
    return evaluator(plans, batches)
