"""Sensitivity analysis (QSLM paper Fig. 7): every block quantized alone to every level, one batched call.

``python -m experiments.sensitivity --task sst2`` writes ``sensitivity.csv`` (blocks x levels, metric),
``sensitivity.json`` (with the baseline and the block order the tiered search would use) and the heat-map
``sensitivity.png`` of the metric change. Evaluations are journaled, so the tiered search (given the same
``--journal``) reuses them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments import names
from experiments.common import (
    add_model_and_evaluation_arguments,
    add_scale_arguments,
    check_search_arguments,
    eval_batch_size,
    finite_float,
    join_processes,
    run_main,
    scheme_of,
)
from experiments.formatting import DefaultsFormatter


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="python -m experiments.sensitivity", description=__doc__,
                                formatter_class=DefaultsFormatter)
    p.add_argument("--task", choices=sorted(names.TASKS), default="sst2", help="the task whose metric is measured")
    p.add_argument("--const-a", type=finite_float, default=2.0,
                   help="the performance constraint used to order blocks (reach = lowest level passing alone)")
    add_model_and_evaluation_arguments(p)
    add_scale_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the analysis described by ``argv``; returns the exit status (0, 1 bad input, 2 usage, 130 Ctrl-C)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: _run(args), resume_hint="Rerun the same command to resume (training from its last "
                                                    "checkpoint, evaluations from the journal).")


def _run(args) -> int:
    from qslm_jax.models.loading import load_for_task
    from qslm_jax.qslm.distributed import is_main_process, output_dir
    from qslm_jax.qslm.outputs import write_sensitivity
    from qslm_jax.qslm.pipeline import prepare_evaluation, run_sensitivity
    from qslm_jax.qslm.report import write_json
    from qslm_jax.qslm.settings import QSLMSettings
    from qslm_jax.tasks.task import get_task

    join_processes(args)
    check_search_arguments(args, const_a=args.const_a)
    task = get_task(args.task)
    model, description = load_for_task(args.model, task, checkpoint=args.checkpoint, init=args.init,
                                       seed=args.seed, cache_dir=args.cache_dir, data_dir=args.data_dir,
                                       progress=not args.no_progress)
    settings = QSLMSettings(const_a=args.const_a, const_m_mb=float("inf"), levels=args.levels,
                            eval_limit=args.eval_limit, eval_batch_size=eval_batch_size(args, task),
                            chunk_size=args.chunk_size, devices=args.devices,
                            memory_budget_gb=args.memory_budget_gb, selection_split=args.selection_split,
                            scheme=scheme_of(args))
    with output_dir(args.out or Path("runs") / f"sensitivity-{Path(args.model).name}-{task.name}") as out:
        ctx = prepare_evaluation(model, task, settings, out, model_description=description, data_dir=args.data_dir,
                                 journal_path=args.journal)
        baseline, table, order = run_sensitivity(ctx, args.levels, args.const_a, progress=not args.no_progress)
        write_sensitivity(out, table, baseline, task)
        write_json(out / "sensitivity.json", {
            "task": task.name, "metric": task.metric_name, "baseline": baseline, "protocol": ctx.data.protocol,
            "model": description, "table": {b: {str(q): m for q, m in row.items()} for b, row in table.items()},
            "order_least_sensitive_first": list(order), "const_a": args.const_a,
            "compilations": ctx.evaluator.compilations, "power_calls": ctx.evaluate.calls})
        print(f"baseline {task.metric_name}: {baseline:.4f}")
        print((out / "sensitivity.csv").read_text())
    print(f"order (least sensitive first): {', '.join(order)}\n"
          + (f"written to {out}" if is_main_process() else "written by process 0"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
