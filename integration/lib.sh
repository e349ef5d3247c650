# shellcheck shell=bash
# Shared by the integration scripts (sourced, never run): log/die helpers and
# installing missing Debian packages, building a minimal Debian root filesystem.
#
#   readonly PROG=name                      # optional: the log prefix (default: the script's name)
#   source "$(dirname "$0")/lib.sh"
#
# Every message goes to stderr as "PROG: message" (stdout stays the script's answer).

: "${PROG:=$(basename "$0")}"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Another apt run (another session's, say) may hold the locks: wait for it rather
# than fail, still bounded by the outer timeout.
LIB_APT_OPTS=(-o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)
LIB_APT_UPDATED=0

# apt_update: refreshes the package lists, once per script run. A failed refresh is
# only warned about: what follows is tried with the current lists.
apt_update() {
    ((LIB_APT_UPDATED)) && return 0
    LIB_APT_UPDATED=1
    timeout -k 10 600 apt-get "${LIB_APT_OPTS[@]}" update -q >&2 ||
        log "warning: apt-get update failed; trying with the current lists"
}

# ensure_packages PKG...: installs those of PKG that dpkg does not have installed
# (nothing at all when every one is there).
ensure_packages() {
    local p missing=()
    for p; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]})) || return 0
    ((EUID == 0)) || die "missing packages (${missing[*]}) and not root to install them"
    log "installing ${missing[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive timeout -k 10 900 \
        apt-get "${LIB_APT_OPTS[@]}" install -y -q --no-install-recommends "${missing[@]}" >&2 ||
        die "apt-get install ${missing[*]} failed"
}

# build_rootfs ROOT SUITE MIRROR PKG...: a minimal Debian root filesystem in ROOT
# (debootstrap --variant=minbase, then PKG installed in a chroot where no service may
# start), with apt's lists, docs, man pages, locales and logs removed.
build_rootfs() {
    local root=$1 suite=$2 mirror=$3
    shift 3
    command -v debootstrap >/dev/null || ensure_packages debootstrap
    log "debootstrap --variant=minbase $suite (a few minutes the first time)"
    timeout -k 10 1200 debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
        tail -20 "$root.debootstrap.log" >&2
        die "debootstrap failed (log above)"
    }
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    # No service may start inside the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    log "apt-get install $* (in the chroot)"
    timeout -k 10 1200 chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        apt-get -q -o DPkg::Lock::Timeout=120 install -y --no-install-recommends "$@" >&2
    timeout -k 10 120 chroot "$root" apt-get clean >&2
    rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
        "$root"/usr/share/locale/* "$root"/var/cache/debconf/*-old "$root"/var/log/*.log \
        "$root/usr/sbin/policy-rc.d"
    : >"$root/etc/resolv.conf"
}
