"""Benchmarks: ``python -m experiments.bench {forward,candidates,quantize,generate} ...``.

Each sub-command lives in its own module (``experiments.bench_<name>``) exposing
``add_arguments(parser)`` and ``run(args) -> dict``; results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from experiments.common import exit_status
from experiments.formatting import DefaultsFormatter

SUBCOMMANDS = {
    "forward": "SpikeGPT forward throughput vs plain matmuls of the same shapes",
    "candidates": "batched (vmap) vs one-at-a-time evaluation of quantization candidates",
    "quantize": "cost per candidate of fake-quantizing the weights (flops, bytes, temporaries, time)",
    "generate": "RNN-mode generation (O(1) per token) vs re-running the parallel forward per token",
}


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, run the chosen benchmark, print its results and return them as a dict."""
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                     formatter_class=DefaultsFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    module = None
    for name, help_text in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(
            name, help=help_text, formatter_class=DefaultsFormatter
        )
        sub_parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
        if name == chosen:  # import only the chosen benchmark (each pulls in its own dependencies)
            module = importlib.import_module(f"experiments.bench_{name}")
            module.add_arguments(sub_parser)
    args = parser.parse_args(argv)
    results = module.run(args)
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(exit_status(main))
