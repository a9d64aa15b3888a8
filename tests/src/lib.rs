//! Test harness shared by the end-to-end tests: real processes, network namespaces, qemu VMs.
//!
//! Tests that need root, namespaces or qemu call [`privileged()`] first and return early when it
//! says no. Everything the harness creates (namespaces, processes, VMs) is removed by `Drop`
//! guards, also when a test fails half-way.
//!
//! ```no_run
//! use luna_tests::{privileged, Netns, Vm, test_assets, MARKER};
//! use std::time::Duration;
//! if !privileged() { return; }
//! let assets = test_assets().unwrap();
//! let ns = Netns::new().unwrap();
//! let vm = Vm::builder("demo")
//!     .direct_kernel(&assets.kernel, &assets.initrd, "console=ttyS0 quiet panic=-1")
//!     .spawn_in(&ns)
//!     .unwrap();
//! vm.wait_for(MARKER, Duration::from_secs(60)).unwrap();
//! ```

mod assets;
pub mod bench;
mod bins;
mod bmcsim;
mod browser;
mod cluster;
mod debian;
mod error;
mod http;
mod net;
mod netns;
mod process;
mod ra;
pub mod swarm_bed;
mod vm;

use std::path::PathBuf;

pub use assets::{test_assets, TestAssets, BOOTED_MARKER, DHCP_MARKER, MARKER};
pub use bins::{agent_bin, cargo_bin, profile_dir, workspace_root};
pub use bmcsim::ipmi_sim;
pub use browser::Browser;
pub use cluster::{private_dracut_base, Cluster, ClusterOptions};
pub use debian::{debian_tree, reached_multi_user, DebianFlavour, DEBIAN_KERNEL_OPTS, MULTI_USER};
pub use error::{HarnessError, Result};
pub use http::{read_request, StandInRequest};
pub use net::{free_port, free_udp_port, next_mac};
pub use netns::{Netns, NetnsThread};
pub use process::{strip_control, wait_for_line, ChildGuard, Lines};
pub use ra::RouterAdverts;
pub use vm::{Firmware, NicModel, Vm, VmBuilder};

/// The environment variable that enables tests needing root, namespaces and qemu.
pub const PRIVILEGED_ENV: &str = "LUNA_TEST_PRIVILEGED";

/// True when privileged tests may run (`LUNA_TEST_PRIVILEGED=1`); otherwise reports the skip
/// (`SKIPPED: <test>: …` on stderr and in `$LUNA_TEST_SKIP_LOG`, which `scripts/test.sh`
/// fails on) and returns false, so a test can `if !privileged() { return; }`.
pub fn privileged() -> bool {
    luna_core::test_support::gate(PRIVILEGED_ENV)
}

/// Reports that the running test skips for `reason` (see [`luna_core::test_support::skip`]).
pub fn skip(reason: &str) {
    luna_core::test_support::skip(reason);
}

/// Scratch directory of the tests: `$LUNA_TEST_WORK`, else `tests/work` in the source tree.
pub fn work_dir() -> PathBuf {
    match std::env::var_os("LUNA_TEST_WORK") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("work"),
    }
}

/// Where captured process output goes: `<work_dir>/logs`, created on demand.
pub fn logs_dir() -> Result<PathBuf> {
    let dir = work_dir().join("logs");
    std::fs::create_dir_all(&dir).map_err(|e| HarnessError::io(format!("create {}", dir.display()), e))?;
    Ok(dir)
}

/// Finds `program` on `PATH` (or takes it as a path), with an error that says how to get it.
pub fn require_tool(program: &str) -> Result<PathBuf> {
    let candidate = PathBuf::from(program);
    if candidate.is_absolute() {
        return if candidate.is_file() { Ok(candidate) } else { Err(missing_tool(program)) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]) {
        let full = dir.join(program);
        if full.is_file() {
            return Ok(full);
        }
    }
    Err(missing_tool(program))
}

fn missing_tool(program: &str) -> HarnessError {
    HarnessError::Setup(format!("{program} not found; run scripts/install-deps.sh as root"))
}
