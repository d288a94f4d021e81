#!/usr/bin/env bash
# Install the S3-compatible server the storage tests run against (mapsnap/tests/storage_remote.rs):
# moto in server mode (`python3 -m moto.server -H 127.0.0.1 -p PORT`), from PyPI.
#
# Idempotent and fast: one Python import check when it is already there, silent then.
# Called by scripts/install-deps.sh (`make deps`). The tests start and stop their own server
# on a free loopback port; nothing is left running.
#
# Environment: PYTHON (default python3) — the interpreter the tests use too
# (MAPSNAP_TEST_PYTHON in the tests, default python3).
set -euo pipefail

say() { printf 'install-s3: %s\n' "$*"; }
die() { printf 'install-s3: error: %s\n' "$*" >&2; exit 1; }

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || die "$PY not found: a Python 3 with pip is needed for the S3 test server (moto)"

# moto >= 5.1: conditional writes (If-None-Match on PUT and CompleteMultipartUpload) and IAM
# signature checks in server mode, which the tests rely on.
probe='
import sys
import moto, moto.server, boto3
major, minor = (int(x) for x in moto.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (5, 1) else 1)
'
if "$PY" -c "$probe" >/dev/null 2>&1; then
    exit 0
fi

say "pip install 'moto[server]>=5.1,<6' (S3 server for the storage tests)"
"$PY" -m pip install --quiet --disable-pip-version-check 'moto[server]>=5.1,<6' ||
    die "pip could not install moto[server]"
"$PY" -c "$probe" || die "moto installed but \`$PY -c 'import moto.server'\` still fails"
