//! qemu-system-x86_64 virtual machines under software emulation, serial console captured.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::{require_tool, work_dir, ChildGuard, HarnessError, Lines, Netns, Result};

/// The machine's firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS; network boot through the NIC's iPXE option ROM.
    Bios,
    /// OVMF (UEFI); network boot through iPXE's EFI driver in the same ROM.
    Uefi,
}

/// The emulated network card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicModel {
    VirtioNet,
    E1000,
}

impl NicModel {
    fn device(self) -> &'static str {
        match self {
            NicModel::VirtioNet => "virtio-net-pci",
            NicModel::E1000 => "e1000",
        }
    }
}

#[derive(Clone, Debug)]
struct Nic {
    tap: String,
    mac: String,
    model: NicModel,
}

#[derive(Clone, Debug)]
struct DirectBoot {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    append: String,
}

/// Builds a qemu command line: `-accel tcg -m 512 -nographic -no-reboot`, serial console on
/// stdout, NICs on tap devices, network boot (`-boot n`) unless a kernel is given directly.
#[derive(Clone, Debug)]
pub struct VmBuilder {
    name: String,
    memory_mb: u32,
    cpus: u32,
    firmware: Firmware,
    nics: Vec<Nic>,
    direct: Option<DirectBoot>,
    disks: Vec<PathBuf>,
    extra: Vec<OsString>,
    nic_rom: bool,
}

/// OVMF images Debian ships (ovmf package): code and the template of its variable store.
const OVMF: [(&str, &str); 2] = [
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
];

impl VmBuilder {
    /// Memory in MiB (default 512).
    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.memory_mb = mb;
        self
    }

    /// Number of virtual CPUs (default 1).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// Firmware (default BIOS).
    pub fn firmware(mut self, firmware: Firmware) -> Self {
        self.firmware = firmware;
        self
    }

    /// Shorthand for `firmware(Firmware::Uefi)`.
    pub fn uefi(self) -> Self {
        self.firmware(Firmware::Uefi)
    }

    /// Adds a virtio NIC on the existing tap device `tap` with address `mac`. The first NIC is
    /// the network boot device.
    pub fn nic(self, tap: &str, mac: &str) -> Self {
        self.nic_model(tap, mac, NicModel::VirtioNet)
    }

    /// Adds a NIC of the given model.
    pub fn nic_model(mut self, tap: &str, mac: &str, model: NicModel) -> Self {
        self.nics.push(Nic { tap: tap.to_string(), mac: mac.to_string(), model });
        self
    }

    /// Boots `kernel` (+ `initrd`) with command line `append` instead of the network.
    pub fn direct_kernel(mut self, kernel: impl AsRef<Path>, initrd: impl AsRef<Path>, append: &str) -> Self {
        self.direct = Some(DirectBoot {
            kernel: kernel.as_ref().to_path_buf(),
            initrd: Some(initrd.as_ref().to_path_buf()),
            append: append.to_string(),
        });
        self
    }

    /// Adds a virtio disk backed by the image file `path` (raw or qcow2, by extension).
    pub fn disk(mut self, path: impl AsRef<Path>) -> Self {
        self.disks.push(path.as_ref().to_path_buf());
        self
    }

    /// Gives the NICs no iPXE option ROM (`romfile=`), so the firmware's own network stack does
    /// the network boot: OVMF's PXE client (DHCP architecture 7, TFTP), as on most real UEFI
    /// machines. SeaBIOS has no network stack of its own.
    pub fn without_nic_rom(mut self) -> Self {
        self.nic_rom = false;
        self
    }

    /// Appends a raw qemu argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// The qemu command this builder would run; `vars` is the writable UEFI variable store.
    fn command(&self, vars: Option<&Path>) -> Result<Command> {
        let qemu = require_tool("qemu-system-x86_64")?;
        let mut cmd = Command::new(qemu);
        cmd.args(["-name", &self.name, "-accel", "tcg", "-nographic", "-no-reboot"]);
        cmd.arg("-m").arg(self.memory_mb.to_string());
        cmd.arg("-smp").arg(self.cpus.to_string());
        if let (Firmware::Uefi, Some(vars)) = (self.firmware, vars) {
            let (code, _) = ovmf()?;
            cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"));
            cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
        }
        if self.nics.is_empty() {
            // otherwise qemu adds a user-mode NIC
            cmd.args(["-nic", "none"]);
        }
        for (i, nic) in self.nics.iter().enumerate() {
            cmd.arg("-netdev").arg(format!("tap,id=n{i},ifname={},script=no,downscript=no", nic.tap));
            let mut dev = format!("{},netdev=n{i},mac={}", nic.model.device(), nic.mac);
            if i == 0 && self.direct.is_none() {
                dev.push_str(",bootindex=1");
            }
            if !self.nic_rom {
                dev.push_str(",romfile=");
            }
            cmd.arg("-device").arg(dev);
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let format = if disk.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
            cmd.arg("-drive").arg(format!("if=virtio,index={i},format={format},file={}", disk.display()));
        }
        match &self.direct {
            Some(direct) => {
                cmd.arg("-kernel").arg(&direct.kernel);
                if let Some(initrd) = &direct.initrd {
                    cmd.arg("-initrd").arg(initrd);
                }
                cmd.arg("-append").arg(&direct.append);
            }
            None => {
                cmd.args(["-boot", "n"]);
            }
        }
        cmd.args(&self.extra);
        Ok(cmd)
    }

    /// Starts the VM inside `ns` (where its tap devices are).
    pub fn spawn_in(self, ns: &Netns) -> Result<Vm> {
        self.start(Some(ns))
    }

    /// Starts the VM in the test's own namespace (only for VMs without NICs).
    pub fn spawn(self) -> Result<Vm> {
        if !self.nics.is_empty() {
            return Err(HarnessError::Setup(format!("vm {} has NICs: start it with spawn_in(netns)", self.name)));
        }
        self.start(None)
    }

    fn start(self, ns: Option<&Netns>) -> Result<Vm> {
        let vars_dir = match self.firmware {
            Firmware::Bios => None,
            Firmware::Uefi => {
                let (_, vars_template) = ovmf()?;
                let base = work_dir().join("vm");
                std::fs::create_dir_all(&base)
                    .map_err(|e| HarnessError::io(format!("create {}", base.display()), e))?;
                let dir = tempfile::Builder::new()
                    .prefix("uefi-")
                    .tempdir_in(&base)
                    .map_err(|e| HarnessError::io(format!("temp dir in {}", base.display()), e))?;
                let vars = dir.path().join("OVMF_VARS.fd");
                std::fs::copy(vars_template, &vars)
                    .map_err(|e| HarnessError::io(format!("copy {vars_template}"), e))?;
                Some(dir)
            }
        };
        let vars = vars_dir.as_ref().map(|d| d.path().join("OVMF_VARS.fd"));
        let qemu = self.command(vars.as_deref())?;
        let mut cmd = match ns {
            Some(ns) => {
                let mut wrapped = ns.command(qemu.get_program());
                wrapped.args(qemu.get_args());
                wrapped
            }
            None => qemu,
        };
        let child = ChildGuard::spawn(&mut cmd, &format!("vm-{}", self.name))?;
        Ok(Vm { child, _vars: vars_dir, name: self.name })
    }
}

