"""Check docker-compose.yml and the monitoring files it mounts, without a Docker engine.

What it verifies:

* every service has an ``image`` (tagged, not ``latest``) or a ``build`` whose
  context and Dockerfile exist; bind-mounted host paths exist; named volumes
  are declared;
* every ``depends_on`` names a service, and ``service_healthy`` only a service
  with a health check (its own or the fedq image's);
* the worker can be scaled: no ``container_name``, no fixed host port;
* fedq services run a subcommand the ``fedq`` entry point has, and every
  ``FEDQ_*`` variable they set is one the services read;
* Prometheus targets are compose services, and the Grafana dashboard only
  queries metrics that the services define (``fedq/metrics.py`` and the
  coordinator API's own gauges).

Usage: ``python infra/check_compose.py [docker-compose.yml]`` (exit 1 on any problem).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from checklib import (
    REPO_ROOT,
    SETTINGS_SOURCES,
    fedq_commands,
    known_fedq_variables,
    load_yaml_documents,
    report,
)

DEFAULT_COMPOSE = REPO_ROOT / "docker-compose.yml"
FEDQ_DOCKERFILE = "infra/docker/Dockerfile"
SCALED_SERVICES = ("worker",)
_METRIC_NAME = re.compile(r"\b(fedq_[a-z0-9_]+)")
_DEFINED_METRIC = re.compile(r"\b(?:Counter|Gauge|Histogram|Summary)\(\s*\"(fedq_[a-z0-9_]+)\"")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def check(compose_path: Path) -> tuple[list[str], list[str]]:
    """Problems and warnings of a compose file and the files it refers to."""
    compose = load_yaml_documents(compose_path)[0]
    base = compose_path.parent
    services: dict[str, dict[str, Any]] = compose.get("services") or {}
    if not services:
        return ["no services"], []

    problems: list[str] = []
    for name, service in services.items():
        problems += _check_source(name, service, base)
        problems += _check_volumes(name, service, base, set(compose.get("volumes") or {}))
        problems += _check_depends_on(name, service, services)
    problems += _check_scaling(services)
    problems += _check_fedq_services(services)

    prometheus = _bind_source(services.get("prometheus", {}), "/etc/prometheus/prometheus.yml")
    if prometheus is not None:
        problems += check_prometheus(base / prometheus, set(services))
    dashboards = _bind_source(services.get("grafana", {}), "/var/lib/grafana/dashboards")
    if dashboards is not None:
        for dashboard in sorted((base / dashboards).glob("*.json")):
            problems += check_dashboard(dashboard)
    return problems, []


def check_prometheus(path: Path, services: set[str]) -> list[str]:
    """Scrape targets must be compose services (or Prometheus itself)."""
    if not path.is_file():
        return [f"prometheus config {path} missing"]
    config = load_yaml_documents(path)[0]

    problems = []
    for job in config.get("scrape_configs") or []:
        hosts = [
            t.rsplit(":", 1)[0]
            for static in job.get("static_configs") or []
            for t in static.get("targets") or []
        ]
        hosts += [n for dns in job.get("dns_sd_configs") or [] for n in dns.get("names") or []]
        problems += [
            f"prometheus job {job.get('job_name')}: target {host!r} is no service"
            for host in hosts
            if host not in services | {"localhost"}
        ]
    return problems


def check_dashboard(path: Path) -> list[str]:
    """Dashboard queries may only use metrics that the services define."""
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    defined = defined_metrics()

    problems = []
    for panel in dashboard.get("panels") or []:
        for target in panel.get("targets") or []:
            for metric in _METRIC_NAME.findall(target.get("expr", "")):
                if _base_metric(metric) not in defined:
                    problems.append(
                        f"{path.name}: panel {panel.get('title')!r} queries "
                        f"{metric}, which no fedq service defines"
                    )
    return problems


def defined_metrics(root: Path = REPO_ROOT) -> set[str]:
    """Names of the Prometheus metrics created anywhere in the services' source."""
    return {
        name
        for package in SETTINGS_SOURCES
        for path in sorted((root / package).rglob("*.py"))
        for name in _DEFINED_METRIC.findall(path.read_text(encoding="utf-8"))
    }


