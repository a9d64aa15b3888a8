//! Status reports to the server: best effort (an unreachable server must not stop an install),
//! steps retried a few times with backoff, download progress at most once a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use luna_core::api::StatusReport;
use parking_lot::Mutex;

use crate::backoff::Backoff;
use crate::http::{retry, Client};

pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Image bytes a node got so far, by source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchedBytes {
    pub from_peers: u64,
    pub over_http: u64,
}

pub struct Reporter {
    client: Client,
    last_progress: Mutex<Option<(Instant, u8)>>,
    /// The progress report in flight. A step waits for it: the server keeps the last report it
    /// got, and a late `download` progress used to land after `installed` (seen in bench-swarm
    /// once installed nodes no longer spent seconds stopping their swarm before reporting).
    in_flight: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Reporter {
    pub fn new(client: Client) -> Arc<Self> {
        Arc::new(Self { client, last_progress: Mutex::new(None), in_flight: Mutex::new(None) })
    }

    /// Reports a step, retrying up to four times; failures are logged, not returned.
    pub async fn step(&self, step: &str, message: Option<String>) {
        self.report(StatusReport { step: step.to_string(), message, ..Default::default() }).await;
    }

    /// [`Reporter::step`] with the image bytes got so far from peers and over HTTP (the live
    /// view sums them into the swarm's saving).
    pub async fn step_with_bytes(&self, step: &str, message: Option<String>, bytes: FetchedBytes) {
        let report = StatusReport {
            step: step.to_string(),
            message,
            bytes_from_peers: Some(bytes.from_peers),
            bytes_over_http: Some(bytes.over_http),
            ..Default::default()
        };
        self.report(report).await;
    }

    async fn report(&self, report: StatusReport) {
        let pending = self.in_flight.lock().take();
        if let Some(p) = pending {
            // Bounded by the client's timeout.
            let _ = p.await;
        }
        let step = &report.step;
        let mut backoff = Backoff::standard();
        if let Err(e) = retry(4, &mut backoff, || self.client.status_once(&report)).await {
            tracing::warn!("report of step {step} lost: {e}");
        }
    }

    /// Whether a progress report for `pct` is due now (first one, ≥ 1 s since the last one, or
    /// the 100 % one); records it as sent when it is.
    pub fn progress_due(&self, pct: u8, now: Instant) -> bool {
        let mut last = self.last_progress.lock();
        let due = match *last {
            None => true,
            Some((_, prev)) if prev == pct => false,
            Some((_, _)) if pct == 100 => true,
            Some((at, _)) => now.duration_since(at) >= PROGRESS_INTERVAL,
        };
        if due {
            *last = Some((now, pct));
        }
        due
    }

    /// Sends a progress report in the background if one is due; never waits for the server.
    pub fn progress(self: &Arc<Self>, step: &str, pct: u8, bytes: FetchedBytes) {
        // One at a time: while one is in flight, later ones are not sent (the next due one is).
        if self.in_flight.lock().as_ref().is_some_and(|p| !p.is_finished()) {
            return;
        }
        if !self.progress_due(pct, Instant::now()) {
            return;
        }
        let me = self.clone();
        let report = StatusReport {
            step: step.to_string(),
            progress: Some(pct),
            bytes_from_peers: Some(bytes.from_peers),
            bytes_over_http: Some(bytes.over_http),
            ..Default::default()
        };
        let task = tokio::spawn(async move {
            if let Err(e) = me.client.status_once(&report).await {
                tracing::debug!("progress report lost: {e}");
            }
        });
        *self.in_flight.lock() = Some(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status endpoint that answers `download` reports 300 ms late and logs what happened.
    fn slow_status_server() -> (String, Arc<Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let events = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let events = events.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut len = 0;
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        line.clear();
                    }
                    let mut body = vec![0; len];
                    let _ = reader.read_exact(&mut body);
                    let report: StatusReport = serde_json::from_slice(&body).unwrap_or_default();
                    events.lock().push(format!("got {}", report.step));
                    if report.step == "download" {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    events.lock().push(format!("answered {}", report.step));
                    let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
                });
            }
        });
        (url, log)
    }

    #[tokio::test]
    async fn a_step_goes_out_after_the_progress_report_in_flight() {
        let (url, log) = slow_status_server();
        let r = Reporter::new(Client::new(&url, "n1", "t").unwrap());
        r.progress("download", 100, FetchedBytes::default());
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.progress("download", 100, FetchedBytes::default()); // in flight still: not sent again
        r.step("installed", None).await;
        assert_eq!(
            *log.lock(),
            ["got download", "answered download", "got installed", "answered installed"],
            "the server keeps the last report: installed must be it"
        );
    }

    #[test]
    fn progress_is_rate_limited() {
        let r = Reporter::new(Client::new("http://127.0.0.1:9", "n", "t").unwrap());
        let t0 = Instant::now();
        assert!(r.progress_due(1, t0));
        assert!(!r.progress_due(2, t0 + Duration::from_millis(300)));
        assert!(!r.progress_due(2, t0 + Duration::from_millis(900)));
        assert!(r.progress_due(3, t0 + Duration::from_millis(1000)));
        assert!(!r.progress_due(3, t0 + Duration::from_secs(5)), "same value twice is not news");
        assert!(r.progress_due(100, t0 + Duration::from_millis(1001)), "completion always goes out");
    }
}
