//! The image's kernel and the initramfs nodes boot with.
//!
//! The initramfs is built by `dracut` **on the server (host)**, not inside the chroot, with
//! `--kmoddir <chroot>/lib/modules/<kver>` so the kernel modules come from the image. Why host:
//! the chroot may not have dracut or luna's `95luna` dracut module installed (images are plain
//! distribution trees), and a host-side build needs no `/proc`, `/sys`, `/dev` mounts inside the
//! chroot and never changes the image. The price is that the initramfs' user space (busybox/
//! systemd, the luna agent) comes from the server, which is what we want: it is luna's
//! provisioning environment, not part of the image.

use std::path::{Component, Path, PathBuf};
use std::process::Command;

use luna_core::model::Osimage;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("osimage '{image}' has no kernel: {detail}")]
    None { image: String, detail: String },
    #[error("osimage '{image}' has several kernels ({candidates}); set kernel_version to one of them")]
    Ambiguous { image: String, candidates: String },
    #[error("osimage '{image}' kernel {kver}: {detail}")]
    Missing { image: String, kver: String, detail: String },
    #[error("cannot run {command}: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("dracut has no 'luna' module: install luna's dracut-module/95luna into /usr/lib/dracut/modules.d/95luna on the server")]
    NoLunaModule,
    #[error("{command} failed ({status}): {stderr}")]
    Failed { command: String, status: String, stderr: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Resolves `rel` inside `root` as if `root` were `/`: symlinks (absolute or relative) are
/// followed without ever leaving `root`. Returns the host path; it need not exist.
pub fn resolve_in_root(root: &Path, rel: &Path) -> PathBuf {
    let mut todo: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut cur: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            cur.pop();
            continue;
        }
        let mut p = root.to_path_buf();
        p.extend(&cur);
        p.push(&part);
        match std::fs::read_link(&p) {
            Ok(target) if hops < 40 => {
                hops += 1;
                if target.is_absolute() {
                    cur.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => todo.push(n.to_os_string()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => cur.push(part),
        }
    }
    let mut p = root.to_path_buf();
    p.extend(&cur);
    p
}

fn names_in(dir: &Path, strip: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix(strip)).map(String::from))
        .filter(|n| !n.is_empty())
        .collect();
    v.sort();
    v
}

