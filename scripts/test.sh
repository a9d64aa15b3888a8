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

step "cargo build --workspace"
cargo build --workspace

step "install the agent and the dracut module as a luna server would have them"
# pack builds initramfs files with `dracut --add luna`: the module and the agent it ships must be
# where a real installation puts them.
install -D -m 0755 "${CARGO_TARGET_DIR:-target}/debug/luna-agent" /usr/lib/luna/luna-agent
mkdir -p /usr/lib/dracut/modules.d
ln -sfn "$PWD/dracut-module/95luna" /usr/lib/dracut/modules.d/95luna

step "boot assets for the VM tests"
bash tests/assets/build-test-image.sh >/dev/null

step "cargo test --workspace"
cargo test --workspace --no-fail-fast "$@"

step "done"
