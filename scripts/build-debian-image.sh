#!/usr/bin/env bash
# Builds a real Debian OS image tree for luna: `debootstrap --variant=minbase` bookworm with
# systemd, udev, iproute2 and the distribution kernel (linux-image-amd64), from the Debian mirror
# apt on this machine is configured with (or $LUNA_DEBIAN_MIRROR). Used by the debootstrap VM
# test (tests/tests/debootstrap_vm.rs) and the demo (LUNA_DEMO_IMAGE=debian scripts/demo.sh).
#
#   bash scripts/build-debian-image.sh [OUT_DIR]      # default: tests/work/debootstrap
#
# Prints ROOT=<tree> on stdout; logs go to stderr. The tree is cached (OUT_DIR/root, marked done
# by OUT_DIR/root.v<N>); a second call returns at once. Needs root, debootstrap and the network
# to the mirror (a few minutes and about 150 MB of packages the first time).
#
# Besides the distribution, the tree has one luna addition, what a site's image would carry:
# luna-booted.service, which once multi-user.target is being reached reports step `booted` to
# luna-server (when luna installed the node: luna.url, luna.node and luna.token are on the kernel
# command line) and prints "LUNA-BOOTED host=<hostname> report=ok|failed|none" on the console.
set -euo pipefail

# bump when the tree's content changes, so a cached tree is rebuilt
VERSION=1
SUITE=${LUNA_DEBIAN_SUITE:-bookworm}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-${LUNA_TEST_WORK:-$here/../tests/work}/debootstrap}"
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

if [ -f "$OUT/root.v$VERSION" ] && [ -x "$ROOT/sbin/init" ]; then
    echo "ROOT=$ROOT"
    exit 0
fi

command -v debootstrap >/dev/null || die "debootstrap not found (run scripts/install-deps.sh)"

# The first Debian mirror of apt's sources (deb822 `URIs:` or one-line `deb` entries).
find_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}
             /^deb / {for (i = 2; i <= NF; i++) if ($i ~ /^http/) print $i}' "$f"
    done | sed 's#/*$##' | grep -m1 '/debian$' || true
}
MIRROR=${LUNA_DEBIAN_MIRROR:-$(find_mirror)}
[ -n "$MIRROR" ] || die "no Debian mirror in /etc/apt/sources.list*; set LUNA_DEBIAN_MIRROR"

rm -f "$OUT"/root.v*
rm -rf "$ROOT"
log "debootstrap --variant=minbase $SUITE from $MIRROR into $ROOT (a few minutes)"
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,udev,kmod,iproute2,linux-image-amd64 \
    "$SUITE" "$ROOT" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 ||
    die "debootstrap failed; last lines of $OUT/debootstrap.log:
$(tail -20 "$OUT/debootstrap.log")"

# The image is unpacked into each node's RAM: no package cache or lists, documentation or
# translations in it, and no initramfs-tools initramfs (luna builds the nodes' own with dracut).
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/boot/initrd.img-* \
    "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/*
echo debian >"$ROOT/etc/hostname"
# a fresh machine id on every boot (each node is its own machine)
: >"$ROOT/etc/machine-id"

cat >"$ROOT/usr/local/sbin/luna-report-booted" <<'EOF'
#!/bin/bash
# Reports step "booted" to luna-server when luna installed this node (luna.url, luna.node and
# luna.token on the kernel command line), over plain HTTP with bash's /dev/tcp (minbase has no
# curl or wget), and prints "LUNA-BOOTED host=<hostname> report=ok|failed|none" on the console.
url= node= token=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        luna.url=*) url="${arg#luna.url=}" ;;
        luna.node=*) node="${arg#luna.node=}" ;;
        luna.token=*) token="${arg#luna.token=}" ;;
    esac
done
report=none
if [ -n "$url" ] && [ -n "$node" ]; then
    report=failed
    # the address the initramfs configured survives the switch of root
    addr="$(ip -4 -o addr show scope global | awk '{sub("/.*", "", $4); print $4; exit}')"
    body="{\"step\":\"booted\",\"message\":\"$(hostname) is up at ${addr:-no address}\"}"
    hostport="${url#http://}"
    hostport="${hostport%%/*}"
    host="${hostport%:*}"
    port=80
    [ "$hostport" != "$host" ] && port="${hostport##*:}"
    if exec 3<>"/dev/tcp/$host/$port"; then
        printf 'POST /boot/status?node=%s&token=%s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
            "$node" "$token" "$hostport" "${#body}" "$body" >&3
        if read -r -t 20 status <&3 && [[ "$status" =~ ^HTTP/[0-9.]+\ 2[0-9][0-9] ]]; then
            report=ok
        fi
        exec 3<&-
    fi
fi
echo "LUNA-BOOTED host=$(hostname) report=$report" >/dev/console
EOF
chmod 755 "$ROOT/usr/local/sbin/luna-report-booted"
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

touch "$OUT/root.v$VERSION"
log "done: $(du -sh "$ROOT" | cut -f1) in $ROOT"
echo "ROOT=$ROOT"
