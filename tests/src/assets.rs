//! Kernel, initramfs and image tree for VM tests, built by `tests/assets/build-test-image.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::{work_dir, HarnessError, Result};

/// Printed by the test initramfs's /init: `LUNA-TEST-MARKER hostname=<name>`.
pub const MARKER: &str = "LUNA-TEST-MARKER";
/// Printed by the test initramfs for each lease when booted with `luna.dhcp=1`:
/// `LUNA-TEST-DHCP iface=eth0 ip=10.0.0.5 mask=24 router=10.0.0.1 mac=52:54:00:..`.
pub const DHCP_MARKER: &str = "LUNA-TEST-DHCP";
/// Printed by the test image's /sbin/init: `LUNA-BOOTED host=<hostname> report=ok|failed|none`,
/// after it POSTed step `booted` to `<luna.url>/boot/status` (when luna installed it).
pub const BOOTED_MARKER: &str = "LUNA-BOOTED";

/// Where the boot assets are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestAssets {
    /// Kernel release, e.g. "6.1.0-56-amd64".
    pub kver: String,
    /// The kernel image (bzImage).
    pub kernel: PathBuf,
    /// The unpacked kernel package: `boot/`, `lib/modules/<kver>/` (for `dracut --kmoddir`).
    pub kroot: PathBuf,
    /// The busybox initramfs printing [`MARKER`] (kernel args: `luna.hostname=`, `luna.dhcp=1`).
    pub initrd: PathBuf,
    /// A busybox root tree whose /sbin/init prints [`BOOTED_MARKER`]; has
    /// `/boot/vmlinuz-<kver>` and some modules.
    pub rootfs: PathBuf,
}

impl TestAssets {
    /// `kroot/lib/modules/<kver>`.
    pub fn modules_dir(&self) -> PathBuf {
        self.kroot.join("lib/modules").join(&self.kver)
    }

    fn parse(text: &str) -> Result<TestAssets> {
        let get = |key: &str| -> Result<String> {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| HarnessError::Setup(format!("build-test-image.sh printed no {key}: {text}")))
        };
        Ok(TestAssets {
            kver: get("KVER")?,
            kernel: get("KERNEL")?.into(),
            kroot: get("KROOT")?.into(),
            initrd: get("INITRD")?.into(),
            rootfs: get("ROOTFS")?.into(),
        })
    }
}

static ASSETS: Mutex<Option<TestAssets>> = Mutex::new(None);

/// Builds the assets if they are missing (a kernel download and about 10 s the first time;
/// cached in `<work>/assets`) and returns where they are. Needs root.
pub fn test_assets() -> Result<TestAssets> {
    let mut cached = ASSETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(a) = cached.as_ref() {
        return Ok(a.clone());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/build-test-image.sh");
    let out_dir = work_dir().join("assets");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&out_dir)
        .output()
        .map_err(|e| HarnessError::io(format!("run {}", script.display()), e))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: format!("bash {} {}", script.display(), out_dir.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let assets = TestAssets::parse(&String::from_utf8_lossy(&out.stdout))?;
    for p in [&assets.kernel, &assets.initrd] {
        if !p.is_file() {
            return Err(HarnessError::Setup(format!("asset {} missing after build", p.display())));
        }
    }
    *cached = Some(assets.clone());
    Ok(assets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_script_output() {
        let a = TestAssets::parse(
            "KVER=6.1.0-1-amd64\nKROOT=/a/k\nKERNEL=/a/k/boot/vmlinuz\nINITRD=/a/i.img\nROOTFS=/a/r\n",
        )
        .unwrap();
        assert_eq!(a.kver, "6.1.0-1-amd64");
        assert_eq!(a.modules_dir(), PathBuf::from("/a/k/lib/modules/6.1.0-1-amd64"));
        assert_eq!(a.rootfs, PathBuf::from("/a/r"));
        assert!(TestAssets::parse("KVER=x\n").is_err());
    }
}
