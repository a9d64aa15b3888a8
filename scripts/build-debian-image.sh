#!/usr/bin/env bash
# Builds a real Debian OS image tree for luna: `debootstrap --variant=minbase` bookworm with
# systemd, udev, iproute2 and the distribution kernel (linux-image-amd64), from the Debian mirror
# apt on this machine is configured with (or $LUNA_DEBIAN_MIRROR). Used by the debootstrap VM
# test (tests/tests/debootstrap_vm.rs) and the demo (LUNA_DEMO_IMAGE=debian scripts/demo.sh).
#
#   bash scripts/build-debian-image.sh [OUT_DIR]      # default: tests/work/debootstrap
#   LUNA_DEBIAN_DISK=1 bash scripts/build-debian-image.sh [OUT_DIR]   # default: .../debootstrap-disk
#   LUNA_DEBIAN_CLOUDINIT=1 bash scripts/build-debian-image.sh [OUT_DIR]   # .../debootstrap-cloudinit
#
# LUNA_DEBIAN_DISK=1 builds the flavour for `root = disk` (tests/tests/disk_vm.rs): grub for
# BIOS and UEFI from the image (grub-pc-bin + grub-efi-amd64-bin + grub2-common: the grub-pc
# and grub-efi-amd64 packages cannot both be installed) and the kernel's initramfs-tools
# initramfs kept in /boot, which the node boots from its disk.
#
# LUNA_DEBIAN_CLOUDINIT=1 builds the flavour with cloud-init (tests/tests/cloudinit_vm.rs):
# the `cloud-init` package (with its Depends only, as debootstrap installs them) and
# systemd-networkd enabled, which applies the network configuration cloud-init renders (its
# `networkd` renderer: the minbase has neither ifupdown nor netplan). luna-agent finds
# /usr/bin/cloud-init in the tree and gives the node a NoCloud seed instead of its own
# personality files.
#
# Prints ROOT=<tree> on stdout; logs go to stderr. The tree is cached (OUT_DIR/root, marked done
# by OUT_DIR/root.v<N>); a second call returns at once. Needs root, debootstrap and the network
# to the mirror (a few minutes and about 150 MB of packages the first time).
#
# Besides the distribution, the tree has one luna addition, what a site's image would carry:
# luna-booted.service, which once multi-user.target is being reached runs
# scripts/image/luna-report-booted (reports step `booted` to luna-server when luna installed the
# node, and prints "LUNA-BOOTED host=<hostname> report=ok|failed|none" on the console).
set -euo pipefail

# bump when the tree's content changes, so a cached tree is rebuilt
VERSION=1
SUITE=${LUNA_DEBIAN_SUITE:-bookworm}
DISK=${LUNA_DEBIAN_DISK:-0}
CLOUDINIT=${LUNA_DEBIAN_CLOUDINIT:-0}
INCLUDE=systemd,systemd-sysv,udev,kmod,iproute2,linux-image-amd64
FLAVOUR=debootstrap
if [ "$DISK" = 1 ] && [ "$CLOUDINIT" = 1 ]; then
    printf 'build-debian-image: error: LUNA_DEBIAN_DISK=1 and LUNA_DEBIAN_CLOUDINIT=1 are two flavours: set one\n' >&2
    exit 2
fi
if [ "$DISK" = 1 ]; then
    INCLUDE="$INCLUDE,grub-pc-bin,grub-efi-amd64-bin,grub2-common,initramfs-tools"
    FLAVOUR=debootstrap-disk
fi
if [ "$CLOUDINIT" = 1 ]; then
    # python3-cffi-backend: provides the virtual python3-cffi-backend-api-* that
    # python3-cryptography needs (debootstrap does not resolve virtual packages)
    INCLUDE="$INCLUDE,cloud-init,python3-cffi-backend"
    FLAVOUR=debootstrap-cloudinit
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-${LUNA_TEST_WORK:-$here/../tests/work}/$FLAVOUR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$OUT/root"

log() { printf 'build-debian-image: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

exec 9>"$OUT/.lock"
flock 9

# debootstrap and trim the tree (cached: slow, and needs the mirror)
build_tree() {
    command -v debootstrap >/dev/null || die "debootstrap not found (run scripts/install-deps.sh)"

    MIRROR="$(bash "$here/debian-mirror.sh")" || die "no Debian mirror (see scripts/debian-mirror.sh)"

    rm -f "$OUT"/root.v*
    rm -rf "$ROOT"
    log "debootstrap --variant=minbase $SUITE from $MIRROR into $ROOT (a few minutes)"
    debootstrap --variant=minbase \
        --include="$INCLUDE" \
        "$SUITE" "$ROOT" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 ||
        die "debootstrap failed; last lines of $OUT/debootstrap.log:"$'\n'"$(tail -20 "$OUT/debootstrap.log")"

    # The image is unpacked into each node's RAM: no package cache or lists, documentation or
    # translations in it, and no initramfs-tools initramfs (luna builds the nodes' own with dracut).
    # The disk flavour keeps its initramfs: a node installed to disk boots with it.
    rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* \
        "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/*
    [ "$DISK" = 1 ] || rm -f "$ROOT"/boot/initrd.img-*
    echo debian >"$ROOT/etc/hostname"
    # a fresh machine id on every boot (each node is its own machine)
    : >"$ROOT/etc/machine-id"
    if [ "$CLOUDINIT" = 1 ]; then
        [ -x "$ROOT/usr/bin/cloud-init" ] || die "the cloud-init flavour has no /usr/bin/cloud-init"
        # cloud-init's networkd renderer writes /etc/systemd/network; networkd applies it
        chroot "$ROOT" systemctl enable systemd-networkd.service >&2 ||
            die "cannot enable systemd-networkd in $ROOT"
    fi

    touch "$OUT/root.v$VERSION"
}

if [ ! -f "$OUT/root.v$VERSION" ] || [ ! -x "$ROOT/sbin/init" ]; then
    build_tree
fi

# luna's addition, applied on every call (a changed hook needs no new debootstrap)
install -D -m 0755 "$here/image/luna-report-booted" "$ROOT/usr/local/sbin/luna-report-booted"
cat >"$ROOT/etc/systemd/system/luna-booted.service" <<'EOF'
[Unit]
Description=Report to luna-server that this node booted
After=network.target systemd-hostnamed.service

[Service]
Type=oneshot
TimeoutStartSec=60
ExecStart=/usr/local/sbin/luna-report-booted

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/luna-booted.service "$ROOT/etc/systemd/system/multi-user.target.wants/luna-booted.service"
if [ -x "$ROOT/usr/bin/cloud-init" ]; then
    # The minbase has no generated locales (and none of /usr/share/locale): cloud-init's locale
    # module would set en_US.UTF-8 and fail (update-locale exits 255); C.UTF-8 is built in.
    mkdir -p "$ROOT/etc/cloud/cloud.cfg.d"
    printf '# build-debian-image.sh: the minbase has no generated locales\nlocale: C.UTF-8\n' \
        >"$ROOT/etc/cloud/cloud.cfg.d/05-luna-image.cfg"
fi

log "done: $(du -sh "$ROOT" | cut -f1) in $ROOT"
echo "ROOT=$ROOT"
