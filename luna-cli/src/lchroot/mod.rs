//! `lchroot IMAGE [COMMAND...]`: a shell or a command inside an osimage's tree, run on the
//! server host as root.
//!
//! The session runs in its own mount namespace (all of it private, so nothing mounted here
//! reaches the host, and the kernel drops every mount when the last process of the session
//! exits, even after a SIGKILL) and its own UTS namespace whose hostname is the image's name
//! (so every distribution's prompt shows it, and a package script that sets the hostname
//! changes nothing on the host). Inside: /proc, read-only /sys, the host's /dev (with
//! /dev/pts), tmpfs /run and /tmp, the host's resolver configuration, and `uname` answering
//! with the image's kernel release (`uname.rs`). The session holds the image's shared lock
//! (`lock.rs`), so `luna osimage pack` refuses to pack under it. The command's exit status is
//! lchroot's (128 + N for a command killed by signal N).

pub mod lock;
pub mod mounts;
pub mod uname;

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;

use luna_core::model::{validate_name, Kind};
use serde_json::Value;

use crate::args::LchrootCli;
use crate::client::{Client, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum LchrootError {
    #[error("lchroot must run as root on the luna server (it mounts and chroots)")]
    NotRoot,
    #[error("{0}")]
    Name(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("invalid answer from luna-server for {what}: {answer}")]
    BadAnswer { what: String, answer: String },
    #[error("osimage '{image}' has path {path}: {detail}")]
    BadPath { image: String, path: String, detail: String },
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error(transparent)]
    Uname(#[from] uname::UnameError),
    #[error("cannot {what}: {source}")]
    Sys { what: &'static str, source: io::Error },
    #[error("cannot run {command} in osimage '{image}': {source}")]
    Spawn { command: String, image: String, source: io::Error },
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> LchrootError {
    move |source| LchrootError::Sys { what, source }
}

/// The image's kernel release for `uname`, from `GET /osimage/{name}/kernels`: the one a pack
/// would boot, else the newest the tree holds; `None` (with a note why) when it holds none.
pub fn pick_release(answer: &Value) -> (Option<String>, Option<String>) {
    let selected = answer.get("selected").and_then(Value::as_str).map(String::from);
    let kernels: Vec<String> = answer
        .get("kernels")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|k| k.as_str().map(String::from)).collect())
        .unwrap_or_default();
    match (selected, kernels.last()) {
        (Some(s), _) => (Some(s), None),
        (None, Some(newest)) => (
            Some(newest.clone()),
            Some(format!(
                "the image has several kernels ({}) and no kernel_version; uname reports {newest}",
                kernels.join(", ")
            )),
        ),
        (None, None) => (None, Some("the image has no kernel yet; uname reports the host's".into())),
    }
}

/// The program and arguments to run: the given command, else the image's bash or sh.
pub fn command_line(root: &Path, command: &[OsString]) -> Vec<OsString> {
    if !command.is_empty() {
        return command.to_vec();
    }
    let shell = if root.join("bin/bash").exists() { "/bin/bash" } else { "/bin/sh" };
    vec![shell.into()]
}

/// The environment of the session: the caller's terminal settings, a standard PATH, and the
/// image's name where shells put it into the prompt (`PS1`, Debian's `debian_chroot`).
pub fn environment(image: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
        ("HOME".into(), "/root".into()),
        ("SHELL".into(), "/bin/sh".into()),
        ("PS1".into(), format!("[lchroot {image}] \\w \\$ ")),
        ("debian_chroot".into(), format!("lchroot {image}")),
        ("LUNA_LCHROOT".into(), image.into()),
    ];
    for keep in ["TERM", "LANG", "LC_ALL", "COLORTERM"] {
        if let Ok(v) = std::env::var(keep) {
            env.push((keep.into(), v));
        }
    }
    env
}

/// The exit code lchroot returns for the command's status.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

