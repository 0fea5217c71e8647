"""Score an exported quantized model: ``python -m experiments.evaluate EXPORT --task T``.

EXPORT is a quantized export (``selection.safetensors`` in a ``experiments.tiered`` run directory, or any file
written by ``qslm_jax.quant.export.export_quantized``). The model is rebuilt from the file alone (its family,
config and dequantized tensors: no checkpoint is needed) and scored on the task's evaluation data with the
search's own code path (same data, batches, metric and compiled evaluator), so with the search's ``--eval-limit``
and ``--eval-batch-size`` (``report.json``: ``config.eval_limit``, ``config.eval_batch_size``) it prints exactly
the report's metric of the selection: ``--split report`` (default) its score on the report split
(``report_split.metrics.selection``), ``--split selection`` the search's own (``selection.metric``).
Exit status: 0, 1 on bad input (missing file, not an export, a task the model cannot do), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments.common import run_main
from experiments.formatting import DefaultsFormatter

MB = 1e6


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (parsing imports nothing heavy, so ``--help`` answers at once)."""
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__,
                                formatter_class=DefaultsFormatter)
    p.add_argument("export", type=Path, metavar="EXPORT",
                   help="quantized export, e.g. runs/tiered-spikegpt-small-a1/selection.safetensors")
    p.add_argument("--task", required=True,
                   help="task to score on: sst2, mrpc or qnli (accuracy, GLUE validation) or wikitext2 "
                        "(perplexity, test split)")
    p.add_argument("--eval-limit", type=int, default=None, metavar="N",
                   help="score the first N examples (sst2) or tokens (wikitext2) only, as the search's flag")
    p.add_argument("--eval-batch-size", type=int, default=None, metavar="B",
                   help="sentences / windows per batch; the search's value (report.json: config.eval_batch_size) "
                        "reproduces its metric to the last digit; default: experiments.tiered's")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="local data directory (default $QSLM_DATA_DIR, else the hub)")
    p.add_argument("--split", choices=("report", "selection", "all"), default="report",
                   help="report: the data a search reports on (report.json: report_split), which it never chose "
                        "on; selection: the data it chose on (report.json: selection.metric); all: both (the "
                        "paper's protocol, --selection-split same)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text lines")
    return p


def evaluate_export(path: str | Path, task_name: str, *, eval_limit: int | None = None,
                    eval_batch_size: int | None = None, data_dir: str | Path | None = None,
                    split: str = "report") -> dict:
    """The metric of the export ``path`` on ``task_name`` and what it was measured on.

    The model of :func:`qslm_jax.model_io.load_quantized_model` is scored at fp32 (its weights already are the
    dequantized codes) by :func:`qslm_jax.finetune.finetuning.evaluate`, on the batches of
    :func:`qslm_jax.tasks.data.load_task_data`: the search's protocol, so the value equals the search's metric
    of the exported plan. Returns ``metric``, ``metric_name``, ``higher_is_better``, ``task``, ``protocol``,
    ``eval_items``, ``plan``, ``family``, ``config`` and ``file_bytes``.
    """
    import dataclasses

    from experiments.common import eval_batch_size as default_eval_batch_size
    from qslm_jax.errors import ConfigError
    from qslm_jax.finetune.finetuning import evaluate
    from qslm_jax.model_io import load_quantized_model
    from qslm_jax.models.registry import family_of
    from qslm_jax.tasks.model_data import check_vocabulary, model_task_data
    from qslm_jax.tasks.task import get_task

    task = get_task(task_name)
    path = Path(path)
    model, export = load_quantized_model(path)
    family = family_of(model)
    if task.n_classes and family.config_value(model.config, "n_classes") != task.n_classes:
        raise ConfigError(f"{task.name} needs a {task.n_classes}-class classifier and the model in {path} has "
                          f"{family.config_value(model.config, 'n_classes') or 'none'}: export a model fine-tuned "
                          f"on {task.name} (python -m experiments.finetune --task {task.name}), or score it on "
                          "wikitext2")
    batch_size = default_eval_batch_size(argparse.Namespace(eval_batch_size=eval_batch_size), task)
    data = model_task_data(model, task, eval_batch_size=batch_size, eval_limit=eval_limit, data_dir=data_dir,
                           with_train=False, eval_split=split)
    check_vocabulary(model, data.eval_batches)
    return {"metric": evaluate(model, task, data.eval_batches), "metric_name": task.metric_name,
            "higher_is_better": task.higher_is_better, "task": task.name, "protocol": data.protocol,
            "eval_items": data.eval_items, "plan": export.plan.to_dict(), "family": family.name,
            "config": dataclasses.asdict(model.config), "file_bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    """Score the export named by ``argv`` and print the result; returns the exit status (0, 1 on bad input,
    130 interrupted)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: _score(args))


def _score(args) -> int:
    result = evaluate_export(args.export, args.task, eval_limit=args.eval_limit,
                             eval_batch_size=args.eval_batch_size, data_dir=args.data_dir, split=args.split)
    if args.json:
        print(json.dumps({"export": str(args.export), **result}))
    else:
        print(f"{args.export}: {result['family']} {result['config']}, plan {json.dumps(result['plan'])}, "
              f"{result['file_bytes'] / MB:.4f} MB on disk")
        print(f"{result['metric_name']} = {result['metric']!r}")
        print(f"protocol: {result['protocol']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
