#!/usr/bin/env bash
# Install Podman (with runc, conmon) and skopeo for the checkpoint/restore end-to-end tests,
# and put a `criu` on PATH: Podman and runc look CRIU up by that name, and the CRIU that runs
# on current kernels is the 4.1 wrapper scripts/install-criu.sh installs
# (/usr/local/sbin/criu-mapsnap). Run install-criu.sh first (install-deps.sh does).
#
# No CRIU config (/etc/criu/runc.conf) and no hooks are written here: the tests pass their
# own (a private hooks directory, CRIU's config through the container's annotations).
#
# Idempotent: prints only what it changes. Must run as root. Environment:
#   MAPSNAP_CRIU_WRAPPER   the CRIU wrapper (default /usr/local/sbin/criu-mapsnap)
#   MAPSNAP_CRIU_LINK      the `criu` to create (default /usr/local/sbin/criu)
set -euo pipefail

WRAPPER=${MAPSNAP_CRIU_WRAPPER:-/usr/local/sbin/criu-mapsnap}
LINK=${MAPSNAP_CRIU_LINK:-/usr/local/sbin/criu}

say() { printf 'install-podman: %s\n' "$*"; }
die() { printf 'install-podman: error: %s\n' "$*" >&2; exit 1; }

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ "$(id -u)" -eq 0 ]] || die "must run as root (apt-get, /usr/local/sbin); try: sudo $0"

# podman pulls in conmon, runc (or crun), containers-common, netavark/cni; uidmap and
# fuse-overlayfs are for rootless use only, so no recommends.
PKGS=(podman skopeo runc conmon)
apt_install "${PKGS[@]}"

# `criu` on PATH -> the CRIU 4.1 wrapper. Bookworm's own criu 3.17 does not run on current
# kernels; if it is installed as /usr/sbin/criu, /usr/local/sbin comes first on PATH.
[[ -x "$WRAPPER" ]] || die "$WRAPPER missing: run scripts/install-criu.sh first"
if [[ "$(readlink "$LINK" 2>/dev/null || true)" != "$WRAPPER" ]]; then
    if [[ -e "$LINK" && ! -L "$LINK" ]]; then
        die "$LINK exists and is not our symlink; remove it or set MAPSNAP_CRIU_LINK"
    fi
    mkdir -p "$(dirname "$LINK")"
    ln -sfn "$WRAPPER" "$LINK"
    say "linked $LINK -> $WRAPPER"
fi
command -v podman >/dev/null 2>&1 || die "podman not on PATH after installing"
