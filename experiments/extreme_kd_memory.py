"""Peak memory of one SpikingBERT training step vs T: implicit differentiation vs BPTT.

``python -m experiments.extreme_kd_memory`` compiles (does not run) the KD training step of
:mod:`experiments.extreme_kd` for every T and gradient method and prints XLA's memory analysis as a table
(extreme_kd.md, "Why equilibrium training": BPTT stores all T steps, implicit differentiation none). With
``--out`` it also writes ``memory.json`` and ``memory_vs_T.png``. Memory depends on the shapes only, so the
full-size model (``--hidden 768 --heads 12 --intermediate 3072``) can be measured on a small machine.
Invalid flags end with ``error: ...`` and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments import names
from experiments.common import AT_LEAST_ONE, check_flags, exit_status
from experiments.formatting import DefaultsFormatter


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (defaults: the CPU-sized student of experiments.extreme_kd)."""
    p = argparse.ArgumentParser(prog="python -m experiments.extreme_kd_memory", description=__doc__,
                                formatter_class=DefaultsFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[8, 16, 32, 64], help="time steps to measure")
    p.add_argument("--methods", nargs="+", choices=sorted(names.MEMORY_METHODS), default=["implicit", "bptt"],
                   help="gradient methods: implicit differentiation at equilibrium, BPTT through the simulation")
    p.add_argument("--hidden", type=int, default=128, help="student hidden size")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--intermediate", type=int, default=None, help="feed-forward width; default 4 x hidden")
    p.add_argument("--blocks", type=int, default=4, help="spiking encoder blocks")
    p.add_argument("--vocab", type=int, default=30522, help="vocabulary size (embedding rows)")
    p.add_argument("--bits", type=float, choices=(32, 1.58, 1), default=1.58,
                   help="weight precision of the encoder Linear layers")
    p.add_argument("--batch-size", type=int, default=32, help="training examples per step")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example")
    p.add_argument("--out", type=Path, default=None, help="directory for memory.json and memory_vs_T.png")
    return p


def plot_memory(rows: list[dict], path: Path) -> None:
    """Peak step memory (MiB) against T, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["T"] for r in mine], [r["peak_mib"] for r in mine], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("time steps T")
    ax.set_ylabel("peak memory of one training step (MiB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SIZES = ("--T", "--hidden", "--heads", "--blocks", "--vocab", "--batch-size", "--max-length", "--intermediate")


def run(argv: list[str] | None = None) -> dict:
    """Measure, print the table and return ``{"device", "settings", "rows"}`` (raises the library's errors)."""
    args = build_parser().parse_args(argv)
    check_flags(args, [(SIZES, *AT_LEAST_ONE)])  # before anything is compiled
    import jax

    from qslm_jax.equilibrium.memory import format_memory_table, memory_vs_T
    from qslm_jax.models.spikingbert import SpikingBERTConfig
    from qslm_jax.qslm.report import write_json

    config = SpikingBERTConfig(hidden=args.hidden, heads=args.heads,
                               intermediate=args.intermediate or 4 * args.hidden, vocab=args.vocab,
                               max_positions=args.max_length, num_blocks=args.blocks)
    rows = memory_vs_T(config, args.T, methods=args.methods, batch_size=args.batch_size,
                       length=args.max_length, bits=args.bits)
    device = jax.devices()[0].device_kind
    print(f"one training step (KD loss + gradient + AdamW), batch {args.batch_size} x {args.max_length} "
          f"tokens, hidden {config.hidden}, {config.num_blocks} blocks, {args.bits:g}-bit encoder, on "
          f"{device}:")
    print(format_memory_table(rows))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"device": device, "settings": settings, "rows": rows}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "memory.json", result)
        plot_memory(rows, args.out / "memory_vs_T.png")
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: :func:`run` with library errors as ``error: ...`` and exit status 1."""
    return exit_status(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
