//! Network namespaces made by the test, with links inside them and code running in them.

use std::ffi::OsStr;
use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{require_tool, ChildGuard, HarnessError, Result};

static NS_SEQ: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// A network namespace `luna-<pid>-<n>` with its loopback up. Dropping it kills every process
/// still inside and deletes it. Private (10.x) addresses belong only in namespaces like this.
pub struct Netns {
    name: String,
}

/// Runs `command` and returns its stdout, or an error naming the command and its stderr.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<String> {
    let rendered = render(cmd);
    let out = cmd.output().map_err(|e| HarnessError::io(format!("run `{rendered}`"), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HarnessError::Command {
            command: rendered,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn render(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn ip(args: &[&str]) -> Result<String> {
    run_checked(Command::new("ip").args(args))
}

impl Netns {
    /// Creates a fresh namespace with `lo` up. On first use in a process it also deletes
    /// namespaces left behind by earlier test processes that no longer exist.
    pub fn new() -> Result<Netns> {
        require_tool("ip")?;
        STALE_CLEANUP.call_once(remove_stale);
        let name = format!("luna-{}-{}", std::process::id(), NS_SEQ.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, e.g. for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec <name> program`;
    /// `ip` execs it, so the child's pid is the program's).
    pub fn command<S: AsRef<OsStr>>(&self, program: S) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program args..` inside the namespace to its end; returns stdout.
    pub fn run<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Result<String> {
        run_checked(self.command(program).args(args))
    }

    /// Runs `ip <args>` against the namespace (`ip -n <name> ...`); returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Starts `program args..` inside the namespace as a [`ChildGuard`] whose output is logged
    /// under `name`.
    pub fn spawn<S: AsRef<OsStr>>(&self, name: &str, program: &str, args: &[S]) -> Result<ChildGuard> {
        ChildGuard::spawn(self.command(program).args(args), name)
    }

    /// Sets link `dev` up.
    pub fn link_up(&self, dev: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "up"]).map(drop)
    }

    /// Adds address `cidr` (e.g. "10.77.0.1/24") to `dev`.
    pub fn add_addr(&self, dev: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev]).map(drop)
    }

    /// Creates bridge `name` (STP off, so ports forward at once) and sets it up.
    pub fn add_bridge(&self, name: &str) -> Result<()> {
        self.ip(&["link", "add", name, "type", "bridge", "stp_state", "0"])?;
        self.link_up(name)
    }

    /// Enslaves `dev` to `bridge`.
    pub fn set_master(&self, dev: &str, bridge: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "master", bridge]).map(drop)
    }

    /// Creates tap device `name` for a qemu NIC, optionally on `bridge`, and sets it up.
    pub fn add_tap(&self, name: &str, bridge: Option<&str>) -> Result<()> {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        if let Some(br) = bridge {
            self.set_master(name, br)?;
        }
        self.link_up(name)
    }

    /// Creates a veth pair: `name` here and `peer_name` in `peer`; both up.
    pub fn add_veth(&self, name: &str, peer: &Netns, peer_name: &str) -> Result<()> {
        ip(&[
            "link", "add", name, "netns", &self.name, "type", "veth", "peer", "name", peer_name, "netns", &peer.name,
        ])?;
        self.link_up(name)?;
        peer.link_up(peer_name)
    }

    /// The MAC address of `dev`.
    pub fn mac_of(&self, dev: &str) -> Result<String> {
        let out = self.ip(&["-o", "link", "show", dev])?;
        let mut words = out.split_whitespace();
        while let Some(w) = words.next() {
            if w == "link/ether" {
                if let Some(mac) = words.next() {
                    return Ok(mac.to_string());
                }
            }
        }
        Err(HarnessError::Setup(format!("no ethernet address on {dev} in {}", self.name)))
    }

    /// Pids of the processes whose network namespace this is.
    pub fn pids(&self) -> Result<Vec<i32>> {
        Ok(ip(&["netns", "pids", &self.name])?.split_whitespace().filter_map(|p| p.parse().ok()).collect())
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns its result. Sockets
    /// it creates live in the namespace. A panic in `f` is passed on.
    pub fn enter<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let file = self.open()?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET)?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs the future made by `f` to completion on a tokio runtime (2 workers) built inside
    /// the namespace: its threads, and so its sockets, are in the namespace.
    pub fn block_on<F, Fut>(&self, f: F) -> Result<Fut::Output>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        self.enter(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| HarnessError::io("build tokio runtime", e))?;
            Ok(rt.block_on(f()))
        })?
    }

    /// Starts `f` on a background thread inside the namespace (e.g. a server the test talks
    /// to). Threads it starts inherit the namespace. Join it with [`NetnsThread::join`].
    pub fn spawn_thread<F, T>(&self, name: &str, f: F) -> Result<NetnsThread<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let file = self.open()?;
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let joined = setns(&file, CloneFlags::CLONE_NEWNET);
                let ok = joined.is_ok();
                let _ = tx.send(joined);
                // never run f outside the namespace
                if ok {
                    Some(f())
                } else {
                    None
                }
            })
            .map_err(|e| HarnessError::io(format!("spawn thread {name}"), e))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(NetnsThread { handle }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(HarnessError::io(format!("setns into {}", self.name), e.into()))
            }
            Err(_) => Err(HarnessError::Setup(format!("thread {name} died before joining {}", self.name))),
        }
    }

    fn open(&self) -> Result<File> {
        let path = self.path();
        File::open(&path).map_err(|e| HarnessError::io(format!("open {}", path.display()), e))
    }
}

/// A thread running inside a namespace; see [`Netns::spawn_thread`].
pub struct NetnsThread<T> {
    handle: JoinHandle<Option<T>>,
}

impl<T> NetnsThread<T> {
    /// Waits for the thread; passes on its panic.
    pub fn join(self) -> T {
        match self.handle.join() {
            // spawn_thread only hands out threads that joined the namespace, which run f
            Ok(Some(v)) => v,
            Ok(None) => unreachable!("namespace thread returned without running its closure"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// True once the thread's closure returned.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Kills every process in namespace `name` and deletes it.
fn destroy(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let own = std::process::id() as i32;
        // never the test process itself (its main thread could have joined the namespace)
        let pids: Vec<i32> = match ip(&["netns", "pids", name]) {
            Ok(out) => out.split_whitespace().filter_map(|p| p.parse().ok()).filter(|&p| p != own).collect(),
            Err(_) => Vec::new(),
        };
        if pids.is_empty() || Instant::now() >= deadline {
            if !pids.is_empty() {
                eprintln!("harness: processes {pids:?} survive in netns {name}");
            }
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(e) = ip(&["netns", "del", name]) {
        eprintln!("harness: cannot delete netns {name}: {e}");
    }
}

/// Deletes `luna-<pid>-<n>` namespaces whose creating process is gone (a test killed hard).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("luna-") else { continue };
        let Some((pid, n)) = rest.split_once('-') else { continue };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u32>()) else { continue };
        if pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            destroy(&name);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        destroy(&self.name);
    }
}
