//! luna-agent: the node side of luna. Runs in the initramfs (dracut module `95luna`), fetches the
//! install plan, runs the group's scripts, streams the OS image from the swarm (HTTP as the
//! fallback) straight into `/sysroot`, writes the node's personality and reports every step.

pub mod backoff;
#[cfg(feature = "bench")]
pub mod bench;
pub mod bmc;
pub mod cloudinit;
pub mod cmdline;
pub mod disk;
pub mod download;
pub mod http;
pub mod install;
pub mod ipmidev;
pub mod loopdev;
pub mod os;
pub mod overlay;
pub mod personality;
pub mod report;
pub mod torrent;
pub mod unpack;

pub use install::{AgentError, Config};
