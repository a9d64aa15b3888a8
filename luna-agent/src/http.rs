//! Talking to luna-server: the install plan, status reports, the `.torrent`, and the archive over
//! HTTP with Range. Every call retries with jittered backoff ([`crate::backoff`]).

pub use luna_core::api::percent_encode as encode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use luna_core::api::{InstallPlan, StatusReport};

use crate::backoff::Backoff;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("request to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("answer of {url} is not valid json: {reason}")]
    Decode { url: String, reason: String },
}

impl HttpError {
    /// Worth retrying: the network, or the server being busy/broken (5xx, 429, 404 while the
    /// image is being packed), not a refusal that will not change (401/403/400).
    pub fn retryable(&self) -> bool {
        match self {
            HttpError::Transport { .. } => true,
            HttpError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 404 || *status == 408,
            HttpError::Decode { .. } => false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    /// The node's server first, then the cluster's other servers (`luna.fallback`).
    bases: Arc<[String]>,
    /// The base in use: moves on to the next one when a request cannot reach it (shared by
    /// clones, so the reporter follows the plan fetch to the server that answers).
    current: Arc<AtomicUsize>,
    node: String,
    token: String,
}

fn transport(url: &str, e: impl std::fmt::Display) -> HttpError {
    HttpError::Transport { url: url.to_string(), reason: e.to_string() }
}

impl Client {
    pub fn new(base: &str, node: &str, token: &str) -> Result<Self, HttpError> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                // A stalled transfer is noticed per read, so long downloads are not cut off.
                .read_timeout(Duration::from_secs(30))
                .no_proxy()
        };
        // The TLS verifier wants the system's CA certificates; an initramfs without them can
        // still speak plain http (what luna.url normally is), so build without any then.
        let http = match builder().build() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("no system CA certificates ({e}); https to {base} will fail, http works");
                builder().tls_certs_only([]).build().map_err(|e| transport(base, e))?
            }
        };
        Ok(Self {
            http,
            bases: vec![base.trim_end_matches('/').to_string()].into(),
            current: Arc::new(AtomicUsize::new(0)),
            node: node.to_string(),
            token: token.to_string(),
        })
    }

    /// The same client with the cluster's other servers to fall back to, in order.
    pub fn with_fallbacks(mut self, fallbacks: &[String]) -> Self {
        let mut bases = self.bases.to_vec();
        bases.extend(fallbacks.iter().map(|b| b.trim_end_matches('/').to_string()));
        self.bases = bases.into();
        self
    }

    fn base(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// After a request to `url` could not reach its server: the next request goes to the next
    /// server (with one server, to the same one again).
    fn unreachable(&self, url: &str) {
        if self.bases.len() > 1 && url.starts_with(self.base()) {
            let next = self.current.fetch_add(1, Ordering::Relaxed).wrapping_add(1) % self.bases.len();
            tracing::warn!("{url} unreachable; trying the next luna server {}", self.bases[next]);
        }
    }

    fn boot_url(&self, what: &str) -> String {
        format!("{}/boot/{what}?node={}&token={}", self.base(), encode(&self.node), encode(&self.token))
    }

    pub fn plan_url(&self) -> String {
        self.boot_url("plan")
    }

    pub fn status_url(&self) -> String {
        self.boot_url("status")
    }

    async fn check(url: &str, resp: reqwest::Response) -> Result<reqwest::Response, HttpError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(300).collect();
        Err(HttpError::Status { url: url.to_string(), status: status.as_u16(), body })
    }

    /// One GET of the install plan (a server that cannot be reached makes the next attempt go
    /// to the next server).
    pub async fn plan_once(&self) -> Result<InstallPlan, HttpError> {
        let url = self.plan_url();
        let resp = self.http.get(&url).timeout(Duration::from_secs(30)).send().await.map_err(|e| {
            self.unreachable(&url);
            transport(&url, e)
        })?;
        let body = Self::check(&url, resp).await?.bytes().await.map_err(|e| transport(&url, e))?;
        serde_json::from_slice(&body).map_err(|e| HttpError::Decode { url, reason: e.to_string() })
    }

    /// One POST of a status report.
    pub async fn status_once(&self, report: &StatusReport) -> Result<(), HttpError> {
        let url = self.status_url();
        let body =
            serde_json::to_vec(report).map_err(|e| HttpError::Decode { url: url.clone(), reason: e.to_string() })?;
        let resp = self
            .http
            .post(&url)
            .timeout(Duration::from_secs(10))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                self.unreachable(&url);
                transport(&url, e)
            })?;
        Self::check(&url, resp).await.map(drop)
    }

    /// One GET of a whole small object (the `.torrent`).
    pub async fn bytes_once(&self, url: &str) -> Result<Bytes, HttpError> {
        let resp = self.http.get(url).timeout(Duration::from_secs(60)).send().await.map_err(|e| transport(url, e))?;
        Self::check(url, resp).await?.bytes().await.map_err(|e| transport(url, e))
    }

    /// One GET of `/boot/<what>?node=&token=` (the node's own data, e.g. `nocloud/meta-data`).
    pub async fn bytes_once_boot(&self, what: &str) -> Result<Bytes, HttpError> {
        self.bytes_once(&self.boot_url(what)).await
    }

    /// Opens `url` from byte `offset` on; the answer must be 206 (or 200 from 0).
    pub async fn range(&self, url: &str, offset: u64) -> Result<RangeBody, HttpError> {
        let mut req = self.http.get(url);
        if offset > 0 {
            req = req.header("range", format!("bytes={offset}-"));
        }
        let resp = Self::check(url, req.send().await.map_err(|e| transport(url, e))?).await?;
        if offset > 0 && resp.status().as_u16() != 206 {
            return Err(HttpError::Status {
                url: url.to_string(),
                status: resp.status().as_u16(),
                body: format!("expected 206 partial content for bytes={offset}-"),
            });
        }
        Ok(RangeBody { url: url.to_string(), stream: Box::pin(resp.bytes_stream()) })
    }
}

