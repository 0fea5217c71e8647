"""Fine-tune a model of any registered family (SpikeGPT, SpikingBERT) on a task: ``python -m experiments.finetune
--model M --task T``.

Checkpoints go to ``OUT/train`` every ``--checkpoint-every`` steps: rerunning the same command resumes an
interrupted run (same seed and data order, so the result equals an uninterrupted run). The final model is saved
to ``OUT/model`` (load it with ``qslm_jax.model_io.load_model`` or pass it as ``--model`` / ``--checkpoint`` to
``experiments.tiered``); metrics go to ``OUT/metrics.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from experiments import names
from experiments.common import AT_LEAST_ONE, check_flags, finite_float, run_main
from experiments.formatting import DefaultsFormatter

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (defaults: the task's recipe, see qslm_jax.finetune.finetuning: the embedded one for
    a preset from random weights, SpikeGPT's own fine-tuning settings for a pretrained checkpoint)."""
    p = argparse.ArgumentParser(prog="python -m experiments.finetune", description=__doc__,
                                formatter_class=DefaultsFormatter)
    p.add_argument("--model", default="spikegpt-small",
                   help="preset name, reference checkpoint (.pth/.safetensors/hf://) or saved model directory")
    p.add_argument("--checkpoint", default=None, help="weights for a preset --model (file or saved directory)")
    p.add_argument("--task", choices=sorted(names.TASKS), default="sst2", help="the task to fine-tune on")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/finetune-MODEL-TASK)")
    p.add_argument("--data-dir", default=None, help="local data directory (layout of shared/data); "
                   "default $QSLM_DATA_DIR, else the HF hub")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the task's recipe)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the task's recipe)")
    p.add_argument("--lr", type=finite_float, default=None, help="peak learning rate (default: the task's recipe)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="save a resumable checkpoint every N steps (default: the task's recipe)")
    p.add_argument("--lm-train-text", choices=names.LM_TRAIN_TEXTS, default=None,
                   help="wikitext2: what the model trains on: WikiText-2 raw valid alone, or followed by the public "
                        "GLUE sentences on disk (QNLI dev/test, MRPC; none sharing an 8-word run with WikiText-2 "
                        "test) (default: the recipe's: wikitext2-valid+glue from random weights, wikitext2-valid "
                        "for a pretrained checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and of new weights")
    p.add_argument("--new-head", action="store_true",
                   help="give a model without the task's classifier a new, randomly initialised one "
                        "(otherwise that is an error)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N examples / tokens")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps in total (resumable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _bare_preset(args) -> bool:
    """Whether ``--model`` is a preset name without ``--checkpoint``: training starts from new weights (the
    embedded recipe) rather than from pretrained ones."""
    from qslm_jax.models.registry import all_presets

    return args.checkpoint is None and args.model in all_presets()


def _recipe_from(args, task):
    """The task's recipe for the weights given (a checkpoint, a reference file or a saved model: the pretrained
    recipe; a bare preset: the from-scratch one), with the flags that override it."""
    from qslm_jax.errors import ConfigError
    from qslm_jax.finetune.finetuning import PRETRAINED_RECIPES, lm_train_description, recipe_for
    from qslm_jax.models.loading import source_family

    family = source_family(args.model, args.checkpoint)
    pretrained = not _bare_preset(args)
    if pretrained and task.name not in PRETRAINED_RECIPES.get(family.name, {}):
        log.info("no pretrained %s recipe for %s: training with its embedded-default recipe (override it with "
                 "--lr/--steps/--batch-size/--warmup)", family.name, task.name)
        pretrained = False
    base = recipe_for(family, task, pretrained=pretrained)
    overrides = {name: value for name, value in (("steps", args.steps), ("learning_rate", args.lr),
                                                 ("warmup_steps", args.warmup),
                                                 ("checkpoint_every", args.checkpoint_every),
                                                 ("seed", args.seed)) if value is not None}
    text = args.lm_train_text or base.lm_train_text
    if text != base.lm_train_text:
        if task.n_classes:
            raise ConfigError(f"--lm-train-text is for language modelling (wikitext2), not {task.name}")
        train_data = lm_train_description(text)
    else:
        train_data = base.train_data
    return dataclasses.replace(base, train=dataclasses.replace(base.train, **overrides),
                               batch_size=args.batch_size or base.batch_size, train_data=train_data,
                               lm_train_text=text)


def main(argv: list[str] | None = None) -> int:
    """Run the fine-tuning described by ``argv`` (prints its metrics); returns the exit status (0, 1 bad
    input, 2 usage, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: _run(args), resume_hint="Rerun the same command to resume from the last checkpoint.")


def _run(args) -> int:
    from qslm_jax.finetune.finetuning import finetune, initial_model
    from qslm_jax.models.loading import resolve_model
    from qslm_jax.models.registry import preset_family
    from qslm_jax.tasks.task import get_task

    check_flags(args, [(("--batch-size", "--eval-limit"), *AT_LEAST_ONE)])
    task = get_task(args.task)
    recipe = _recipe_from(args, task)  # checks the training settings before the model is loaded
    out = args.out or Path("runs") / f"finetune-{Path(args.model).name}-{task.name}"
    if recipe.warm_start is not None and _bare_preset(args):
        family = preset_family(args.model)  # a bare SpikingBERT preset: the recipe's BERT warm start first
        model = initial_model(family, family.config(args.model, n_classes=task.n_classes), task, recipe, out,
                              data_dir=args.data_dir, progress=not args.no_progress)
    else:
        model = resolve_model(args.model, task, checkpoint=args.checkpoint, seed=args.seed, new_head=args.new_head)
    metrics = finetune(model, task, recipe, out, data_dir=args.data_dir, eval_limit=args.eval_limit,
                       progress=not args.no_progress, stop_after=args.stop_after)
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
