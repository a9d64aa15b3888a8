//! IPv6 router advertisements on a test network, so network-booting VMs do not stall.
//!
//! iPXE's automatic configuration (`ifconf`, used by the autoboot of qemu's NIC ROMs) runs
//! DHCPv4 and IPv6 autoconfiguration together and only carries on when both finished: on a link
//! without router advertisements that is about 16 s of waiting per boot. A router advertising a
//! ULA prefix ends the IPv6 half in a second.

use std::time::Duration;

use crate::{require_tool, work_dir, ChildGuard, HarnessError, Netns, Result};

/// A router-advertisement daemon (dnsmasq in RA-only mode: no DHCP, no DNS, so it binds neither
/// port 67 nor 53) on one link of a namespace. Stops on drop.
pub struct RouterAdverts {
    child: ChildGuard,
    // dropped after the child: dnsmasq's pid file is in it
    _dir: tempfile::TempDir,
}

impl RouterAdverts {
    /// Adds `<prefix>1/64` to `dev` (e.g. prefix "fd77::" gives fd77::1/64; use a ULA prefix)
    /// and advertises the prefix for SLAAC on `dev`.
    pub fn start(ns: &Netns, dev: &str, prefix: &str) -> Result<RouterAdverts> {
        require_tool("dnsmasq")?;
        if !prefix.ends_with("::") {
            return Err(HarnessError::Setup(format!("ipv6 prefix {prefix:?} must end in \"::\"")));
        }
        ns.add_addr(dev, &format!("{prefix}1/64"))?;
        let base = work_dir();
        std::fs::create_dir_all(&base).map_err(|e| HarnessError::io(format!("create {}", base.display()), e))?;
        let dir = tempfile::Builder::new()
            .prefix("ra-")
            .tempdir_in(&base)
            .map_err(|e| HarnessError::io(format!("temp dir in {}", base.display()), e))?;
        let args = [
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".to_string(),
            "--port=0".to_string(),
            "--no-resolv".to_string(),
            "--no-hosts".to_string(),
            format!("--interface={dev}"),
            "--bind-interfaces".to_string(),
            "--enable-ra".to_string(),
            format!("--dhcp-range=::,constructor:{dev},ra-only"),
            format!("--pid-file={}", dir.path().join("pid").display()),
            format!("--dhcp-leasefile={}", dir.path().join("leases").display()),
            "--user=root".to_string(),
            "--log-facility=-".to_string(),
        ];
        let child = ns.spawn(&format!("ra-{}", ns.name()), "dnsmasq", &args)?;
        child.wait_for("started", Duration::from_secs(20))?;
        Ok(RouterAdverts { child, _dir: dir })
    }

    /// The daemon's log (lines `RTR-SOLICIT(dev) <mac>` / `RTR-ADVERT(dev) <prefix>`).
    pub fn output(&self) -> &crate::Lines {
        self.child.output()
    }
}
