//! The prologue of the Debian VM tests (`debootstrap_vm`, `disk_vm`, `debian_modes_vm`,
//! `cloudinit_vm`): the Debian tree, built (or found cached) by `scripts/build-debian-image.sh`
//! as the demo builds it, the kernel options those tests boot it with and what systemd prints
//! when the boot is through.

use std::path::PathBuf;
use std::process::Command;

use crate::{work_dir, workspace_root, HarnessError, Result, Vm};

/// Kernel options of the Debian osimages. no_timer_check: under TCG on a busy host the
/// kernel's IO-APIC timer check can fail and panic ("IO-APIC + timer doesn't work");
/// systemd.show_status: the "Reached target" lines on the console.
pub const DEBIAN_KERNEL_OPTS: &str = "console=ttyS0 panic=-1 rd.retry=600 no_timer_check systemd.show_status=1";

/// What systemd prints when the boot is through (systemd 252: "[  OK  ] Reached target
/// multi-user.target - Multi-User System.").
pub const MULTI_USER: &str = "Multi-User System";

/// The flavours `scripts/build-debian-image.sh` builds, each cached in its own directory under
/// the tests' work directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebianFlavour {
    /// `debootstrap --variant=minbase` bookworm with systemd, udev, iproute2 and the kernel.
    Minbase,
    /// Minbase with grub for BIOS and UEFI and the kernel's initramfs (`root = disk`).
    Disk,
    /// Minbase with cloud-init and systemd-networkd enabled.
    CloudInit,
}

impl DebianFlavour {
    fn dir(self) -> &'static str {
        match self {
            DebianFlavour::Minbase => "debootstrap",
            DebianFlavour::Disk => "debootstrap-disk",
            DebianFlavour::CloudInit => "debootstrap-cloudinit",
        }
    }

    fn env(self) -> Option<&'static str> {
        match self {
            DebianFlavour::Minbase => None,
            DebianFlavour::Disk => Some("LUNA_DEBIAN_DISK"),
            DebianFlavour::CloudInit => Some("LUNA_DEBIAN_CLOUDINIT"),
        }
    }
}

/// The Debian tree of `flavour` (`<work>/<flavour dir>/root`): built by
/// `scripts/build-debian-image.sh` the first time (needs root, debootstrap and the Debian
/// mirror), found cached afterwards.
pub fn debian_tree(flavour: DebianFlavour) -> Result<PathBuf> {
    let script = workspace_root().join("scripts/build-debian-image.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(work_dir().join(flavour.dir()));
    for var in ["LUNA_DEBIAN_DISK", "LUNA_DEBIAN_CLOUDINIT"] {
        cmd.env_remove(var);
    }
    if let Some(var) = flavour.env() {
        cmd.env(var, "1");
    }
    let out = cmd.output().map_err(|e| HarnessError::io(format!("run {}", script.display()), e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: format!("{} ({flavour:?}; needs debootstrap and the Debian mirror)", script.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("ROOT="))
        .map(|r| PathBuf::from(r.trim()))
        .ok_or_else(|| HarnessError::Setup(format!("{} printed no ROOT=: {stdout}", script.display())))
}

/// Whether systemd on `vm`'s console reached `multi-user.target`.
pub fn reached_multi_user(vm: &Vm) -> bool {
    vm.serial().lines().iter().any(|l| l.contains("Reached target") && l.contains(MULTI_USER))
}
