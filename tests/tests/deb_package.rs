//! The Debian package, installed and run the way an admin does (`LUNA_TEST_PRIVILEGED=1`; needs
//! debootstrap, systemd-nspawn, dpkg-deb, lintian and the Debian mirror apt uses).
//!
//! `scripts/build-deb.sh` packages this tree's binaries twice (two versions). A fresh Debian
//! bookworm `debootstrap --variant=minbase` root, with systemd and exactly the package's
//! `Depends` from the mirror, boots with systemd as PID 1 in `systemd-nspawn` (private network).
//! Inside it: `dpkg -i` (postinst creates the store and the token), `systemctl enable --now
//! luna-server` (returns once the server said READY=1), `luna network add/list`, a restart, an
//! upgrade to the higher version (objects, token and config kept), and a store written by a
//! newer schema, which keeps the service down (exit 78, no restart loop). `lintian` reports no
//! error on the package.
//!
//! The pristine root is cached in `<work>/deb-root` (about 2 minutes and 100 MB from the mirror
//! the first time); each run boots a copy of it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use luna_tests::{privileged, require_tool, work_dir, workspace_root, ChildGuard};

/// Bump when the pristine root's recipe changes, so a cached one is rebuilt.
const ROOT_VERSION: u32 = 1;

fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds the package of this tree's binaries with the given version into `out`.
fn build_deb(version: &str, out: &Path) -> PathBuf {
    let root = workspace_root();
    let profile = if cfg!(debug_assertions) { "dev" } else { "release" };
    let o = run(Command::new("bash")
        .arg(root.join("scripts/build-deb.sh"))
        .args(["--no-build", "--profile", profile, "--version", version, "--out"])
        .arg(out)
        .current_dir(&root));
    let deb = PathBuf::from(stdout(&o).lines().last().unwrap_or_default());
    assert!(deb.is_file(), "build-deb.sh printed {deb:?}, which is no file");
    deb
}

/// The names of the packages `deb` depends on (alternatives and versions dropped).
fn depends(deb: &Path) -> Vec<String> {
    let o = run(Command::new("dpkg-deb").args(["-f"]).arg(deb).arg("Depends"));
    stdout(&o)
        .split(',')
        .filter_map(|d| d.split('|').next())
        .filter_map(|d| d.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// A debootstrapped bookworm with systemd and `extra` packages, cached across runs.
fn pristine_root(extra: &[String]) -> PathBuf {
    let dir = work_dir().join("deb-root");
    let root = dir.join("root");
    let mut include = vec!["systemd".to_string(), "systemd-sysv".into(), "dbus".into()];
    include.extend(extra.iter().cloned());
    include.sort();
    include.dedup();
    let marker = dir.join(format!("root.v{ROOT_VERSION}-{}", include.join("+")));
    if marker.exists() {
        return root;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&root);
    for old in std::fs::read_dir(&dir).unwrap().flatten() {
        if old.file_name().to_string_lossy().starts_with("root.v") {
            let _ = std::fs::remove_file(old.path());
        }
    }
    let mirror = stdout(&run(Command::new("bash").arg(workspace_root().join("scripts/debian-mirror.sh"))));
    eprintln!("debootstrap bookworm with {} from {mirror} (a few minutes, cached afterwards)", include.join(","));
    let log = dir.join("debootstrap.log");
    let status = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={}", include.join(",")), "bookworm"])
        .arg(&root)
        .arg(&mirror)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("debootstrap.err")).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "debootstrap failed; see {}", log.display());
    std::fs::write(&marker, b"").unwrap();
    root
}

/// A booted copy of the pristine root: systemd as PID 1 under systemd-nspawn. Dropping it stops
/// the container and removes the copy.
struct Container {
    nspawn: Option<ChildGuard>,
    leader: u32,
    root: PathBuf,
}

