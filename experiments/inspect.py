"""Print a model's quantization units (the QSLM paper's Table I) from shapes only: no weights are built.

``python -m experiments.inspect --model spikegpt216m`` (or any registered preset, e.g. ``spikingbert-small``)
lists every block and module with its parameter count and MB at fp32 (MB = 10^6 bytes); ``--plan plan.json``
adds the memory under a plan. The model is built with ``nnx.eval_shape``, so even the 216M preset takes well
under a second and no memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments import names
from experiments.common import exit_status
from experiments.formatting import DefaultsFormatter

MODELS = names.MODEL_PRESETS


def abstract_model(name: str, n_classes: int = 0):
    """The named preset (any registered family) as an abstract model (``nnx.eval_shape``: shapes, no weights);
    ``n_classes`` > 0 gives it a classifier of that width."""
    from qslm_jax.models.registry import preset_family

    family = preset_family(name)
    return family.abstract(family.config(name, n_classes=n_classes or None))


def main(argv: list[str] | None = None) -> dict:
    """Print the unit table of ``--model`` (and its memory under ``--plan``); return it as a dict."""
    parser = argparse.ArgumentParser(prog="python -m experiments.inspect", description=__doc__,
                                     formatter_class=DefaultsFormatter)
    parser.add_argument("--model", default="spikegpt216m", choices=MODELS, help="model preset")
    parser.add_argument("--n-classes", type=int, default=0, help="add a classifier with this many classes")
    parser.add_argument("--scheme", default="minmax", choices=sorted(names.SCHEMES),
                        help="quantization scheme (scale storage, whether vectors are quantized)")
    parser.add_argument("--plan", type=Path, default=None, help="QuantPlan JSON to account for")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    from qslm_jax.models.registry import hierarchy_of
    from qslm_jax.quant.memory import format_table, memory_report
    from qslm_jax.quant.plan import QuantPlan
    from qslm_jax.quant.quantizers import QuantScheme

    hierarchy = hierarchy_of(abstract_model(args.model, args.n_classes), scheme=QuantScheme.preset(args.scheme))
    plan = QuantPlan.load(args.plan) if args.plan else None
    print(f"{args.model} ({hierarchy.family}), scheme {args.scheme}: {len(hierarchy.blocks)} blocks, "
          f"{len(hierarchy.modules)} modules, {len(hierarchy.tensors)} tensors")
    print(format_table(hierarchy, plan))
    fp32 = memory_report(hierarchy, QuantPlan())
    result = {
        "model": args.model, "family": hierarchy.family, "scheme": hierarchy.scheme.to_dict(),
        "params": hierarchy.numel(), "fp32_bytes": hierarchy.fp32_bytes,
        "blocks": [{"block": b, "params": hierarchy.numel(block=b), "fp32_bytes": fp32.block_bytes[b],
                    "modules": [{"module": m, "params": hierarchy.numel(module=m),
                                 "fp32_bytes": fp32.module_bytes[m]} for m in hierarchy.modules_of(b)]}
                   for b in hierarchy.blocks],
    }
    if plan is not None:
        result["plan"] = plan.to_dict()
        result["plan_memory"] = memory_report(hierarchy, plan).to_dict()
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(exit_status(main))
