//! Personality through cloud-init: an image that carries cloud-init (`/usr/bin/cloud-init`) gets
//! a NoCloud seed directory with the node's `meta-data`, `user-data` and `network-config`,
//! fetched from the server with the agent's boot token, instead of luna's own personality files.
//!
//! A seed directory rather than `ds=nocloud;s=<url>` on the kernel command line: the token is
//! per boot and spent once the node reports `installed`, so the booted OS could not fetch the
//! data itself; the seed holds it. A `cloud.cfg.d` drop-in limits cloud-init to NoCloud, so it
//! does not spend minutes probing cloud metadata services that a cluster does not have.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::http::{Client, HttpError};

/// The NoCloud files, as the server names them and cloud-init reads them.
pub const FILES: [&str; 3] = ["meta-data", "user-data", "network-config"];
/// The seed directory, relative to the root.
pub const SEED_DIR: &str = "var/lib/cloud/seed/nocloud";
/// The datasource drop-in, relative to the root.
pub const DATASOURCE_CFG: &str = "etc/cloud/cloud.cfg.d/90-luna-nocloud.cfg";
const DATASOURCE_TEXT: &str =
    "# written by luna-agent: the node's data is in the NoCloud seed\ndatasource_list: [ NoCloud, None ]\n";

#[derive(Debug, thiserror::Error)]
pub enum CloudInitError {
    #[error("fetch cloud-init data: {0}")]
    Fetch(#[from] HttpError),
    #[error("write cloud-init seed {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// Whether the image at `root` has cloud-init.
pub fn present(root: &Path) -> bool {
    fs::symlink_metadata(root.join("usr/bin/cloud-init")).is_ok()
}

/// The node's NoCloud files from the server.
pub async fn fetch(client: &Client) -> Result<Vec<(&'static str, bytes::Bytes)>, CloudInitError> {
    let mut out = Vec::new();
    for f in FILES {
        let what = format!("nocloud/{f}");
        let body =
            crate::http::retry(4, &mut crate::backoff::Backoff::standard(), || client.bytes_once_boot(&what)).await?;
        out.push((f, body));
    }
    Ok(out)
}

fn werr(path: &Path) -> impl FnOnce(std::io::Error) -> CloudInitError + '_ {
    move |source| CloudInitError::Write { path: path.display().to_string(), source }
}

/// Writes the seed (directory 0700, files 0600: user-data may hold secrets) and the datasource
/// drop-in into `root`. Returns the seed directory.
pub fn write_seed(root: &Path, files: &[(&str, bytes::Bytes)]) -> Result<PathBuf, CloudInitError> {
    let dir = root.join(SEED_DIR);
    fs::create_dir_all(&dir).map_err(werr(&dir))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(werr(&dir))?;
    for (name, body) in files {
        let path = dir.join(name);
        // Replaces whatever the image had (a stale seed of the machine it was made on).
        let _ = fs::remove_file(&path);
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(werr(&path))?;
        f.write_all(body).map_err(werr(&path))?;
    }
    let cfg = root.join(DATASOURCE_CFG);
    if let Some(parent) = cfg.parent() {
        fs::create_dir_all(parent).map_err(werr(parent))?;
    }
    fs::write(&cfg, DATASOURCE_TEXT).map_err(werr(&cfg))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_is_written_private_with_the_datasource_pinned() {
        let d = tempfile::tempdir().unwrap();
        assert!(!present(d.path()));
        fs::create_dir_all(d.path().join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("../lib/cloud-init/cloud-init", d.path().join("usr/bin/cloud-init")).unwrap();
        assert!(present(d.path()), "a dangling symlink is still cloud-init's entry point");
        fs::create_dir_all(d.path().join(SEED_DIR)).unwrap();
        fs::write(d.path().join(SEED_DIR).join("meta-data"), "instance-id: stale\n").unwrap();
        let files: Vec<(&str, bytes::Bytes)> =
            FILES.iter().map(|f| (*f, bytes::Bytes::from(format!("{f} of node001\n")))).collect();
        let dir = write_seed(d.path(), &files).unwrap();
        for f in FILES {
            let p = dir.join(f);
            assert_eq!(fs::read_to_string(&p).unwrap(), format!("{f} of node001\n"));
            assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
        }
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(fs::read_to_string(d.path().join(DATASOURCE_CFG))
            .unwrap()
            .contains("datasource_list: [ NoCloud, None ]"));
    }
}
