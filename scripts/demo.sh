#!/usr/bin/env bash
# The demo: a luna cluster on the embedded store, in a private network namespace. luna-server
# packs a small OS image (a busybox tree with a Debian kernel) into a torrent, then three qemu
# VMs network-boot from it alone (its DHCP, TFTP and HTTP/iPXE), download the image from the
# swarm (the server's seeder and each other), switch root into it, and the booted image
# reports back. Ends with the node table, each node's status and timings. Run as root on
# Debian; cleans up after itself.
#
#   sudo bash scripts/demo.sh                          # LUNA_DEMO_VMS=2 for two VMs
#   sudo LUNA_DEMO_IMAGE=debian bash scripts/demo.sh   # a real Debian instead (see below)
#
# LUNA_DEMO_IMAGE=debian: the image is a `debootstrap --variant=minbase` bookworm with systemd and
# the Debian kernel (scripts/build-debian-image.sh; needs the Debian mirror apt uses, about 9 min
# the first time, cached in tests/work/debootstrap). Two VMs with 2.5 GiB each boot it to
# multi-user.target. Expect 20-40 min under TCG.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

IMAGE=${LUNA_DEMO_IMAGE:-tiny}
case "$IMAGE" in
    tiny) VMS=${LUNA_DEMO_VMS:-3} VM_MB=1024 WAIT_S=600 ;;
    debian) VMS=${LUNA_DEMO_VMS:-2} VM_MB=2560 WAIT_S=2700 ;;
    *)
        echo "LUNA_DEMO_IMAGE must be tiny or debian, not $IMAGE" >&2
        exit 2
        ;;
esac
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
BIN=$(cd "$BIN" && pwd)
say "building luna-agent as nodes get it: static (musl), --profile agent"
cargo build -p luna-agent --profile agent --target x86_64-unknown-linux-musl
AGENT=$(cd "${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-musl/agent" && pwd)/luna-agent
KERNEL_OPTS="console=ttyS0 panic=-1 rd.retry=300"

if [ "$IMAGE" = debian ]; then
    say "preparing the OS image tree: debootstrap --variant=minbase bookworm + systemd + kernel"
    ROOTFS=$(bash scripts/build-debian-image.sh | sed -n 's/^ROOT=//p')
    # no_timer_check: TCG on a busy host can fail the kernel's IO-APIC timer check
    KERNEL_OPTS="console=ttyS0 panic=-1 rd.retry=600 no_timer_check systemd.show_status=1"
else
    say "preparing the OS image tree (a Debian kernel and a busybox root)"
    bash tests/assets/build-test-image.sh >/dev/null
    # shellcheck disable=SC1091
    . tests/work/assets/env
fi

# luna-server builds each image's initramfs with dracut and luna's dracut module, which ships
# luna-agent. A real server has them in /usr/lib/dracut/modules.d/95luna and
# /usr/lib/luna/luna-agent; the demo leaves the system alone and points dracut at a private
# copy holding this tree's module and agent ([image] dracut below).
cp -a /usr/lib/dracut "$WORK/dracutbase"
rm -rf "$WORK/dracutbase/modules.d/95luna"
ln -s "$PWD/dracut-module/95luna" "$WORK/dracutbase/modules.d/95luna"
cat >"$WORK/dracut" <<EOF
#!/bin/sh
export dracutbasedir="$WORK/dracutbase" LUNA_AGENT_BIN="$AGENT"
exec dracut --compress 'gzip -1' "\$@"
EOF
chmod 755 "$WORK/dracut"

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
[http]
api_listen = "$SERVER_IP:7051"
tls_names = ["$SERVER_IP"]
[dhcp]
interfaces = ["br0"]
[tftp]
root = "$WORK/tftpboot"
bind = "$SERVER_IP:69"
[image]
dracut = "$WORK/dracut"
seed_listen = "$SERVER_IP:6881"
EOF
"$BIN/luna-server" --config "$WORK/luna.toml" init
ip netns exec "$NS" "$BIN/luna-server" --config "$WORK/luna.toml" >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "http listening" "$WORK/server.log" && break; sleep 0.2; done