impl Container {
    fn boot(pristine: &Path, name: &str) -> Container {
        let root = pristine.with_file_name(format!("run-{name}"));
        let _ = std::fs::remove_dir_all(&root);
        run(Command::new("cp").args(["-a", "--reflink=auto"]).arg(pristine).arg(&root));
        std::fs::write(root.join("etc/hostname"), "lunadeb\n").unwrap();
        // no host systemd or machined here: no scope, no registration
        let nspawn = ChildGuard::spawn(
            Command::new(require_tool("systemd-nspawn").unwrap())
                .args(["--quiet", "--register=no", "--keep-unit", "--private-network", "-M", name, "-D"])
                .arg(&root)
                .arg("--boot")
                .stdin(std::process::Stdio::null()),
            &format!("nspawn-{name}"),
        )
        .unwrap();
        let mut c = Container { leader: 0, nspawn: Some(nspawn), root };
        c.leader = c.wait_leader();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let state = c.sh_output("systemctl is-system-running 2>/dev/null || true");
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(Instant::now() < deadline, "the container did not finish booting (state {state:?})");
            std::thread::sleep(Duration::from_millis(500));
        }
        c
    }

    /// The container's PID 1, as the host sees it: the child of systemd-nspawn running systemd.
    fn wait_leader(&mut self) -> u32 {
        let nspawn = self.nspawn.as_ref().unwrap().pid();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).unwrap_or_default();
            // nspawn's first child may be its short-lived outer child: the container's PID 1 is
            // the child that has become systemd
            let init = children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "systemd"));
            if let Some(pid) = init {
                return pid;
            }
            assert!(Instant::now() < deadline, "systemd-nspawn started no container");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.leader.to_string(), "-a", "--", "/bin/sh", "-c", script]);
        cmd.env_clear().env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        cmd
    }

    /// Runs `script` in the container; panics with its output (and the server's journal) when
    /// it fails.
    fn sh(&self, script: &str) -> String {
        let out = self.command(script).output().unwrap_or_else(|e| panic!("cannot run nsenter: {e}"));
        if !out.status.success() {
            let journal = self.sh_output("journalctl -u luna-server --no-pager -o cat -n 40");
            panic!(
                "in the container, {script:?} failed ({}):\n{}\n{}\nluna-server's journal:\n{journal}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        stdout(&out)
    }

    fn sh_output(&self, script: &str) -> String {
        stdout(&self.command(script).output().unwrap())
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut n) = self.nspawn.take() {
            // SIGTERM to nspawn shuts the container down; the guard kills it if that hangs
            let _ = n.terminate(Duration::from_secs(20));
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[test]
fn package_installs_runs_as_a_service_and_upgrades_keeping_the_data() {
    if !privileged() {
        return;
    }
    for tool in ["debootstrap", "systemd-nspawn", "nsenter", "dpkg-deb", "lintian"] {
        require_tool(tool).unwrap();
    }
    let scratch = work_dir().join("deb-packages");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let old = build_deb("0.1.0", &scratch);
    let new = build_deb("0.1.1", &scratch);

    // lintian: no error (warnings are printed for the record)
    let lint =
        Command::new("lintian").args(["--fail-on", "error", "--no-tag-display-limit"]).arg(&old).output().unwrap();
    eprintln!("lintian:\n{}", String::from_utf8_lossy(&lint.stdout));
    assert!(lint.status.success(), "lintian reported errors:\n{}", String::from_utf8_lossy(&lint.stdout));

    let deps: Vec<String> =
        depends(&old).into_iter().filter(|d| !d.starts_with("libc6") && !d.starts_with("libgcc")).collect();
    let pristine = pristine_root(&deps);
    let c = Container::boot(&pristine, &format!("lunadeb{}", std::process::id()));
    for deb in [&old, &new] {
        std::fs::copy(deb, c.path("/root").join(deb.file_name().unwrap())).unwrap();
    }

    // install: postinst makes the store and the token, and starts nothing
    c.sh("dpkg -i /root/luna_0.1.0_amd64.deb");
    assert_eq!(c.sh("stat -c %a /var/lib/luna"), "700");
    let token = c.sh("cat /etc/luna/token");
    assert_eq!(token.len(), 64, "postinst wrote no admin token");
    assert_eq!(c.sh_output("systemctl is-active luna-server"), "inactive");
    for path in [
        "/usr/sbin/luna-server",
        "/usr/bin/luna",
        "/usr/lib/luna/luna-agent",
        "/usr/lib/dracut/modules.d/95luna/module-setup.sh",
        "/usr/share/luna/image/luna-report-booted",
        "/usr/share/bash-completion/completions/luna",
        "/usr/share/man/man1/luna.1.gz",
        "/etc/luna/luna.toml",
    ] {
        assert!(c.path(path).exists(), "the package did not install {path}");
    }

    // the admin's way: enable --now returns once the server told systemd READY=1
    c.sh("systemctl enable --now luna-server");
    assert_eq!(c.sh("systemctl is-active luna-server"), "active");
    assert_eq!(c.sh("systemctl show -p Type --value luna-server"), "notify");
    assert_eq!(c.sh("systemctl show -p LimitNOFILE --value luna-server"), "1048576");
    c.sh("mkdir -p /srv/compute && luna network add cluster --cidr 10.141.0.0/16 && luna osimage add compute --path /srv/compute");
    assert!(c.sh("luna network list").contains("10.141.0.0/16"));

    c.sh("systemctl restart luna-server");
    assert_eq!(c.sh("systemctl is-active luna-server"), "active");
    assert!(c.sh("luna network list").contains("10.141.0.0/16"));
    // the admin's edit of the conffile survives the upgrade
    c.sh("printf '\\n# edited by the admin\\n' >> /etc/luna/luna.toml");

    // upgrade: the running server is restarted on the new version, the data stays
    c.sh("dpkg -i --force-confold /root/luna_0.1.1_amd64.deb");
    assert_eq!(c.sh("dpkg-query -W -f '${Version}' luna"), "0.1.1");
    assert_eq!(c.sh("systemctl is-active luna-server"), "active");
    assert_eq!(c.sh("cat /etc/luna/token"), token, "the upgrade changed the admin token");
    assert!(c.sh("tail -n 1 /etc/luna/luna.toml").contains("edited by the admin"));
    assert!(c.sh("luna network list").contains("10.141.0.0/16"), "objects lost in the upgrade");
    assert!(c.sh("luna osimage list").contains("compute"), "objects lost in the upgrade");

    // a store written by a newer luna-server: refused, and the service stays down
    c.sh("systemctl stop luna-server");
    let db = c.path("/var/lib/luna/luna.db");
    run(Command::new("python3").args([
        "-c",
        "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
         c.execute(\"UPDATE records SET doc='{\\\"version\\\": 999}' WHERE collection='meta' AND key='schema'\"); \
         c.commit(); assert c.total_changes == 1",
        db.to_str().unwrap(),
    ]));
    let _ = c.command("systemctl start luna-server").output();
    std::thread::sleep(Duration::from_secs(8)); // > RestartSec: a restart loop would show by now
    assert_eq!(c.sh_output("systemctl is-active luna-server"), "failed");
    assert_eq!(c.sh("systemctl show -p ExecMainStatus --value luna-server"), "78");
    assert_eq!(c.sh("systemctl show -p NRestarts --value luna-server"), "0");
    let journal = c.sh("journalctl -u luna-server --no-pager -o cat");
    assert!(journal.contains("newer than this luna-server understands"), "journal:\n{journal}");
    drop(c);
    let _ = std::fs::remove_dir_all(&scratch);
}
