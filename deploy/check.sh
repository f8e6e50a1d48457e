#!/usr/bin/env bash
# The whole test suite: generated code current, protos lint-clean, ruff, mypy, the Kubernetes manifests,
# then pytest (which starts or reuses a real Cassandra). Run through `make test` after deploy/bootstrap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
started=$(date +%s)

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

step "generated code is current";  "$PY" protos/generate.py --check
step "buf lint";                   "$PY" protos/generate.py --lint
step "ruff";                       .venv/bin/ruff check .
step "mypy";                       .venv/bin/mypy shared services deploy tests protos/generate.py
# Renders k8s/overlays/* with the pinned kustomize, validates them strictly against the Kubernetes
# API schemas, and checks env vars, ports, probes and targets against shared/config.py.
step "kubernetes manifests";       "$PY" -m deploy.manifests check
step "pytest"
# pytest exits 5 when it collected no tests; with `set -e` that fails the suite, as it should.
"$PY" -m pytest "$@"
echo "suite finished in $(( $(date +%s) - started )) s"
