#!/usr/bin/env bash
# Install the reference tools the signed/encrypted snapshot tests check mapsnap against:
# Debian's `minisign` (signatures) and `age` (encryption), and `ssh-keygen` (openssh-client)
# to make the ssh-ed25519 keys age accepts as recipients and identities.
#
# Idempotent: prints only what it changes. Must run as root. Called by scripts/install-deps.sh.
set -euo pipefail

say() { printf 'install-trust-tools: %s\n' "$*"; }
die() { printf 'install-trust-tools: error: %s\n' "$*" >&2; exit 1; }

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ "$(id -u)" -eq 0 ]] || die "must run as root (apt-get); try: sudo $0"

PKGS=(minisign age openssh-client)
apt_install "${PKGS[@]}"
for tool in minisign age age-keygen ssh-keygen; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not on PATH after installing"
done
