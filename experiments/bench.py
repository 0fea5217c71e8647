"""Benchmarks: ``python -m experiments.bench {forward,candidates,quantize,generate} ...``.

Each sub-command's measurement lives in its own module (``experiments.bench_<name>``, exposing
``run(args) -> dict``), imported after parsing so that ``--help`` loads no JAX; its flags are defined here.
Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from experiments.common import exit_status
from experiments.formatting import DefaultsFormatter
from experiments.names import MODES, SCHEMES, SPIKEGPT_PRESETS

MIN_REPEATS = 5  # timed rounds of a benchmark by default (medians reported)


def _forward_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m experiments.bench forward``."""
    parser.add_argument("--preset", default="spikegpt216m", choices=sorted(SPIKEGPT_PRESETS), help="model size")
    parser.add_argument("--mode", default="gpt", choices=MODES, help="forward quirks")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="timed rounds (medians reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")


def _candidates_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m experiments.bench candidates``."""
    parser.add_argument("--preset", default="spikegpt-small", choices=sorted(SPIKEGPT_PRESETS),
                        help="model shape (that of the embedded model)")
    parser.add_argument("--n-layer", type=int, default=None, help="override the preset's")
    parser.add_argument("--n-embd", type=int, default=None, help="override the preset's")
    parser.add_argument("--vocab", type=int, default=None, help="override the preset's")
    parser.add_argument("--ctx-len", type=int, default=None, help="window length, stride half of it (preset's)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="length of the random token stream (default: one batch of windows)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per batch")
    parser.add_argument("--candidates", type=int, default=16, help="plans evaluated by every variant")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16], help="K: candidates per call")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="timed rounds (medians reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, tokens and plans")


def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m experiments.bench quantize``."""
    parser.add_argument("--preset", default="spikegpt216m", choices=sorted(SPIKEGPT_PRESETS), help="model shape")
    parser.add_argument("--blocks", nargs="+", default=["input", "attention_0"],
                        help="blocks whose tensors are quantized (216M: input = 38.6M weights, attention_i = 7.7M)")
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 4], help="K: candidates per call")
    parser.add_argument("--scheme", default="minmax", choices=sorted(SCHEMES), help="quantizer")
    parser.add_argument("--group-size", type=int, default=None, help="inputs per scale group (group-wise)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (best is reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and plans")


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m experiments.bench generate``."""
    parser.add_argument("--preset", default="spikegpt-small", choices=sorted(SPIKEGPT_PRESETS), help="model size")
    parser.add_argument("--mode", default="rnn", choices=MODES, help="forward quirks (rnn: run.py's)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512], help="new tokens per call")
    parser.add_argument("--quadratic-lengths", type=int, nargs="*", default=[256, 512],
                        help="lengths at which the re-run-the-forward baseline is timed too")
    parser.add_argument("--torch-lengths", type=int, nargs="*", default=[256],
                        help="lengths at which the PyTorch RNN stand-in is timed too (when torch is installed)")
    parser.add_argument("--prompt-len", type=int, default=16, help="tokens in the (random) prompt")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="timed rounds (medians reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, prompt and sampling")


SUBCOMMANDS = {
    "forward": ("SpikeGPT forward throughput vs plain matmuls of the same shapes", _forward_arguments),
    "candidates": ("batched (vmap) vs one-at-a-time evaluation of quantization candidates", _candidates_arguments),
    "quantize": ("cost per candidate of fake-quantizing the weights (flops, bytes, temporaries, time)",
                 _quantize_arguments),
    "generate": ("RNN-mode generation (O(1) per token) vs re-running the parallel forward per token",
                 _generate_arguments),
}


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, run the chosen benchmark, print its results and return them as a dict."""
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                     formatter_class=DefaultsFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (help_text, add_arguments) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, formatter_class=DefaultsFormatter)
        sub_parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
        add_arguments(sub_parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    results = importlib.import_module(f"experiments.bench_{args.benchmark}").run(args)
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(exit_status(main))
