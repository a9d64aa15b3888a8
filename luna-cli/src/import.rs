//! `luna osimage import NAME --from SOURCE --path DIR`: an image tree from a container image,
//! without a container runtime. SOURCE is an OCI image layout directory (`index.json`,
//! `blobs/`), or a tar archive of one (`docker save` of Docker 25+, `skopeo copy oci-archive:`,
//! `podman save --format oci-archive`), or an older `docker save` archive (`manifest.json` with
//! layer paths). The manifests are read with oci-spec; the layers are applied in order with the
//! tar crate: `.wh.NAME` removes NAME from the layers below, `.wh..wh..opq` empties its
//! directory of what the layers below put there. Every blob is checked against its digest
//! (OCI: the manifest's and each layer's sha256 of the stored bytes; old docker save: each
//! layer's `diff_id`, the sha256 of the uncompressed tar). Gzip and zstd layers are recognised
//! by their magic bytes.
//!
//! It runs in the CLI on the server host (the source is a local file of the admin's; progress
//! and Ctrl-C are the admin's terminal's). The tree is built in a staging directory next to
//! DIR (see `tree.rs`) and renamed into place only when every layer applied and verified, so an
//! error or an interrupt leaves nothing behind.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest as _, Sha256};

use crate::tree::{InterruptGuard, Staging, TreeError};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{source_path} is not an OCI image layout or a docker save archive: {detail}")]
    Format { source_path: PathBuf, detail: String },
    #[error("blob {digest} of {source_path}: digest mismatch (the file has sha256:{actual}); the image is corrupt")]
    Digest { source_path: PathBuf, digest: String, actual: String },
    #[error("layer {layer} of {source_path}: {detail}")]
    Layer { source_path: PathBuf, layer: String, detail: String },
    #[error("interrupted; nothing was written to {0}")]
    Interrupted(PathBuf),
}

/// What a whiteout entry means, if the path is one.
#[derive(Debug, PartialEq, Eq)]
pub enum Whiteout {
    /// `.wh..wh..opq` in this directory: drop what lower layers put into it.
    Opaque(PathBuf),
    /// `.wh.NAME`: remove NAME.
    Remove(PathBuf),
}

pub fn whiteout(rel: &Path) -> Option<Whiteout> {
    let name = rel.file_name()?.to_str()?;
    let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
    if name == ".wh..wh..opq" {
        return Some(Whiteout::Opaque(parent));
    }
    let target = name.strip_prefix(".wh.")?;
    (!target.is_empty()).then(|| Whiteout::Remove(parent.join(target)))
}

/// A layer entry's path relative to the tree; `None` for the root itself, an error for paths
/// that climb out.
pub fn clean(path: &Path) -> Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("entry {} leaves the tree", path.display()))
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing { inner, hash: Sha256::new(), bytes: 0 }
    }
    fn hex(self) -> String {
        hex::encode(self.hash.finalize())
    }
}

/// Which bytes a digest covers.
enum Expect {
    /// sha256 of the blob as stored (OCI descriptors).
    Stored(String),
    /// sha256 of the uncompressed tar (docker's diff_ids).
    Uncompressed(String),
}

fn remove_any(p: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies one layer's tar stream onto `root`.
fn apply_tar<R: Read>(reader: R, root: &Path, guard: &InterruptGuard) -> Result<(), String> {
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    ar.set_preserve_mtime(true);
    let mut this_layer: HashSet<PathBuf> = HashSet::new();
    for entry in ar.entries().map_err(|e| e.to_string())? {
        if guard.interrupted() {
            return Err("interrupted".into());
        }
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let Some(rel) = clean(&path)? else { continue };
        match whiteout(&rel) {
            Some(Whiteout::Opaque(dir)) => {
                if let Ok(rd) = std::fs::read_dir(root.join(&dir)) {
                    for child in rd.flatten() {
                        if !this_layer.contains(&dir.join(child.file_name())) {
                            remove_any(&child.path()).map_err(|e| format!("{}: {e}", child.path().display()))?;
                        }
                    }
                }
                continue;
            }
            Some(Whiteout::Remove(target)) => {
                remove_any(&root.join(&target)).map_err(|e| format!("{}: {e}", target.display()))?;
                continue;
            }
            None => {}
        }
        let dst = root.join(&rel);
        if let Ok(m) = std::fs::symlink_metadata(&dst) {
            if !(m.is_dir() && entry.header().entry_type().is_dir()) {
                remove_any(&dst).map_err(|e| format!("{}: {e}", dst.display()))?;
            }
        }
        entry.unpack_in(root).map_err(|e| format!("{}: {e}", rel.display()))?;
        this_layer.insert(rel);
    }
    Ok(())
}

/// Opens, decompresses (by magic bytes), verifies and applies one layer blob.
fn apply_blob(
    source: &Path,
    blob: &Path,
    expect: &Expect,
    root: &Path,
    guard: &InterruptGuard,
) -> Result<u64, ImportError> {
    let name = blob.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let layer_err = |detail: String| ImportError::Layer { source_path: source.into(), layer: name.clone(), detail };
    let file = File::open(blob).map_err(|e| ImportError::Read { path: blob.into(), source: e })?;
    let mut stored = Hashing::new(file);
    let plain_hex = {
        let mut buf = BufReader::new(&mut stored);
        let head = buf.fill_buf().map_err(|e| layer_err(e.to_string()))?.to_vec();
        let decoded: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(buf))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(zstd::stream::read::Decoder::with_buffer(buf).map_err(|e| layer_err(e.to_string()))?)
        } else {
            Box::new(buf)
        };
        let mut plain = Hashing::new(decoded);
        let applied = apply_tar(&mut plain, root, guard);
        if guard.interrupted() {
            return Err(ImportError::Interrupted(root.into()));
        }
        // A corrupt blob may fail to decompress: say it is corrupt when its digest is wrong.
        let drained = io::copy(&mut plain, &mut io::sink());
        if let Err(detail) = applied {
            drop(plain);
            let _ = io::copy(&mut stored, &mut io::sink());
            let actual = stored.hex();
            if let Expect::Stored(d) = expect {
                if actual != *d {
                    return Err(ImportError::Digest {
                        source_path: source.into(),
                        digest: format!("sha256:{d}"),
                        actual,
                    });
                }
            }
            return Err(layer_err(detail));
        }
        drained.map_err(|e| layer_err(e.to_string()))?;
        plain.hex()
    };
    io::copy(&mut stored, &mut io::sink()).map_err(|e| layer_err(e.to_string()))?;
    let size = stored.bytes;
    let stored_hex = stored.hex();
    let (want, got) = match expect {
        Expect::Stored(d) => (d, stored_hex),
        Expect::Uncompressed(d) => (d, plain_hex),
    };
    if *want != got {
        return Err(ImportError::Digest { source_path: source.into(), digest: format!("sha256:{want}"), actual: got });
    }
    Ok(size)
}

