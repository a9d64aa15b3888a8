//! `root = disk`: the node's image goes onto its local disks, and its next boots come from them.
//!
//! Before the image: the part-script partitions, formats and mounts the root on `/sysroot` (the
//! group's own script, or when the group keeps the default tmpfs one, [`DEFAULT_PARTSCRIPT`] on
//! the disk [`choose_disk`] picks or `luna.disk=` names); the agent checks that a block device is
//! mounted there. After the image, the personality and the postscript: `/etc/fstab` gets the
//! mounts under `/sysroot` by UUID ([`fstab`]), `/etc/default/grub.d/luna.cfg` the node's kernel
//! options ([`kernel_opts`]: the osimage's, as on the network boot) and [`BOOTLOADER_SCRIPT`]
//! runs chrooted in the image: grub from the image for BIOS and for UEFI (`--removable`, so no
//! NVRAM entry is needed), `update-grub`, `sync`.
//!
//! Then dracut switches root into the disk, as for a tmpfs root: the first boot goes on without
//! a second POST (minutes on a server), and the boot loader was installed and checked (its exit
//! status) before `installed` was reported. The server sets the node's `localboot` on that
//! report, so every later boot comes from the disk, until `luna node reinstall`.
//!
//! Everything here but [`prepare`] and [`finish`] is sans-IO (text and values in and out);
//! those two read `/sys` and `/proc/self/mountinfo` (plain files, test copies in tests) and make
//! their privileged calls through [`Os`].

use std::path::{Path, PathBuf};

use luna_core::model::DEFAULT_PARTSCRIPT as TMPFS_PARTSCRIPT;

use crate::os::Os;

/// The part-script of a `disk` node whose group keeps the default (tmpfs) one: the whole disk
/// `$LUNA_DISK` becomes GPT with a BIOS boot partition (1 MiB, where grub-pc puts its core
/// image on GPT), an EFI system partition (vfat, 512 MiB) and the root (ext4, the rest); the
/// root is mounted on `$LUNA_SYSROOT` and the ESP on `$LUNA_SYSROOT/boot/efi`. Everything on the
/// disk is lost. Needs sfdisk, partx, wipefs, mkfs.vfat and mkfs.ext4 in the initramfs (95luna
/// installs them).
pub const DEFAULT_PARTSCRIPT: &str = r#"# luna default disk part-script: GPT, BIOS boot + ESP + root on $LUNA_DISK
set -eu
disk="$LUNA_DISK"
root="$LUNA_SYSROOT"
[ -b "$disk" ] || { echo "partscript: $disk is not a block device" >&2; exit 1; }
# nvme0n1, mmcblk0, loop0: partitions are <disk>p<n>; sda, vda: <disk><n>
case "$disk" in
    *[0-9]) part="${disk}p" ;;
    *) part="$disk" ;;
esac
for p in "$part"[0-9]*; do
    [ -b "$p" ] && wipefs -a -q "$p" || :
done
wipefs -a -q "$disk"
sfdisk -q --wipe always --wipe-partitions always "$disk" <<EOF
label: gpt
size=1MiB, type=21686148-6449-6E6F-744E-656564454649, name=bios
size=512MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC3B8, name=esp
type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root
EOF
# sfdisk asked the kernel to re-read the table; where that is not enough (loop devices), partx
# tells it the partitions one by one
partx -u "$disk" 2> /dev/null || :
[ -b "${part}3" ] || partx -a "$disk" 2> /dev/null || :
command -v udevadm > /dev/null && udevadm settle || :
i=0
while [ ! -b "${part}3" ]; do
    i=$((i + 1))
    [ "$i" -le 50 ] || { echo "partscript: ${part}3 did not appear" >&2; exit 1; }
    sleep 0.2
done
mkfs.vfat -F 32 -n ESP "${part}2" > /dev/null
mkfs.ext4 -q -F -L root "${part}3"
mount -t ext4 "${part}3" "$root"
mkdir -p "$root/boot/efi"
# quiet: the image's own boot/efi directory (if any) cannot get owner and mode on vfat
mount -t vfat -o umask=0077,quiet "${part}2" "$root/boot/efi"
"#;

