#!/usr/bin/env bash
# Installs everything OneCDP needs on a fresh machine; quick no-op when it is already installed.
#   - .venv with the project (editable) and its dev tools, reinstalled when pyproject.toml changes
#   - grpcurl (pinned) into .venv/bin, built with `go install` (the Go module proxy is reachable here)
#   - kustomize (pinned) into .venv/bin the same way; deploy/manifests.py renders k8s/ overlays with it
#   - the Cassandra jars from Maven Central into ~/.cache/onecdp (see deploy/cassandra.py)
set -euo pipefail
cd "$(dirname "$0")/.."

GRPCURL_VERSION=v1.9.4
KUSTOMIZE_VERSION=v5.8.1
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

"$PYTHON" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)' \
  || { echo "Python 3.11 or 3.12 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  step "installing OneCDP and its dependencies into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev,demo]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

# `go install` builds leave grpcurl's own -version unset, so a stamp file records what was installed.
if [ ! -x "$VENV/bin/grpcurl" ] || [ ! -f "$VENV/.grpcurl-$GRPCURL_VERSION" ]; then
  command -v go >/dev/null || { echo "Go is required to install grpcurl (go install)" >&2; exit 1; }
  step "installing grpcurl $GRPCURL_VERSION into $VENV/bin"
  GOBIN="$PWD/$VENV/bin" go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
  touch "$VENV/.grpcurl-$GRPCURL_VERSION"
fi

# Same pattern for kustomize: a pinned binary, so CI renders the manifests the same way everywhere.
# v5.8.1 needs Go >= 1.24 (grpcurl above already needs 1.25); v5.8.2+ would raise the floor to Go 1.26.
if [ ! -x "$VENV/bin/kustomize" ] || [ ! -f "$VENV/.kustomize-$KUSTOMIZE_VERSION" ]; then
  command -v go >/dev/null || { echo "Go is required to install kustomize (go install)" >&2; exit 1; }
  step "installing kustomize $KUSTOMIZE_VERSION into $VENV/bin"
  GOBIN="$PWD/$VENV/bin" go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
  rm -f "$VENV"/.kustomize-*
  touch "$VENV/.kustomize-$KUSTOMIZE_VERSION"
fi

command -v java >/dev/null || { echo "Java 17 is required to run Cassandra" >&2; exit 1; }
command -v mvn >/dev/null || { echo "Maven is required to fetch Cassandra from Maven Central" >&2; exit 1; }
"$VENV/bin/python" -m deploy.cassandra fetch
