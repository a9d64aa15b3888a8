//! Download and unpack at once: archive bytes flow from the swarm (or HTTP) through a SHA-256
//! and a small bounded channel into a blocking thread that decompresses and unpacks them into
//! the target root. Neither the archive nor more than a few chunks of it are ever held.
//!
//! If the swarm makes no progress for the stall time (no byte at the read position, and no piece
//! completed anywhere in that time), or fails, the same stream continues over
//! HTTP with `Range: bytes=<consumed>-`. A hash mismatch empties the root and starts over
//! (over HTTP), a bounded number of times.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use luna_core::api::PlanImage;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::http::{Client, RangeBody};
use crate::os::Os;
use crate::report::Reporter;
use crate::torrent::Swarm;
use crate::unpack::{clear_dir, unpack_tar_zst, BlockPool, BlockReader, UnpackError, UnpackStats};

/// Whole attempts (download + verify) before giving up.
pub const ATTEMPTS: u32 = 3;
/// Consecutive failed HTTP (re)connections before an attempt gives up.
const HTTP_FAILURES: u32 = 8;
/// Read size from the swarm.
pub(crate) const CHUNK: usize = 64 * 1024;
/// Chunks in flight between the network and the unpacker (2 MiB).
pub(crate) const CHANNEL: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("download of {url} failed: {reason}")]
    Download { url: String, reason: String },
    #[error("image {url} has sha256 {got}, the plan says {want}")]
    Verify { url: String, got: String, want: String },
    #[error("image {url} is longer than the plan's {want} bytes")]
    TooLong { url: String, want: u64 },
    #[error(transparent)]
    Unpack(#[from] UnpackError),
}

/// What the verified bytes become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// A tar.zst unpacked into `root` as it streams.
    Unpack,
    /// The file `root/<name>`, as is (the `overlay` mode's squashfs).
    File(&'static str),
}

pub struct Job<'a> {
    pub image: &'a PlanImage,
    /// The tree to unpack into, or the directory of the file; emptied before a retry.
    pub root: &'a Path,
    pub sink: Sink,
    pub os: Arc<dyn Os>,
    pub client: &'a Client,
    pub reporter: &'a Arc<Reporter>,
    pub stall: Duration,
    /// Unpack into `root`; `false` downloads and verifies only (`luna-agent install
    /// --no-unpack`, for measuring the network without the CPU cost of unpacking).
    pub unpack: bool,
}

/// What a finished fetch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    pub stats: UnpackStats,
    pub bytes_from_swarm: u64,
    pub bytes_from_http: u64,
    pub attempts: u32,
}

enum Source {
    Swarm(Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    Http(Option<RangeBody>),
}

/// Downloads, verifies and unpacks; retries a failed attempt from scratch over HTTP.
pub async fn fetch(job: &Job<'_>, swarm: Option<&Swarm>) -> Result<Fetched, FetchError> {
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            clear_dir(job.root).map_err(|e| UnpackError::Io { path: job.root.display().to_string(), source: e })?;
            // Later attempts go over HTTP: the swarm only seeds from now on.
            if let Some(s) = swarm {
                s.window.park();
            }
        }
        let use_swarm = if attempt == 1 { swarm } else { None };
        match fetch_once(job, use_swarm, http_source(job.image, attempt)).await {
            Ok(mut f) => {
                f.attempts = attempt;
                return Ok(f);
            }
            Err(e) => {
                tracing::warn!("image attempt {attempt} of {ATTEMPTS} failed: {e}");
                if attempt < ATTEMPTS {
                    job.reporter.step("download", Some(format!("attempt {attempt} failed, retrying: {e}"))).await;
                }
                last = Some(e);
            }
        }
    }
    // The last attempt may have unpacked a whole tree that failed verification: empty the root,
    // so nothing unverified is left for dracut to switch into (say, after the emergency shell).
    if let Err(e) = clear_dir(job.root) {
        tracing::warn!("cannot empty {} after the failed download: {e}", job.root.display());
    }
    Err(last
        .unwrap_or_else(|| FetchError::Download { url: job.image.http_url.clone(), reason: "no attempt made".into() }))
}