def _base_metric(name: str) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_source(name: str, service: dict[str, Any], base: Path) -> list[str]:
    build, image = service.get("build"), service.get("image")
    if not build and not image:
        return [f"{name}: neither image nor build"]

    problems = []
    if image and ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
        problems.append(f"{name}: image {image} has no tag")
    elif image and image.endswith(":latest"):
        problems.append(f"{name}: image {image} uses 'latest'")
    if build:
        context = base / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        if not context.is_dir():
            problems.append(f"{name}: build context {context} missing")
        elif not (context / dockerfile).is_file():
            problems.append(f"{name}: Dockerfile {context / dockerfile} missing")
    return problems


def _check_volumes(name: str, service: dict[str, Any], base: Path, declared: set[str]) -> list[str]:
    problems = []
    for volume in service.get("volumes") or []:
        source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
        if source.startswith((".", "/")):
            if not (base / source).exists():
                problems.append(f"{name}: bind mount source {source} missing")
        elif source and source not in declared:
            problems.append(f"{name}: volume {source} not declared under volumes:")
    return problems


def _check_depends_on(
    name: str, service: dict[str, Any], services: dict[str, dict[str, Any]]
) -> list[str]:
    depends = service.get("depends_on") or {}
    conditions = (
        {d: "service_started" for d in depends}
        if isinstance(depends, list)
        else {d: (c or {}).get("condition", "service_started") for d, c in depends.items()}
    )

    problems = []
    for other, condition in conditions.items():
        if other not in services:
            problems.append(f"{name}: depends_on {other}, which is no service")
        elif condition == "service_healthy" and not _has_healthcheck(services[other]):
            problems.append(f"{name}: waits for {other} to be healthy, which has no healthcheck")
    return problems


def _has_healthcheck(service: dict[str, Any]) -> bool:
    if service.get("healthcheck"):
        return not service["healthcheck"].get("disable", False)
    return _is_fedq(service)  # the fedq image declares a HEALTHCHECK


def _check_scaling(services: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    for name in SCALED_SERVICES:
        service = services.get(name)
        if service is None:
            problems.append(f"no {name} service")
            continue
        if "container_name" in service:
            problems.append(f"{name}: container_name prevents --scale {name}=N")
        fixed = [p for p in service.get("ports") or [] if ":" in str(p)]
        if fixed:
            problems.append(f"{name}: fixed host port(s) {fixed} prevent --scale {name}=N")
    return problems


def _check_fedq_services(services: dict[str, dict[str, Any]]) -> list[str]:
    commands, variables = fedq_commands(), known_fedq_variables()

    problems = []
    for name, service in services.items():
        if not _is_fedq(service):
            continue
        command = service.get("command") or ["coordinator"]
        command = command.split() if isinstance(command, str) else command
        if command[0] not in commands:
            problems.append(
                f"{name}: `fedq {command[0]}` is not a fedq subcommand "
                f"(have: {', '.join(sorted(commands))})"
            )
        environment = service.get("environment") or {}
        keys = (
            environment
            if isinstance(environment, dict)
            else [e.split("=", 1)[0] for e in environment]
        )
        problems += [
            f"{name}: {key} is not read by any fedq service"
            for key in keys
            if key.startswith("FEDQ_") and key not in variables
        ]
    return problems


def _is_fedq(service: dict[str, Any]) -> bool:
    build = service.get("build")
    return isinstance(build, dict) and build.get("dockerfile") == FEDQ_DOCKERFILE


def _bind_source(service: dict[str, Any], target: str) -> str | None:
    for volume in service.get("volumes") or []:
        if isinstance(volume, str) and volume.split(":")[1:2] == [target]:
            return volume.split(":", 1)[0]
    return None


def main(argv: list[str]) -> int:
    """Check the compose file named in ``argv`` (default: the project's) and report."""
    path = Path(argv[0]) if argv else DEFAULT_COMPOSE
    problems, warnings = check(path)
    return report(f"check_compose {path.name}", problems, warnings)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
