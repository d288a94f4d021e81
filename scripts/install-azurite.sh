#!/usr/bin/env bash
# Install the Azure Blob server the storage tests run against: Azurite 3 (Microsoft's Azure
# Storage emulator) from npm, into a project-owned prefix. Not started here: each test starts
# `azurite-blob --blobHost 127.0.0.1 --blobPort PORT ...` itself and stops it.
#
# Idempotent and fast: silent when the pinned major version is already there.
# Called by scripts/install-deps.sh (`make deps`).
#
# Environment: MAPSNAP_TEST_PREFIX (default /opt/mapsnap-test) — the tests read the same
# variable.
set -euo pipefail

say() { printf 'install-azurite: %s\n' "$*"; }
die() { printf 'install-azurite: error: %s\n' "$*" >&2; exit 1; }

PREFIX=${MAPSNAP_TEST_PREFIX:-/opt/mapsnap-test}/azurite
BIN="$PREFIX/node_modules/.bin/azurite-blob"

probe() {
    [[ -x "$BIN" ]] && node -e '
        const v = require(process.argv[1] + "/node_modules/azurite/package.json").version;
        process.exit(v.startsWith("3.") ? 0 : 1);' "$PREFIX" 2>/dev/null
}
probe && exit 0

command -v node >/dev/null 2>&1 || die "node not found: Azurite needs Node.js (>= 18)"
command -v npm >/dev/null 2>&1 || die "npm not found: Azurite is installed from npm"
node_major=$(node -p 'process.versions.node.split(".")[0]')
((node_major >= 18)) || die "Node.js $node_major is too old for Azurite 3 (needs >= 18)"

say "npm install azurite@3 into $PREFIX (Azure Blob server for the storage tests)"
mkdir -p "$PREFIX"
[[ -f "$PREFIX/package.json" ]] || printf '{ "name": "mapsnap-test-azurite", "private": true }\n' >"$PREFIX/package.json"
npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error 'azurite@3' >/dev/null ||
    die "npm could not install azurite@3"
probe || die "azurite installed but $BIN is missing or not version 3"
