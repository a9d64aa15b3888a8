//! The real dracut path (LUNA_TEST_PRIVILEGED=1; needs dracut-core, dracut-network, luna's
//! 95luna dracut module installed, and the Debian test kernel that tests/assets/build-test-image.sh
//! caches under tests/work/assets): packing an image whose kernel is that Debian kernel builds,
//! on the host, an initramfs holding that kernel's modules and luna's module.

mod image_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use image_support::{privileged, Env};
use luna_core::model::Kind;
use luna_server::image::{self, PackRequest};
use serde_json::json;

/// The unpacked Debian kernel package: `<root>/boot/vmlinuz-<kver>` and `<root>/lib/modules/<kver>`.
fn test_kernel() -> (PathBuf, String) {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/work/assets");
    let env = std::fs::read_to_string(assets.join("env")).unwrap_or_default();
    let get = |k: &str| env.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).map(String::from);
    match (get("KROOT"), get("KVER")) {
        (Some(root), Some(kver)) if Path::new(&root).join("boot").join(format!("vmlinuz-{kver}")).is_file() => {
            (root.into(), kver)
        }
        _ => panic!("no test kernel under {}: run tests/assets/build-test-image.sh first", assets.display()),
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn real_dracut_builds_the_initramfs_on_the_host_from_the_image_modules() {
    if !privileged() {
        return;
    }
    let (kroot, kver) = test_kernel();
    let env = Env::new(|_, c| c.dracut = "dracut".into()).await;
    // swap the fake kernel for the real one; hard links keep it cheap
    std::fs::remove_dir_all(env.chroot.join("usr/lib/modules")).unwrap();
    for f in std::fs::read_dir(env.chroot.join("boot")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    std::fs::create_dir_all(env.chroot.join("usr/lib/modules")).unwrap();
    run(Command::new("cp")
        .arg("-al")
        .arg(kroot.join("lib/modules").join(&kver))
        .arg(env.chroot.join("usr/lib/modules")));
    std::fs::copy(
        kroot.join("boot").join(format!("vmlinuz-{kver}")),
        env.chroot.join("boot").join(format!("vmlinuz-{kver}")),
    )
    .unwrap();
    env.service
        .update(
            Kind::Osimage,
            "compute",
            json!({"dracut_drivers_add": ["virtio_net", "virtio_pci"], "dracut_modules_omit": ["plymouth", "i18n"]}),
        )
        .await
        .unwrap();

    let rev = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    assert_eq!(rev.kernel_version, kver);
    let dir = env.rev_dir(rev.id);
    assert_eq!(
        std::fs::read(dir.join(&rev.kernel)).unwrap(),
        std::fs::read(kroot.join("boot").join(format!("vmlinuz-{kver}"))).unwrap()
    );
    let listing = run(Command::new("lsinitrd").arg(dir.join(&rev.initrd)));
    assert!(listing.contains(&format!("lib/modules/{kver}/")), "modules of the image's kernel:\n{listing}");
    assert!(listing.contains("virtio_net.ko"), "driver added by the osimage:\n{listing}");
    let modules = run(Command::new("lsinitrd").arg("--mod").arg(dir.join(&rev.initrd)));
    for m in ["luna", "network-legacy", "base"] {
        assert!(modules.lines().any(|l| l.trim() == m), "dracut module {m} missing:\n{modules}");
    }
    assert!(!modules.lines().any(|l| l.trim() == "plymouth"), "omitted module present:\n{modules}");
}
