#!/usr/bin/env bash
# Install CRIU 4.1 (Debian trixie's build) beside this machine's bookworm system, for the
# mapsnap CRIU plugin and its tests. Called by scripts/install-deps.sh; runs on its own too.
#
# Bookworm's criu 3.17 does not run on current kernels (vDSO layout; fixed in CRIU 4.1), and
# trixie's criu needs a newer libc than bookworm has, so it is not apt-get installed: the
# packages are downloaded from trixie (an apt source pinned to priority 1, so nothing on the
# system is ever upgraded from it), unpacked with `dpkg -x` into a private prefix and run
# through that prefix's own dynamic loader by a wrapper script:
#
#   $PREFIX/                          unpacked packages (criu, its libraries, trixie's libc)
#   $PREFIX/usr/include/criu/         criu-plugin.h and criu-log.h (libcriu-dev): the plugin ABI
#   $WRAPPER                          `criu-mapsnap ARGS...` runs that criu; give it to runc
#                                     as `runc --criu $WRAPPER ...`
#
# Also installs bookworm's iptables (CRIU's network lock for containers with their own netns),
# creates CRIU's default plugin directory /usr/lib/criu (empty; where the mapsnap plugin is
# installed, and where the plugin tests bind-mount a private copy in their own mount
# namespace), and runs scripts/install-zig.sh (zig and cargo-zigbuild, which build the
# plugin against glibc 2.28: scripts/build-criu-plugin.sh).
#
# Idempotent and quick when already installed (a marker file records what was installed).
# Must run as root. Environment:
#   MAPSNAP_CRIU_PREFIX    install prefix (default /opt/mapsnap-criu)
#   MAPSNAP_CRIU_WRAPPER   wrapper path (default /usr/local/sbin/criu-mapsnap)
#   MAPSNAP_CRIU_SUITE     Debian suite to take CRIU from (default trixie)
set -euo pipefail

PREFIX=${MAPSNAP_CRIU_PREFIX:-/opt/mapsnap-criu}
WRAPPER=${MAPSNAP_CRIU_WRAPPER:-/usr/local/sbin/criu-mapsnap}
SUITE=${MAPSNAP_CRIU_SUITE:-trixie}
SOURCES=/etc/apt/sources.list.d/mapsnap-$SUITE.sources
PREFS=/etc/apt/preferences.d/mapsnap-$SUITE
MARKER=$PREFIX/.mapsnap-installed

# criu, the plugin header, and every library criu 4.1 loads that bookworm lacks or has too old.
PKGS=(criu libcriu-dev libcompel1 libc6 libgnutls30t64 libnftables1 libnl-3-200 libprotobuf-c1
    libnet1 libbsd0 libmd0 libuuid1 libunistring5 libnettle8t64 libhogweed6t64 libgmp10
    libidn2-0 libtasn1-6 libp11-kit0 libffi8 libnftnl11 libmnl0 libjansson4 libxtables12 libedit2)

say() { printf 'install-criu: %s\n' "$*"; }
die() { printf 'install-criu: error: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (apt-get, /opt, /usr/local/sbin); try: sudo $0"

arch=$(dpkg --print-architecture)
case "$arch" in
    amd64) triplet=x86_64-linux-gnu loader=ld-linux-x86-64.so.2 ;;
    arm64) triplet=aarch64-linux-gnu loader=ld-linux-aarch64.so.1 ;;
    *) die "unsupported architecture $arch (amd64 and arm64 are known)" ;;
esac
libdir=$PREFIX/usr/lib/$triplet
want="suite=$SUITE arch=$arch packages=${PKGS[*]}"

wrapper_text() {
    cat <<EOF
#!/bin/sh
# CRIU from Debian $SUITE, unpacked in $PREFIX by mapsnap's scripts/install-criu.sh and run
# through its own dynamic loader (it needs a newer libc than this system's).
exec "$libdir/$loader" --library-path "$libdir:/usr/lib/$triplet" "$PREFIX/usr/sbin/criu" "\$@"
EOF
}

