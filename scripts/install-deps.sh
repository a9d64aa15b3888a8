#!/usr/bin/env bash
# Installs everything luna's build, test suite and demo need on a Debian 12 (bookworm) machine.
# Idempotent: a second run only checks. Run as root. Needs only Debian's archive, crates.io
# (for cargo later), the Rust toolchain server behind rustup, and PyPI.
#
#   sudo bash scripts/install-deps.sh
#
# Environment:
#   LUNA_VENV             python venv for the test doubles (default /opt/luna-venv)
#   LUNA_SKIP_APT=1       skip the Debian packages (for machines managed otherwise)
#   LUNA_SKIP_PYTHON=1    skip the python venv
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (installs Debian packages and /opt/luna-venv)"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
VENV="${LUNA_VENV:-/opt/luna-venv}"

# Debian packages. Notes on choices:
# - bridge-utils is not needed: iproute2 creates bridges (`ip link add type bridge`).
# - openipmi provides ipmi_sim (the BMC simulator); ipmitool is the client.
# - python3-gdbm: snmpsim keeps its record index in a dbm file.
# - linux-image-amd64 is NOT installed: tests/assets/build-test-image.sh downloads the kernel
#   package with `apt-get download` and unpacks it into tests/work, so the host kernel is untouched.
PACKAGES=(
    # VMs and network boot
    qemu-system-x86 qemu-utils ipxe ipxe-qemu ovmf
    # stand-in and reference servers/clients for DHCP and TFTP
    dnsmasq-base kea-dhcp4-server isc-dhcp-client tftpd-hpa tftp-hpa atftp
    # BitTorrent peers and tracker for interop tests
    aria2 transmission-cli opentracker
    # real clients of the swarm proof (tests/tests/swarm_clients.rs)
    qbittorrent-nox transmission-daemon
    # power-control peers: IPMI simulator + client, SNMP agent + client
    openipmi ipmitool snmpd snmp
    # load and timing
    wrk hyperfine nginx-light valgrind
    # images: initramfs and root trees
    dracut-core dracut-network busybox-static cpio zstd gzip kmod debootstrap
    # root = disk: the part-script's tools (sfdisk, mkfs.vfat) go into the initramfs; grub for
    # BIOS and UEFI (the -bin packages: grub-pc and grub-efi-amd64 exclude each other)
    fdisk dosfstools grub-pc-bin grub-efi-amd64-bin grub2-common
    # squashfs of images for the overlay root mode (mksquashfs, unsquashfs)
    squashfs-tools
    # image trees: osimage clone --path and grab (rsync over ssh; sshd for the grab test)
    rsync openssh-client openssh-server
    # static musl build of luna-agent
    musl-tools
    # networking in namespaces
    iproute2 iputils-ping procps psmisc
    # python test doubles (Redfish, SNMP, MongoDB wire protocol)
    python3 python3-venv python3-pip python3-gdbm
    # the Debian package: build (dpkg-shlibdeps, strip), check, and boot it under systemd
    dpkg-dev binutils lintian systemd-container
    # ACLs in the osimage clone test (setfacl, getfacl)
    acl
    # charts of the benchmarks (bench-swarm writes docs/*.png with gnuplot)
    gnuplot-nox
    # packet loss in bench-storm (this kernel has no sch_netem; nf_tables numgen drops)
    nftables
    # misc used by scripts and tests
    curl ca-certificates util-linux
    # the live web page test drives a headless browser (tests/liveview.rs)
    chromium
    # self-signed certificates for the Redfish emulator (tests/power.rs)
    openssl
)

# Services some of these packages would start on install: they would hold the ports the
# tests use (67/udp, 69/udp, 161/udp, 6969) on the host.
SERVICES=(tftpd-hpa kea-dhcp4-server kea-dhcp6-server kea-dhcp-ddns-server kea-ctrl-agent snmpd
    snmptrapd opentracker openipmi transmission-daemon)

