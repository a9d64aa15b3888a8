#!/usr/bin/env bash
# The demo: a luna cluster on the embedded store, in a private network namespace, network-booting
# three qemu VMs from luna-server alone (its DHCP, TFTP and HTTP/iPXE), then the node table with
# each node's status and how long it took. Run as root on Debian; cleans up after itself.
#
#   sudo bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VMS=${LUNA_DEMO_VMS:-3}
NS=luna-demo-$$
SERVER_IP=10.88.0.1
WORK=$(mktemp -d /tmp/luna-demo.XXXXXX)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    ip netns pids "$NS" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }

if [ -x "$HOME/.cargo/bin/cargo" ] && ! command -v cargo >/dev/null; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

say "installing what the demo needs"
bash scripts/install-deps.sh >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; exit 1; }

say "building luna-server and luna"
cargo build -p luna-server -p luna-cli
BIN=${CARGO_TARGET_DIR:-target}/debug

say "preparing the small test image (a Debian kernel and a busybox initramfs)"
bash tests/assets/build-test-image.sh >/dev/null
# shellcheck disable=SC1091
. tests/work/assets/env

say "starting luna-server in network namespace $NS ($SERVER_IP)"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge
ip -n "$NS" addr add "$SERVER_IP/24" dev br0
ip -n "$NS" link set br0 up
cat >"$WORK/luna.toml" <<EOF
store = "sqlite://$WORK/luna.db"
listen = "$SERVER_IP:7050"
token_file = "$WORK/token"
data_dir = "$WORK/data"
[dhcp]
interfaces = ["br0"]
[tftp]
root = "$WORK/tftpboot"
bind = "$SERVER_IP:69"
[image]
seed_listen = "$SERVER_IP:6881"
EOF
"$BIN/luna-server" --config "$WORK/luna.toml" init
ip netns exec "$NS" "$BIN/luna-server" --config "$WORK/luna.toml" >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "http listening" "$WORK/server.log" && break; sleep 0.2; done

luna() { ip netns exec "$NS" env LUNA_SERVER="http://$SERVER_IP:7050" LUNA_TOKEN_FILE="$WORK/token" "$BIN/luna" "$@"; }

say "creating the cluster's objects with the luna CLI"
luna cluster change --frontend-address "$SERVER_IP" --dhcp-interfaces br0 >/dev/null
luna network add prov --cidr 10.88.0.0/24 --gateway "$SERVER_IP"
luna osimage add tiny --path "$ROOTFS" --kernel-opts "console=ttyS0 panic=-1 luna.dhcp=1"
luna group add compute --osimage tiny --network prov
MACS=()
for i in $(seq "$VMS"); do MACS+=("52:54:00:88:00:$(printf %02x "$i")"); done
luna node add "node[001-$(printf %03d "$VMS")]" --group compute
for i in $(seq "$VMS"); do luna node change "node$(printf %03d "$i")" --mac "${MACS[$((i - 1))]}"; done

# Publish the test kernel and initramfs as the osimage's current revision (what
# `luna osimage pack` produces from a real chroot).
mkdir -p "$WORK/data/images/tiny/1"
cp "$KERNEL" "$WORK/data/images/tiny/1/vmlinuz"
cp "$INITRD" "$WORK/data/images/tiny/1/initrd.img"
ip netns exec "$NS" curl -sf -X PATCH -H "Authorization: Bearer $(cat "$WORK/token")" \
    -H "Content-Type: application/json" "http://$SERVER_IP:7050/api/v1/osimage/tiny" \
    --data "{\"revisions\":[{\"id\":1,\"created\":$(date +%s),\"kernel_version\":\"$KVER\",\"archive\":\"tiny.tar.zst\",\"archive_size\":0,\"sha256\":\"\",\"kernel\":\"vmlinuz\",\"initrd\":\"initrd.img\",\"torrent\":\"tiny.torrent\",\"info_hash\":\"\"}],\"current_revision\":1}" >/dev/null
luna node list

say "booting $VMS VMs (qemu, TCG) from the network"
START=$(date +%s)
for i in $(seq "$VMS"); do
    tap="tap$i"
    ip -n "$NS" tuntap add dev "$tap" mode tap
    ip -n "$NS" link set "$tap" master br0
    ip -n "$NS" link set "$tap" up
    ip netns exec "$NS" qemu-system-x86_64 -accel tcg -m 512 -nographic -no-reboot -boot n \
        -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" \
        -device "virtio-net-pci,netdev=n0,mac=${MACS[$((i - 1))]}" >"$WORK/vm$i.log" 2>&1 </dev/null &
    PIDS+=($!)
done

declare -A DONE
for _ in $(seq 300); do
    for i in $(seq "$VMS"); do
        if [ -z "${DONE[$i]:-}" ] && grep -q "LUNA-TEST-MARKER" "$WORK/vm$i.log" 2>/dev/null; then
            DONE[$i]=$(($(date +%s) - START))
            echo "node$(printf %03d "$i"): booted its kernel and initramfs after ${DONE[$i]} s"
        fi
    done
    [ "${#DONE[@]}" -eq "$VMS" ] && break
    sleep 1
done

say "the node table"
luna node list
if [ "${#DONE[@]}" -ne "$VMS" ]; then
    echo "only ${#DONE[@]} of $VMS VMs booted; the last lines of each console:" >&2
    for i in $(seq "$VMS"); do echo "--- vm$i"; tail -5 "$WORK/vm$i.log"; done >&2
    exit 1
fi
echo "all $VMS nodes network-booted from luna-server in at most $(printf '%s\n' "${DONE[@]}" | sort -n | tail -1) s"