# The admin API is HTTPS only; `init` generated its CA and certificate in $WORK/data/tls.
luna() {
    ip netns exec "$NS" env LUNA_SERVER="https://$SERVER_IP:7051" LUNA_CA="$WORK/data/tls/ca.pem" \
        LUNA_TOKEN_FILE="$WORK/token" "$BIN/luna" "$@"
}
# the image's kept revisions with their swarm and seeder counters, as JSON
revisions() { luna osimage show "$IMAGE" --json | json 'json.dumps(d["revisions"])'; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

say "creating the cluster's objects with the luna CLI"
luna cluster change --frontend-address "$SERVER_IP" --dhcp-interfaces br0 >/dev/null
luna network add prov --cidr 10.88.0.0/24 --gateway "$SERVER_IP"
luna osimage add "$IMAGE" --path "$ROOTFS" --kernel-opts "$KERNEL_OPTS"
# a VM needs the virtio drivers, not every module set
luna osimage change "$IMAGE" --dracut-drivers-add virtio_net,virtio_pci,af_packet \
    --dracut-modules-omit systemd,systemd-initrd,systemd-networkd,dracut-systemd,plymouth,i18n,kernel-modules,kernel-modules-extra,qemu,qemu-net
luna group add compute --osimage "$IMAGE" --network prov
MACS=()
for i in $(seq "$VMS"); do MACS+=("52:54:00:88:00:$(printf %02x "$i")"); done
luna node add "node[001-$(printf %03d "$VMS")]" --group compute
for i in $(seq "$VMS"); do luna node change "node$(printf %03d "$i")" --mac "${MACS[$((i - 1))]}"; done

say "packing osimage $IMAGE: tar.zst + torrent, kernel, initramfs by dracut with luna's module"
PACK_START=$(date +%s)
luna osimage pack "$IMAGE"
echo "packed in $(($(date +%s) - PACK_START)) s"
luna osimage show "$IMAGE"
for _ in $(seq 600); do
    revisions | json 'd[-1]["seeder"] and d[-1]["seeder"]["healthy"]' | grep -q True && break
    sleep 0.5
done
luna node list

say "the live view: open it in a browser inside the namespace (or forward the port)"
echo "  https://$SERVER_IP:7051/  (it asks for the admin token: $WORK/token; the CA is $WORK/data/tls/ca.pem)"
echo "  e.g. ip netns exec $NS chromium --user-data-dir=\$(mktemp -d) --ignore-certificate-errors https://$SERVER_IP:7051/"
echo "  or in this terminal: ip netns exec $NS env LUNA_SERVER=https://$SERVER_IP:7051 LUNA_CA=$WORK/data/tls/ca.pem LUNA_TOKEN_FILE=$WORK/token $BIN/luna node watch"

say "booting $VMS VMs (qemu, TCG) from the network into the image"
START=$(date +%s)
for i in $(seq "$VMS"); do
    tap="tap$i"
    ip -n "$NS" tuntap add dev "$tap" mode tap
    ip -n "$NS" link set "$tap" master br0
    ip -n "$NS" link set "$tap" up
    ip netns exec "$NS" qemu-system-x86_64 -accel tcg -m "$VM_MB" -nographic -no-reboot -boot n \
        -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" \
        -device "virtio-net-pci,netdev=n0,mac=${MACS[$((i - 1))]}" >"$WORK/vm$i.log" 2>&1 </dev/null &
    PIDS+=($!)
done

declare -A DONE=()
declare -A SEEN=()
MAX_LEECHERS=0
while [ $(($(date +%s) - START)) -lt "$WAIT_S" ]; do
    for i in $(seq "$VMS"); do
        if [ -z "${DONE[$i]:-}" ] && grep -q "LUNA-BOOTED" "$WORK/vm$i.log" 2>/dev/null; then
            DONE[$i]=$(($(date +%s) - START))
            echo "node$(printf %03d "$i"): $(grep -o 'LUNA-BOOTED.*' "$WORK/vm$i.log" | tr -d '\r') after ${DONE[$i]} s"
        elif [ "$IMAGE" = debian ] && [ -z "${DONE[$i]:-}" ]; then
            # the long way there, as the node reports it
            s=$(luna node show "node$(printf %03d "$i")" --json 2>/dev/null |
                json '(d.get("status") or {}).get("step", "-")' 2>/dev/null || echo -)
            if [ "${SEEN[$i]:-}" != "$s" ]; then
                SEEN[$i]=$s
                echo "node$(printf %03d "$i"): $s after $(($(date +%s) - START)) s"
            fi
        fi
    done
    L=$(revisions | json '(d[-1]["tracker"] or {}).get("leechers", 0)' 2>/dev/null || echo 0)
    [ "$L" -gt "$MAX_LEECHERS" ] && MAX_LEECHERS=$L
    [ "${#DONE[@]}" -eq "$VMS" ] && break
    sleep 1
done
if [ "$IMAGE" = debian ]; then
    for i in $(seq "$VMS"); do
        sed 's/\x1b\[[0-9;]*m//g' "$WORK/vm$i.log" | grep -a -m1 -o 'Reached target.*Multi-User System' |
            sed "s/^/vm$i: systemd: /" || true
    done
fi

say "the node table"
luna node list
echo
luna node list --json | python3 -c '
import json, sys, time
start = int(sys.argv[1])
for n in json.load(sys.stdin):
    s = n.get("status") or {}
    print("%-8s %-8s %4s s after power-on  %s" % (n["name"], s.get("step", "-"), s.get("time", start) - start, s.get("message", "")))
' "$START"
echo
echo "the tracker saw up to $MAX_LEECHERS nodes downloading at once; where each node's bytes came from:"
sed 's/\x1b\[[0-9;]*m//g' "$WORK/server.log" | grep "step=unpack" | sed -E 's/.*node=([^ ]+).*detail="?([^"]*)"?.*/\1: \2/' || true
if [ "${#DONE[@]}" -ne "$VMS" ]; then
    echo "only ${#DONE[@]} of $VMS VMs booted; the last lines of each console:" >&2
    for i in $(seq "$VMS"); do echo "--- vm$i"; tail -15 "$WORK/vm$i.log"; done >&2
    exit 1
fi
echo "all $VMS nodes network-booted into the packed image through the swarm in at most $(printf '%s\n' "${DONE[@]}" | sort -n | tail -1) s"
