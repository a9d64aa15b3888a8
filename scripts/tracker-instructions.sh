#!/bin/bash
# Instructions per announce, luna's tracker against opentracker, counted by callgrind: a figure
# that, unlike requests per second, does not depend on what else the machine is doing.
#
#   cargo build --release -p luna-tests --bin bench_tracker
#   sudo bash scripts/tracker-instructions.sh [N1] [N2]
#
# Each server runs under `valgrind --tool=callgrind`; a client sends the same announces (one TCP
# connection each, `Connection: close`, as BitTorrent clients announce; luna also with
# keep-alive) after a warm-up that fills the swarms. Each server is run twice, with N1 and N2
# announces; (Ir(N2) - Ir(N1)) / (N2 - N1) is the cost of one announce, start-up and shutdown
# cancelled out. Kernel work (accept, the TCP handshake) is not counted: callgrind sees user
# space only.
set -euo pipefail
N1=${1:-300}
N2=${2:-1300}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BENCH_TRACKER:-$ROOT/target/release/bench_tracker}
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release -p luna-tests --bin bench_tracker" >&2; exit 1; }
for t in valgrind callgrind_annotate opentracker python3 setpriv; do
    command -v "$t" >/dev/null || { echo "$t not found" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/tracker-ir.XXXXXX)
chmod 0777 "$WORK"
trap 'rm -rf "$WORK"' EXIT
"$BIN" paths >"$WORK/paths"

# drive ADDR COUNT MODE: COUNT announces (after a warm-up of every path once), MODE close|keepalive
drive() {
    python3 - "$1" "$2" "$3" "$WORK/paths" <<'PY'
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
count, mode, paths = int(sys.argv[2]), sys.argv[3], open(sys.argv[4]).read().split()
def recv_answer(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")), None)
    while length is None or len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    assert head.startswith(b"HTTP/1.") and body.startswith(b"d"), head[:80]
    return body
def one(path, s=None):
    close = s is None
    if close:
        s = socket.create_connection((host, int(port)))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n".encode())
    recv_answer(s)
    if close:
        s.close()
for p in paths:
    one(p)
if mode == "close":
    for i in range(count):
        one(paths[i % len(paths)])
else:
    s = socket.create_connection((host, int(port)))
    for i in range(count):
        one(paths[i % len(paths)], s)
    s.close()
PY
}

# (awk reads to the end: an early exit would kill callgrind_annotate with SIGPIPE, fatal under pipefail)
total_ir() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}'; }

# run_luna COUNT MODE -> total Ir
run_luna() {
    local out="$WORK/luna.$1.$2" fifo="$WORK/stdin.$1.$2"
    mkfifo "$fifo"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$BIN" serve luna <"$fifo" >"$WORK/luna.log" 2>"$WORK/luna.err" &
    local pid=$!
    exec 9>"$fifo"
    local addr=""
    for _ in $(seq 600); do addr=$(awk '/^listening/ {print $2}' "$WORK/luna.log"); [ -n "$addr" ] && break; sleep 0.1; done
    [ -n "$addr" ] || { cat "$WORK/luna.err" >&2; exit 1; }
    drive "$addr" "$1" "$2"
    exec 9>&-
    wait "$pid"
    total_ir "$out"
}

# run_ot COUNT -> total Ir (opentracker as nobody: no chroot, so valgrind keeps its files)
run_ot() {
    local out="$WORK/ot.$1" port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    awk -F'info_hash=' '{split($2, a, "&"); print a[1]}' "$WORK/paths" | sort -u | python3 -c '
import sys, urllib.parse
for l in sys.stdin:
    print(urllib.parse.unquote_to_bytes(l.strip()).hex())' >"$WORK/whitelist"
    setpriv --reuid=nobody --regid=nogroup --clear-groups \
        valgrind --tool=callgrind --callgrind-out-file="$out" opentracker -i 127.0.0.1 -p "$port" -P "$port" \
        -w "$WORK/whitelist" >"$WORK/ot.log" 2>&1 &
    local pid=$!
    for _ in $(seq 600); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port)).close()" 2>/dev/null && break
        sleep 0.1
    done
    drive "127.0.0.1:$port" "$1" close
    kill -INT "$pid"
    wait "$pid" || true
    total_ir "$out"
}

per() { python3 -c "print(round(($2 - $1) / ($N2 - $N1)))"; }
l1=$(run_luna "$N1" close); l2=$(run_luna "$N2" close)
k1=$(run_luna "$N1" keepalive); k2=$(run_luna "$N2" keepalive)
o1=$(run_ot "$N1"); o2=$(run_ot "$N2")
lc=$(per "$l1" "$l2"); lk=$(per "$k1" "$k2"); oc=$(per "$o1" "$o2")
echo "instructions per announce (user space, callgrind Ir; N1=$N1 N2=$N2):"
echo "  luna, one connection per announce: $lc"
echo "  luna, keep-alive:                  $lk"
echo "  opentracker (one per connection):  $oc"
python3 -c "print(f'  ratio opentracker/luna, one connection per announce: {$oc / $lc:.2f} (>= 1.0: luna needs fewer)')"
