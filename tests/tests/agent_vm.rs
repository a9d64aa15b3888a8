//! The node side in an initramfs: dracut builds one with the 95luna module for the test kernel,
//! and `lsinitrd` shows the agent, the hooks and the network pieces they rely on.
//! Needs root and dracut (`LUNA_TEST_PRIVILEGED=1`).

use std::path::{Path, PathBuf};
use std::process::Command;

use luna_tests::{cargo_bin, privileged, test_assets, work_dir, workspace_root};

/// Makes `/usr/lib/dracut/modules.d/95luna` point at the module in this tree.
fn link_module() -> PathBuf {
    let src = workspace_root().join("dracut-module/95luna");
    let dst = Path::new("/usr/lib/dracut/modules.d/95luna");
    if std::fs::read_link(dst).ok().as_deref() != Some(src.as_path()) {
        let _ = std::fs::remove_file(dst);
        let _ = std::fs::remove_dir_all(dst);
        std::os::unix::fs::symlink(&src, dst).expect("link the 95luna module into dracut's modules.d");
    }
    src
}

/// Builds an initramfs with 95luna for the test kernel; returns its path.
pub fn build_initramfs(agent: &Path, out: &Path) {
    let assets = test_assets().expect("boot assets (tests/assets/build-test-image.sh)");
    link_module();
    let modules = assets.modules_dir();
    let status = Command::new("depmod").arg("-b").arg(&assets.kroot).arg(&assets.kver).status().expect("run depmod");
    assert!(status.success(), "depmod -b {} {}", assets.kroot.display(), assets.kver);
    let output = Command::new("dracut")
        .env("LUNA_AGENT_BIN", agent)
        .args(["--force", "--no-hostonly", "--kver", &assets.kver, "--kmoddir"])
        .arg(&modules)
        .args(["--omit", "systemd systemd-initrd systemd-networkd dracut-systemd plymouth i18n"])
        .args(["--add", "luna network-legacy base", "--add-drivers", "virtio_net virtio_pci e1000"])
        .arg(out)
        .output()
        .expect("run dracut (apt-get install dracut-core dracut-network isc-dhcp-client)");
    assert!(
        output.status.success(),
        "dracut failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn dracut_initramfs_has_the_agent_and_hooks() {
    if !privileged() {
        return;
    }
    let agent = cargo_bin("luna-agent").expect("luna-agent binary");
    let dir = work_dir().join("agent-initramfs");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("luna-initrd.img");
    build_initramfs(&agent, &img);

    let out = Command::new("lsinitrd").arg(&img).output().expect("run lsinitrd");
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    for path in [
        "usr/bin/luna-agent",
        "sbin/lunaroot",
        "lib/luna-lib.sh",
        "hooks/cmdline/90-parse-luna.sh",
        "hooks/mount/90-luna-mount.sh",
        "sbin/netroot",
        "sbin/ifup",
        "sbin/dhclient",
        "chroot",
    ] {
        assert!(listing.lines().any(|l| l.contains(path)), "{path} missing from the initramfs:\n{listing}");
    }
    // The agent in the image is the one we built.
    let agent_in = Command::new("lsinitrd").arg("-f").arg("usr/bin/luna-agent").arg(&img).output().unwrap();
    assert_eq!(agent_in.stdout.len() as u64, std::fs::metadata(&agent).unwrap().len());
    // And the hook that claims root=luna is the module's.
    let hook = Command::new("lsinitrd")
        .arg("-f")
        .arg("usr/lib/dracut/hooks/cmdline/90-parse-luna.sh")
        .arg(&img)
        .output()
        .unwrap();
    let hook = String::from_utf8_lossy(&hook.stdout);
    assert!(hook.contains("rootok=1") && hook.contains("netroot=luna"), "{hook}");
}