pub struct RangeBody {
    url: String,
    stream: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
}

impl RangeBody {
    pub async fn next(&mut self) -> Result<Option<Bytes>, HttpError> {
        match self.stream.next().await {
            None => Ok(None),
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => Err(transport(&self.url, e)),
        }
    }
}

/// Retries `op` with backoff while its error is retryable, at most `attempts` times.
pub async fn retry<T, F, Fut>(attempts: u32, backoff: &mut Backoff, mut op: F) -> Result<T, HttpError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, HttpError>>,
{
    let mut left = attempts.max(1);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.retryable() && left > 1 => {
                left -= 1;
                let wait = backoff.next_delay();
                tracing::warn!("{e}; retrying in {:.1}s", wait.as_secs_f32());
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("node001"), "node001");
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn urls() {
        let c = Client::new("http://10.0.0.1:7050/", "n 1", "t&k").unwrap();
        assert_eq!(c.plan_url(), "http://10.0.0.1:7050/boot/plan?node=n%201&token=t%26k");
        assert_eq!(c.status_url(), "http://10.0.0.1:7050/boot/status?node=n%201&token=t%26k");
    }

    /// A server that answers every request with 204, counting them.
    async fn answering() -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let n = Arc::new(AtomicUsize::new(0));
        let count = n.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                count.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").await;
            }
        });
        (url, n)
    }

    #[tokio::test]
    async fn an_unreachable_server_hands_over_to_the_next() {
        // Nothing listens on the first address (a port bound and closed again).
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (live, served) = answering().await;
        let c = Client::new(&format!("http://{dead}/"), "n", "t").unwrap().with_fallbacks(&[format!("{live}/")]);
        let report = StatusReport { step: "download".into(), ..Default::default() };
        assert!(matches!(c.status_once(&report).await, Err(HttpError::Transport { .. })));
        // A clone (the reporter's) follows.
        let reporter = c.clone();
        reporter.status_once(&report).await.unwrap();
        c.status_once(&report).await.unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 2);
        assert!(c.plan_url().starts_with(&format!("{live}/boot/plan?")), "{}", c.plan_url());
        // Alone, a client stays with its server.
        let alone = Client::new(&format!("http://{dead}"), "n", "t").unwrap();
        assert!(alone.status_once(&report).await.is_err());
        assert!(alone.plan_url().starts_with(&format!("http://{dead}/")));
    }

    #[test]
    fn retryable_classes() {
        let s = |status| HttpError::Status { url: "u".into(), status, body: String::new() };
        assert!(s(503).retryable());
        assert!(s(404).retryable());
        assert!(!s(403).retryable());
        assert!(!s(400).retryable());
        assert!(HttpError::Transport { url: "u".into(), reason: "refused".into() }.retryable());
    }
}
