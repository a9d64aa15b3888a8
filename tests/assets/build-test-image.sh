#!/usr/bin/env bash
# Builds the boot assets the end-to-end tests use, cached under tests/work/assets (or $1):
#   KERNEL   a Debian kernel (vmlinuz) of the distribution's linux-image-amd64
#   KROOT    the unpacked kernel package (boot/, lib/modules/<kver>/ with depmod done): what
#            dracut --kmoddir wants
#   INITRD   a busybox initramfs whose /init prints "LUNA-TEST-MARKER hostname=<name>" on the
#            console and powers off. Kernel cmdline: luna.hostname=<name> sets the name;
#            luna.dhcp=1 first loads virtio_net, runs udhcpc on every NIC and prints
#            "LUNA-TEST-DHCP iface=<if> ip=<ip> mask=<mask> router=<gw> mac=<mac>".
#   ROOTFS   a directory tree of a tiny busybox system (a future provisioning image): its
#            /sbin/init reports step "booted" to luna-server when the command line has luna.url,
#            luna.node and luna.token (busybox wget), prints "LUNA-BOOTED host=<hostname>
#            report=ok|failed|none" on /dev/console and powers off;
#            /boot/vmlinuz-<kver> and a subset of modules under /lib/modules/<kver>
#   KVER     the kernel release
# Prints those as KEY=VALUE lines on stdout (and keeps them in <dir>/env); logs go to stderr.
# Rebuilds only what is missing. Needs root (mknod), apt, dpkg-deb, depmod, cpio, gzip and
# busybox-static. Concurrent callers serialise on a lock file.
set -euo pipefail

# bump when the layout or content changes, so cached assets are rebuilt
ASSET_VERSION=4

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-${LUNA_TEST_WORK:-$here/../work}/assets}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

log() { printf 'build-test-image: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

exec 9>"$OUT/.lock"
flock 9

if [ -f "$OUT/env" ] && grep -qx "ASSET_VERSION=$ASSET_VERSION" "$OUT/env"; then
    # shellcheck disable=SC1091
    . "$OUT/env"
    if [ -f "$KERNEL" ] && [ -f "$INITRD" ] && [ -x "$ROOTFS/sbin/init" ] && [ -d "$KROOT/lib/modules/$KVER" ]; then
        grep -v '^ASSET_VERSION=' "$OUT/env"
        exit 0
    fi
fi

for tool in apt-get apt-cache dpkg-deb depmod modprobe cpio gzip; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
done
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (install busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked (install busybox-static, not busybox)"
fi

# --- kernel -----------------------------------------------------------------------------------
find_kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9].*-amd64$/ {print $2; exit}'
}

if [ -n "${LUNA_TEST_KVER:-}" ]; then
    KVER="$LUNA_TEST_KVER"
else
    pkg="$(find_kernel_package)"
    if [ -z "$pkg" ]; then
        log "no apt lists know linux-image-amd64; running apt-get update"
        apt-get update -q >&2
        pkg="$(find_kernel_package)"
    fi
    [ -n "$pkg" ] || die "cannot find the kernel package linux-image-amd64 depends on"
    KVER="${pkg#linux-image-}"
fi
KROOT="$OUT/kernel-$KVER"
KERNEL="$KROOT/boot/vmlinuz-$KVER"

if [ ! -f "$KROOT/.done" ]; then
    log "fetching linux-image-$KVER"
    tmp="$(mktemp -d "$OUT/.kernel.XXXXXX")"
    # the download dir is root's; apt's sandbox user could not write there
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "linux-image-$KVER" >&2) ||
        die "apt-get download linux-image-$KVER failed"
    deb="$(ls "$tmp"/linux-image-*.deb)"
    mkdir "$tmp/root"
    dpkg-deb -x "$deb" "$tmp/root"
    rm -f "$deb"
    [ -f "$tmp/root/boot/vmlinuz-$KVER" ] || die "package has no boot/vmlinuz-$KVER"
    depmod -b "$tmp/root" "$KVER"
    touch "$tmp/root/.done"
    rm -rf "$KROOT"
    mv "$tmp/root" "$KROOT"
    rmdir "$tmp"
fi

# Copies the named modules and their dependencies from KROOT into the tree $1, then runs depmod.
copy_modules() {
    local dest="$1" m f rel
    shift
    mkdir -p "$dest/lib/modules/$KVER"
    for f in modules.order modules.builtin modules.builtin.modinfo; do
        [ -f "$KROOT/lib/modules/$KVER/$f" ] && cp "$KROOT/lib/modules/$KVER/$f" "$dest/lib/modules/$KVER/"
    done
    for m in "$@"; do
        modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | while read -r kind f _; do
            [ "$kind" = insmod ] || continue
            rel="${f#"$KROOT"/}"
            mkdir -p "$dest/$(dirname "$rel")"
            cp "$f" "$dest/$rel"
        done
    done
    depmod -b "$dest" "$KVER"
}

# Installs busybox and its applet links into the tree $1 (not init: each tree brings its own).
install_busybox() {
    local dest="$1" a
    mkdir -p "$dest/bin" "$dest/sbin" "$dest/usr/bin" "$dest/usr/sbin"
    cp "$BUSYBOX" "$dest/bin/busybox"
    "$BUSYBOX" --list-full | while read -r a; do
        case "$a" in bin/busybox | sbin/init | linuxrc) continue ;; esac
        [ -e "$dest/$a" ] || ln -s /bin/busybox "$dest/$a"
    done
}

