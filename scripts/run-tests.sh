#!/usr/bin/env bash
# Run every test of the workspace (called by `make test` / `make test-only`).
#
# Uses cargo-nextest when installed (one line per test, a summary at the end), otherwise
# `cargo test` (one line per test) followed by a "tests: N passed, N failed" total.
# Doc tests run first, so the run closes on the real test count.
#
# Environment: CARGO (default cargo), TEST_RUNNER=auto|nextest|cargo (default auto).
# Extra arguments go to the runner (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO=${CARGO:-cargo}
runner=${TEST_RUNNER:-auto}

if [[ "$(id -u)" -ne 0 ]]; then
    echo "run-tests: the tests must run as root (they create, pin and load BPF objects)" >&2
    exit 1
fi

if [[ "$runner" == auto ]]; then
    if "$CARGO" nextest --version >/dev/null 2>&1; then runner=nextest; else runner=cargo; fi
fi

# A full disk fails tests far from its cause (a temp file, a plugin build): say it first.
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
if (( free_kib < 4 * 1024 * 1024 )); then
    echo "run-tests: only $((free_kib / 1024)) MiB free on $(df -P . | awk 'NR == 2 { print $6 }');" \
        "the build and tests need about 4 GiB more (make clean frees the old builds)" >&2
fi

echo "==> $CARGO test --workspace --doc"
"$CARGO" test --workspace --doc

case "$runner" in
    nextest)
        echo "==> $CARGO nextest run --workspace --no-fail-fast $*"
        exec "$CARGO" nextest run --workspace --no-fail-fast "$@"
        ;;
    cargo)
        echo "==> $CARGO test --workspace --no-fail-fast --lib --bins --tests $*"
        log=$(mktemp)
        trap 'rm -f "$log"' EXIT
        status=0
        "$CARGO" test --workspace --no-fail-fast --lib --bins --tests "$@" 2>&1 | tee "$log" || status=$?
        awk '/^test result: / {
                 for (i = 1; i <= NF; i++) {
                     if ($(i + 1) ~ /^passed;?$/) p += $i
                     if ($(i + 1) ~ /^failed;?$/) f += $i
                 }
             }
             END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
        exit "$status"
        ;;
    *)
        echo "run-tests: TEST_RUNNER must be auto, nextest or cargo (got $runner)" >&2
        exit 2
        ;;
esac
