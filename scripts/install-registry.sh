#!/usr/bin/env bash
# Install a real OCI registry for the checkpoint-image tests: Debian's `docker-registry`
# (the CNCF distribution registry), `skopeo` to inspect what was pushed, and what the tests
# use to give the registry a password (`htpasswd -B`, apache2-utils) and a TLS certificate
# (`openssl`). The registry is
# NOT started or enabled here: each test starts its own `docker-registry serve CONFIG` on
# 127.0.0.1 with a private root, and stops it.
#
# Idempotent: prints only what it changes. Must run as root. Called by scripts/install-deps.sh.
set -euo pipefail

say() { printf 'install-registry: %s\n' "$*"; }
die() { printf 'install-registry: error: %s\n' "$*" >&2; exit 1; }

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ "$(id -u)" -eq 0 ]] || die "must run as root (apt-get); try: sudo $0"

PKGS=(docker-registry skopeo apache2-utils openssl)
apt_install "${PKGS[@]}"
if ((APT_INSTALLED)); then
    # The package starts a system registry on :5000; the tests run their own, so stop and
    # disable the packaged one (it would only hold a port and a directory).
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
        say "stopping and disabling the packaged docker-registry service"
        systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
fi
command -v docker-registry >/dev/null 2>&1 || die "docker-registry not on PATH after installing"
