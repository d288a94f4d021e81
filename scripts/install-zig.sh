#!/usr/bin/env bash
# Install what scripts/build-criu-plugin.sh needs to link the CRIU plugin against an old
# glibc: zig (from PyPI's `ziglang` package, which ships the zig binary and its glibc stubs)
# and cargo-zigbuild (crates.io), which makes zig the linker for a `<triple>.<glibc>` target.
#
# Idempotent and quiet when both are present. Called by scripts/install-deps.sh.
# Environment:
#   MAPSNAP_ZIG_VERSION            ziglang version for pip (default 0.17.1)
#   MAPSNAP_CARGO_ZIGBUILD_VERSION cargo-zigbuild version (default 0.24.1)
set -euo pipefail

ZIG_VERSION=${MAPSNAP_ZIG_VERSION:-0.17.1}
ZIGBUILD_VERSION=${MAPSNAP_CARGO_ZIGBUILD_VERSION:-0.24.1}

say() { printf 'install-zig: %s\n' "$*"; }
die() { printf 'install-zig: error: %s\n' "$*" >&2; exit 1; }

# cargo-zigbuild finds zig on PATH, or runs `python3 -m ziglang` when it is not.
have_zig() {
    command -v zig >/dev/null 2>&1 && return 0
    python3 -m ziglang version >/dev/null 2>&1
}

if ! have_zig; then
    command -v python3 >/dev/null 2>&1 || die "python3 not found (zig comes from PyPI's ziglang)"
    say "pip install ziglang==$ZIG_VERSION"
    python3 -m pip install --quiet --disable-pip-version-check "ziglang==$ZIG_VERSION" ||
        die "pip install ziglang failed"
    have_zig || die "ziglang installed but \`python3 -m ziglang version\` fails"
fi

if ! cargo-zigbuild --version >/dev/null 2>&1; then
    say "cargo install --locked cargo-zigbuild@$ZIGBUILD_VERSION (takes a minute or two)"
    cargo install --locked --quiet "cargo-zigbuild@$ZIGBUILD_VERSION" ||
        die "cargo install cargo-zigbuild failed"
fi
