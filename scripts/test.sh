#!/usr/bin/env bash
# The whole test suite, as CI runs it (as root): installs the dependencies, builds the
# workspace, builds the VM boot assets, then runs every test including the privileged ones
# (network namespaces, qemu) and the MongoDB-backend ones. Exits non-zero on any failure.
#
#   sudo bash scripts/test.sh              # everything
#   sudo bash scripts/test.sh -p luna-core # extra arguments go to `cargo test`
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS" >&2; }

if [ -x "$HOME/.cargo/bin/cargo" ] && ! command -v cargo >/dev/null; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

step "install dependencies"
bash scripts/install-deps.sh

# test doubles installed by install-deps (nx-27017, sushy-emulator, snmpsim-*); appended so
# the venv's python does not shadow the system one
export PATH="$PATH:${LUNA_VENV:-/opt/luna-venv}/bin"
export LUNA_TEST_PRIVILEGED=1
export LUNA_TEST_MONGO=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# full debug info makes every test binary hundreds of MB and linking slow; line tables keep
# file:line in backtraces
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}"
# one build from scratch: incremental state would only add gigabytes to the target dir (a CI
# run once failed with "No space left on device" while linking)
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "cargo fmt --check, cargo clippy -D warnings"
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --workspace"
cargo build --workspace

step "the static luna-agent, installed with the dracut module as a luna server has them"
# What a node boots is the static musl build (`--profile agent`); the tests put that one into
# their initramfs images too (LUNA_TEST_AGENT, read by luna_tests::agent_bin). pack builds
# initramfs files with `dracut --add luna`: module and agent must be where an installation has them.
cargo build -p luna-agent --profile agent --target x86_64-unknown-linux-musl
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR = /* ]] || TARGET_DIR="$PWD/$TARGET_DIR"
export LUNA_TEST_AGENT="$TARGET_DIR/x86_64-unknown-linux-musl/agent/luna-agent"
install -D -m 0755 "$LUNA_TEST_AGENT" /usr/lib/luna/luna-agent
mkdir -p /usr/lib/dracut/modules.d
ln -sfn "$PWD/dracut-module/95luna" /usr/lib/dracut/modules.d/95luna

step "boot assets for the VM tests"
bash tests/assets/build-test-image.sh >/dev/null

step "cargo test --workspace"
# Every gated test that skips appends `SKIPPED: <test>: <reason>` here (luna_core::test_support):
# here every gate is on, so a skip means a test did not run what it is for, and that fails.
skip_log=$(mktemp "${TMPDIR:-/tmp}/luna-test-skips.XXXXXX")
alongside_pid=
trap 'rm -f "$skip_log"; [ -z "$alongside_pid" ] || kill "$alongside_pid" 2>/dev/null || true' EXIT
export LUNA_TEST_SKIP_LOG="$skip_log"
status=0
if [ $# -eq 0 ]; then
    # The swarm test with real clients spends most of its 8 minutes waiting out libtorrent's
    # 300 s announce cycle, in namespaces of its own: it runs beside the rest, not after it.
    cargo test --workspace --no-run
    alongside=aria2_transmission_and_qbittorrent_swarm_with_restarts_and_honest_counters
    alongside_log=$(mktemp "${TMPDIR:-/tmp}/luna-test-swarm-clients.XXXXXX")
    cargo test --workspace --test swarm_clients -- --exact "$alongside" >"$alongside_log" 2>&1 &
    alongside_pid=$!
    cargo test --workspace --no-fail-fast -- --skip "$alongside" || status=$?
    alongside_status=0
    wait "$alongside_pid" || alongside_status=$?
    alongside_pid=
    printf '\n=== swarm_clients (run alongside), exit %s:\n' "$alongside_status" >&2
    cat "$alongside_log" >&2
    rm -f "$alongside_log"
    [ "$alongside_status" -eq 0 ] || [ "$status" -ne 0 ] || status=$alongside_status
else
    cargo test --workspace --no-fail-fast "$@" || status=$?
fi
if [ -s "$skip_log" ]; then
    printf '\n=== gated tests skipped although every gate is on (%s):\n' "$(wc -l <"$skip_log")" >&2
    sort "$skip_log" >&2
    [ "$status" -ne 0 ] || status=1
fi
[ "$status" -eq 0 ] || exit "$status"

if [ $# -eq 0 ]; then
    step "librqbit's unit tests (vendor/librqbit, with those of luna's patches)"
    # Outside the workspace (vendor/ is excluded), with a lock file of its own.
    CARGO_TARGET_DIR="$TARGET_DIR/librqbit" cargo test --locked \
        --manifest-path vendor/librqbit/Cargo.toml --lib
fi

step "done"