/// The consumer of a download that unpacks nothing: reads the stream to its end (the SHA-256 is
/// taken on the network side, as when unpacking).
fn discard(mut reader: impl std::io::Read, root: &Path) -> Result<UnpackStats, UnpackError> {
    std::io::copy(&mut reader, &mut std::io::sink())
        .map_err(|e| UnpackError::Io { path: root.display().to_string(), source: e })?;
    Ok(UnpackStats::default())
}

/// Copies the stream into `path` (created anew).
fn write_file(mut reader: impl std::io::Read, path: &Path) -> Result<UnpackStats, UnpackError> {
    let io_err = |source| UnpackError::Io { path: path.display().to_string(), source };
    let mut f = std::fs::File::create(path).map_err(io_err)?;
    let bytes = std::io::copy(&mut reader, &mut f).map_err(io_err)?;
    Ok(UnpackStats { files: 1, bytes, ..UnpackStats::default() })
}

/// The HTTP source of attempt `attempt` (1-based): the plan's server first, then each other
/// server holding the image in turn (the answering server may be the one that died).
pub fn http_source(image: &PlanImage, attempt: u32) -> &str {
    let n = 1 + image.http_mirrors.len();
    match (attempt.saturating_sub(1) as usize) % n {
        0 => &image.http_url,
        i => &image.http_mirrors[i - 1],
    }
}

/// One pass over the archive, with `url` as the HTTP source.
pub async fn fetch_once(job: &Job<'_>, swarm: Option<&Swarm>, url: &str) -> Result<Fetched, FetchError> {
    let url = url.to_string();
    let size = job.image.size;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(CHANNEL);
    let (pool, recycle) = BlockPool::new();
    let root: PathBuf = job.root.to_path_buf();
    let os = job.os.clone();
    let sink = job.sink;
    let unpack = job.unpack;
    let consumer = tokio::task::spawn_blocking(move || {
        let reader = BlockReader::new(move || rx.blocking_recv(), recycle);
        match sink {
            Sink::Unpack if unpack => unpack_tar_zst(reader, &root, &*os),
            Sink::Unpack => discard(reader, &root),
            Sink::File(name) => write_file(reader, &root.join(name)),
        }
    });

    let mut source = match swarm {
        Some(s) => match s.stream().await {
            Ok(stream) => Source::Swarm(stream),
            Err(e) => {
                job.reporter.step("http-fallback", Some(format!("swarm stream unavailable: {e:#}"))).await;
                Source::Http(None)
            }
        },
        None => Source::Http(None),
    };
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    let mut out = Fetched::default();
    let mut backoff = Backoff::standard();
    let mut failures = 0u32;
    let mut consumer_gone = false;
    let download_err = |reason: String| FetchError::Download { url: url.clone(), reason };

    loop {
        let chunk = match &mut source {
            Source::Swarm(stream) => {
                let mut chunk = pool.take(CHUNK);
                let mut watch = StallWatch::new(swarm.map_or(0, Swarm::progress));
                let failed = loop {
                    match tokio::time::timeout(job.stall, stream.read(&mut chunk)).await {
                        Ok(Ok(n)) => {
                            chunk.truncate(n);
                            break None;
                        }
                        Ok(Err(e)) => break Some(format!("swarm failed at byte {offset}: {e}")),
                        // The piece at the read position is late, but others keep coming:
                        // the swarm delivers, wait on (`read` is cancel safe).
                        Err(_) if !watch.stalled(swarm.map_or(0, Swarm::progress)) => {
                            tracing::debug!(
                                "no byte at {offset} for {} s, but pieces ahead arrive",
                                job.stall.as_secs()
                            );
                        }
                        Err(_) => break Some(format!("swarm stalled {}s at byte {offset}", job.stall.as_secs())),
                    }
                };
                if let Some(why) = failed {
                    if let Some(s) = swarm {
                        s.window.park();
                        tracing::warn!("{}", s.census());
                    }
                    tracing::warn!("{why}; continuing over http");
                    job.reporter.step("http-fallback", Some(why)).await;
                    source = Source::Http(None);
                    continue;
                }
                // An empty read is the end of the stream.
                (!chunk.is_empty()).then_some((chunk, true))
            }
            Source::Http(body) => {
                if offset >= size {
                    None
                } else {
                    let got = match body {
                        Some(b) => b.next().await,
                        None => match job.client.range(&url, offset).await {
                            Ok(b) => {
                                *body = Some(b);
                                continue;
                            }
                            Err(e) => Err(e),
                        },
                    };
                    match got {
                        Ok(Some(b)) => {
                            failures = 0;
                            backoff.reset();
                            let mut chunk = pool.take(0);
                            chunk.extend_from_slice(&b);
                            Some((chunk, false))
                        }
                        // Ended early or broke: resume from where we are.
                        other => {
                            failures += 1;
                            let why = match other {
                                Err(e) => e.to_string(),
                                _ => format!("connection closed at byte {offset} of {size}"),
                            };
                            if failures >= HTTP_FAILURES {
                                drop(tx);
                                let _ = consumer.await;
                                return Err(download_err(why));
                            }
                            tracing::warn!("{why}; resuming");
                            *body = None;
                            tokio::time::sleep(backoff.next_delay()).await;
                            continue;
                        }
                    }
                }
            }
        };
        let Some((chunk, from_swarm)) = chunk else { break };
        if offset + chunk.len() as u64 > size {
            drop(tx);
            let _ = consumer.await;
            return Err(FetchError::TooLong { url, want: size });
        }
        hasher.update(&chunk);
        offset += chunk.len() as u64;
        if from_swarm {
            out.bytes_from_swarm += chunk.len() as u64;
        } else {
            out.bytes_from_http += chunk.len() as u64;
        }
        if let Some(s) = swarm {
            s.window.set_consumed(offset);
        }
        if tx.send(chunk).await.is_err() {
            // The unpacker stopped: its error says why.
            consumer_gone = true;
            break;
        }
        let pct = (offset * 100).checked_div(size).unwrap_or(100) as u8;
        let bytes = crate::report::FetchedBytes { from_peers: out.bytes_from_swarm, over_http: out.bytes_from_http };
        job.reporter.progress("download", pct, bytes);
    }
    drop(tx);
    let unpacked = consumer.await.map_err(|e| download_err(format!("unpack thread died: {e}")))?;
    if consumer_gone || offset < size {
        // A broken stream shows up as a hash mismatch when complete; when not, the unpacker's
        // complaint is the best explanation there is.
        unpacked?;
        return Err(download_err(format!("stream ended at byte {offset} of {size}")));
    }
    let got = hex::encode(hasher.finalize());
    if !got.eq_ignore_ascii_case(&job.image.sha256) {
        return Err(FetchError::Verify { url, got, want: job.image.sha256.clone() });
    }
    out.stats = unpacked?;
    Ok(out)
}