/// Runs chrooted in the installed image with /proc, /sys and /dev bound: grub from the image
/// for BIOS (`i386-pc` on every disk in `$LUNA_BOOT_DISKS`) and for UEFI (`x86_64-efi` into the
/// ESP mounted on /boot/efi, as the removable-media path `EFI/BOOT/BOOTX64.EFI`: found by any
/// firmware without an NVRAM entry), whichever the image has (both when it has both, so the
/// disk boots either way); then the configuration (`update-grub`, else `grub-mkconfig`), with
/// the root by UUID on the kernel command line (the `/dev/disk/by-uuid` link grub-mkconfig
/// looks for is made when udev has not made it: measured, a chroot whose /dev has no such link
/// got `root=/dev/loop0p3`).
/// An image with neither is an error naming the packages.
pub const BOOTLOADER_SCRIPT: &str = r#"# luna: install the image's boot loader on $LUNA_BOOT_DISKS
set -eu
done_any=
if [ -d /usr/lib/grub/i386-pc ]; then
    for disk in $LUNA_BOOT_DISKS; do
        grub-install --target=i386-pc --recheck "$disk"
    done
    done_any=1
fi
if [ -d /usr/lib/grub/x86_64-efi ] && mountpoint -q /boot/efi 2> /dev/null; then
    grub-install --target=x86_64-efi --efi-directory=/boot/efi --removable --no-nvram
    done_any=1
fi
if [ -z "$done_any" ]; then
    echo "bootloader: the image has no grub for BIOS (/usr/lib/grub/i386-pc: grub-pc-bin) and none for UEFI with an ESP on /boot/efi (/usr/lib/grub/x86_64-efi: grub-efi-amd64-bin); add grub2-common and them to the image" >&2
    exit 3
fi
# grub-mkconfig puts root=UUID= on the kernel command line only when /dev/disk/by-uuid has the
# root's link, else the device name (sda3 may be sdb3 on the next boot): the link is made here
# when udev (in the initramfs) has not made it
uuid=$(grub-probe --target=fs_uuid / 2> /dev/null || :)
if [ -n "$uuid" ] && [ ! -e "/dev/disk/by-uuid/$uuid" ]; then
    mkdir -p /dev/disk/by-uuid
    ln -sf "$(grub-probe --target=device /)" "/dev/disk/by-uuid/$uuid"
fi
if [ -z "$(ls /boot/initrd.img-* /boot/initramfs-* 2> /dev/null)" ] && command -v update-initramfs > /dev/null; then
    update-initramfs -c -k all
fi
if command -v update-grub > /dev/null; then
    update-grub
else
    mkdir -p /boot/grub
    grub-mkconfig -o /boot/grub/grub.cfg
fi
sync
"#;

/// Where the agent writes the node's kernel options for grub (Debian's grub-mkconfig reads
/// `/etc/default/grub.d/*.cfg` after `/etc/default/grub`).
pub const GRUB_DEFAULTS: &str = "etc/default/grub.d/luna.cfg";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("kernel command line has a bad luna.disk: '{0}' (expected a device like sda or /dev/nvme0n1)")]
    BadDiskArg(String),
    #[error("no disk to install on: no non-removable, writable disk in {0} (name one with luna.disk=)")]
    NoDisk(String),
    #[error("partscript failed: {0}")]
    Partscript(String),
    #[error("root = disk, but no block device is mounted on {0} after the partscript (it must mount the root there)")]
    NotMounted(String),
    #[error("read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("write {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("filesystem uuid of {device}: {reason}")]
    Uuid { device: String, reason: String },
    #[error("no disk found under the root device {0} in /sys")]
    NoBootDisk(String),
    #[error("bootloader failed: {0}")]
    Bootloader(String),
}

/// A block device as `/sys/block/<name>` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDev {
    pub name: String,
    pub removable: bool,
    pub read_only: bool,
    /// In 512-byte sectors.
    pub size: u64,
}

/// Kernel names that are never an install target: loop, RAM and compressed-RAM disks, device
/// mapper and md (made of disks), optical and floppy drives, network block devices.
const NOT_DISKS: [&str; 9] = ["loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd", "mtdblock"];

/// The disk the default part-script uses: the first (in the kernel's order: shorter names first,
/// so `sdb` before `sdaa`) non-removable, writable disk with a size.
pub fn choose_disk(devs: &[BlockDev]) -> Option<String> {
    let mut disks: Vec<&BlockDev> = devs
        .iter()
        .filter(|d| !d.removable && !d.read_only && d.size > 0)
        .filter(|d| !NOT_DISKS.iter().any(|p| d.name.starts_with(p)))
        .collect();
    disks.sort_by(|a, b| (a.name.len(), &a.name).cmp(&(b.name.len(), &b.name)));
    disks.first().map(|d| format!("/dev/{}", d.name))
}

