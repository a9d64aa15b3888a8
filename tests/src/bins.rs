//! Finding (and if need be building) the workspace's binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::{HarnessError, Result};

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// The workspace root (the directory holding the root Cargo.toml).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or_else(|| manifest.to_path_buf())
}

/// The cargo profile directory the running test was built into (`<target>/debug`), found from
/// the test executable (`<target>/<profile>/deps/<test>`) or bench binary
/// (`<target>/<profile>/<bin>`), else from `CARGO_TARGET_DIR`, else
/// `<workspace>/target/debug`.
pub fn profile_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            if dir.file_name().is_some_and(|n| n == "deps") {
                if let Some(profile) = dir.parent() {
                    return profile.to_path_buf();
                }
            }
            // A binary of this crate (the benches) sits in the profile directory itself.
            if dir.join(".fingerprint").is_dir() {
                return dir.to_path_buf();
            }
        }
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    };
    target.join("debug")
}

/// Path of the workspace binary `name` (e.g. "luna-server", "luna") in the profile directory
/// of the running test. If it is missing, builds it with `cargo build --bin <name>` first.
/// `scripts/test.sh` builds the whole workspace before testing, so that is the rare case.
pub fn cargo_bin(name: &str) -> Result<PathBuf> {
    let profile = profile_dir();
    let path = profile.join(name);
    if path.is_file() {
        return Ok(path);
    }
    let _guard = BUILD_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if path.is_file() {
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args(["build", "--bin", name]);
    if let Some(target) = profile.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = cmd.output().map_err(|e| HarnessError::io(format!("run cargo build --bin {name}"), e))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: format!("cargo build --bin {name}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::Setup(format!("cargo build --bin {name} did not produce {}", path.display())))
    }
}

/// The luna-agent that goes into test initramfs images: `LUNA_TEST_AGENT` when set
/// (`scripts/test.sh` sets it to the static musl `--profile agent` build a real server ships),
/// else that build next to this profile when there is one, else this workspace's debug build
/// (correct, only slow to unpack a big image under TCG).
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LUNA_TEST_AGENT").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(p);
        if !path.is_file() {
            return Err(HarnessError::io(
                format!("LUNA_TEST_AGENT={}", path.display()),
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        return Ok(path);
    }
    let profile = profile_dir();
    match profile.parent().map(|t| t.join("x86_64-unknown-linux-musl/agent/luna-agent")) {
        Some(p) if p.is_file() => Ok(p),
        _ => cargo_bin("luna-agent"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_holds_this_test_binary() {
        let exe = std::env::current_exe().unwrap();
        let profile = profile_dir();
        assert!(exe.starts_with(&profile), "{} not under {}", exe.display(), profile.display());
        assert!(workspace_root().join("Cargo.toml").is_file());
    }
}
