"""Validate the Kubernetes manifests in ``infra/k8s`` offline.

* Built-in kinds go through ``kubernetes-validate`` (strict: unknown fields fail)
  for ``KUBERNETES_VERSION``.
* KEDA's ScaledObject and TriggerAuthentication are not in those schemas; they
  are checked against the JSON schemas in ``infra/k8s/schemas`` with jsonschema.
* References are followed: Services select a Deployment's pods and name its
  ports, ``envFrom`` and KEDA's secrets exist with the keys used, the
  ScaledObject targets a Deployment and reads the queue the workers consume,
  containers run a ``fedq`` subcommand, and ConfigMap keys are known settings.

Usage: ``python infra/check_k8s.py [--skip-builtin] [folder]`` (exit 1 on any problem).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from checklib import REPO_ROOT, fedq_commands, known_fedq_variables, load_yaml_documents, report

DEFAULT_FOLDER = REPO_ROOT / "infra" / "k8s"
KUBERNETES_VERSION = "1.30.0"
KEDA_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.schema.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication.schema.json",
}

Doc = dict[str, Any]


def check(folder: Path, *, builtin: bool = True) -> list[str]:
    """Every problem found in the manifests of ``folder``."""
    docs = [
        (path.name, doc)
        for path in sorted(folder.glob("*.yaml"))
        for doc in load_yaml_documents(path)
    ]
    if not docs:
        return [f"no manifests in {folder}"]

    problems = []
    for source, doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in KEDA_SCHEMAS:
            problems += _validate_keda(source, doc, folder / "schemas" / KEDA_SCHEMAS[key])
        elif builtin:
            problems += _validate_builtin(source, doc)
    problems += check_references([doc for _, doc in docs])
    return problems


def check_references(docs: list[Doc]) -> list[str]:
    """Cross-object checks that no schema can express."""
    index = {
        (d["kind"], d["metadata"].get("namespace", "default"), d["metadata"]["name"]): d
        for d in docs
    }
    problems = []
    for doc in docs:
        kind = doc["kind"]
        if kind == "Deployment":
            problems += _check_deployment(doc, index)
        elif kind == "Service":
            problems += _check_service(doc, index)
        elif kind == "ScaledObject":
            problems += _check_scaled_object(doc, index)
        elif kind == "TriggerAuthentication":
            problems += _check_trigger_auth(doc, index)
        elif kind == "ConfigMap":
            unknown = sorted(set(doc.get("data") or {}) - known_fedq_variables())
            problems += [
                f"ConfigMap {_name(doc)}: {key} is not read by any fedq service"
                for key in unknown
                if key.startswith("FEDQ_")
            ]
    return problems


def _validate_builtin(source: str, doc: Doc) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{source}: {doc['kind']} {_name(doc)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{source}: no schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    return []


def _validate_keda(source: str, doc: Doc, schema_path: Path) -> list[str]:
    from jsonschema import Draft202012Validator

    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    return [
        f"{source}: {doc['kind']} {_name(doc)}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def _check_deployment(doc: Doc, index: dict[tuple[str, str, str], Doc]) -> list[str]:
    namespace, name = _namespace(doc), _name(doc)
    spec = doc["spec"]
    problems = []
    selector = spec["selector"].get("matchLabels", {})
    labels = spec["template"]["metadata"].get("labels", {})
    if any(labels.get(k) != v for k, v in selector.items()):
        problems.append(f"Deployment {name}: selector does not match the pod labels")

    commands = fedq_commands()
    for container in spec["template"]["spec"]["containers"]:
        args = container.get("args") or []
        if container.get("image", "").startswith("fedq") and args and args[0] not in commands:
            problems.append(f"Deployment {name}: `fedq {args[0]}` is not a fedq subcommand")
        for source in container.get("envFrom") or []:
            for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if ref in source and (kind, namespace, source[ref]["name"]) not in index:
                    problems.append(f"Deployment {name}: {kind} {source[ref]['name']} missing")
    return problems


def _check_service(doc: Doc, index: dict[tuple[str, str, str], Doc]) -> list[str]:
    namespace, name = _namespace(doc), _name(doc)
    selector = doc["spec"].get("selector") or {}
    for (kind, ns, _), other in index.items():
        if kind != "Deployment" or ns != namespace:
            continue
        template = other["spec"]["template"]
        if all(template["metadata"].get("labels", {}).get(k) == v for k, v in selector.items()):
            ports = {
                p.get("name") for c in template["spec"]["containers"] for p in c.get("ports") or []
            }
            return [
                f"Service {name}: targetPort {p['targetPort']} is no container port"
                for p in doc["spec"]["ports"]
                if isinstance(p.get("targetPort"), str) and p["targetPort"] not in ports
            ]
    return [f"Service {name}: selector {selector} matches no Deployment"]


def _check_scaled_object(doc: Doc, index: dict[tuple[str, str, str], Doc]) -> list[str]:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from fedq.queue.base import UPDATES_QUEUE

    namespace, name, spec = _namespace(doc), _name(doc), doc["spec"]
    problems = []
    target = spec["scaleTargetRef"]
    if (target.get("kind", "Deployment"), namespace, target["name"]) not in index:
        problems.append(f"ScaledObject {name}: target {target['name']} missing")
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        problems.append(f"ScaledObject {name}: minReplicaCount above maxReplicaCount")

    for trigger in spec["triggers"]:
        auth = (trigger.get("authenticationRef") or {}).get("name")
        if auth and ("TriggerAuthentication", namespace, auth) not in index:
            problems.append(f"ScaledObject {name}: TriggerAuthentication {auth} missing")
        queue = trigger["metadata"].get("queueName")
        if trigger["type"] == "rabbitmq" and queue != UPDATES_QUEUE:
            problems.append(
                f"ScaledObject {name}: scales on queue {queue!r}, workers consume {UPDATES_QUEUE!r}"
            )
    return problems


def _check_trigger_auth(doc: Doc, index: dict[tuple[str, str, str], Doc]) -> list[str]:
    namespace, name = _namespace(doc), _name(doc)
    problems = []
    for ref in doc["spec"].get("secretTargetRef") or []:
        secret = index.get(("Secret", namespace, ref["name"]))
        if secret is None:
            problems.append(f"TriggerAuthentication {name}: Secret {ref['name']} missing")
        elif ref["key"] not in {**(secret.get("data") or {}), **(secret.get("stringData") or {})}:
            problems.append(
                f"TriggerAuthentication {name}: Secret {ref['name']} has no key {ref['key']}"
            )
    return problems


def _name(doc: Doc) -> str:
    return str(doc.get("metadata", {}).get("name", "?"))


def _namespace(doc: Doc) -> str:
    return str(doc.get("metadata", {}).get("namespace", "default"))


def main(argv: list[str]) -> int:
    """Check the manifests of the folder named in ``argv`` (default: infra/k8s)."""
    builtin = "--skip-builtin" not in argv
    folders = [a for a in argv if not a.startswith("--")]
    folder = Path(folders[0]) if folders else DEFAULT_FOLDER
    return report(f"check_k8s {folder.name}", check(folder, builtin=builtin))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
