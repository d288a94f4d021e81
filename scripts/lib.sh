# Shared by the install scripts (sourced, not run). The sourcing script defines `say`.

# apt_install PKG...: installs those of the Debian packages that are not installed yet,
# without recommends, printing one line when it does. `apt-get update` runs only when the
# first try fails (a fresh machine has no package lists; others need none). Sets
# APT_INSTALLED=1 when it installed something.
APT_INSTALLED=0
apt_install() {
    local missing=() p status
    for p in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ "$status" == installed ]] || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    export DEBIAN_FRONTEND=noninteractive
    say "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    }
    APT_INSTALLED=1
}
