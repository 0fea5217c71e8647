"""Command-line flags shared by the QSLM entry points (``tiered``, ``sensitivity``), their up-front checks
and exit statuses.

Exit statuses of every entry point: 0 success; 1 bad input (a :class:`~qslm_jax.errors.QSLMError`: a flag value
out of range, missing data or weights, a corrupt file), printed as ``error: ...`` without a traceback; 2 a
usage error (argparse: unknown flag, malformed value); 3 no feasible candidate (``tiered``: the closest ones are
listed); 4 another process of a multi-process run died (rerun every process to resume); 130 interrupted (Ctrl-C;
rerunning the same command resumes).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

from experiments import names
from qslm_jax.errors import ConfigError, DistributedError, QSLMError

# This module is imported while a parser is built: the library (and JAX) only inside the functions that run
# after parsing, so that ``--help`` answers at once.

EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
EXIT_PROCESS_LOST = 4
EXIT_INTERRUPTED = 130


def parse_levels(text: str) -> tuple[float, ...]:
    """``"32,8,1.58"`` -> ``(32, 8, 1.58)`` (integers stay integers); a malformed list is a usage error."""
    try:
        return tuple(float(x) if "." in x else int(x) for x in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 32,16,8, found {text!r}") \
            from err


def as_list(values) -> str:
    """``(32, 16, 1.58)`` -> ``"32,16,1.58"``: a tuple default as the flag takes it (argparse parses string
    defaults with the flag's type, so ``--help`` shows what a user would type)."""
    return ",".join(str(v) for v in values)


def finite_float(text: str) -> float:
    """A float flag that must be finite (``nan``/``inf`` are usage errors)."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from err
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, found {text!r}")
    return value


def interval_level(text: str) -> float:
    """An interval level flag (``--confidence``, ``--level``): a number strictly between 0 and 1 (argparse error
    otherwise)."""
    try:
        level = float(text)
    except ValueError:
        level = math.nan
    if not 0 < level < 1:
        raise argparse.ArgumentTypeError(f"expected a level in (0, 1) such as 0.95, found {text!r}")
    return level


class _TqdmHandler(logging.Handler):
    """Log lines written through ``tqdm.write``, so they do not break an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record).rstrip("\n"), file=sys.stderr)


def _above_the_bars(name: str, level: int) -> None:
    """Logger ``name`` writes its records from ``level`` on through :class:`_TqdmHandler` only."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def configure_logging() -> None:
    """The library's INFO messages (phases, resuming, cache hits) on stderr, above any progress bar; Python
    warnings (all third-party: the library raises or logs instead) above the bar too, never through it;
    orbax/absl only from ERROR (their routine WARNINGs, e.g. "waiting for previous save", are not shown)."""
    _above_the_bars("qslm_jax", logging.INFO)
    logging.captureWarnings(True)
    _above_the_bars("py.warnings", logging.WARNING)
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_main(body: Callable[[], int], *, resume_hint: str | None = None) -> int:
    """Run an entry point's ``body`` with :func:`configure_logging`: a :class:`QSLMError` becomes ``error: ...``
    and exit 1, Ctrl-C a short message (with how to resume) and exit 130 — never a traceback for either."""
    configure_logging()
    try:
        return body()
    except DistributedError as err:
        from qslm_jax.qslm.distributed import exit_now

        print(f"error: {err}", file=sys.stderr)
        exit_now(EXIT_PROCESS_LOST)  # JAX's shutdown barrier would wait for the lost process
    except QSLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted." + (f" {resume_hint}" if resume_hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED


def exit_status(main: Callable[[], object], *, resume_hint: str | None = None) -> int:
    """The exit status of an entry point whose ``main()`` returns results rather than a status: 0, or
    :func:`run_main`'s status for an error or an interruption (``resume_hint``: as there)."""
    def body() -> int:
        main()
        return 0

    return run_main(body, resume_hint=resume_hint)


AT_LEAST_ONE = (lambda v: v >= 1, "an integer >= 1")


def check_flags(args: argparse.Namespace, checks) -> None:
    """Refuse impossible flag values before any data is loaded or model built: ``checks`` holds ``(flags, test,
    what is expected)`` rows; a flag left at its default None is not checked, a list flag (``nargs``) is checked
    element by element. :class:`ConfigError` naming the flag."""
    for flags, ok, expected in checks:
        for flag in flags:
            value = getattr(args, flag.removeprefix("--").replace("-", "_"))
            for item in value if isinstance(value, list) else [value]:
                if item is not None and not ok(item):
                    raise ConfigError(f"expected {flag} to be {expected}, found {item!r}: give a valid value "
                                      "(see --help for the defaults)")


