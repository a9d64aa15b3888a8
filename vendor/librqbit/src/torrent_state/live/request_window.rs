//! luna patch: a per-peer request window that follows what the peer delivers, without IO.
//!
//! Upstream keeps a fixed number of chunk requests outstanding per peer
//! (`PeerConnectionOptions::max_request_window`). Every request beyond what the peer sends in a
//! short while only waits in the peer's uplink queue, behind what it sends to everyone else,
//! and so does a request for the piece a node needs next. On bench-swarm's slow links a small
//! fixed window was best (8 nodes at 10 Mbit/s: 1.60 and 1.63 S/B with 4 chunks, 1.85 and 1.90
//! with 16), but 4 chunks a peer is far too few on a fast LAN: 64 KiB per round trip caps a peer
//! at a fraction of a 10 Gbit/s link. So the window is sized to what the peer delivered in the
//! last measurement, times `queue_time`: it stays small where the uplink is the bottleneck and
//! grows to the cap where the round trip is short.

use std::time::{Duration, Instant};

/// The window never goes below this many chunks (nor above the cap).
pub(crate) const MIN_WINDOW: usize = 4;
/// How often the rate is measured and the window resized.
pub(crate) const MEASURE_EVERY: Duration = Duration::from_millis(250);
/// Chunk size the window is counted in.
const CHUNK: f64 = 16384.0;

pub(crate) struct RequestWindow {
    queue_time: Duration,
    cap: usize,
    window: usize,
    since: Instant,
    bytes: u64,
}

impl RequestWindow {
    /// Starts at `MIN_WINDOW` (or `cap` if that is smaller): the first measurement grows it.
    pub(crate) fn new(queue_time: Duration, cap: usize, now: Instant) -> Self {
        let cap = cap.max(1);
        Self {
            queue_time,
            cap,
            window: MIN_WINDOW.min(cap),
            since: now,
            bytes: 0,
        }
    }

    pub(crate) fn window(&self) -> usize {
        self.window
    }

    /// A lower cap (the peer's `reqq`).
    pub(crate) fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
        self.window = self.window.min(self.cap);
    }

    /// `len` bytes of a requested chunk arrived. Returns true when the window grew (the
    /// requester may send more).
    pub(crate) fn on_chunk(&mut self, len: usize, now: Instant) -> bool {
        self.bytes += len as u64;
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed < MEASURE_EVERY {
            return false;
        }
        let rate = self.bytes as f64 / elapsed.as_secs_f64();
        self.bytes = 0;
        self.since = now;
        let want = (rate * self.queue_time.as_secs_f64() / CHUNK).ceil() as usize;
        // At most doubled or halved per measurement: one slow interval (a choke, nothing to
        // ask for) does not drop a fast peer to the floor.
        let new = want
            .clamp(self.window / 2, self.window.saturating_mul(2))
            .clamp(MIN_WINDOW.min(self.cap), self.cap);
        let grew = new > self.window;
        self.window = new;
        grew
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` measurement intervals in which the peer delivers `rate` bytes/s; the final window.
    fn run(w: &mut RequestWindow, now: &mut Instant, rate: f64, n: usize) -> usize {
        for _ in 0..n {
            // Chunks in the interval, the last one closing it.
            let bytes = (rate * MEASURE_EVERY.as_secs_f64()) as usize;
            w.on_chunk(bytes.saturating_sub(16384), *now + MEASURE_EVERY / 2);
            *now += MEASURE_EVERY;
            w.on_chunk(bytes.min(16384), *now);
        }
        w.window()
    }

    #[test]
    fn a_slow_peer_keeps_the_floor() {
        let mut now = Instant::now();
        let mut w = RequestWindow::new(Duration::from_millis(200), 128, now);
        // 300 KB/s (a quarter of 10 Mbit/s): 60 KB in 200 ms, under 4 chunks.
        assert_eq!(run(&mut w, &mut now, 300e3, 12), MIN_WINDOW);
    }

    #[test]
    fn a_fast_peer_grows_to_the_cap_and_back() {
        let mut now = Instant::now();
        let mut w = RequestWindow::new(Duration::from_millis(200), 128, now);
        // 100 MB/s: 20 MB in 200 ms, far above the cap; doubled each interval from 4.
        assert!(!w.on_chunk(16384, now + MEASURE_EVERY / 2), "no measurement yet");
        assert_eq!(run(&mut w, &mut now, 100e6, 1), 8);
        assert_eq!(run(&mut w, &mut now, 100e6, 3), 64);
        assert_eq!(run(&mut w, &mut now, 100e6, 3), 128);
        // 2 MB/s: 400 KB in 200 ms, 25 chunks; halved at most each interval.
        assert_eq!(run(&mut w, &mut now, 2e6, 1), 64);
        assert_eq!(run(&mut w, &mut now, 2e6, 4), 25);
    }

    #[test]
    fn the_cap_wins() {
        let mut now = Instant::now();
        let mut w = RequestWindow::new(Duration::from_millis(200), 128, now);
        run(&mut w, &mut now, 100e6, 8);
        w.set_cap(10);
        assert_eq!(w.window(), 10);
        assert_eq!(run(&mut w, &mut now, 100e6, 2), 10);
        let mut w = RequestWindow::new(Duration::from_millis(200), 2, now);
        assert_eq!(w.window(), 2, "a cap under the floor");
        assert_eq!(run(&mut w, &mut now, 1e3, 4), 2);
    }
}
