//! The archive reproduces the tree: GNU tar lists and extracts what we packed, with hard links,
//! symlinks, FIFOs, device nodes, xattrs (incl. security.capability and POSIX ACLs), sparse
//! files, numeric owners and mtimes.

mod image_support;

use std::ffi::CString;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use image_support::{is_root, set_xattr};
use luna_server::image::archive::{self, ArchiveOptions, Excludes};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn set_mtime(path: &Path, secs: i64) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let t = [libc::timespec { tv_sec: secs, tv_nsec: 0 }, libc::timespec { tv_sec: secs, tv_nsec: 0 }];
    // SAFETY: valid path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(r, 0);
}

/// A POSIX ACL in the kernel's xattr format: user::rw-, user:1234:r--, group::r--, mask::r--,
/// other::---.
fn acl_bytes() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in
        [(1u16, 6u16, u32::MAX), (2, 4, 1234), (4, 4, u32::MAX), (0x10, 4, u32::MAX), (0x20, 0, u32::MAX)]
    {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

fn build_tree(root: &Path) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("proc/1")).unwrap();
    std::fs::write(root.join("proc/1/status"), b"excluded").unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    std::fs::set_permissions(root.join("etc/passwd"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(root.join("usr/bin/ping"), b"\x7fELF pretend").unwrap();
    std::fs::set_permissions(root.join("usr/bin/ping"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::hard_link(root.join("usr/bin/ping"), root.join("usr/bin/ping6")).unwrap();
    std::os::unix::fs::symlink("../usr/bin/ping", root.join("etc/ping-link")).unwrap();
    let fifo = CString::new(root.join("etc/fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    // a long name (> 100 bytes) needs the GNU long-name extension
    let long = "d".repeat(80);
    std::fs::create_dir_all(root.join(&long)).unwrap();
    std::fs::write(root.join(&long).join("f".repeat(60)), b"long").unwrap();
    // sparse: 64 MiB with data at 0, at 20 MiB and at the very end
    let mut f = std::fs::File::create(root.join("sparse.img")).unwrap();
    f.write_all(b"head").unwrap();
    f.seek(SeekFrom::Start(20 << 20)).unwrap();
    f.write_all(&[7u8; 10000]).unwrap();
    f.set_len(64 << 20).unwrap();
    f.seek(SeekFrom::Start((64 << 20) - 3)).unwrap();
    f.write_all(b"end").unwrap();
    // a sparse file with a trailing hole
    let f = std::fs::File::create(root.join("hole-at-end")).unwrap();
    f.set_len(1 << 20).unwrap();
    set_xattr(&root.join("etc/passwd"), "user.luna.test", b"hello\0binary\xff");
    set_xattr(&root.join("etc/passwd"), "system.posix_acl_access", &acl_bytes());
    if is_root() {
        // cap_net_raw+ep, VFS_CAP_REVISION_2
        let cap: [u8; 20] = [0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        set_xattr(&root.join("usr/bin/ping"), "security.capability", &cap);
        let dev = CString::new(root.join("dev/null").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) }, 0);
        let p = CString::new(root.join("etc/passwd").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::lchown(p.as_ptr(), 4321, 8765) }, 0);
    }
    for p in ["etc/passwd", "usr/bin/ping", "sparse.img", "etc/ping-link"] {
        set_mtime(&root.join(p), 1_600_000_000);
    }
}

fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    archive::read_xattrs(path).unwrap()
}

#[test]
fn gnu_tar_extracts_what_we_packed() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    build_tree(&src);
    let ex = Excludes::new(&["proc/*", "dev/*"].map(String::from)).unwrap();
    let ex_keep_dev = Excludes::new(&["proc/*"].map(String::from)).unwrap();
    let ex = if is_root() { ex_keep_dev } else { ex };
    let stats = archive::scan(&src, &ex).unwrap();
    let out = std::fs::File::create(d.path().join("a.tar.zst")).unwrap();
    let (_, sum) =
        archive::write_archive(&src, &ex, out, &ArchiveOptions::default(), stats.data_bytes, &mut |_| true).unwrap();
    assert_eq!(sum.data_bytes, stats.data_bytes);
    assert!(sum.data_bytes < 1 << 20, "holes are not read: {}", sum.data_bytes);
    assert_eq!(sum.size, std::fs::metadata(d.path().join("a.tar.zst")).unwrap().len());

    let listing =
        run(Command::new("tar").args(["--zstd", "-tvf"]).arg(d.path().join("a.tar.zst")).arg("--numeric-owner"));
    let line = |name: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("{name} not in\n{listing}"))
            .to_string()
    };
    assert!(line("usr/bin/ping6 link to usr/bin/ping").starts_with('h'), "{listing}");
    assert!(line("etc/fifo").starts_with('p'), "{listing}");
    assert!(line("etc/ping-link -> ../usr/bin/ping").starts_with('l'), "{listing}");
    assert!(line("usr/bin/ping").starts_with("-rwsr-xr-x"), "{listing}");
    assert!(!listing.contains("proc/1"), "excluded: {listing}");
    assert!(listing.contains("proc/"), "the directory itself stays: {listing}");
    if is_root() {
        assert!(line("etc/passwd").contains("4321/8765"), "{listing}");
        assert!(line("dev/null").starts_with('c'), "{listing}");
    }

    let dst = d.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    run(Command::new("tar")
        .args(["--zstd", "-x", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "-f"])
        .arg(d.path().join("a.tar.zst"))
        .arg("-C")
        .arg(&dst));

    let m = |root: &Path, p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
    for p in ["etc/passwd", "usr/bin/ping", "sparse.img", "hole-at-end", "etc", "usr/bin"] {
        let (a, b) = (m(&src, p), m(&dst, p));
        assert_eq!(a.mode(), b.mode(), "{p} mode");
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{p} owner");
        assert_eq!(a.len(), b.len(), "{p} size");
        if !a.is_dir() {
            assert_eq!(std::fs::read(src.join(p)).unwrap(), std::fs::read(dst.join(p)).unwrap(), "{p} content");
            assert_eq!(a.mtime(), b.mtime(), "{p} mtime");
        }
    }
    assert_eq!(m(&dst, "usr/bin/ping").ino(), m(&dst, "usr/bin/ping6").ino(), "hard link restored");
    assert_eq!(std::fs::read_link(dst.join("etc/ping-link")).unwrap(), Path::new("../usr/bin/ping"));
    assert_eq!(m(&dst, "etc/ping-link").mtime(), 1_600_000_000);
    assert!(m(&dst, "etc/fifo").file_type().is_fifo());
    assert!(m(&dst, "sparse.img").blocks() * 512 < 1 << 20, "extracted sparse");
    assert_eq!(xattrs(&src.join("etc/passwd")), xattrs(&dst.join("etc/passwd")));
    assert!(xattrs(&dst.join("etc/passwd")).iter().any(|(k, _)| k == b"system.posix_acl_access"));
    if is_root() {
        assert_eq!(xattrs(&src.join("usr/bin/ping")), xattrs(&dst.join("usr/bin/ping")));
        assert!(xattrs(&dst.join("usr/bin/ping")).iter().any(|(k, _)| k == b"security.capability"));
        let dev = m(&dst, "dev/null");
        assert!(dev.file_type().is_char_device());
        assert_eq!(dev.rdev(), libc::makedev(1, 3));
    }
    let long = format!("{}/{}", "d".repeat(80), "f".repeat(60));
    assert_eq!(std::fs::read(dst.join(long)).unwrap(), b"long");
}

#[test]
fn mount_points_are_kept_empty() {
    if !image_support::privileged() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("mnt")).unwrap();
    std::fs::write(src.join("keep"), b"k").unwrap();
    run(Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(src.join("mnt")));
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _g = Umount(src.join("mnt"));
    std::fs::write(src.join("mnt/other-fs"), b"x").unwrap();
    let ex = Excludes::new::<String>(&[]).unwrap();
    let (out, _) = archive::write_archive(&src, &ex, Vec::new(), &ArchiveOptions::default(), 0, &mut |_| true).unwrap();
    let dec = zstd::decode_all(&out[..]).unwrap();
    let names: Vec<String> = tar::Archive::new(&dec[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["./", "keep", "mnt/"]);
}