/// Where the image keeps a kernel version's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFiles {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// Finds the kernel to boot: `kernel_version` if set, else the only version that has both
/// `/boot/vmlinuz-<v>` and `/lib/modules/<v>` in the image.
pub fn detect(image: &Osimage) -> Result<KernelFiles> {
    let root = Path::new(&image.path);
    let boot = resolve_in_root(root, Path::new("boot"));
    let mods = resolve_in_root(root, Path::new("lib/modules"));
    let files = |v: &str| KernelFiles {
        version: v.to_string(),
        vmlinuz: resolve_in_root(root, &Path::new("boot").join(format!("vmlinuz-{v}"))),
        modules: mods.join(v),
    };
    if let Some(v) = &image.kernel_version {
        let f = files(v);
        let missing = |detail: String| KernelError::Missing { image: image.name.clone(), kver: v.clone(), detail };
        if !f.vmlinuz.is_file() {
            return Err(missing(format!(
                "{} does not exist in the image",
                Path::new("/boot").join(format!("vmlinuz-{v}")).display()
            )));
        }
        if !f.modules.is_dir() {
            return Err(missing(format!("/lib/modules/{v} does not exist in the image")));
        }
        return Ok(f);
    }
    let kernels = names_in(&boot, "vmlinuz-");
    let modules = names_in(&mods, "");
    let both: Vec<&String> = kernels.iter().filter(|k| modules.contains(k)).collect();
    match both.as_slice() {
        [one] => Ok(files(one)),
        [] => Err(KernelError::None {
            image: image.name.clone(),
            detail: format!(
                "found /boot/vmlinuz-* for [{}] and /lib/modules/* for [{}], none with both",
                kernels.join(", "),
                modules.join(", ")
            ),
        }),
        many => Err(KernelError::Ambiguous {
            image: image.name.clone(),
            candidates: many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// Orders kernel versions as people read them (`6.1.0-9` before `6.1.0-10`): runs of digits
/// compare as numbers.
pub fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, &str>> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let n = if digits > 0 { digits } else { rest.bytes().take_while(|b| !b.is_ascii_digit()).count() };
            let (head, tail) = rest.split_at(n);
            out.push(if digits > 0 { head.parse::<u64>().map_err(|_| head) } else { Err(head) });
            rest = tail;
        }
        out
    }
    let order = |p: &Result<u64, &str>, q: &Result<u64, &str>| match (p, q) {
        (Ok(x), Ok(y)) => x.cmp(y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Greater,
        (Err(_), Ok(_)) => std::cmp::Ordering::Less,
        (Err(x), Err(y)) => x.cmp(y),
    };
    let (pa, pb) = (parts(a), parts(b));
    for (p, q) in pa.iter().zip(&pb) {
        match order(p, q) {
            std::cmp::Ordering::Equal => continue,
            o => return o,
        }
    }
    pa.len().cmp(&pb.len())
}

/// The kernel versions the image's tree holds (both `/boot/vmlinuz-<v>` and
/// `/lib/modules/<v>/`), oldest first.
pub fn list(image: &Osimage) -> Vec<String> {
    let root = Path::new(&image.path);
    let kernels = names_in(&resolve_in_root(root, Path::new("boot")), "vmlinuz-");
    let modules = names_in(&resolve_in_root(root, Path::new("lib/modules")), "");
    let mut both: Vec<String> = kernels.into_iter().filter(|k| modules.contains(k)).collect();
    both.sort_by(|a, b| version_order(a, b));
    both
}

/// The dracut invocation for an image (without running it).
pub fn dracut_args(image: &Osimage, k: &KernelFiles, out: &Path) -> Vec<String> {
    let mut a = vec![
        "--force".to_string(),
        "--no-hostonly".into(),
        "--kver".into(),
        k.version.clone(),
        "--kmoddir".into(),
        k.modules.display().to_string(),
        "--add".into(),
        "luna network-legacy base".into(),
    ];
    let mut list = |flag: &str, items: &[String]| {
        let items: Vec<&str> = items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
        if !items.is_empty() {
            a.push(flag.into());
            a.push(items.join(" "));
        }
    };
    list("--add", &image.dracut_modules_add);
    list("--omit", &image.dracut_modules_omit);
    list("--add-drivers", &image.dracut_drivers_add);
    list("--omit-drivers", &image.dracut_drivers_omit);
    a.push(out.display().to_string());
    a
}

fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let rendered = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|source| KernelError::Spawn { command: rendered.clone(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let text = if stderr.trim().is_empty() { stdout } else { stderr };
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        return Err(KernelError::Failed {
            command: rendered,
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(out)
}

/// Checks that `dracut --list-modules` knows `luna`.
pub fn check_luna_module(dracut: &str) -> Result<()> {
    let out = run(Command::new(dracut).args(["--list-modules", "--no-kernel"]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.split_whitespace().any(|m| m == "luna") {
        Ok(())
    } else {
        Err(KernelError::NoLunaModule)
    }
}

/// Copies the kernel to `dir/vmlinuz-<kver>` and builds `dir/initramfs-<kver>.img`. Returns the
/// two file names.
pub fn build(dracut: &str, image: &Osimage, k: &KernelFiles, dir: &Path) -> Result<(String, String)> {
    let kernel = format!("vmlinuz-{}", k.version);
    let initrd = format!("initramfs-{}.img", k.version);
    let dst = dir.join(&kernel);
    std::fs::copy(&k.vmlinuz, &dst).map_err(|source| KernelError::Io {
        what: "cannot copy kernel to",
        path: dst,
        source,
    })?;
    if !k.modules.join("modules.dep").is_file() {
        return Err(KernelError::Missing {
            image: image.name.clone(),
            kver: k.version.clone(),
            detail: format!("/lib/modules/{}/modules.dep is missing; run depmod {} in the image", k.version, k.version),
        });
    }
    check_luna_module(dracut)?;
    let out = dir.join(&initrd);
    run(Command::new(dracut).args(dracut_args(image, k, &out)))?;
    if !out.is_file() {
        return Err(KernelError::Failed {
            command: dracut.into(),
            status: "exit status: 0".into(),
            stderr: format!("it wrote no {}", out.display()),
        });
    }
    Ok((kernel, initrd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn image(root: &Path) -> Osimage {
        Osimage::new("compute", root.to_str().unwrap())
    }

    fn add_kernel(root: &Path, v: &str) {
        std::fs::create_dir_all(root.join("usr/lib/modules").join(v)).unwrap();
        std::fs::create_dir_all(root.join("boot")).unwrap();
        std::fs::write(root.join("boot").join(format!("vmlinuz-{v}")), b"kernel").unwrap();
    }

    #[test]
    fn resolves_merged_usr_symlinks_inside_the_root_even_when_absolute() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("usr/lib/modules")).unwrap();
        symlink("/usr/lib", d.path().join("lib")).unwrap();
        assert_eq!(resolve_in_root(d.path(), Path::new("lib/modules")), d.path().join("usr/lib/modules"));
        symlink("../../..", d.path().join("usr/lib/up")).unwrap();
        assert_eq!(resolve_in_root(d.path(), Path::new("usr/lib/up/x")), d.path().join("x"), "never above the root");
    }

    #[test]
    fn detects_the_only_kernel() {
        let d = tempfile::tempdir().unwrap();
        symlink("usr/lib", d.path().join("lib")).unwrap();
        add_kernel(d.path(), "6.1.0-28-amd64");
        // modules without a kernel do not count
        std::fs::create_dir_all(d.path().join("usr/lib/modules/6.1.0-1-amd64")).unwrap();
        let k = detect(&image(d.path())).unwrap();
        assert_eq!(k.version, "6.1.0-28-amd64");
        assert_eq!(k.vmlinuz, d.path().join("boot/vmlinuz-6.1.0-28-amd64"));
    }

    #[test]
    fn refuses_ambiguity_listing_candidates() {
        let d = tempfile::tempdir().unwrap();
        symlink("usr/lib", d.path().join("lib")).unwrap();
        add_kernel(d.path(), "6.1.0-28-amd64");
        add_kernel(d.path(), "6.1.0-30-amd64");
        let e = detect(&image(d.path())).unwrap_err().to_string();
        assert!(e.contains("6.1.0-28-amd64, 6.1.0-30-amd64") && e.contains("kernel_version"), "{e}");
        let mut img = image(d.path());
        img.kernel_version = Some("6.1.0-30-amd64".into());
        assert_eq!(detect(&img).unwrap().version, "6.1.0-30-amd64");
        img.kernel_version = Some("6.9".into());
        let e = detect(&img).unwrap_err().to_string();
        assert!(e.contains("vmlinuz-6.9"), "{e}");
    }

    #[test]
    fn lists_kernels_in_version_order() {
        let d = tempfile::tempdir().unwrap();
        symlink("usr/lib", d.path().join("lib")).unwrap();
        add_kernel(d.path(), "6.1.0-10-amd64");
        add_kernel(d.path(), "6.1.0-9-amd64");
        std::fs::create_dir_all(d.path().join("usr/lib/modules/7.0")).unwrap();
        assert_eq!(list(&image(d.path())), ["6.1.0-9-amd64", "6.1.0-10-amd64"], "modules alone do not count");
        assert_eq!(list(&image(&d.path().join("missing"))), Vec::<String>::new());
        assert_eq!(version_order("5.14.0-427.el9", "5.14.0-70.el9"), std::cmp::Ordering::Greater);
    }

    #[test]
    fn no_kernel_says_what_was_found() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("lib/modules/5.0")).unwrap();
        let e = detect(&image(d.path())).unwrap_err().to_string();
        assert!(e.contains("no kernel") && e.contains("[5.0]"), "{e}");
    }

    #[test]
    fn dracut_args_carry_the_image_settings() {
        let mut img = image(Path::new("/srv/img"));
        img.dracut_modules_add = vec!["nfs".into(), "lvm".into()];
        img.dracut_drivers_omit = vec!["nouveau".into()];
        let k =
            KernelFiles { version: "6.1".into(), vmlinuz: "/x".into(), modules: "/srv/img/usr/lib/modules/6.1".into() };
        let a = dracut_args(&img, &k, Path::new("/tmp/out.img"));
        assert_eq!(
            a,
            [
                "--force",
                "--no-hostonly",
                "--kver",
                "6.1",
                "--kmoddir",
                "/srv/img/usr/lib/modules/6.1",
                "--add",
                "luna network-legacy base",
                "--add",
                "nfs lvm",
                "--omit-drivers",
                "nouveau",
                "/tmp/out.img"
            ]
        );
    }
}
