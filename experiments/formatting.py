"""The ``--help`` layout every entry point shares (a light module: importing it pulls in nothing heavy)."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default in ``--help`` once: appended as ``(default: X)`` unless it is unset (None) or a
    switch (False), whose help text says in words what happens by default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