/// Runs the session; returns the command's exit code.
pub fn run(cli: &LchrootCli) -> Result<i32, LchrootError> {
    let image = cli.image.as_str();
    validate_name(Kind::Osimage, image).map_err(|e| LchrootError::Name(e.to_string()))?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LchrootError::NotRoot);
    }
    let client = Client::from_args(&cli.global);
    let obj = client.get(&format!("/osimage/{image}"), &[])?;
    let path = obj
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| LchrootError::BadAnswer { what: format!("osimage {image}"), answer: obj.to_string() })?;
    let bad = |detail: String| LchrootError::BadPath { image: image.into(), path: path.into(), detail };
    let root = std::fs::canonicalize(path).map_err(|e| bad(e.to_string()))?;
    if !root.is_dir() {
        return Err(bad("not a directory".into()));
    }
    if root == Path::new("/") {
        return Err(bad("that is the host's root; lchroot works only in an image tree".into()));
    }
    let kernels = client.get(&format!("/osimage/{image}/kernels"), &[])?;
    let (release, note) = pick_release(&kernels);
    if let Some(n) = note {
        eprintln!("lchroot: {n}");
    }
    let _lock = lock::acquire(&cli.data_dir, image)?;

    // No thread is running yet: unshare(CLONE_NEWNS) needs a single-threaded process.
    // SAFETY: unshare has no memory preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS) } != 0 {
        return Err(sys("create a mount namespace")(io::Error::last_os_error()));
    }
    mounts::make_private()?;
    // SAFETY: a valid buffer and its length.
    if unsafe { libc::sethostname(image.as_ptr().cast(), image.len()) } != 0 {
        return Err(sys("set the session's hostname")(io::Error::last_os_error()));
    }
    let host_resolv = std::fs::read("/etc/resolv.conf").ok();
    let plan = mounts::plan(&root, &mounts::ResolvConf::of(&root), host_resolv.as_deref(), release.as_deref());
    mounts::apply(&plan)?;
    let uts = match &release {
        Some(r) => Some(uname::with_release(uname::host().map_err(sys("read uname"))?, r)?),
        None => None,
    };
    let argv = command_line(&root, &cli.command);
    let rendered = argv.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
    let spawn_err = |source| LchrootError::Spawn { command: rendered.clone(), image: image.into(), source };

    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        return Err(sys("create a socket pair")(io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are new and ours.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let filter: &'static [libc::sock_filter] = Box::leak(uname::filter().into_boxed_slice());
    let trap = uts.is_some();
    let child_sock = theirs.as_raw_fd();
    let root_c = CString::new(root.as_os_str().as_bytes()).map_err(|e| bad(e.to_string()))?;
    let parent = std::process::id() as libc::pid_t;

    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear().envs(environment(image));
    // SAFETY: the closure runs between fork and exec and only makes system calls on values
    // prepared before the fork (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            // The session must not outlive lchroot (its supervisor answers uname, its lock
            // keeps packs away).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if libc::chroot(root_c.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            if trap {
                let prog = uname::fprog(filter);
                uname::install_and_send(&prog, child_sock)?;
            }
            Ok(())
        });
    }
    // Like su and sudo: ^C and ^\ are for the command, not for lchroot.
    // SAFETY: setting dispositions to SIG_IGN; the child resets them before exec.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    drop(theirs);
    if trap {
        match uname::receive(&ours) {
            Ok(Some(listener)) => {
                let uts = uts.unwrap_or_else(|| unreachable!("trap implies uts"));
                std::thread::Builder::new()
                    .name("uname".into())
                    .spawn(move || uname::supervise(listener, uts))
                    .map_err(sys("start the uname supervisor"))?;
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(sys("set up uname")(io::Error::other("the session sent no seccomp listener")));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(sys("receive the seccomp listener")(e));
            }
        }
    }
    let status = child.wait().map_err(sys("wait for the session"))?;
    Ok(exit_code(status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn release_is_the_selected_kernel_else_the_newest() {
        assert_eq!(pick_release(&json!({"kernels": ["5.1", "6.1"], "selected": "5.1"})), (Some("5.1".into()), None));
        let (r, note) = pick_release(&json!({"kernels": ["5.1", "6.1"], "selected": null}));
        assert_eq!(r.as_deref(), Some("6.1"));
        assert!(note.unwrap().contains("5.1, 6.1"));
        let (r, note) = pick_release(&json!({"kernels": [], "selected": null}));
        assert_eq!(r, None);
        assert!(note.unwrap().contains("host's"));
    }

    #[test]
    fn default_command_is_the_image_shell() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(command_line(d.path(), &[]), [OsString::from("/bin/sh")]);
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        std::fs::write(d.path().join("bin/bash"), b"").unwrap();
        assert_eq!(command_line(d.path(), &[]), [OsString::from("/bin/bash")]);
        let given = [OsString::from("dnf"), OsString::from("-y")];
        assert_eq!(command_line(d.path(), &given), given);
    }

    #[test]
    fn prompt_names_the_image() {
        let env = environment("rocky9");
        assert!(env.contains(&("PS1".into(), "[lchroot rocky9] \\w \\$ ".into())));
        assert!(env.contains(&("debian_chroot".into(), "lchroot rocky9".into())));
    }

    #[test]
    fn exit_codes_pass_through() {
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(9)), 137);
    }
}
