"""Every flag of every entry point has help text, no help text states its default twice, and ``--help`` imports
no JAX."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import pytest

from experiments import names
from tests.conftest import REPO_ROOT

ENTRY_POINTS = sorted(p.stem for p in (REPO_ROOT / "experiments").glob("*.py")
                      if 'if __name__ == "__main__":' in p.read_text())


class _Parsed(Exception):
    """Raised in place of parsing: the parser the entry point built is what the test needs."""


def _parsers_of(name: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """The parser(s) ``experiments.<name>.main`` builds (bench: one per sub-command), captured at parse time."""
    seen: list[argparse.ArgumentParser] = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(f"experiments.{name}")
    argvs = [[sub] for sub in module.SUBCOMMANDS] if name == "bench" else [[]]
    for argv in argvs:
        with pytest.raises(_Parsed):
            module.main(argv)
    parsers = []
    for parser in seen:
        parsers.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return parsers


def test_every_entry_point_is_walked():
    assert {"tiered", "sensitivity", "finetune", "evaluate", "extreme_kd", "bench", "inspect", "tables"} <= \
        set(ENTRY_POINTS)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_flag_has_help_and_states_its_default_once(name, monkeypatch):
    missing, doubled = [], []
    for parser in _parsers_of(name, monkeypatch):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            if not (action.help or "").strip():
                missing.append(f"{parser.prog} {flag}")
            elif parser._get_formatter()._expand_help(action).lower().count("default") > 1:
                doubled.append(f"{parser.prog} {flag}")  # e.g. "default 64 (sst2) (default: None)"
    assert not missing, f"flags without help: {missing}"
    assert not doubled, f"flags whose default is printed twice: {doubled}"


HEAVY = ("jax", "flax", "optax", "orbax", "matplotlib", "torch", "transformers", "datasets")
_HELP_IN_A_FRESH_INTERPRETER = """
import contextlib, io, runpy, sys
sys.argv = ["{name}", *{sub}, "--help"]
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    runpy.run_module("experiments.{name}", run_name="__main__")
print(out.getvalue().startswith("usage:"), sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy})))
"""


def _help_commands() -> list[tuple[str, list[str]]]:
    from experiments.bench import SUBCOMMANDS

    return [(name, []) for name in ENTRY_POINTS] + [("bench", [sub]) for sub in SUBCOMMANDS]


@pytest.mark.parametrize(("name", "sub"), _help_commands())
def test_help_imports_no_jax(name, sub):
    """``python -m experiments.X [sub-command] --help`` builds its parser and answers without importing JAX (or
    any other heavy library): the imports come after parsing, so help is immediate."""
    code = _HELP_IN_A_FRESH_INTERPRETER.format(name=name, sub=sub, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "[]"], f"--help of experiments.{name} {sub} imported {done.stdout}"


def test_the_names_the_parsers_offer_are_the_librarys():
    """experiments.names (plain data, so that parsers need no JAX) agrees with every table it mirrors."""
    from qslm_jax.equilibrium.memory import METHODS
    from qslm_jax.equilibrium.solvers import SOLVERS
    from qslm_jax.equilibrium.student import KDObjective
    from qslm_jax.finetune.finetuning import EMBEDDED_PRESET
    from qslm_jax.models.registry import all_presets
    from qslm_jax.models.spikegpt import MODES, PRESETS
    from qslm_jax.models.spikingbert import GRADIENT_POINTS, SPIKINGBERT_PRESETS
    from qslm_jax.qslm import selection, settings
    from qslm_jax.quant.quantizers import QuantScheme
    from qslm_jax.tasks.data import LM_TRAIN_TEXTS
    from qslm_jax.tasks.task import TASKS

    mirrored = {"SPIKEGPT_PRESETS": PRESETS, "SPIKINGBERT_PRESETS": SPIKINGBERT_PRESETS,
                "MODEL_PRESETS": all_presets(), "EMBEDDED_PRESET": EMBEDDED_PRESET, "MODES": MODES, "TASKS": TASKS,
                "LM_TRAIN_TEXTS": LM_TRAIN_TEXTS,
                "CASES": settings.CASES, "STRATEGIES": settings.STRATEGIES, "DEFAULT_LEVELS": settings.DEFAULT_LEVELS,
                "SELECTION_SPLITS": settings.SELECTION_SPLITS, "ALPHAS": selection.ALPHAS,
                "SCHEMES": QuantScheme.PRESETS, "SOLVERS": SOLVERS, "GRADIENT_POINTS": GRADIENT_POINTS,
                "KD_OBJECTIVES": KDObjective.PRESETS, "MEMORY_METHODS": METHODS}
    offered = {name: value for name, value in vars(names).items() if name.isupper()}
    assert offered.keys() == mirrored.keys()
    for name, table in mirrored.items():
        expected = table if isinstance(table, str) else tuple(table)  # a dict: its keys, in order
        assert offered[name] == expected, f"experiments.names.{name} differs from the library's {expected}"