fn ovmf() -> Result<(&'static str, &'static str)> {
    OVMF.iter()
        .find(|(code, vars)| Path::new(code).is_file() && Path::new(vars).is_file())
        .copied()
        .ok_or_else(|| HarnessError::Setup("no OVMF firmware in /usr/share/OVMF; install the ovmf package".into()))
}

/// A running VM; killed on drop. Its serial console (qemu's stdout) and qemu's stderr are in
/// [`Vm::serial`].
pub struct Vm {
    child: ChildGuard,
    // dropped after the child: the UEFI variable store qemu has open
    _vars: Option<tempfile::TempDir>,
    name: String,
}

impl Vm {
    /// A builder for a VM called `name` (used in logs and qemu's `-name`).
    pub fn builder(name: &str) -> VmBuilder {
        VmBuilder {
            name: name.to_string(),
            memory_mb: 512,
            cpus: 1,
            firmware: Firmware::Bios,
            nics: Vec::new(),
            direct: None,
            disks: Vec::new(),
            extra: Vec::new(),
            nic_rom: true,
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The console transcript.
    pub fn serial(&self) -> &Lines {
        self.child.output()
    }

    /// Waits for a console line containing `needle`; returns the line.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.child.wait_for(needle, timeout)
    }

    /// Waits for qemu to exit (the guest powered off; `-no-reboot` makes a reboot exit too).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.child.wait_timeout(timeout)
    }

    /// qemu's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Stops the VM now.
    pub fn kill(&mut self) {
        self.child.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn network_boot_command_line() {
        if require_tool("qemu-system-x86_64").is_err() {
            crate::skip("qemu-system-x86_64 not installed");
            return;
        }
        let b =
            Vm::builder("t").nic("tap0", "52:54:00:00:00:01").nic_model("tap1", "52:54:00:00:00:02", NicModel::E1000);
        let a = args(&b.command(None).unwrap()).join(" ");
        assert!(a.contains("-accel tcg"), "{a}");
        assert!(a.contains("-m 512"), "{a}");
        assert!(a.contains("-no-reboot") && a.contains("-nographic"), "{a}");
        assert!(a.contains("-boot n"), "{a}");
        assert!(a.contains("tap,id=n0,ifname=tap0,script=no,downscript=no"), "{a}");
        assert!(a.contains("virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,bootindex=1"), "{a}");
        assert!(a.contains("e1000,netdev=n1,mac=52:54:00:00:00:02 "), "{a}");
        assert!(!a.contains("-nic none") && !a.contains("pflash") && !a.contains("romfile"), "{a}");
        let b = Vm::builder("t").uefi().without_nic_rom().nic("tap0", "52:54:00:00:00:01");
        let a = args(&b.command(Some(Path::new("/v.fd"))).unwrap()).join(" ");
        assert!(a.contains("mac=52:54:00:00:00:01,bootindex=1,romfile= "), "{a}");
    }

    #[test]
    fn direct_kernel_and_uefi_command_line() {
        if require_tool("qemu-system-x86_64").is_err() || ovmf().is_err() {
            crate::skip("qemu-system-x86_64 or OVMF not installed");
            return;
        }
        let b = Vm::builder("k").uefi().memory_mb(768).direct_kernel("/k", "/i", "console=ttyS0");
        let a = args(&b.command(Some(Path::new("/v.fd"))).unwrap());
        let joined = a.join(" ");
        assert!(joined.contains("-m 768"), "{joined}");
        assert!(joined.contains("-nic none"), "{joined}");
        assert!(joined.contains("readonly=on,file=/usr/share/OVMF/OVMF_CODE"), "{joined}");
        assert!(joined.contains("unit=1,file=/v.fd"), "{joined}");
        assert!(!joined.contains("-boot n"), "{joined}");
        let i = a.iter().position(|x| x == "-append").unwrap();
        assert_eq!(a[i + 1], "console=ttyS0");
    }
}