/// `/sys/block` as [`BlockDev`]s (entries it cannot read are left out).
pub fn read_block_devs(sys_block: &Path) -> Vec<BlockDev> {
    let Ok(dir) = std::fs::read_dir(sys_block) else { return Vec::new() };
    let num = |p: PathBuf| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let base = sys_block.join(&name);
            Some(BlockDev {
                removable: num(base.join("removable"))? == 1,
                read_only: num(base.join("ro")).unwrap_or(0) == 1,
                size: num(base.join("size"))?,
                name,
            })
        })
        .collect()
}

/// `luna.disk=` from the kernel command line: `sda` or `/dev/sda` (also `/dev/disk/by-id/…`).
pub fn disk_arg(cmdline: &str) -> Result<Option<String>, DiskError> {
    let Some(value) =
        crate::cmdline::words(cmdline).into_iter().rev().find_map(|w| w.strip_prefix("luna.disk=").map(str::to_string))
    else {
        return Ok(None);
    };
    let path = if value.starts_with('/') { value.clone() } else { format!("/dev/{value}") };
    let ok = path.starts_with("/dev/")
        && path.len() > 5
        && !path.contains("..")
        && path[5..].chars().all(|c| c.is_ascii_alphanumeric() || "/_.:-".contains(c));
    if ok {
        Ok(Some(path))
    } else {
        Err(DiskError::BadDiskArg(value))
    }
}

