#!/usr/bin/env bash
# mapsnap demo: pinned maps -> dump to a snapshot -> delete -> restore -> diff.
#
# Needs root, bpftool and bpffs (`make deps`) and a release build (`make build`);
# `make demo` does all three. Environment:
#   MAPSNAP   the mapsnap binary (default: ${CARGO_TARGET_DIR:-target}/release/mapsnap)
#   PIN       the bpffs directory to use (default: /sys/fs/bpf/mapsnap-demo)
#   SNAP      the snapshot file (default: /tmp/mapsnap-demo.snap)
#   KEEP=1    leave the pins and the snapshot in place at the end
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MAPSNAP=${MAPSNAP:-${CARGO_TARGET_DIR:-$ROOT/target}/release/mapsnap}
PIN=${PIN:-/sys/fs/bpf/mapsnap-demo}
SNAP=${SNAP:-/tmp/mapsnap-demo.snap}
KEEP=${KEEP:-0}

step=0
if [[ -t 1 ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
header() {
    step=$((step + 1))
    printf '\n%s== %d. %s%s\n' "$bold" "$step" "$*" "$plain"
}
run() {
    printf '$ %s\n' "$*"
    "$@"
}
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (creates and pins BPF maps); try: sudo make demo"
command -v bpftool >/dev/null || die "bpftool not found: run \`make deps\`"
awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { f = 1 } END { exit !f }' /proc/mounts ||
    die "bpffs is not mounted at /sys/fs/bpf: run \`make deps\`"
[[ -x "$MAPSNAP" ]] || die "$MAPSNAP not found: run \`make build\` (or set MAPSNAP=...)"
case "$PIN" in
    /sys/fs/bpf/?*) ;;
    *) die "PIN must be a directory under /sys/fs/bpf (got $PIN)" ;;
esac

workdir=$(mktemp -d /tmp/mapsnap-demo.XXXXXX)
cleanup() {
    rm -rf "$workdir"
    if [[ "$KEEP" == 1 ]]; then
        printf '\nKEEP=1: left %s and %s in place\n' "$PIN" "$SNAP"
    else
        rm -rf "$PIN"
        rm -f "$SNAP" "$SNAP.manifest.json"
    fi
}
trap cleanup EXIT

# Little-endian bytes of an unsigned integer, as bpftool takes them: le_bytes VALUE NBYTES.
le_bytes() {
    local v=$1 n=$2 i out=()
    for ((i = 0; i < n; i++)); do
        out+=("$(((v >> (8 * i)) & 255))")
    done
    echo "${out[*]}"
}

# bpftool's view of every map in $PIN, sorted (hash iteration order differs between maps).
bpftool_view() {
    local m
    for m in "$PIN"/*; do
        echo "## $(basename "$m")"
        bpftool map show pinned "$m" | sed -E 's/^[0-9]+: //; s/ +memlock [0-9]+B//' |
            tr -s ' \t' ' ' | grep -v '^ *$'
        bpftool map dump pinned "$m" | grep -v '^Found ' | sort
    done
}

header "Create pinned maps under $PIN with bpftool"
rm -rf "$PIN"
run mkdir -p "$PIN"
run bpftool map create "$PIN/counters" type hash key 4 value 8 entries 256 name counters
run bpftool map create "$PIN/config" type array key 4 value 16 entries 8 name config
run bpftool map create "$PIN/routes" type lpm_trie key 8 value 4 entries 64 name routes flags 1

header "Fill them (one bpftool batch of map updates)"
batch="$workdir/fill.batch"
{
    # counters: 100 entries, key i -> value i*i + 7
    for ((i = 1; i <= 100; i++)); do
        echo "map update pinned $PIN/counters key $(le_bytes "$i" 4) value $(le_bytes $((i * i + 7)) 8)"
    done
    # config: every slot, a 4-byte id, a 4-byte flag word and an 8-byte counter
    for ((i = 0; i < 8; i++)); do
        echo "map update pinned $PIN/config key $(le_bytes "$i" 4) value $(le_bytes $((100 + i)) 4) $(le_bytes $((1 << i)) 4) $(le_bytes $((i * 1000)) 8)"
    done
    # routes: { u32 prefixlen; u8 addr[4]; } -> u32 ifindex
    echo "map update pinned $PIN/routes key $(le_bytes 8 4) 10 0 0 0 value $(le_bytes 1 4)"
    echo "map update pinned $PIN/routes key $(le_bytes 16 4) 10 1 0 0 value $(le_bytes 2 4)"
    echo "map update pinned $PIN/routes key $(le_bytes 24 4) 10 1 2 0 value $(le_bytes 3 4)"
    echo "map update pinned $PIN/routes key $(le_bytes 24 4) 192 168 7 0 value $(le_bytes 4 4)"
    echo "map update pinned $PIN/routes key $(le_bytes 0 4) 0 0 0 0 value $(le_bytes 9 4)"
} >"$batch"
printf '$ bpftool batch file %s   # %d map updates\n' "$batch" "$(wc -l <"$batch")"
bpftool batch file "$batch" >/dev/null
for m in counters config routes; do
    printf '  %-9s %s\n' "$m" "$(bpftool map dump pinned "$PIN/$m" | grep '^Found ')"
done
bpftool_view >"$workdir/before.txt"

header "List the pinned maps: mapsnap ls"
run "$MAPSNAP" ls --pin "$PIN"

header "Dump them into $SNAP: mapsnap dump"
rm -f "$SNAP" "$SNAP.manifest.json"
run "$MAPSNAP" dump --pin "$PIN" -o "$SNAP"
ls -l "$SNAP"

header "Look inside the snapshot: mapsnap inspect"
run "$MAPSNAP" inspect "$SNAP"

header "Delete the pins (the maps are gone)"
run rm -f "$PIN"/counters "$PIN"/config "$PIN"/routes
run ls -la "$PIN"

header "Restore the snapshot into $PIN: mapsnap restore"
run "$MAPSNAP" restore "$SNAP" --pin-root "$PIN"
run ls -la "$PIN"

header "Compare the snapshot with the live maps: mapsnap diff"
printf '$ %s\n' "$MAPSNAP diff $SNAP --pin $PIN"
if ! diff_out=$("$MAPSNAP" diff "$SNAP" --pin "$PIN"); then
    printf '%s\n' "$diff_out"
    die "mapsnap diff exited non-zero: the restored maps differ from the snapshot"
fi
printf '%s\n' "$diff_out"
grep -qi 'no differences' <<<"$diff_out" || die "mapsnap diff did not report \"no differences\""

header "Cross-check with bpftool: same maps, same entries as before the dump"
bpftool_view >"$workdir/after.txt"
if ! diff -u "$workdir/before.txt" "$workdir/after.txt"; then
    die "bpftool sees different maps or entries after the restore"
fi
echo "bpftool: $(grep -c '^## ' "$workdir/after.txt") maps, $(grep -c '^key' "$workdir/after.txt") entries, identical to before the dump"

header "Clean up"
if [[ "$KEEP" == 1 ]]; then
    echo "(KEEP=1: nothing removed)"
else
    echo "rm -rf $PIN; rm -f $SNAP $SNAP.manifest.json"
fi
echo
echo "demo: OK"
