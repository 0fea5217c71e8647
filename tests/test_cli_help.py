"""Every flag of every entry point has help text, and no help text states its default twice."""

from __future__ import annotations

import argparse
import importlib

import pytest

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