/// Whether the swarm stalled, asked each time the read position got nothing for the stall time:
/// only when librqbit did not complete any piece either (the reader waits for one piece while
/// the others arrive: a slow peer holds that one, and librqbit steals it from it in time).
#[derive(Debug)]
struct StallWatch {
    progress: u64,
}

impl StallWatch {
    fn new(progress: u64) -> Self {
        StallWatch { progress }
    }

    /// `progress`: the bytes librqbit has verified now.
    fn stalled(&mut self, progress: u64) -> bool {
        let moved = progress > self.progress;
        self.progress = progress;
        !moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_no_progress_anywhere_for_the_stall_time() {
        let mut w = StallWatch::new(100);
        assert!(!w.stalled(400), "pieces ahead of the reader arrived: not a stall");
        assert!(w.stalled(400), "nothing for another stall time: stalled");
        assert!(StallWatch::new(0).stalled(0));
    }

    #[test]
    fn http_attempts_go_round_the_servers_holding_the_image() {
        let mut image = PlanImage {
            osimage: "c".into(),
            revision: 1,
            torrent_url: "http://a/c.torrent".into(),
            http_url: "http://a/c.tar.zst".into(),
            sha256: String::new(),
            size: 0,
            info_hash: String::new(),
            http_mirrors: Vec::new(),
            torrent_mirrors: Vec::new(),
        };
        assert_eq!((1..=3).map(|a| http_source(&image, a)).collect::<Vec<_>>(), ["http://a/c.tar.zst"; 3]);
        image.http_mirrors = vec!["http://b/c.tar.zst".into()];
        assert_eq!(
            (1..=ATTEMPTS).map(|a| http_source(&image, a)).collect::<Vec<_>>(),
            ["http://a/c.tar.zst", "http://b/c.tar.zst", "http://a/c.tar.zst"]
        );
    }
}
