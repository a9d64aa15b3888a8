//! Shared set-up for the image tests: a store with a cluster and an osimage over a generated
//! chroot, and a fake dracut.
#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use luna_core::model::{Kind, Osimage};
use luna_server::image::{ImageConfig, ImageState};
use luna_server::service::Service;
use luna_server::store;
use serde_json::json;

pub const KVER: &str = "6.1.0-99-amd64";

/// `len` incompressible-looking bytes, the same for the same `seed` (xorshift: no rand needed).
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when tests needing root may run (`LUNA_TEST_PRIVILEGED=1`); otherwise reports the skip
/// (see `luna_core::test_support`) and returns false.
pub fn privileged() -> bool {
    luna_core::test_support::gate("LUNA_TEST_PRIVILEGED")
}

/// A fake dracut: lists a `luna` module, and writes its arguments into the output file (the
/// last argument). `extra` runs first (e.g. `sleep 2` or `exit 3`).
pub fn fake_dracut(dir: &Path, extra: &str, with_luna: bool) -> PathBuf {
    let path = dir.join("fake-dracut");
    let modules = if with_luna { "base\nluna\nnetwork-legacy" } else { "base\nnetwork-legacy" };
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = --list-modules ]; then printf '{modules}\\n'; exit 0; fi\n{extra}\nfor a; do out=\"$a\"; done\necho \"fake initramfs: $*\" > \"$out\"\n"
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A small chroot: merged /usr, a kernel with modules.dep, some files.
pub fn make_chroot(root: &Path) {
    for d in ["usr/lib/modules", "boot", "etc", "proc", "var/cache/apt", "usr/bin"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("usr/lib/modules").join(KVER)).unwrap();
    std::fs::write(root.join("usr/lib/modules").join(KVER).join("modules.dep"), b"").unwrap();
    std::fs::write(root.join("boot").join(format!("vmlinuz-{KVER}")), b"not really a kernel").unwrap();
    std::fs::write(root.join("etc/hostname"), b"image\n").unwrap();
    std::fs::write(root.join("proc/should-not-be-packed"), b"x").unwrap();
    std::fs::write(root.join("var/cache/apt/pkgcache.bin"), vec![9u8; 4096]).unwrap();
    let mut data = Vec::new();
    for i in 0..300_000u32 {
        data.extend_from_slice(format!("line {i} of some compressible text\n").as_bytes());
    }
    std::fs::write(root.join("usr/bin/data"), data).unwrap();
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub chroot: PathBuf,
    pub data_dir: PathBuf,
    pub service: Service,
    pub state: Arc<ImageState>,
}

impl Env {
    pub async fn new(config: impl FnOnce(&Path, &mut ImageConfig)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let chroot = dir.path().join("chroot");
        std::fs::create_dir_all(&chroot).unwrap();
        make_chroot(&chroot);
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let url = format!("sqlite://{}", dir.path().join("luna.db").display());
        let service = Service::new(store::open(&url).await.unwrap());
        service.ensure_cluster("test").await.unwrap();
        service
            .update(Kind::Cluster, "cluster", json!({"frontend_address": "127.0.0.1", "http_port": 7050}))
            .await
            .unwrap();
        let img = Osimage::new("compute", chroot.to_str().unwrap());
        service.create(Kind::Osimage, serde_json::to_value(img).unwrap()).await.unwrap();
        let mut cfg =
            ImageConfig { dracut: fake_dracut(dir.path(), "", true).display().to_string(), ..Default::default() };
        config(dir.path(), &mut cfg);
        let state = Arc::new(ImageState::new(service.clone(), &data_dir, cfg));
        Env { dir, chroot, data_dir, service, state }
    }

    pub async fn image(&self) -> Osimage {
        luna_server::image::osimage(&self.service, "compute").await.unwrap()
    }

    pub fn rev_dir(&self, rev: u32) -> PathBuf {
        self.data_dir.join("images/compute").join(rev.to_string())
    }
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of value.len() bytes.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr() as *const libc::c_void, value.len(), 0) };
    assert_eq!(r, 0, "setxattr {name} on {}: {}", path.display(), std::io::Error::last_os_error());
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}
