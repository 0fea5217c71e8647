"""1 / 1.58-bit spiking BERT by knowledge distillation at equilibrium: ``python -m experiments.extreme_kd``.

Stages (extreme_kd.md, "KD pipeline"), each a resumable :func:`qslm_jax.training.train` run with its orbax
checkpoints in ``OUT/checkpoints/<stage>``:

1. ``teacher`` (with ``--train-teacher``): a small BERT fine-tuned on the task with cross-entropy; or
   ``--teacher DIR``, an HF BERT classifier loaded with ``converters.bert.load_bert``;
2. ``internal`` (unless ``--no-internal-kd``): internal-layer KD, hidden states through ``fit_dense`` and
   attention scores, teacher layers mapped uniformly onto the student's blocks;
3. ``prediction``: prediction-layer KD (soft cross-entropy at ``--temperature``) and/or cross-entropy on
   labels.

The student is a SpikingBERT (IF neurons, T steps) initialised from the teacher (``--init teacher``) or at
random, trained by implicit differentiation (no BPTT), with its encoder Linear kernels binarised (``--bits
1``) or ternarised (``--bits 1.58``) through a straight-through estimator. With ``--feedback`` the student's
feedback connection (last layer -> embedding neuron) is closed and trained through the implicit fixed point
of the feedback loop (an adjoint solve per step; its iterations and residuals go into results.json).
``OUT/student`` is the trained student (``qslm_jax.model_io``; ``python -m experiments.tiered --model OUT``
searches the rest of it, its encoder kernels kept at ``--bits``). ``OUT/results.json`` holds dev accuracy (and
F1 for MRPC), the average spike rate of every neuron layer, the model size in bits and an operation / energy
estimate; ``OUT/curve_<stage>.png`` the training curves. An interrupted run (Ctrl-C, or ``--stop-after``)
continues when the same command is run again, as every entry point does: the run in ``--out`` resumes from its
stage checkpoints (it says so) and ends with the same result as an uninterrupted one; ``--out`` holding a run
with other settings is refused (choose another ``--out`` to start over). Invalid flags or data end with
``error: ...`` and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from experiments import names
from experiments.common import check_flags, exit_status
from experiments.formatting import DefaultsFormatter
from qslm_jax.errors import ConfigError

# Flags that do not change what is trained: they may differ between a run and the rerun that resumes it.
NOT_SETTINGS = ("stop_after", "no_progress", "out", "data_dir", "eval_limit", "eval_batch_size")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (defaults sized for a CPU)."""
    p = argparse.ArgumentParser(prog="python -m experiments.extreme_kd", description=__doc__,
                                formatter_class=DefaultsFormatter)
    p.add_argument("--task", choices=("sst2", "mrpc", "qnli"), default="sst2", help="GLUE task")
    p.add_argument("--bits", type=float, choices=(32, 1.58, 1), default=1.58,
                   help="weight precision of the student's encoder Linear layers")
    teacher = p.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher", type=Path, help="HF BERT classifier fine-tuned on the task (load_bert)")
    teacher.add_argument("--train-teacher", action="store_true", help="train a small BERT teacher here")
    p.add_argument("--teacher-layers", type=int, default=4, help="layers of the teacher trained here")
    p.add_argument("--teacher-steps", type=int, default=2000, help="optimizer steps of the teacher trained here")
    p.add_argument("--teacher-lr", type=float, default=5e-4, help="peak learning rate of the teacher trained here")
    p.add_argument("--init", choices=("teacher", "random"), default="teacher",
                   help="student initialisation: the teacher's embeddings and uniformly chosen layers, "
                   "or random")
    p.add_argument("--hidden", type=int, default=None,
                   help="student (and trained teacher) hidden size; default: the loaded teacher's, else 128")
    p.add_argument("--heads", type=int, default=None, help="attention heads; default: the teacher's, else 4")
    p.add_argument("--intermediate", type=int, default=None, help="feed-forward width; default 4 x hidden")
    p.add_argument("--blocks", type=int, default=4, help="student encoder blocks")
    p.add_argument("--T", type=int, default=16, help="simulation time steps of the student")
    p.add_argument("--vth", type=float, default=1.0, help="IF threshold")
    p.add_argument("--gradient-at", choices=names.GRADIENT_POINTS[::-1], default="equilibrium",
                   help="where the surrogate is linearised: at the SNN's equilibrium rates of every layer, or "
                   "along the surrogate's own forward pass (the reference; learns poorly at small T)")
    p.add_argument("--feedback", action="store_true",
                   help="close the feedback connection (last layer's spikes -> embedding neuron through an H x H "
                   "Linear) and train through its implicit fixed point (adjoint solve each step)")
    p.add_argument("--feedback-scale", type=float, default=0.0,
                   help="with --feedback: the fresh feedback kernel is this times its LeCun-normal "
                   "initialisation (0: the loop starts open and W_fb is learned; the teacher-initialised "
                   "4-block student's feedback map is already expansive at 0.01)")
    p.add_argument("--feedback-solver", choices=sorted(names.SOLVERS), default="anderson",
                   help="with --feedback: fixed-point solver of the feedback equilibrium and its adjoint")
    p.add_argument("--feedback-tol", type=float, default=1e-5,
                   help="with --feedback: relative residual at which a solve stops")
    p.add_argument("--feedback-max-iter", type=int, default=50,
                   help="with --feedback: most iterations per solve (unconverged solves are counted in "
                   "results.json)")
    p.add_argument("--no-internal-kd", action="store_true", help="skip the internal-layer KD stage")
    p.add_argument("--internal-steps", type=int, default=None,
                   help="internal-layer KD steps (default: --steps)")
    p.add_argument("--steps", type=int, default=1000, help="prediction-stage steps")
    p.add_argument("--internal-lr", type=float, default=5e-4, help="peak learning rate, internal-layer KD")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate, prediction stage")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="linear warm-up share of each stage")
    p.add_argument("--prediction", choices=sorted(set(names.KD_OBJECTIVES) - {"internal"}), default="kd+ce",
                   help="prediction-stage loss: soft cross-entropy with the teacher (kd), labels (ce) "
                   "or both")
    p.add_argument("--temperature", type=float, default=1.0, help="prediction-KD temperature tau")
    p.add_argument("--batch-size", type=int, default=32, help="training examples per step")
    p.add_argument("--eval-batch-size", type=int, default=64, help="examples per evaluation batch")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (the reference uses 128)")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N examples")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N examples")
    p.add_argument("--checkpoint-every", type=int, default=200,
                   help="save a resumable checkpoint every N steps of each stage (0: only at the end)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initialisations, the training-batch order and QNLI's train/dev split")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default runs/extreme_kd-TASK-BITSbit); a run already in it resumes")
    p.add_argument("--data-dir", default=None, help="local data directory (layout of shared/data); "
                   "default $QSLM_DATA_DIR, else the HF hub")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after N optimizer steps over all stages, as an interruption would (resumable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# (flags, test, what is expected); flags left at their default None are not checked
FLAG_CHECKS = (
    (("--steps", "--internal-steps", "--teacher-steps", "--checkpoint-every", "--stop-after", "--seed"),
     lambda v: v >= 0, "an integer >= 0"),
    (("--batch-size", "--eval-batch-size", "--max-length", "--T", "--blocks", "--teacher-layers", "--hidden",
      "--heads", "--intermediate", "--train-limit", "--eval-limit", "--feedback-max-iter"),
     lambda v: v >= 1, "an integer >= 1"),
    (("--lr", "--internal-lr", "--teacher-lr", "--vth", "--temperature"),
     lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    (("--warmup-fraction",), lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    (("--feedback-scale",), math.isfinite, "a finite number"),
    (("--feedback-tol",), lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
)


def _check_run_settings(args, out: Path) -> None:
    """Resume the run in ``out`` when it holds one with the same settings (and say so), refuse one with other
    settings, and record the settings of the run."""
    from qslm_jax.qslm.report import write_json

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in NOT_SETTINGS}
    path = out / "settings.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"the run settings {path} are unreadable ({err}): choose another --out") from err
        parser = build_parser()  # a flag added after the run was saved counts with its default
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k, parser.get_default(k)) != v}
        if changed:
            raise ConfigError(f"{out} holds a run with other settings (saved, given): {changed}; rerun with its "
                              "flags to resume it, or choose another --out to start a new run")
        print(f"resuming the run in {out}: its stages continue from their checkpoints in {out / 'checkpoints'}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def run(argv: list[str] | None = None) -> dict:
    """Run the pipeline described by ``argv``; returns the results (also written to OUT/results.json).

    Raises the library's errors (:class:`qslm_jax.errors.QSLMError`); :func:`main` turns them into exit 1.
    """
    args = build_parser().parse_args(argv)
    check_flags(args, FLAG_CHECKS)
    out = args.out or Path("runs") / f"extreme_kd-{args.task}-{args.bits:g}bit"
    _check_run_settings(args, out)
    from experiments.extreme_kd_stages import run_stages

    return run_stages(args, out)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: :func:`run` with library errors as ``error: ...`` and exit status 1."""
    return exit_status(lambda: run(argv), resume_hint="Rerun the same command to resume from the stage "
                                                      "checkpoints in its --out.")


if __name__ == "__main__":
    sys.exit(main())