fn sha256_hex(d: &Descriptor) -> Option<String> {
    let digest = d.digest();
    (digest.algorithm().as_ref() == "sha256").then(|| digest.digest().to_string())
}

fn blob_path(layout: &Path, d: &Descriptor) -> Result<(PathBuf, String), String> {
    let hex = sha256_hex(d).ok_or_else(|| format!("digest {} is not sha256", d.digest()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("invalid digest {}", d.digest()));
    }
    Ok((layout.join("blobs/sha256").join(&hex), hex))
}

/// Reads a small JSON blob, checking its digest.
fn read_blob(source: &Path, layout: &Path, d: &Descriptor) -> Result<Vec<u8>, ImportError> {
    let fmt = |detail: String| ImportError::Format { source_path: source.into(), detail };
    let (path, hex) = blob_path(layout, d).map_err(fmt)?;
    let bytes = std::fs::read(&path).map_err(|e| ImportError::Read { path: path.clone(), source: e })?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != hex {
        return Err(ImportError::Digest { source_path: source.into(), digest: d.digest().to_string(), actual });
    }
    Ok(bytes)
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The manifest to import: the only one, else the one for this host's architecture.
fn pick_manifest(source: &Path, layout: &Path, index: &ImageIndex, depth: u32) -> Result<ImageManifest, ImportError> {
    let fmt = |detail: String| ImportError::Format { source_path: source.into(), detail };
    let candidates: Vec<&Descriptor> = index.manifests().iter().collect();
    let chosen = match candidates.as_slice() {
        [] => return Err(fmt("index.json lists no manifest".into())),
        [one] => *one,
        many => many
            .iter()
            .find(|d| d.platform().as_ref().is_some_and(|p| p.architecture().to_string() == host_arch()))
            .copied()
            .ok_or_else(|| fmt(format!("index lists {} manifests and none for {}", many.len(), host_arch())))?,
    };
    let bytes = read_blob(source, layout, chosen)?;
    if *chosen.media_type() == MediaType::ImageIndex && depth < 4 {
        let nested = ImageIndex::from_reader(&bytes[..]).map_err(|e| fmt(format!("nested index: {e}")))?;
        return pick_manifest(source, layout, &nested, depth + 1);
    }
    ImageManifest::from_reader(&bytes[..]).map_err(|e| fmt(format!("manifest {}: {e}", chosen.digest())))
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

/// The layers to apply, bottom first: (blob path, what its digest covers, label).
fn layers(source: &Path, layout: &Path) -> Result<Vec<(PathBuf, Expect, String)>, ImportError> {
    let fmt = |detail: String| ImportError::Format { source_path: source.into(), detail };
    if layout.join("index.json").is_file() {
        let index = ImageIndex::from_file(layout.join("index.json")).map_err(|e| fmt(format!("index.json: {e}")))?;
        let manifest = pick_manifest(source, layout, &index, 0)?;
        let mut out = Vec::new();
        for d in manifest.layers() {
            let (path, hex) = blob_path(layout, d).map_err(fmt)?;
            let label = format!("sha256:{}", &hex[..12]);
            out.push((path, Expect::Stored(hex), label));
        }
        return Ok(out);
    }
    if layout.join("manifest.json").is_file() {
        // docker save before Docker 25: [{"Config": "<hex>.json", "Layers": ["<id>/layer.tar", ...]}]
        let text = std::fs::read(layout.join("manifest.json"))
            .map_err(|e| ImportError::Read { path: layout.join("manifest.json"), source: e })?;
        let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| fmt(format!("manifest.json: {e}")))?;
        let first = v.as_array().and_then(|a| a.first()).ok_or_else(|| fmt("manifest.json lists no image".into()))?;
        let config = first.get("Config").and_then(|c| c.as_str()).ok_or_else(|| fmt("no Config".into()))?;
        let config = clean(Path::new(config)).map_err(&fmt)?.ok_or_else(|| fmt("empty Config".into()))?;
        let cfg_bytes = std::fs::read(layout.join(&config))
            .map_err(|e| ImportError::Read { path: layout.join(&config), source: e })?;
        let cfg: serde_json::Value = serde_json::from_slice(&cfg_bytes).map_err(|e| fmt(format!("config: {e}")))?;
        let diff_ids: Vec<&str> =
            cfg["rootfs"]["diff_ids"].as_array().into_iter().flatten().filter_map(|d| d.as_str()).collect();
        let paths: Vec<&str> =
            first.get("Layers").and_then(|l| l.as_array()).into_iter().flatten().filter_map(|l| l.as_str()).collect();
        if paths.len() != diff_ids.len() {
            return Err(fmt(format!("{} layers but {} diff_ids in the config", paths.len(), diff_ids.len())));
        }
        let mut out = Vec::new();
        for (p, d) in paths.iter().zip(diff_ids) {
            let hex = d.strip_prefix("sha256:").ok_or_else(|| fmt(format!("diff_id {d} is not sha256")))?;
            let rel = clean(Path::new(p)).map_err(&fmt)?.ok_or_else(|| fmt("empty layer path".into()))?;
            out.push((
                layout.join(rel),
                Expect::Uncompressed(hex.to_string()),
                format!("sha256:{}", &hex[..hex.len().min(12)]),
            ));
        }
        return Ok(out);
    }
    Err(fmt("it has neither index.json nor manifest.json".into()))
}

/// Builds the tree at `dst` (which must not exist) from `source`; prints progress to stderr.
pub fn import(source: &Path, dst: &Path) -> Result<(), ImportError> {
    if dst.exists() {
        return Err(TreeError::Path { path: dst.into(), detail: "already exists".into() }.into());
    }
    let guard = InterruptGuard::new();
    let meta = std::fs::metadata(source).map_err(|e| ImportError::Read { path: source.into(), source: e })?;
    // An archive is unpacked next to the destination first (removed in every case).
    let unpacked = if meta.is_dir() {
        None
    } else {
        let dir = dst.with_file_name(format!(
            ".{}.luna-src-{}",
            dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id()
        ));
        let st = Staging::new(&dir)?;
        eprintln!("unpacking {} ({})", source.display(), mib(meta.len()));
        let f = File::open(source).map_err(|e| ImportError::Read { path: source.into(), source: e })?;
        tar::Archive::new(f).unpack(st.path()).map_err(|e| ImportError::Format {
            source_path: source.into(),
            detail: format!("not a tar archive: {e}"),
        })?;
        Some(st)
    };
    let layout = unpacked.as_ref().map_or(source, |s| s.path());
    let list = layers(source, layout)?;
    let staging = Staging::new(dst)?;
    let total = list.len();
    for (i, (blob, expect, label)) in list.iter().enumerate() {
        if guard.interrupted() {
            return Err(ImportError::Interrupted(dst.into()));
        }
        let size = std::fs::metadata(blob).map(|m| m.len()).unwrap_or(0);
        eprintln!("layer {}/{total} {label} ({}): applying", i + 1, mib(size));
        apply_blob(source, blob, expect, staging.path(), &guard)?;
    }
    staging.commit()?;
    eprintln!("imported {total} layers into {}", dst.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteouts_are_recognised() {
        assert_eq!(whiteout(Path::new("etc/.wh.gone")), Some(Whiteout::Remove("etc/gone".into())));
        assert_eq!(whiteout(Path::new(".wh.top")), Some(Whiteout::Remove("top".into())));
        assert_eq!(whiteout(Path::new("opt/.wh..wh..opq")), Some(Whiteout::Opaque("opt".into())));
        assert_eq!(whiteout(Path::new("etc/passwd")), None);
        assert_eq!(whiteout(Path::new("etc/.whatever")), None);
    }

    #[test]
    fn entry_paths_stay_inside() {
        assert_eq!(clean(Path::new("./etc/x")).unwrap(), Some(PathBuf::from("etc/x")));
        assert_eq!(clean(Path::new("/etc/x")).unwrap(), Some(PathBuf::from("etc/x")));
        assert_eq!(clean(Path::new("./")).unwrap(), None);
        assert!(clean(Path::new("etc/../../x")).unwrap_err().contains("leaves the tree"));
    }
}
