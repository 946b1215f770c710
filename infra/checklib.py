"""Shared pieces of the offline infrastructure checks (``infra/check_*.py``).

Each checker collects problems as strings and exits 1 when there is any, so that
``infra/check.sh`` and ``tests/test_infra.py`` can run them without a Docker
engine, a cluster or an AWS account.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "REPO_ROOT",
    "SETTINGS_SOURCES",
    "fedq_commands",
    "known_fedq_variables",
    "load_yaml_documents",
    "report",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTINGS_SOURCES = ("fedq", "coordinator", "workers", "clients")

# EnvReader calls such as env.int("ROUNDS", 5, ...) name the variable without its prefix.
_ENV_READER_CALL = re.compile(r"\benv\.(?:str|int|float|bool|list)\(\s*\"([A-Z0-9_]+)\"")
_ENVIRON_GET = re.compile(r"environ\.get\(\s*\"(FEDQ_[A-Z0-9_]+)\"")


def known_fedq_variables(root: Path = REPO_ROOT) -> set[str]:
    """Every ``FEDQ_*`` variable the services read, found in their source."""
    names: set[str] = set()
    for package in SETTINGS_SOURCES:
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            names.update("FEDQ_" + name for name in _ENV_READER_CALL.findall(text))
            names.update(_ENVIRON_GET.findall(text))
    return names


def fedq_commands() -> set[str]:
    """The subcommands the ``fedq`` entry point accepts today."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    # NOTE: reads the private parser on purpose: it is the one list of subcommands.
    from fedq.cli import _parser

    parser = _parser()
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse has no public API
        return set(action.choices)
    return set()


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a file."""
    import yaml

    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def report(name: str, problems: Iterable[str], warnings: Iterable[str] = ()) -> int:
    """Print what a checker found and return its exit status."""
    problems, warnings = list(problems), list(warnings)
    for line in warnings:
        print(f"{name}: warning: {line}")
    for line in problems:
        print(f"{name}: error: {line}")
    if problems:
        print(f"{name}: {len(problems)} problem(s)")
        return 1
    print(f"{name}: ok")
    return 0
