"""Shared test fixtures: where ../shared lives, offline hub settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _shared_root() -> Path:
    data = os.environ.get("QSLM_DATA_DIR")
    return Path(data).resolve().parent if data else REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``shared/fixtures`` (reference outputs of the original PyTorch code); skips when absent."""
    path = _shared_root() / "fixtures"
    if not path.is_dir():
        pytest.skip(f"reference fixtures not found at {path} (set QSLM_DATA_DIR to <shared>/data)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``shared/data`` (benchmark data and tokenizers); skips when absent."""
    path = Path(os.environ["QSLM_DATA_DIR"]) if "QSLM_DATA_DIR" in os.environ else _shared_root() / "data"
    if not path.is_dir():
        pytest.skip(f"benchmark data not found at {path} (set QSLM_DATA_DIR)")
    return path
