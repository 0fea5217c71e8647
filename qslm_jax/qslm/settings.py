"""What a QSLM search is asked (qslm.md "What the user gives and gets"): constraints, levels, selection factor,
evaluation set-up and strategy, checked before any work; the paper's six cases and their budgets scaled to a
model's fp32 size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qslm_jax.errors import ConfigError
from qslm_jax.qslm.evaluator import Evaluator
from qslm_jax.qslm.selection import ALPHAS
from qslm_jax.qslm.uncertainty import LEVEL, Bootstrap
from qslm_jax.quant.hierarchy import DEFAULT_SCHEME
from qslm_jax.quant.quantizers import QuantScheme

MB = 1e6
PAPER_FP32_MB = 861.597696  # SpikeGPT-216M at fp32 (qslm.md section 2)
DEFAULT_LEVELS = (32, 16, 12, 8, 6, 4, 3, 2)
EXIT_NO_FEASIBLE = 3  # exit status of a search with no feasible candidate (1: bad input, 2: usage error)
SELECTION_SPLITS = ("held-out", "same")
# the paper's cases on SpikeGPT-216M (qslm.md "What the user gives and gets"): task, const_a, const_m (MB)
CASES = {
    "a1": ("sst2", 2.0, 400.0), "a2": ("sst2", 5.0, 400.0), "a3": ("sst2", 5.0, 420.0),
    "b1": ("wikitext2", 1.0, 400.0), "b2": ("wikitext2", 4.0, 400.0), "b3": ("wikitext2", 4.0, 420.0),
}


def case_budget_mb(case: str, fp32_bytes: int) -> float:
    """The memory budget of paper case ``case`` for a model of ``fp32_bytes``: the case's MB scaled by
    ``fp32 / 861.6 MB`` (so SpikeGPT-216M gets exactly 400 or 420 MB)."""
    if case not in CASES:
        raise ConfigError(f"unknown case {case!r}: expected one of {sorted(CASES)}")
    return CASES[case][2] * (fp32_bytes / MB) / PAPER_FP32_MB


@dataclass(frozen=True)
class QSLMSettings:
    """What a search is asked: constraints, levels, selection factor and evaluation set-up."""

    const_a: float
    const_m_mb: float
    levels: tuple[float, ...] = DEFAULT_LEVELS
    alpha: float = 0.5
    alphas: tuple[float, ...] = ALPHAS
    eval_limit: int | None = None
    eval_batch_size: int = 32
    chunk_size: int | None = 8
    devices: int | None = None  # number of local devices to shard candidates over (default all)
    memory_budget_gb: float | None = None  # per device, sizes the chunk (default: device_memory.DEFAULT_FRACTION)
    case: str | None = None  # the paper's case the constraints come from (reports only; not in journals)
    selection_split: str = "held-out"  # "held-out": choose on the selection split, report on another; "same"
    scheme: QuantScheme = DEFAULT_SCHEME  # quantizer (--scheme, --group-size); in the journal fingerprint
    strategy: str = "tiered"  # "tiered" (qslm.md section 3) or "knapsack" (qslm_jax.qslm.knapsack)
    stop: bool = True  # tiered: the paper's stop at a unit's first failing level (False: --no-stop)
    confidence: float | None = None  # --confidence: pass only if the whole delta_ci is within const_a

    def __post_init__(self):
        def finite(x) -> bool:
            return isinstance(x, int | float) and math.isfinite(x)

        checks = [
            ("const_a", self.const_a, "a finite number >= 0", finite(self.const_a) and self.const_a >= 0),
            ("const_m_mb", self.const_m_mb, "a number > 0 (MB; inf for no budget)",
             isinstance(self.const_m_mb, int | float) and self.const_m_mb > 0 and not math.isnan(self.const_m_mb)),
            ("alpha", self.alpha, "a finite number >= 0", finite(self.alpha) and self.alpha >= 0),
            ("alphas", self.alphas, "finite numbers >= 0", all(finite(a) and a >= 0 for a in self.alphas)),
            ("eval_limit", self.eval_limit, "None or an integer >= 1",
             self.eval_limit is None or (isinstance(self.eval_limit, int) and self.eval_limit >= 1)),
            ("eval_batch_size", self.eval_batch_size, "an integer >= 1",
             isinstance(self.eval_batch_size, int) and self.eval_batch_size >= 1),
            ("chunk_size", self.chunk_size, "None or an integer >= 1",
             self.chunk_size is None or (isinstance(self.chunk_size, int) and self.chunk_size >= 1)),
            ("devices", self.devices, "None or an integer >= 1",
             self.devices is None or (isinstance(self.devices, int) and self.devices >= 1)),
            ("memory_budget_gb", self.memory_budget_gb, "None or a number > 0 (GB per device)",
             self.memory_budget_gb is None or (finite(self.memory_budget_gb) and self.memory_budget_gb > 0)),
            ("selection_split", self.selection_split, f"one of {SELECTION_SPLITS}",
             self.selection_split in SELECTION_SPLITS),
            ("levels", self.levels, "at least one level", len(self.levels) >= 1),
            ("confidence", self.confidence, "None or a number in (0, 1)",
             self.confidence is None or (finite(self.confidence) and 0 < self.confidence < 1)),
        ]
        problems = [f"{name}={value!r} (expected {rule})" for name, value, rule, ok in checks if not ok]
        if problems:
            raise ConfigError(f"invalid search settings: {'; '.join(problems)}")

    @property
    def search_split(self) -> str:
        """The task split the search chooses on (:data:`qslm_jax.tasks.data.EVAL_SPLITS`)."""
        return "selection" if self.selection_split == "held-out" else "all"

    def bootstrap(self, evaluator: Evaluator) -> Bootstrap:
        """The intervals of the reports (at ``confidence``, else 95%) for ``evaluator``'s metric."""
        return Bootstrap(evaluator.metric.finalize, level=self.confidence or LEVEL)


STRATEGIES = ("tiered", "knapsack")


def check_strategy(settings: QSLMSettings) -> None:
    """Refuse an unknown ``strategy`` and ``stop=False`` outside the tiered search (:class:`ConfigError`)."""
    if settings.strategy not in STRATEGIES:
        raise ConfigError(f"unknown search strategy {settings.strategy!r}: expected one of {list(STRATEGIES)}")
    if not settings.stop and settings.strategy != "tiered":
        raise ConfigError(f"--no-stop changes the tiered search's stop rule; the {settings.strategy} strategy "
                          f"has none: drop --no-stop or use --strategy tiered")


