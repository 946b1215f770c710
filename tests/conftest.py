"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Read-only data sets: ``$FEDQ_TEST_DATA``, else ``../shared/data`` next to the repo."""
    root = Path(os.environ.get("FEDQ_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip(f"test data not found under {root}; set FEDQ_TEST_DATA")
    return root