installed_ok() {
    [[ -f "$MARKER" && "$(cat "$MARKER")" == "$want" ]] || return 1
    [[ -x "$WRAPPER" && "$(cat "$WRAPPER")" == "$(wrapper_text)" ]] || return 1
    [[ -f "$PREFIX/usr/include/criu/criu-plugin.h" ]] || return 1
    "$WRAPPER" --version >/dev/null 2>&1
}

ensure_iptables() {
    local status
    status=$(dpkg-query -W -f='${db:Status-Status}' iptables 2>/dev/null || true)
    if [[ "$status" != installed ]]; then
        export DEBIAN_FRONTEND=noninteractive
        say "apt-get install iptables"
        apt-get install -y -qq --no-install-recommends iptables >/dev/null 2>&1 || {
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends iptables >/dev/null
        }
    fi
}

# CRIU loads every *.so of /usr/lib/criu when it exists; an empty one changes nothing.
ensure_plugin_dir() {
    [[ -d /usr/lib/criu ]] || mkdir -p -m 0755 /usr/lib/criu
}

ensure_zig() {
    bash "$(dirname "${BASH_SOURCE[0]}")/install-zig.sh"
}

if installed_ok; then
    ensure_iptables
    ensure_plugin_dir
    ensure_zig
    exit 0
fi

# --- the trixie source, pinned so that nothing is installed or upgraded from it -----------
src_text="Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
pref_text="# mapsnap: CRIU packages are only downloaded from $SUITE (scripts/install-criu.sh),
# never installed or upgraded from it.
Package: *
Pin: release n=$SUITE
Pin-Priority: 1"
changed=0
if [[ ! -f "$SOURCES" || "$(cat "$SOURCES")" != "$src_text" ]]; then
    say "adding $SOURCES (pinned to priority 1 by $PREFS)"
    printf '%s\n' "$pref_text" >"$PREFS"
    printf '%s\n' "$src_text" >"$SOURCES"
    changed=1
elif [[ ! -f "$PREFS" || "$(cat "$PREFS")" != "$pref_text" ]]; then
    printf '%s\n' "$pref_text" >"$PREFS"
fi
if ((changed)) || ! apt-cache madison criu 2>/dev/null | grep -q " $SUITE/"; then
    say "apt-get update"
    apt-get update -qq
fi
ensure_iptables

# --- download and unpack ------------------------------------------------------------------
work=$(mktemp -d /tmp/mapsnap-criu.XXXXXX)
new=$PREFIX.new.$$
trap 'rm -rf "$work" "$new"' EXIT
spec=()
for p in "${PKGS[@]}"; do
    spec+=("$p/$SUITE")
done
say "apt-get download ${#PKGS[@]} packages from $SUITE"
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "${spec[@]}" >/dev/null) ||
    die "apt-get download failed (is deb.debian.org reachable, and does $SUITE have: ${PKGS[*]}?)"

rm -rf "$new"
mkdir -p "$new"
for deb in "$work"/*.deb; do
    dpkg -x "$deb" "$new"
done
[[ -x "$new/usr/sbin/criu" ]] || die "criu binary missing after unpacking"
[[ -e "$new/usr/lib/$triplet/$loader" ]] || die "$loader missing after unpacking libc6"
[[ -f "$new/usr/include/criu/criu-plugin.h" ]] || die "criu-plugin.h missing after unpacking libcriu-dev"
for deb in "$work"/*.deb; do
    basename "$deb"
done >"$new/.mapsnap-packages"
rm -rf "$PREFIX.old"
if [[ -e "$PREFIX" ]]; then mv "$PREFIX" "$PREFIX.old"; fi
mv "$new" "$PREFIX"
rm -rf "$PREFIX.old"

mkdir -p "$(dirname "$WRAPPER")"
wrapper_text >"$WRAPPER.tmp"
chmod 755 "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

version=$("$WRAPPER" --version 2>&1) || die "the installed criu does not run: $version"
ensure_plugin_dir
ensure_zig
printf '%s\n' "$want" >"$MARKER"
say "installed $(head -n1 <<<"$version" | tr -s ' ') in $PREFIX; run it as $WRAPPER"
