#!/usr/bin/env bash
# Build the CRIU plugin (libmapsnap_criu.so) as it is shipped: release, without object
# storage (mapsnap's `remote` feature off), linked against glibc 2.28 symbol versions so that
# it loads on every host from glibc 2.28 on (RHEL 8 family, Debian 10, Ubuntu 20.04 and newer).
#
# CRIU loads every *.so of its plugin directory and aborts every dump and restore when one
# fails to load, so a plugin linked on a newer system (glibc 2.34 moved pthread symbols into
# libc with new versions) would break checkpointing on older nodes. zig (via cargo-zigbuild)
# links against stubs of the requested glibc version; scripts/install-zig.sh installs both.
#
#   scripts/build-criu-plugin.sh                 build; print the path of the stripped .so
#   scripts/build-criu-plugin.sh --install       ... and install it into $DESTDIR/usr/lib/criu/
#
# Options:
#   --target-dir DIR   cargo target directory (default: $CARGO_TARGET_DIR, else ./target)
#   --glibc VERSION    oldest glibc to support (default 2.28)
#   --out FILE         where to put the stripped .so (default DIR/criu-plugin/libmapsnap_criu.so)
#   --install          install the stripped .so as $DESTDIR/usr/lib/criu/libmapsnap_criu.so,
#                      CRIU's default plugin directory (no `libdir` needed, CRIU's own
#                      plugins there keep loading)
#   --locked           pass --locked to cargo
#
# The plugin is built alone (`-p mapsnap-criu`): in a workspace build cargo unifies features,
# so the CLI's `remote` would be switched on for it too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'build-criu-plugin: %s\n' "$*" >&2; }
die() { printf 'build-criu-plugin: error: %s\n' "$*" >&2; exit 1; }

target_dir=${CARGO_TARGET_DIR:-$PWD/target}
glibc=2.28
out=
install=0
locked=()
while (($#)); do
    case "$1" in
        --target-dir) target_dir=$2; shift 2 ;;
        --glibc) glibc=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --install) install=1; shift ;;
        --locked) locked=(--locked); shift ;;
        -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ "$glibc" =~ ^2\.[0-9]+$ ]] || die "--glibc wants a version like 2.28, got $glibc"
out=${out:-$target_dir/criu-plugin/libmapsnap_criu.so}

case "$(uname -m)" in
    x86_64) triple=x86_64-unknown-linux-gnu ;;
    aarch64) triple=aarch64-unknown-linux-gnu ;;
    *) die "unsupported machine $(uname -m) (x86_64 and aarch64 are known)" ;;
esac

if ! cargo-zigbuild --version >/dev/null 2>&1 ||
    ! { command -v zig >/dev/null 2>&1 || python3 -m ziglang version >/dev/null 2>&1; }; then
    die "zig or cargo-zigbuild missing: run scripts/install-zig.sh (make deps does)"
fi

say "cargo zigbuild --release -p mapsnap-criu --lib --target $triple.$glibc"
cargo zigbuild "${locked[@]}" --release -p mapsnap-criu --lib \
    --target "$triple.$glibc" --target-dir "$target_dir" >&2
built=$target_dir/$triple/release/libmapsnap_criu.so
[[ -f "$built" ]] || die "$built was not produced"

mkdir -p "$(dirname "$out")"
# Debug line tables stay in the unstripped build (target/<triple>/release) for backtraces.
# A temporary name of this run's own: test processes may build the same plugin at once.
strip --strip-debug -o "$out.tmp.$$" "$built"
mv "$out.tmp.$$" "$out"
say "$(stat -c %s "$built") bytes unstripped, $(stat -c %s "$out") bytes stripped"

if ((install)); then
    dest=${DESTDIR:-}/usr/lib/criu/libmapsnap_criu.so
    # Through a temporary name in the same directory: a CRIU starting meanwhile sees the old
    # file or the new one, never half a library.
    install -D -m 0644 "$out" "$dest.tmp.$$"
    mv "$dest.tmp.$$" "$dest"
    say "installed $dest"
fi
printf '%s\n' "$out"
