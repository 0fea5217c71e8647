"""Command-line flags shared by the QSLM entry points (``tiered``, ``sensitivity``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qslm_jax.models.spikegpt import PRESETS
from qslm_jax.qslm.finetuning import EMBEDDED_PRESET
from qslm_jax.qslm.pipeline import DEFAULT_LEVELS
from qslm_jax.quant.quantizers import QuantScheme


def parse_levels(text: str) -> tuple[float, ...]:
    """``"32,8,1.58"`` -> ``(32, 8, 1.58)`` (integers stay integers)."""
    return tuple(float(x) if "." in x else int(x) for x in text.split(","))


def add_model_and_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """Which model, which levels, how to evaluate, where to write."""
    p.add_argument("--model", default=EMBEDDED_PRESET, help=f"preset ({', '.join(sorted(PRESETS))}), reference "
                   "checkpoint (.pth/.safetensors/hf://) or a directory saved by experiments.finetune")
    p.add_argument("--checkpoint", default=None, help="weights for a preset --model (file or saved directory)")
    p.add_argument("--levels", type=parse_levels, default=DEFAULT_LEVELS, help="precision levels Q, descending; "
                   "1.58 = ternary, 1 = binary")
    p.add_argument("--scheme", default="minmax", choices=("minmax", "symmetric", "per-channel", "mse"),
                   help="uniform quantizer: asymmetric per-tensor min-max (the paper's default), symmetric "
                        "(max|W|), per-channel (a scale per output channel) or mse (min-max range clipped to "
                        "minimise each tensor's quantization error)")
    p.add_argument("--group-size", type=int, default=None, help="a scale and zero-point per G consecutive "
                   "inputs of each output channel (group-wise; combines with --scheme)")
    p.add_argument("--init", choices=("trained", "random"), default="trained",
                   help="random: random weights, no training (pipeline checks)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N examples / tokens")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default 64 (sst2) / 8 (wikitext2)")
    p.add_argument("--chunk-size", type=int, default=8, help="candidates per compiled (vmapped) call")
    p.add_argument("--devices", type=int, default=None, help="local devices to shard candidates over (all)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default under runs/)")
    p.add_argument("--journal", type=Path, default=None,
                   help="evaluation journal (default OUT/journal.jsonl); share one across runs of the same model "
                        "and task to reuse evaluations; rerun to resume")
    p.add_argument("--data-dir", default=None, help="local data directory (default $QSLM_DATA_DIR, else the hub)")
    p.add_argument("--cache-dir", default=None, help="where the embedded default model is cached "
                   "(default $QSLM_CACHE_DIR or ~/.cache/qslm_jax)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def scheme_of(args) -> QuantScheme:
    """The :class:`QuantScheme` of ``--scheme`` and ``--group-size``."""
    return QuantScheme.preset(args.scheme, group_size=args.group_size)


def eval_batch_size(args, task) -> int:
    """``--eval-batch-size`` or the task's default (64 sentences / 8 windows: LM logits are large)."""
    return args.eval_batch_size or (64 if task.n_classes else 8)
