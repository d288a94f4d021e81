#!/usr/bin/env bash
# Install the reference tools the signed/encrypted snapshot tests check mapsnap against:
# Debian's `minisign` (signatures) and `age` (encryption), and `ssh-keygen` (openssh-client)
# to make the ssh-ed25519 keys age accepts as recipients and identities.
#
# Idempotent: prints only what it changes. Must run as root. Called by scripts/install-deps.sh.
set -euo pipefail

say() { printf 'install-trust-tools: %s\n' "$*"; }
die() { printf 'install-trust-tools: error: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (apt-get); try: sudo $0"

PKGS=(minisign age openssh-client)
missing=()
for p in "${PKGS[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [[ "$status" == installed ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    say "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    }
fi
for tool in minisign age age-keygen ssh-keygen; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not on PATH after installing"
done