NET_MODULES=(virtio_net virtio_pci e1000 af_packet)

# --- marker initramfs ---------------------------------------------------------------------------
INITRD="$OUT/marker-initrd.img"
if [ ! -f "$INITRD" ] || [ ! -f "$OUT/.initrd-v$ASSET_VERSION" ]; then
    log "building $INITRD"
    tmp="$(mktemp -d "$OUT/.initrd.XXXXXX")"
    t="$tmp/tree"
    mkdir -p "$t"/{dev,proc,sys,tmp,run,etc,usr/share/udhcpc}
    install_busybox "$t"
    copy_modules "$t" "${NET_MODULES[@]}"
    # the kernel opens /dev/console before /init runs; without the node init has no stdout
    mknod -m 600 "$t/dev/console" c 5 1
    mknod -m 666 "$t/dev/null" c 1 3
    cat >"$t/init" <<'EOF'
#!/bin/sh
# luna test initramfs: prints a marker and powers off
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
name=
dhcp=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        luna.hostname=*) name="${arg#luna.hostname=}" ;;
        luna.dhcp=1) dhcp=1 ;;
    esac
done
[ -n "$name" ] && hostname "$name"
if [ "$dhcp" = 1 ]; then
    for m in virtio_net virtio_pci e1000 af_packet; do modprobe "$m" 2>/dev/null; done
    sleep 1
    ip link set lo up
    for path in /sys/class/net/*; do
        dev="${path##*/}"
        [ "$dev" = lo ] && continue
        ip link set "$dev" up
        udhcpc -i "$dev" -q -n -t 5 -T 2 -s /usr/share/udhcpc/default.script ||
            echo "LUNA-TEST-DHCP iface=$dev failed"
    done
fi
echo "LUNA-TEST-MARKER hostname=$(hostname)"
sync
poweroff -f
EOF
    cat >"$t/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc hook: configure the lease and report it on the console
case "$1" in
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
        mac="$(cat /sys/class/net/$interface/address)"
        echo "LUNA-TEST-DHCP iface=$interface ip=$ip mask=${mask:-} router=${router:-} mac=$mac"
        ;;
esac
exit 0
EOF
    chmod 755 "$t/init" "$t/usr/share/udhcpc/default.script"
    (cd "$t" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) >"$tmp/initrd.img"
    mv "$tmp/initrd.img" "$INITRD"
    rm -rf "$tmp"
    rm -f "$OUT"/.initrd-v*
    touch "$OUT/.initrd-v$ASSET_VERSION"
fi

# --- busybox root tree (a provisioning image) ---------------------------------------------------
ROOTFS="$OUT/rootfs"
if [ ! -x "$ROOTFS/sbin/init" ] || [ ! -f "$OUT/.rootfs-v$ASSET_VERSION" ]; then
    log "building $ROOTFS"
    tmp="$(mktemp -d "$OUT/.rootfs.XXXXXX")"
    t="$tmp/tree"
    mkdir -p "$t"/{boot,dev,proc,sys,tmp,run,root,home,mnt,var/log,var/tmp,etc/network,usr/share/udhcpc}
    chmod 1777 "$t/tmp" "$t/var/tmp"
    chmod 700 "$t/root"
    install_busybox "$t"
    copy_modules "$t" "${NET_MODULES[@]}" virtio_blk virtio_scsi ext4 overlay squashfs loop
    cp "$KERNEL" "$t/boot/vmlinuz-$KVER"
    cp "$KROOT/boot/config-$KVER" "$t/boot/config-$KVER"
    cat >"$t/sbin/init" <<'EOF'
#!/bin/sh
# luna test image: reports that it booted (to luna-server, when luna installed it: what a real
# image's boot-time hook would do), prints the marker, then powers off
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
[ -s /etc/hostname ] && hostname "$(cat /etc/hostname)"
/usr/sbin/luna-report-booted
sync
poweroff -f
EOF
    chmod 755 "$t/sbin/init"
    install -m 0755 "$here/../../scripts/image/luna-report-booted" "$t/usr/sbin/luna-report-booted"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$t/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$t/etc/group"
    printf 'root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n' >"$t/etc/shadow"
    chmod 640 "$t/etc/shadow"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$t/etc/hosts"
    printf '# <file system> <mount point> <type> <options> <dump> <pass>\n' >"$t/etc/fstab"
    printf 'luna-test\n' >"$t/etc/hostname"
    printf 'ID=luna-test\nNAME="luna test image"\nPRETTY_NAME="luna test image (busybox)"\nVERSION_ID=1\n' \
        >"$t/etc/os-release"
    : >"$t/etc/resolv.conf"
    rm -rf "$ROOTFS"
    mv "$t" "$ROOTFS"
    rm -rf "$tmp"
    rm -f "$OUT"/.rootfs-v*
    touch "$OUT/.rootfs-v$ASSET_VERSION"
fi

cat >"$OUT/env.tmp" <<EOF
ASSET_VERSION=$ASSET_VERSION
KVER=$KVER
KROOT=$KROOT
KERNEL=$KERNEL
INITRD=$INITRD
ROOTFS=$ROOTFS
EOF
mv "$OUT/env.tmp" "$OUT/env"
grep -v '^ASSET_VERSION=' "$OUT/env"