def check_search_arguments(args, *, const_a: float | None = None) -> None:
    """Every search flag checked before any model is loaded or evaluated (:class:`ConfigError` listing the
    problems): the same rules as :class:`QSLMSettings`, plus levels, the budget flags and the device count."""
    from qslm_jax.qslm.settings import QSLMSettings
    from qslm_jax.quant.quantizers import check_level

    for q in args.levels:
        check_level(q)
    scheme_of(args)
    const_m_frac = getattr(args, "const_m_frac", None)
    if const_m_frac is not None and not const_m_frac > 0:
        raise ConfigError(f"--const-m-frac must be > 0 (a fraction of the fp32 size), found {const_m_frac}")
    const_m = getattr(args, "const_m", None)
    QSLMSettings(const_a=const_a if const_a is not None else 0.0,
                 const_m_mb=const_m if const_m is not None else math.inf, levels=args.levels,
                 alpha=getattr(args, "alpha", 0.5), alphas=getattr(args, "alphas", (0.5,)),
                 eval_limit=args.eval_limit, chunk_size=args.chunk_size,
                 eval_batch_size=1 if args.eval_batch_size is None else args.eval_batch_size,
                 devices=args.devices, selection_split=args.selection_split)
    if args.devices is not None:
        import jax

        available = jax.local_device_count()
        if args.devices > available:
            raise ConfigError(f"--devices {args.devices}: only {available} local device(s) are visible")


def add_model_and_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """Which model, which levels, how to evaluate, where to write."""
    p.add_argument("--model", default=names.EMBEDDED_PRESET,
                   help=f"preset ({', '.join(names.MODEL_PRESETS)}), reference "
                   "checkpoint (.pth/.safetensors/hf://) or a directory saved by experiments.finetune")
    p.add_argument("--checkpoint", default=None, help="weights for a preset --model (file or saved directory)")
    p.add_argument("--levels", type=parse_levels, default=as_list(names.DEFAULT_LEVELS),
                   help="precision levels Q, descending; 1.58 = ternary, 1 = binary")
    p.add_argument("--scheme", default="minmax", choices=("minmax", "symmetric", "per-channel", "mse"),
                   help="uniform quantizer: asymmetric per-tensor min-max (the paper's), symmetric "
                        "(max|W|), per-channel (a scale per output channel) or mse (min-max range clipped to "
                        "minimise each tensor's quantization error)")
    p.add_argument("--group-size", type=int, default=None, help="a scale and zero-point per G consecutive "
                   "inputs of each output channel (group-wise; combines with --scheme)")
    p.add_argument("--init", choices=("trained", "random"), default="trained",
                   help="random: random weights, no training (pipeline checks)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N examples / tokens")
    p.add_argument("--selection-split", choices=names.SELECTION_SPLITS, default="held-out",
                   help="held-out: choose on a selection split and report the choice on data the search never saw "
                        "(SST-2: 1000 train rows held out of training / GLUE validation; WikiText-2: first / "
                        "second half of the test tokens used); same: the paper's protocol, one set for both")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default 64 (sst2) / 8 (wikitext2)")
    p.add_argument("--chunk-size", type=int, default=8, help="candidates per compiled (vmapped) call")
    p.add_argument("--devices", type=int, default=None, help="local devices to shard candidates over (all)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default under runs/)")
    p.add_argument("--journal", type=Path, default=None,
                   help="evaluation journal (default OUT/../journals/TASK-SPLIT-FINGERPRINT.jsonl, one per model, "
                        "data, protocol and scheme, shared by every case of that setup); rerun to resume")
    p.add_argument("--data-dir", default=None, help="local data directory (default $QSLM_DATA_DIR, else the hub)")
    p.add_argument("--cache-dir", default=None, help="where the embedded model is cached "
                   "(else $QSLM_CACHE_DIR or ~/.cache/qslm_jax)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (--init random) and new heads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    """How much memory a compiled call may use, and the process group of a multi-process (multi-host) run."""
    p.add_argument("--memory-budget-gb", type=finite_float, default=None,
                   help="per-device memory (GB) that sizes the candidate chunk from XLA's memory analysis "
                        "(default: half the device's memory; on CPU half the RAM available)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0, joining a multi-process run "
                   "(one process per host; default: none, or detected from SLURM / Open MPI / TPU)")
    p.add_argument("--num-processes", type=int, default=None, help="processes in the run (with --coordinator)")
    p.add_argument("--process-id", type=int, default=None, help="this process's id, 0 .. N-1 (0 writes)")
    p.add_argument("--heartbeat-timeout", type=int, default=20,
                   help="seconds after which the others stop when a process stops answering")


def join_processes(args):
    """Join the process group ``args`` describe (:func:`qslm_jax.qslm.distributed.initialize`; before any JAX
    computation); returns the :class:`~qslm_jax.qslm.distributed.ProcessGroup`."""
    from qslm_jax.qslm.distributed import initialize

    if args.memory_budget_gb is not None and not args.memory_budget_gb > 0:
        raise ConfigError(f"--memory-budget-gb must be > 0, found {args.memory_budget_gb}")
    return initialize(args.coordinator, args.num_processes, args.process_id,
                      heartbeat_timeout_s=args.heartbeat_timeout)


def scheme_of(args):
    """The :class:`~qslm_jax.quant.quantizers.QuantScheme` of ``--scheme`` and ``--group-size``."""
    from qslm_jax.quant.quantizers import QuantScheme

    return QuantScheme.preset(args.scheme, group_size=args.group_size)


def eval_batch_size(args, task) -> int:
    """``--eval-batch-size`` or the task's default (64 sentences / 8 windows: LM logits are large)."""
    return args.eval_batch_size or (64 if task.n_classes else 8)
