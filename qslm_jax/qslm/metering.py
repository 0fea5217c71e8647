"""``evaluate(plans) -> evaluations`` with GPU power sampled around every batched call (qslm.md section 4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qslm_jax.qslm.evaluator import Evaluator
from qslm_jax.qslm.power import PowerMeter
from qslm_jax.qslm.uncertainty import Evaluation
from qslm_jax.quant.plan import QuantPlan


class MeteredEvaluate:
    """``evaluate(plans) -> metrics`` over fixed batches, with GPU power sampled around every batched call.

    The chunk sizes a call needs are compiled before the metered window opens, so the energy is that of
    computing only; each candidate gets the call's energy divided by the candidate slots the call computed
    (padding included), and its mean power is the call's (``per_plan``: plan key -> that record).
    """

    def __init__(self, evaluator: Evaluator, batches: Sequence[dict]):
        self.evaluator, self.batches = evaluator, list(batches)
        self.calls: list[dict[str, Any]] = []
        self.per_plan: dict[str, dict[str, float]] = {}

    def __call__(self, plans: list[QuantPlan], *, on_chunk=None) -> list[Evaluation]:
        """The metrics of ``plans`` with their per-example statistics (``on_chunk``:
        :meth:`Evaluator.example_stats`'s progress callback)."""
        self.evaluator.prepare(len(plans), self.batches)
        slots = self.evaluator.slots
        with PowerMeter() as meter:
            metrics = self.evaluator.evaluations(plans, self.batches, on_chunk=on_chunk)
        slots = self.evaluator.slots - slots
        reading = meter.reading.to_dict()
        per = reading["energy_j"] / slots if reading["measured"] else None
        self.calls.append({"plans": len(plans), "slots": slots, **reading, "energy_j_per_candidate": per})
        if reading["measured"]:
            self.per_plan.update({p.key(): {"energy_j": per, "mean_w": reading["mean_w"]} for p in plans})
        return metrics

    def saving(self, baseline: QuantPlan, selected: QuantPlan) -> dict[str, Any]:
        """Energy and mean power per candidate of ``selected`` vs the fp32 ``baseline`` and the saving
        ``100 (1 - selected / baseline)`` in percent (qslm.md section 4), or ``measured: False``."""
        base, sel = self.per_plan.get(baseline.key()), self.per_plan.get(selected.key())
        if base is None or sel is None:
            return {"measured": False, "reason": "no NVML reading for the baseline or the selection in this run"}
        return {"measured": True, "baseline": base, "selection": sel,
                "energy_saving_percent": 100.0 * (1.0 - sel["energy_j"] / base["energy_j"]),
                "power_saving_percent": 100.0 * (1.0 - sel["mean_w"] / base["mean_w"])}