/// The kernel options the node's disk boot gets: its network boot's command line without what
/// iPXE added for luna and dracut (`luna.*` (the token among them), `root=`, `BOOTIF=`, `ip=`,
/// `nameserver=`, `initrd=`, `BOOT_IMAGE=`, `rd.*`): what is left is the osimage's
/// `kernel_opts`. Words are re-quoted when they hold spaces. Luna's script starts the line with
/// `initrd=`; what comes before it is the loader's (iPXE's EFI build puts the image name first:
/// `kernel initrd=initrd.img root=luna ...`) and is dropped too, else the disk's init would get
/// `kernel` as an argument.
pub fn kernel_opts(cmdline: &str) -> String {
    const DROP: [&str; 7] = ["root=", "BOOTIF=", "ip=", "nameserver=", "initrd=", "BOOT_IMAGE=", "rd."];
    let mut words = crate::cmdline::words(cmdline);
    if let Some(first) = words.iter().position(|w| w.starts_with("initrd=")) {
        words.drain(..first);
    }
    words
        .into_iter()
        .filter(|w| !w.starts_with("luna.") && !DROP.iter().any(|d| w.starts_with(d)))
        .map(|w| match w.split_once('=') {
            Some((k, v)) if v.contains(char::is_whitespace) => format!("{k}=\"{v}\""),
            _ => w,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `/etc/default/grub.d/luna.cfg`: sourced by grub-mkconfig's shell, so the value is
/// single-quoted (a `'` inside closed, escaped and reopened). An image without
/// `/etc/default/grub` (grub2-common alone ships none) would get a menu without a timeout that
/// waits forever: the image's timeout is kept, else 5 s.
pub fn grub_defaults(opts: &str) -> String {
    let quoted = opts.replace('\'', r"'\''");
    format!(
        "# Written by luna-agent at install: the osimage's kernel options, as on the network boot.\n\
         GRUB_CMDLINE_LINUX='{quoted}'\n\
         GRUB_TIMEOUT=${{GRUB_TIMEOUT:-5}}\n"
    )
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub major: u32,
    pub minor: u32,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

fn unescape(s: &str) -> String {
    // Mount points have space, tab, newline and backslash as \040, \011, \012, \134.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo`; lines it does not understand are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let (major, minor) = l.get(2)?.split_once(':')?;
            Some(Mount {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                mount_point: PathBuf::from(unescape(l.get(4)?)),
                fstype: (*r.first()?).to_string(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

/// The block-device mounts at or under `root`, the visible one per mount point (the last), in
/// mount order, with their path inside the root (`/`, `/boot/efi`).
pub fn mounts_under(mounts: &[Mount], root: &Path) -> Vec<(PathBuf, Mount)> {
    let mut out: Vec<(PathBuf, Mount)> = Vec::new();
    for m in mounts {
        let Ok(rel) = m.mount_point.strip_prefix(root) else { continue };
        let inner = Path::new("/").join(rel);
        out.retain(|(p, _)| !p.starts_with(&inner));
        // Device number 0 is no block device (tmpfs, proc, overlay...).
        if m.major != 0 {
            out.push((inner, m.clone()));
        }
    }
    out
}

/// The node's `/etc/fstab`: the image's lines for other mount points kept (comments, NFS,
/// swap), its lines for the mount points luna made replaced by `UUID=` lines, in mount order.
/// `mounts` are (path inside the root, fstype, uuid).
pub fn fstab(image: &str, mounts: &[(PathBuf, String, String)]) -> String {
    let ours: Vec<String> = mounts.iter().map(|(p, _, _)| p.display().to_string()).collect();
    let mut out = String::new();
    for line in image.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let replaced =
            !line.trim_start().starts_with('#') && fields.get(1).is_some_and(|p| ours.iter().any(|o| o == p));
        if !replaced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# luna: the filesystems the part-script made\n");
    for (path, fstype, uuid) in mounts {
        let root = path == Path::new("/");
        let opts = match fstype.as_str() {
            "vfat" => "umask=0077",
            _ if root => "errors=remount-ro",
            _ => "defaults",
        };
        let pass = if root { 1 } else { 2 };
        out.push_str(&format!("UUID={uuid}\t{}\t{fstype}\t{opts}\t0\t{pass}\n", path.display()));
    }
    out
}

/// The disks under block device `major:minor` (`/sys/dev/block/M:m`): a partition's disk, a
/// whole disk itself, and for device-mapper and md devices the disks under their members
/// (`slaves/`), so grub goes onto every disk of a mirrored root. Sorted, without duplicates.
pub fn boot_disks(sys: &Path, major: u32, minor: u32) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(dev) = std::fs::canonicalize(sys.join(format!("dev/block/{major}:{minor}"))) else { return out };
    collect_disks(&dev, 0, &mut out);
    out.sort();
    out.dedup();
    out
}

fn collect_disks(dev: &Path, depth: u32, out: &mut Vec<String>) {
    if depth > 8 {
        return;
    }
    let slaves: Vec<PathBuf> = std::fs::read_dir(dev.join("slaves"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    if !slaves.is_empty() {
        for s in slaves {
            if let Ok(s) = std::fs::canonicalize(&s) {
                collect_disks(&s, depth + 1, out);
            }
        }
        return;
    }
    let disk = if dev.join("partition").exists() { dev.parent() } else { Some(dev) };
    if let Some(name) = disk.and_then(Path::file_name) {
        out.push(format!("/dev/{}", name.to_string_lossy()));
    }
}

/// Paths the disk steps read; the real node's by default, test copies in tests.
#[derive(Clone, Debug)]
pub struct Paths {
    pub sys: PathBuf,
    pub mountinfo: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths { sys: "/sys".into(), mountinfo: "/proc/self/mountinfo".into() }
    }
}

fn read(path: &Path) -> Result<String, DiskError> {
    std::fs::read_to_string(path)
        .map_err(|e| DiskError::Read { path: path.display().to_string(), reason: e.to_string() })
}

/// Before the image: runs the part-script (the group's, else [`DEFAULT_PARTSCRIPT`] on the
/// chosen disk; `LUNA_DISK` is in the environment of both) and checks that a block device is
/// mounted on `sysroot`. Returns the disk it chose.
pub fn prepare(
    os: &dyn Os,
    paths: &Paths,
    cmdline: &str,
    group_partscript: &str,
    sysroot: &Path,
    env: &[(String, String)],
) -> Result<String, DiskError> {
    let disk = match disk_arg(cmdline)? {
        Some(d) => d,
        None => {
            let sys_block = paths.sys.join("block");
            choose_disk(&read_block_devs(&sys_block))
                .ok_or_else(|| DiskError::NoDisk(sys_block.display().to_string()))?
        }
    };
    let script = if group_partscript.trim().is_empty() || group_partscript.trim() == TMPFS_PARTSCRIPT.trim() {
        DEFAULT_PARTSCRIPT
    } else {
        group_partscript
    };
    let mut env = env.to_vec();
    env.push(("LUNA_DISK".into(), disk.clone()));
    tracing::info!(
        "root = disk: partitioning with {} on {disk}",
        if script == DEFAULT_PARTSCRIPT { "the default part-script" } else { "the group's part-script" }
    );
    crate::install::run_script(os, "partscript", script, &env, None).map_err(DiskError::Partscript)?;
    let mounts = parse_mountinfo(&read(&paths.mountinfo)?);
    if !mounts_under(&mounts, sysroot).iter().any(|(p, _)| p == Path::new("/")) {
        return Err(DiskError::NotMounted(sysroot.display().to_string()));
    }
    Ok(disk)
}

/// After the image, personality and postscript: fstab by UUID, grub's kernel options, the boot
/// loader. Returns the disks grub went onto.
pub fn finish(
    os: &dyn Os,
    paths: &Paths,
    cmdline: &str,
    sysroot: &Path,
    env: &[(String, String)],
) -> Result<Vec<String>, DiskError> {
    let mounts = mounts_under(&parse_mountinfo(&read(&paths.mountinfo)?), sysroot);
    let root = mounts
        .iter()
        .find(|(p, _)| p == Path::new("/"))
        .map(|(_, m)| m.clone())
        .ok_or_else(|| DiskError::NotMounted(sysroot.display().to_string()))?;
    let mut entries = Vec::new();
    for (path, m) in &mounts {
        let uuid =
            os.fs_uuid(&m.source).map_err(|e| DiskError::Uuid { device: m.source.clone(), reason: e.to_string() })?;
        entries.push((path.clone(), m.fstype.clone(), uuid));
    }
    let fstab_path = sysroot.join("etc/fstab");
    let image_fstab = std::fs::read_to_string(&fstab_path).unwrap_or_default();
    write(&fstab_path, &fstab(&image_fstab, &entries))?;
    let grub = sysroot.join(GRUB_DEFAULTS);
    if let Some(dir) = grub.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| DiskError::Write { path: dir.display().to_string(), reason: e.to_string() })?;
    }
    write(&grub, &grub_defaults(&kernel_opts(cmdline)))?;

    let disks = boot_disks(&paths.sys, root.major, root.minor);
    if disks.is_empty() {
        return Err(DiskError::NoBootDisk(root.source));
    }
    let mut env = env.to_vec();
    env.push(("LUNA_BOOT_DISKS".into(), disks.join(" ")));
    crate::install::chrooted(os, sysroot, "bootloader", BOOTLOADER_SCRIPT, &env).map_err(DiskError::Bootloader)?;
    Ok(disks)
}

fn write(path: &Path, text: &str) -> Result<(), DiskError> {
    std::fs::write(path, text).map_err(|e| DiskError::Write { path: path.display().to_string(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(name: &str, removable: bool, ro: bool, size: u64) -> BlockDev {
        BlockDev { name: name.into(), removable, read_only: ro, size }
    }

    #[test]
    fn the_first_fixed_writable_disk_is_chosen() {
        let devs = [
            dev("loop0", false, false, 100),
            dev("sr0", true, false, 100),
            dev("sdaa", false, false, 100),
            dev("sdb", false, false, 100),
            dev("sda", true, false, 100),
            dev("dm-0", false, false, 100),
            dev("vda", false, true, 100),
            dev("vdb", false, false, 0),
        ];
        assert_eq!(choose_disk(&devs).as_deref(), Some("/dev/sdb"));
        assert_eq!(choose_disk(&devs[..2]), None);
        assert_eq!(
            choose_disk(&[dev("nvme0n1", false, false, 9), dev("sda", false, false, 9)]).as_deref(),
            Some("/dev/sda")
        );
    }

    #[test]
    fn block_devs_are_read_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        for (name, rem, ro, size) in [("vda", "0", "0", "20971520"), ("sr0", "1", "0", "2048")] {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("removable"), format!("{rem}\n")).unwrap();
            std::fs::write(d.join("ro"), format!("{ro}\n")).unwrap();
            std::fs::write(d.join("size"), format!("{size}\n")).unwrap();
        }
        std::fs::create_dir(dir.path().join("broken")).unwrap();
        let mut devs = read_block_devs(dir.path());
        devs.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(devs, vec![dev("sr0", true, false, 2048), dev("vda", false, false, 20971520)]);
        assert_eq!(choose_disk(&devs).as_deref(), Some("/dev/vda"));
    }

    #[test]
    fn luna_disk_names_a_device_or_is_refused() {
        assert_eq!(disk_arg("root=luna quiet").unwrap(), None);
        assert_eq!(disk_arg("luna.disk=sdb").unwrap().as_deref(), Some("/dev/sdb"));
        assert_eq!(
            disk_arg("luna.disk=/dev/disk/by-id/nvme-X_1:2").unwrap().as_deref(),
            Some("/dev/disk/by-id/nvme-X_1:2")
        );
        for bad in ["/etc/passwd", "../sda", "sd$a", "/dev/"] {
            let e = disk_arg(&format!("luna.disk={bad}")).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("luna.disk"), "{e}");
        }
    }

    #[test]
    fn kernel_opts_are_what_the_osimage_added() {
        let line = "initrd=initrd.img root=luna luna.url=http://10.0.0.1:7050 luna.node=n1 luna.mac=52:54:00:12:34:56 \
                    luna.token=SECRET BOOTIF=01-52-54-00-12-34-56 ip=10.0.0.2::10.0.0.1:255.255.255.0:n1::none \
                    nameserver=10.0.0.1 luna.domain=cluster console=ttyS0,115200n8 rd.retry=600 \"x=a b\" quiet\n";
        let opts = kernel_opts(line);
        assert_eq!(opts, "console=ttyS0,115200n8 x=\"a b\" quiet");
        assert!(!opts.contains("SECRET"));
        // iPXE's EFI build: the image name first (the line of a UEFI node in disk_vm).
        let efi = "kernel initrd=initrd.img root=luna luna.node=n2 BOOTIF=01-52-54-00-4c-d1-02 console=ttyS0 panic=-1";
        assert_eq!(kernel_opts(efi), "console=ttyS0 panic=-1");
        // Without luna's initrd= nothing is taken for the loader's.
        assert_eq!(kernel_opts("quiet root=luna console=ttyS0"), "quiet console=ttyS0");
        assert_eq!(
            grub_defaults("a='b'"),
            "# Written by luna-agent at install: the osimage's kernel options, as on the network boot.\n\
             GRUB_CMDLINE_LINUX='a='\\''b'\\'''\nGRUB_TIMEOUT=${GRUB_TIMEOUT:-5}\n"
        );
        // What grub-mkconfig's shell makes of it.
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("luna.cfg");
        std::fs::write(&cfg, grub_defaults("console=ttyS0 x='y z'")).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#". "$0"; printf '%s|%s' "$GRUB_CMDLINE_LINUX" "$GRUB_TIMEOUT""#)
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "console=ttyS0 x='y z'|5");
    }

    const MOUNTINFO: &str = "\
22 1 0:21 / / rw,relatime - rootfs rootfs rw
30 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw
40 22 253:3 / /sysroot rw,relatime - ext4 /dev/vda3 rw
41 40 253:2 / /sysroot/boot/efi rw,relatime - vfat /dev/vda2 rw,fmask=0077
42 40 0:33 / /sysroot/run rw - tmpfs tmpfs rw
43 40 8:17 / /sysroot/srv/my\\040data rw - xfs /dev/sdb1 rw
";

    #[test]
    fn mounts_under_the_root_become_fstab_lines() {
        let all = parse_mountinfo(MOUNTINFO);
        assert_eq!(all.len(), 6);
        assert_eq!(all[5].mount_point, Path::new("/sysroot/srv/my data"));
        let under = mounts_under(&all, Path::new("/sysroot"));
        let paths: Vec<_> = under.iter().map(|(p, m)| (p.display().to_string(), m.source.as_str())).collect();
        assert_eq!(
            paths,
            vec![("/".into(), "/dev/vda3"), ("/boot/efi".into(), "/dev/vda2"), ("/srv/my data".into(), "/dev/sdb1")]
        );
        let image = "# /etc/fstab: static file system information.\n/dev/sda1 / ext4 defaults 0 1\nnfs:/home /home nfs defaults 0 0\n";
        let entries: Vec<(PathBuf, String, String)> = under
            .iter()
            .take(2)
            .zip(["1111-root", "AB12-CD34"])
            .map(|((p, m), u)| (p.clone(), m.fstype.clone(), u.to_string()))
            .collect();
        assert_eq!(
            fstab(image, &entries),
            "# /etc/fstab: static file system information.\nnfs:/home /home nfs defaults 0 0\n\
             # luna: the filesystems the part-script made\n\
             UUID=1111-root\t/\text4\terrors=remount-ro\t0\t1\n\
             UUID=AB12-CD34\t/boot/efi\tvfat\tumask=0077\t0\t2\n"
        );
        // Something mounted over the root later hides what was mounted before.
        let mut over = all.clone();
        over.push(Mount {
            major: 0,
            minor: 40,
            mount_point: "/sysroot".into(),
            fstype: "tmpfs".into(),
            source: "tmpfs".into(),
        });
        assert!(mounts_under(&over, Path::new("/sysroot")).is_empty());
    }

    #[test]
    fn boot_disks_follow_partitions_and_members() {
        let sys = tempfile::tempdir().unwrap();
        let s = sys.path();
        let mk = |p: &str| std::fs::create_dir_all(s.join(p)).unwrap();
        mk("devices/pci/virtio1/block/vda/vda3");
        std::fs::write(s.join("devices/pci/virtio1/block/vda/vda3/partition"), "3\n").unwrap();
        mk("devices/pci/ata1/block/sda/sda2");
        std::fs::write(s.join("devices/pci/ata1/block/sda/sda2/partition"), "2\n").unwrap();
        mk("devices/pci/ata2/block/sdb/sdb2");
        std::fs::write(s.join("devices/pci/ata2/block/sdb/sdb2/partition"), "2\n").unwrap();
        mk("devices/virtual/block/md0/slaves");
        let link = |target: &str, at: &str| std::os::unix::fs::symlink(s.join(target), s.join(at)).unwrap();
        link("devices/pci/ata2/block/sdb/sdb2", "devices/virtual/block/md0/slaves/sdb2");
        link("devices/pci/ata1/block/sda/sda2", "devices/virtual/block/md0/slaves/sda2");
        mk("dev/block");
        link("devices/pci/virtio1/block/vda/vda3", "dev/block/253:3");
        link("devices/virtual/block/md0", "dev/block/9:0");
        link("devices/pci/virtio1/block/vda", "dev/block/253:0");
        assert_eq!(boot_disks(s, 253, 3), vec!["/dev/vda"]);
        assert_eq!(boot_disks(s, 253, 0), vec!["/dev/vda"]);
        assert_eq!(boot_disks(s, 9, 0), vec!["/dev/sda", "/dev/sdb"]);
        assert!(boot_disks(s, 1, 1).is_empty());
    }

    /// The default part-script on a real (loop) disk, twice (a reinstall repartitions a disk
    /// that has the first install on it): GPT with the BIOS boot, EFI system and root
    /// partitions, ext4 root on the sysroot, vfat ESP on its /boot/efi, both found under the
    /// root by mountinfo with their UUIDs from blkid, and the loop disk as the boot disk.
    /// Needs root, losetup, sfdisk, mkfs.vfat and mkfs.ext4 (`LUNA_TEST_PRIVILEGED=1`); runs in
    /// a private mount namespace of its own.
    #[test]
    fn default_partscript_makes_a_bootable_layout_on_a_loop_disk() {
        if !luna_core::test_support::gate("LUNA_TEST_PRIVILEGED") {
            return;
        }
        use crate::os::{RealOs, Script};
        use std::process::Command;

        struct Loop(String);
        impl Drop for Loop {
            fn drop(&mut self) {
                let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(1200 << 20).unwrap();
        let out = Command::new("losetup").args(["-f", "-P", "--show"]).arg(&image).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let lo = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let disk = lo.0.clone();
        let sysroot = dir.path().join("sysroot");
        std::fs::create_dir(&sysroot).unwrap();

        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare the mount namespace");
            let none = None::<&str>;
            nix::mount::mount(none, "/", none, nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE, none)
                .unwrap();
            let mut env = vec![
                ("LUNA_DISK".to_string(), disk.clone()),
                ("LUNA_SYSROOT".to_string(), sysroot.display().to_string()),
            ];
            // A kernel without vfat (a build machine's kernel without modules; every distribution
            // kernel has it) cannot mount the ESP: there the script's vfat mount goes to a
            // `mount` in front of PATH that records its arguments, and the mount itself is left
            // to the VM test (disk_vm.rs).
            let vfat = std::fs::read_to_string("/proc/filesystems").unwrap().contains("\tvfat\n");
            let shim = sysroot.parent().unwrap().join("shim");
            let record = shim.join("vfat-mount");
            if !vfat {
                eprintln!("the kernel has no vfat: the ESP mount is recorded, not made");
                std::fs::create_dir(&shim).unwrap();
                let script = format!(
                    "#!/bin/sh\ncase \"$*\" in *'-t vfat'*) echo \"$*\" >> {rec}; exit 0 ;; esac\nexec /usr/bin/mount \"$@\"\n",
                    rec = record.display()
                );
                std::fs::write(shim.join("mount"), script).unwrap();
                std::fs::set_permissions(shim.join("mount"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
                let path = std::env::var("PATH").unwrap_or_default();
                env.push(("PATH".into(), format!("{}:{path}:/usr/sbin:/sbin", shim.display())));
            }
            let mut uuids = Vec::new();
            for round in 0..2 {
                let code = RealOs
                    .run_script(&Script { name: "partscript", body: DEFAULT_PARTSCRIPT, env: &env, chroot: None })
                    .unwrap();
                assert_eq!(code, 0, "round {round}: the default part-script failed");
                let info = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
                let under = mounts_under(&parse_mountinfo(&info), &sysroot);
                let got: Vec<(String, String, String)> = under
                    .iter()
                    .map(|(p, m)| (p.display().to_string(), m.fstype.clone(), m.source.clone()))
                    .collect();
                let mut want = vec![("/".to_string(), "ext4".to_string(), format!("{disk}p3"))];
                let esp = ("/boot/efi".to_string(), "vfat".to_string(), format!("{disk}p2"));
                if vfat {
                    want.push(esp);
                } else {
                    let recorded = std::fs::read_to_string(&record).unwrap();
                    let line = recorded.lines().nth(round).unwrap_or_default().to_string();
                    assert_eq!(
                        line,
                        format!("-t vfat -o umask=0077,quiet {disk}p2 {}/boot/efi", sysroot.display()),
                        "round {round}"
                    );
                }
                assert_eq!(got, want, "round {round}");
                let (_, root) = &under[0];
                assert_eq!(boot_disks(Path::new("/sys"), root.major, root.minor), vec![disk.clone()]);
                let table = Command::new("sfdisk").arg("--json").arg(&disk).output().unwrap();
                let table: serde_json::Value = serde_json::from_slice(&table.stdout).unwrap();
                let parts = table["partitiontable"]["partitions"].as_array().unwrap();
                assert_eq!(table["partitiontable"]["label"], "gpt");
                let types: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap()).collect();
                assert_eq!(
                    types,
                    [
                        "21686148-6449-6E6F-744E-656564454649",
                        "C12A7328-F81F-11D2-BA4B-00A0C93EC3B8",
                        "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
                    ]
                );
                assert_eq!(parts[1]["size"].as_u64(), Some(512 << 11), "a 512 MiB ESP");
                let root_uuid = RealOs.fs_uuid(&format!("{disk}p3")).unwrap();
                let esp_uuid = RealOs.fs_uuid(&format!("{disk}p2")).unwrap();
                let entries = vec![
                    (PathBuf::from("/"), "ext4".to_string(), root_uuid.clone()),
                    (PathBuf::from("/boot/efi"), "vfat".to_string(), esp_uuid.clone()),
                ];
                let tab = fstab("", &entries);
                assert!(tab.contains(&format!("UUID={root_uuid}\t/\text4")), "{tab}");
                assert!(tab.contains(&format!("UUID={esp_uuid}\t/boot/efi\tvfat")), "{tab}");
                uuids.push(root_uuid);
                // The install writes there; the next round (a reinstall) starts from a used disk.
                std::fs::write(sysroot.join("installed"), "round").unwrap();
                if vfat {
                    nix::mount::umount(&sysroot.join("boot/efi")).unwrap();
                }
                nix::mount::umount(&sysroot).unwrap();
            }
            assert_ne!(uuids[0], uuids[1], "the second run made new filesystems");
            assert!(RealOs.fs_uuid("/dev/null").is_err());
        })
        .join()
        .unwrap();
        drop(lo);
    }
}