missing_packages() {
    local p status
    for p in "${PACKAGES[@]}"; do
        status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
        if [ "$status" != "install ok installed" ]; then
            printf '%s\n' "$p"
        fi
    done
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages)
    if [ "${#missing[@]}" -eq 0 ]; then
        log "debian packages: all ${#PACKAGES[@]} present"
        return 0
    fi
    log "debian packages to install: ${missing[*]}"

    # A policy-rc.d that answers 101 keeps invoke-rc.d/deb-systemd-invoke from starting daemons.
    # Only add (and later remove) ours if the machine has none.
    local own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# written by luna scripts/install-deps.sh for the duration of apt-get\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local rc=0 round
    apt-get update -q || rc=$?
    # Two rounds: a machine may come with packages from bookworm-backports (qemu-utils, say) that
    # apt removes when it installs their bookworm siblings (qemu-system-x86); the second round
    # installs again whatever the first one took away.
    for round in 1 2; do
        [ "$rc" -eq 0 ] || break
        apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${missing[@]}" || rc=$?
        mapfile -t missing < <(missing_packages)
        [ "${#missing[@]}" -ne 0 ] || break
        [ "$round" -eq 2 ] || log "missing after round $round (replaced by apt?): ${missing[*]}"
    done
    if [ "$own_policy" -eq 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [ "$rc" -ne 0 ]; then
        log "apt-get failed (exit $rc)"
        return "$rc"
    fi
    mapfile -t missing < <(missing_packages)
    if [ "${#missing[@]}" -ne 0 ]; then
        log "still missing after install: ${missing[*]}"
        return 1
    fi
}

# Make sure none of the daemons runs now or starts at boot.
quiet_services() {
    local s
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        for s in "${SERVICES[@]}"; do
            if systemctl list-unit-files "$s.service" >/dev/null 2>&1 &&
                systemctl cat "$s.service" >/dev/null 2>&1; then
                systemctl disable --now "$s.service" >/dev/null 2>&1 || true
            fi
        done
    else
        for s in "${SERVICES[@]}"; do
            if [ -x "/etc/init.d/$s" ]; then
                # the init scripts stop by pid file, i.e. only the daemon they started
                "/etc/init.d/$s" stop >/dev/null 2>&1 || true
                update-rc.d "$s" disable >/dev/null 2>&1 || true
            fi
        done
    fi
}

install_rust_targets() {
    if ! command -v rustup >/dev/null; then
        if [ -x "$HOME/.cargo/bin/rustup" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            log "rustup not found: cannot add the musl target (luna-agent's static build needs it)"
            return 1
        fi
    fi
    if rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
        log "rust target x86_64-unknown-linux-musl: present"
    else
        rustup target add x86_64-unknown-linux-musl
    fi
}

# The venv must be made by Debian's python (/usr/bin/python3): a python under root's home (pyenv)
# is unreadable once snmpsim drops privileges to nobody, and it lacks the gdbm module.
PY_PACKAGES=(nx-27017 sushy-tools snmpsim pysmi)
PY_COMMANDS=(nx-27017 sushy-emulator snmpsim-command-responder)

install_python() {
    local recreate=0
    if [ ! -x "$VENV/bin/python3" ]; then
        recreate=1
    elif ! grep -qE '^home = /usr/bin/?$' "$VENV/pyvenv.cfg" 2>/dev/null; then
        log "$VENV was not made by /usr/bin/python3: recreating it"
        recreate=1
    fi
    if [ "$recreate" -eq 1 ]; then
        /usr/bin/python3 -m venv --clear "$VENV"
    fi
    local c need=0
    for c in "${PY_COMMANDS[@]}"; do
        [ -x "$VENV/bin/$c" ] || need=1
    done
    "$VENV/bin/python3" -c 'import pysmi, dbm.gnu' 2>/dev/null || need=1
    if [ "$need" -eq 0 ]; then
        log "python venv $VENV: present"
        return 0
    fi
    "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
    for c in "${PY_COMMANDS[@]}"; do
        if [ ! -x "$VENV/bin/$c" ]; then
            log "python venv: $c missing after pip install"
            return 1
        fi
    done
}

if [ "${LUNA_SKIP_APT:-0}" != 1 ]; then
    install_packages
    quiet_services
fi
install_rust_targets
if [ "${LUNA_SKIP_PYTHON:-0}" != 1 ]; then
    install_python
fi
# the tests create network namespaces and tap devices
modprobe tun 2>/dev/null || true
[ -c /dev/net/tun ] || log "warning: /dev/net/tun missing; qemu tap networking will fail"
log "done"
