"""QSLM: mixed-precision weight quantization of a spiking LM by tiered search.

``python -m experiments.tiered`` with no arguments runs the embedded default end to end: the small SpikeGPT
(``spikegpt-small``) is trained on SST-2 once (cached), then sensitivity analysis, tiered search
(global -> block -> module) under the paper's case a1 constraints scaled to its size, selection and report.
``--model spikegpt216m --checkpoint SpikeGPT-216M.pth --task wikitext2 --case b1`` runs the paper's setting.
By default the search chooses on a selection split and the report scores the choice on data the search never
saw (``--selection-split same``: the paper's protocol).
Exit status: 0 with a selection, 1 on bad input, 2 on a usage error, 3 when no candidate is feasible (the
closest are listed), 130 when interrupted (rerun the same command to resume from the journal).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments import names
from experiments.common import (
    add_model_and_evaluation_arguments,
    add_scale_arguments,
    as_list,
    check_search_arguments,
    eval_batch_size,
    finite_float,
    interval_level,
    join_processes,
    parse_levels,
    run_main,
    scheme_of,
)
from experiments.formatting import DefaultsFormatter
from qslm_jax.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="python -m experiments.tiered", description=__doc__,
                                formatter_class=DefaultsFormatter)
    p.add_argument("--task", choices=sorted(names.TASKS), default=None,
                   help="default: the --case's task, else sst2")
    p.add_argument("--case", choices=sorted(names.CASES), default=None,
                   help="the paper's constraints (a1-a3: SST-2, b1-b3: WikiText-2); memory budgets scale with "
                        "the model's fp32 size (x fp32/861.6 MB). Default when no constraint is given: a1 / b1")
    p.add_argument("--const-a", type=finite_float, default=None,
                   help="largest accuracy drop (points) or perplexity increase allowed")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--const-m", type=finite_float, default=None, help="memory budget in MB (10^6 bytes)")
    budget.add_argument("--const-m-frac", type=finite_float, default=None,
                        help="memory budget as a fraction of fp32")
    p.add_argument("--alpha", type=finite_float, default=0.5, help="trade-off factor of the selection score")
    p.add_argument("--alphas", type=parse_levels, default=as_list(names.ALPHAS), help="alphas of the ablation")
    p.add_argument("--strategy", choices=names.STRATEGIES, default="tiered",
                   help="tiered: the paper's global -> block -> module search; knapsack: per-unit levels minimising "
                        "memory under the metric drop predicted from measured block/module sensitivities, "
                        "evaluated and repaired until feasible (qslm_jax.qslm.knapsack)")
    p.add_argument("--no-stop", action="store_true",
                   help="tiered: evaluate every level of each unit and keep the lowest that passes, instead of "
                        "the paper's stop at a unit's first failing level (more evaluations, more candidates)")
    p.add_argument("--confidence", type=interval_level, default=None,
                   help="pass a candidate only if the whole paired bootstrap interval (at this level) of its "
                        "change vs fp32 is within --const-a; default: the paper's rule on the point estimate. "
                        "Reports show intervals at this level (95%% without it)")
    add_model_and_evaluation_arguments(p)
    add_scale_arguments(p)
    return p


def _task_and_case(args) -> tuple[str, str | None]:
    """The task and the paper's case whose constraints apply: a case's constraints carry over to any task
    scored like its own (a1-a3: accuracy, e.g. MRPC and QNLI too; b1-b3: perplexity)."""
    from qslm_jax.qslm.settings import CASES
    from qslm_jax.tasks.task import get_task

    if args.case is not None:
        case_task = CASES[args.case][0]
        if args.task is not None and bool(get_task(args.task).n_classes) != bool(get_task(case_task).n_classes):
            raise ConfigError(f"--case {args.case} is a {case_task} case, but --task {args.task} is scored "
                              f"differently: use a{args.case[1]} for classification, b{args.case[1]} for wikitext2")
        return args.task or case_task, args.case
    task = args.task or "sst2"
    default_case = None if args.const_a is not None and (args.const_m or args.const_m_frac) else \
        ("a1" if get_task(task).n_classes else "b1")
    return task, default_case


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline described by ``argv``; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: _run(args), resume_hint="Rerun the same command to resume (training from its last "
                                                    "checkpoint, evaluations from the journal).")


def _run(args) -> int:
    from qslm_jax.models.loading import load_for_task
    from qslm_jax.models.registry import hierarchy_of
    from qslm_jax.qslm.distributed import is_main_process, output_dir
    from qslm_jax.qslm.pipeline import run_qslm
    from qslm_jax.qslm.settings import CASES, EXIT_NO_FEASIBLE, QSLMSettings, case_budget_mb
    from qslm_jax.tasks.task import get_task

    join_processes(args)
    task_name, case = _task_and_case(args)
    task = get_task(task_name)
    const_a = args.const_a if args.const_a is not None else CASES[case][1]
    check_search_arguments(args, const_a=const_a)  # before any model is loaded, trained or evaluated
    model, description = load_for_task(args.model, task, checkpoint=args.checkpoint, init=args.init,
                                       seed=args.seed, cache_dir=args.cache_dir, data_dir=args.data_dir,
                                       progress=not args.no_progress)
    fp32 = hierarchy_of(model).fp32_bytes
    if args.const_m is not None:
        const_m = args.const_m
    elif args.const_m_frac is not None:
        const_m = args.const_m_frac * fp32 / 1e6
    else:
        const_m = case_budget_mb(case, fp32)
    settings = QSLMSettings(const_a=const_a, const_m_mb=const_m, levels=args.levels, alpha=args.alpha,
                            alphas=args.alphas, eval_limit=args.eval_limit,
                            eval_batch_size=eval_batch_size(args, task), chunk_size=args.chunk_size,
                            devices=args.devices, memory_budget_gb=args.memory_budget_gb, case=case,
                            selection_split=args.selection_split, scheme=scheme_of(args), strategy=args.strategy,
                            stop=not args.no_stop, confidence=args.confidence)
    run_name = case if case and CASES[case][0] == task.name else f"{task.name}-{case}" if case else task.name
    with output_dir(args.out or Path("runs") / f"tiered-{Path(args.model).name}-{run_name}") as out:
        report, code = run_qslm(model, task, settings, out, model_description=description, data_dir=args.data_dir,
                                journal_path=args.journal, progress=not args.no_progress)
        print((out / "summary.md").read_text())
    if code == EXIT_NO_FEASIBLE:
        print(json.dumps(report["no_feasible"]["closest"], indent=1), file=sys.stderr)
    print(f"report: {out / 'report.json'}" if is_main_process() else "report: written by process 0")
    return code


if __name__ == "__main__":
    sys.exit(main())
