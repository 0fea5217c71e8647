"""Progress bars of a search, each with a total (so with an ETA): the units of the current phase, the candidates
of the current unit, and the plans of a long batched call.

The tiered search (qslm.md section 3) visits its units in a known order: the global phase one unit (the
model), the block phase every block, the module phase every module of every block. A unit tries at most the
levels below the one it starts from (its first candidate is at the highest of them), so the candidates of a
unit have a total too; the paper's stop rule may end a unit before it (the bar is then left unfinished).
Speculative candidates count where they fall: they are always next in the search's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from qslm_jax.qslm.search import MODEL_UNIT, Candidate, search_levels
from qslm_jax.quant.quantizers import Level

if TYPE_CHECKING:
    from qslm_jax.quant.hierarchy import Hierarchy


class SearchProgress:
    """The ``on_evaluated`` callback of a search: a bar of the current phase's units (``search block: 3/14
    unit``) and one of the current unit's candidates (``attention_2: 2/6 cand``).

    A phase without units (the knapsack strategy's solve and repair rounds: how many rounds the repair takes
    is known only at its end) counts its candidates without a total; each of its calls is short.
    """

    def __init__(self, hierarchy: Hierarchy, levels: Sequence[Level], *, order: Sequence[str] | None = None,
                 strategy: str = "tiered", enabled: bool = True):
        self.levels = search_levels(levels)
        order = tuple(order or hierarchy.blocks)  # the block order of the block and module phases
        self.units = {"global": (MODEL_UNIT,), "block": order,
                      "module": tuple(m for block in order for m in hierarchy.modules_of(block))}
        self.strategy, self.enabled = strategy, enabled
        self.phase: str | None = None
        self.unit: str | None = None
        self.phase_bar: tqdm | None = None
        self.unit_bar: tqdm | None = None

    def __call__(self, made: Sequence[Candidate]) -> None:
        """Count the candidates of one batched call (in the search's order)."""
        for candidate in made:
            if candidate.phase == "baseline":
                continue
            if candidate.phase != self.phase:
                self._start_phase(candidate.phase)
            if candidate.phase in self.units and candidate.unit != self.unit:
                self._start_unit(candidate)
            (self.unit_bar or self.phase_bar).update(1)

    def _start_phase(self, phase: str) -> None:
        self.close()
        self.phase = phase
        counted = phase in self.units
        self.phase_bar = tqdm(total=len(self.units[phase]) if counted else None, desc=f"{self.strategy} {phase}",
                              unit="unit" if counted else "cand", disable=not self.enabled, position=0)

    def _start_unit(self, candidate: Candidate) -> None:
        if self.unit_bar is not None:
            self.unit_bar.close()
        units = self.units[self.phase]
        if candidate.unit in units:  # the units before it are done (one starting at the lowest level has none)
            self.phase_bar.update(units.index(candidate.unit) - self.phase_bar.n)
        self.unit = candidate.unit
        tries = sum(1 for q in self.levels if q <= candidate.level)
        self.unit_bar = tqdm(total=tries, desc=candidate.unit, unit="cand", leave=False, disable=not self.enabled,
                             position=1)

    def close(self) -> None:
        """End the bars of the current phase (all its units done)."""
        if self.unit_bar is not None:
            self.unit_bar.close()
        if self.phase_bar is not None:
            if self.phase_bar.total is not None:
                self.phase_bar.update(self.phase_bar.total - self.phase_bar.n)
            self.phase_bar.close()
        self.phase = self.unit = self.phase_bar = self.unit_bar = None


def with_progress(evaluate: Callable[..., list], desc: str, *, enabled: bool = True
                  ) -> Callable[[list], list]:
    """``evaluate(plans, on_chunk=...)`` as a plain ``evaluate(plans)`` showing a bar of the call's plans
    (total: the plans of the call), advanced as each compiled chunk finishes; for the long batched calls (the
    sensitivity analysis: every block at every level in one call)."""
    def call(plans: list) -> list:
        with tqdm(total=len(plans), desc=desc, unit="plan", leave=False, disable=not enabled) as bar:
            return evaluate(plans, on_chunk=bar.update)

    return call
