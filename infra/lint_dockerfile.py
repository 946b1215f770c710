"""Check the rules we rely on in a multi-stage Dockerfile; hadolint covers the rest.

Rules (the final stage is the image that runs):

* every ``FROM`` names a tag or digest, and not ``latest`` (ARG defaults resolved);
* ``apt-get install`` uses ``--no-install-recommends`` and removes
  ``/var/lib/apt/lists`` in the same ``RUN``;
* the final stage installs no compiler or build tool;
* the final stage switches to a user other than root;
* the final stage has a ``HEALTHCHECK`` (not ``NONE``) and an exec-form ``ENTRYPOINT``.

Usage: ``python infra/lint_dockerfile.py [Dockerfile]`` (exit 1 on any problem).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from checklib import REPO_ROOT, report

DEFAULT_DOCKERFILE = REPO_ROOT / "infra" / "docker" / "Dockerfile"
BUILD_TOOLS = frozenset(
    {
        "build-essential",
        "gcc",
        "g++",
        "make",
        "cmake",
        "clang",
        "cc",
        "ninja-build",
        "autoconf",
        "automake",
        "libtool",
        "pkg-config",
        "git",
    }
)
_ROOT_USERS = frozenset({"root", "0", "0:0", "root:root"})


@dataclass
class Instruction:
    """One instruction with its continuation lines joined."""

    line: int
    keyword: str
    argument: str


@dataclass
class Stage:
    """The instructions from one ``FROM`` to the next."""

    base: str
    name: str
    line: int
    instructions: list[Instruction] = field(default_factory=list)


def lint(text: str) -> list[str]:
    """Every rule violation in a Dockerfile's text, as readable lines."""
    instructions = parse(text)
    args = {
        i.argument.split("=", 1)[0]: i.argument.split("=", 1)[1].strip('"')
        for i in instructions
        if i.keyword == "ARG" and "=" in i.argument
    }
    stages = _stages(instructions)
    if not stages:
        return ["no FROM instruction"]

    problems = [p for stage in stages for p in _check_base(stage, args)]
    problems += [p for i in instructions if i.keyword == "RUN" for p in _check_apt(i)]
    problems += _check_final(stages[-1])
    return problems


def parse(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile, comments dropped and continuations joined."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue

        keyword, _, argument = (pending + stripped).partition(" ")
        out.append(Instruction(start, keyword.upper(), argument.strip()))
        pending = ""
    return out


def _stages(instructions: list[Instruction]) -> list[Stage]:
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.argument.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name, instruction.line))
        elif stages:
            stages[-1].instructions.append(instruction)
    return stages


def _check_base(stage: Stage, args: dict[str, str]) -> list[str]:
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), stage.base)
    if base == "scratch" or "@sha256:" in base:
        return []
    if "$" in base:
        return [f"line {stage.line}: FROM {stage.base}: ARG without a default"]

    image = base.rsplit("/", 1)[-1]
    if ":" not in image:
        return [f"line {stage.line}: FROM {base}: pin a tag (e.g. python:3.11-slim)"]
    if image.endswith(":latest"):
        return [f"line {stage.line}: FROM {base}: 'latest' is not a pinned tag"]
    return []


def _check_apt(run: Instruction) -> list[str]:
    if not re.search(r"apt-get\s+(-\S+\s+)*install", run.argument):
        return []
    problems = []
    if "--no-install-recommends" not in run.argument:
        problems.append(f"line {run.line}: apt-get install without --no-install-recommends")
    if "/var/lib/apt/lists" not in run.argument:
        problems.append(
            f"line {run.line}: apt lists not removed in the same RUN "
            "(add && rm -rf /var/lib/apt/lists/*)"
        )
    return problems


def _check_final(stage: Stage) -> list[str]:
    label = stage.name or stage.base
    problems = [
        f"final stage {label}: line {i.line} installs build tool(s) {', '.join(sorted(tools))}"
        for i in stage.instructions
        if i.keyword == "RUN"
        for tools in [_installed_tools(i.argument)]
        if tools
    ]

    users = [i for i in stage.instructions if i.keyword == "USER"]
    if not users:
        problems.append(f"final stage {label}: no USER, so it runs as root")
    elif users[-1].argument.strip() in _ROOT_USERS:
        problems.append(f"final stage {label}: line {users[-1].line}: USER is root")

    checks = [i for i in stage.instructions if i.keyword == "HEALTHCHECK"]
    if not checks or checks[-1].argument.upper().startswith("NONE"):
        problems.append(f"final stage {label}: no HEALTHCHECK")

    entry = [i for i in stage.instructions if i.keyword == "ENTRYPOINT"]
    if not entry or not _is_exec_form(entry[-1].argument):
        problems.append(f"final stage {label}: ENTRYPOINT missing or not in exec form")
    return problems


def _installed_tools(command: str) -> set[str]:
    installs = re.findall(
        r"(?:apt-get|apt|apk|dnf|yum)\s+(?:-\S+\s+)*(?:install|add)\s+([^&;|]+)", command
    )
    packages = {word for part in installs for word in part.split() if not word.startswith("-")}
    return {p for p in packages if p in BUILD_TOOLS or p.endswith("-dev")}


def _is_exec_form(argument: str) -> bool:
    try:
        value = json.loads(argument)
    except ValueError:
        return False
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def main(argv: list[str]) -> int:
    """Lint the Dockerfile named in ``argv`` (default: the project's) and report."""
    path = Path(argv[0]) if argv else DEFAULT_DOCKERFILE
    return report(f"lint_dockerfile {path.name}", lint(path.read_text(encoding="utf-8")))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
