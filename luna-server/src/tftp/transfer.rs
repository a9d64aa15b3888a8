//! The sending side of one read transfer as a sans-IO state machine.
//!
//! The driver feeds it datagrams from the client ([`Transfer::handle_datagram`]) and timer
//! expiries ([`Transfer::handle_timeout`]), then drains packets to send with
//! [`Transfer::poll_transmit`] and sleeps until [`Transfer::poll_timeout`]. File bytes come from
//! a [`BlockSource`], so the machine can be driven from tests without sockets or files.
//!
//! Reliability follows RFC 1350 and RFC 7440: a window of `windowsize` blocks is sent, the
//! client acknowledges the last block it got in order, and the next window starts right after
//! that block (go-back-N). A duplicate or old ACK is ignored rather than answered, which is what
//! keeps the Sorcerer's Apprentice syndrome away; only a timeout re-sends. Block numbers are
//! tracked as 64-bit counters and put on the wire modulo 2^16, so files of more than 65535
//! blocks roll over to block 0 like tftp-hpa, atftp and iPXE expect.

use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::packet::{self, ErrorCode, Packet, Request, DEFAULT_BLKSIZE, MAX_BLKSIZE, MIN_BLKSIZE};

/// Where a transfer's bytes come from: positional reads, so re-sending a block is cheap.
pub trait BlockSource {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
}

impl BlockSource for &[u8] {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

impl BlockSource for std::fs::File {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
}

/// Server-side bounds on what a client may negotiate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest block size granted (already clamped to the path MTU, see [`blksize_for_mtu`]).
    pub max_blksize: u16,
    /// Largest window granted (RFC 7440 lets the server answer with less than asked).
    pub max_windowsize: u16,
    /// Retransmission timeout when the client does not negotiate `timeout`.
    pub default_timeout: Duration,
    /// Timeouts in a row before the transfer is given up.
    pub max_retries: u32,
    /// Longest `timeout` (RFC 2349) accepted; a longer one is declined (left out of the
    /// OACK: the RFC lets the server accept the value only unchanged) and `default_timeout`
    /// is used. Why: a client asking for 255 s would otherwise hold a slot for
    /// 255 s × (retries + 1) without sending a single ACK.
    pub max_timeout: Duration,
}

/// The largest block that fits one unfragmented datagram on a link with this MTU.
pub fn blksize_for_mtu(mtu: u16, ipv6: bool) -> u16 {
    // IP header (20 or 40) + UDP header (8) + TFTP DATA header (4).
    let overhead = if ipv6 { 52 } else { 32 };
    mtu.saturating_sub(overhead).clamp(MIN_BLKSIZE, MAX_BLKSIZE)
}

/// The outcome of option negotiation for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Duration,
    /// Options to acknowledge, in the client's order; empty means no OACK is sent and DATA 1
    /// starts the transfer (RFC 2347: a server that accepts no option behaves like RFC 1350).
    pub oack: Vec<(String, String)>,
}

/// RFC 2347/2348/2349/7440 negotiation. Unknown options and unusable values are left out of the
/// OACK, which is how a server declines an option.
pub fn negotiate(req: &Request, file_len: u64, limits: &Limits) -> Negotiated {
    let mut n =
        Negotiated { blksize: DEFAULT_BLKSIZE, windowsize: 1, timeout: limits.default_timeout, oack: Vec::new() };
    for (name, value) in &req.options {
        let Ok(v) = value.trim().parse::<u64>() else { continue };
        match name.as_str() {
            "blksize" => {
                // RFC 2348: below 8 is invalid; above what we allow, answer with our maximum.
                if v < u64::from(MIN_BLKSIZE) {
                    continue;
                }
                let granted = v.min(u64::from(limits.max_blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE))) as u16;
                n.blksize = granted;
                n.oack.push((name.clone(), granted.to_string()));
            }
            "tsize" => n.oack.push((name.clone(), file_len.to_string())),
            "timeout" => {
                // RFC 2349: 1..=255 seconds, and the server may only accept it unchanged; above
                // our cap it is declined.
                if !(1..=255).contains(&v) || Duration::from_secs(v) > limits.max_timeout {
                    continue;
                }
                n.timeout = Duration::from_secs(v);
                n.oack.push((name.clone(), v.to_string()));
            }
            "windowsize" => {
                if !(1..=65535).contains(&v) {
                    continue;
                }
                let granted = v.min(u64::from(limits.max_windowsize.max(1))) as u16;
                n.windowsize = granted;
                n.oack.push((name.clone(), granted.to_string()));
            }
            _ => {}
        }
    }
    n
}

/// Why a transfer ended without the client's final ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `max_retries` timeouts in a row.
    TimedOut,
    /// No ACK moved the transfer on for the configured lifetime (see
    /// [`Transfer::give_up_after`]).
    Abandoned,
    /// The client sent an ERROR (code 8 after an OACK means it refused our options).
    ClientError { code: ErrorCode, message: String },
    /// The client sent something that has no place in a read transfer.
    Protocol(String),
    /// The file could not be read (or shrank while being served).
    Read(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Running,
    /// The last block was acknowledged.
    Done,
    Failed(Failure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// OACK sent, waiting for ACK 0.
    Negotiating,
    Sending,
    Finished,
}

/// Counters for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub data_sent: u64,
    pub retransmitted: u64,
    pub timeouts: u64,
}

pub struct Transfer {
    blksize: u64,
    windowsize: u64,
    timeout: Duration,
    max_retries: u32,
    file_len: u64,
    /// Index of the final (short, possibly empty) block; blocks count from 1.
    last_block: u64,
    oack: Vec<(String, String)>,
    phase: Phase,
    status: Status,
    /// Every block up to here is acknowledged.
    acked: u64,
    /// Next block `poll_transmit` will send.
    next: u64,
    /// Last block of the window being sent.
    window_end: u64,
    highest_sent: u64,
    retries: u32,
    deadline: Option<Instant>,
    /// When the transfer last moved on (start, ACK 0, an ACK of new blocks).
    progress_at: Instant,
    /// How long it may go without moving on, whatever the retransmission timer says.
    idle_limit: Option<Duration>,
    oack_pending: bool,
    error_pending: Option<(ErrorCode, String)>,
    stats: Stats,
}

impl Transfer {
    /// Starts a transfer of `file_len` bytes: the first `poll_transmit` yields the OACK, or the
    /// first window of DATA when no option was accepted.
    pub fn new(neg: Negotiated, file_len: u64, max_retries: u32, now: Instant) -> Transfer {
        let blksize = u64::from(neg.blksize.max(MIN_BLKSIZE));
        let windowsize = u64::from(neg.windowsize.max(1));
        let last_block = file_len / blksize + 1;
        let negotiating = !neg.oack.is_empty();
        Transfer {
            blksize,
            windowsize,
            timeout: neg.timeout,
            max_retries,
            file_len,
            last_block,
            oack: neg.oack,
            phase: if negotiating { Phase::Negotiating } else { Phase::Sending },
            status: Status::Running,
            acked: 0,
            next: 1,
            window_end: if negotiating { 0 } else { windowsize.min(last_block) },
            highest_sent: 0,
            retries: 0,
            deadline: Some(now + neg.timeout),
            progress_at: now,
            idle_limit: None,
            oack_pending: negotiating,
            error_pending: None,
            stats: Stats::default(),
        }
    }

    /// Abandons the transfer when no ACK moves it on for `limit` (counted from the start and
    /// from each ACK that acknowledges something new), even while retries are left. Bounds how
    /// long a client that never answers holds a transfer slot.
    pub fn give_up_after(mut self, limit: Duration) -> Transfer {
        self.idle_limit = Some(limit);
        self.deadline = self.deadline.map(|d| self.cap(d));
        self
    }

    /// `deadline`, or the moment the idle limit runs out if that comes first.
    fn cap(&self, deadline: Instant) -> Instant {
        match self.idle_limit {
            Some(l) => deadline.min(self.progress_at + l),
            None => deadline,
        }
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    /// True once nothing is left to send and the driver can drop the transfer.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished && self.error_pending.is_none()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn blksize(&self) -> u64 {
        self.blksize
    }

    /// When the driver must call [`Transfer::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    fn fail(&mut self, failure: Failure, reply: Option<(ErrorCode, String)>) {
        self.phase = Phase::Finished;
        self.status = Status::Failed(failure);
        self.deadline = None;
        self.oack_pending = false;
        self.error_pending = reply;
    }

    fn start_window(&mut self, now: Instant) {
        self.next = self.acked + 1;
        self.window_end = (self.acked + self.windowsize).min(self.last_block);
        self.deadline = Some(self.cap(now + self.timeout));
    }

    /// Feeds one datagram received from the client's TID.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        if self.phase == Phase::Finished {
            return;
        }
        match packet::parse(datagram) {
            Ok(Packet::Ack(wire)) => self.on_ack(now, wire),
            Ok(Packet::Error { code, message }) => self.fail(Failure::ClientError { code, message }, None),
            Ok(other) => {
                let what = match other {
                    Packet::Rrq(_) => "rrq",
                    Packet::Wrq(_) => "wrq",
                    Packet::Data { .. } => "data",
                    Packet::Oack(_) => "oack",
                    Packet::Ack(_) | Packet::Error { .. } => "packet",
                };
                let msg = format!("unexpected {what} packet in a read transfer");
                self.fail(Failure::Protocol(msg.clone()), Some((ErrorCode::IllegalOperation, msg)));
            }
            Err(e) => {
                let msg = e.to_string();
                self.fail(Failure::Protocol(msg.clone()), Some((e.code(), msg)));
            }
        }
    }

    fn on_ack(&mut self, now: Instant, wire: u16) {
        match self.phase {
            Phase::Negotiating => {
                // Only ACK 0 confirms the OACK; anything else is a stray and is ignored.
                if wire == 0 {
                    self.phase = Phase::Sending;
                    self.oack_pending = false;
                    self.retries = 0;
                    self.progress_at = now;
                    self.start_window(now);
                }
            }
            Phase::Sending => {
                // Which outstanding block does this 16-bit number name? At most `windowsize`
                // (< 2^16) blocks are outstanding, so the distance from `acked` is unambiguous.
                let delta = u64::from(wire.wrapping_sub(self.acked as u16));
                if delta == 0 || delta > self.highest_sent - self.acked {
                    // Duplicate or old ACK: ignored, never answered (Sorcerer's Apprentice).
                    return;
                }
                self.acked += delta;
                self.retries = 0;
                self.progress_at = now;
                if self.acked == self.last_block {
                    self.phase = Phase::Finished;
                    self.status = Status::Done;
                    self.deadline = None;
                    return;
                }
                // An ACK inside the window means the blocks after it were lost: go back to the
                // block after it (RFC 7440 section 4); an ACK of the window's end slides it.
                if self.acked < self.highest_sent {
                    self.stats.retransmitted += self.highest_sent - self.acked;
                }
                self.start_window(now);
            }
            Phase::Finished => {}
        }
    }

    /// Tells the machine that `now` may be past [`Transfer::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.deadline else { return };
        if now < deadline || self.phase == Phase::Finished {
            return;
        }
        self.stats.timeouts += 1;
        if self.idle_limit.is_some_and(|l| now >= self.progress_at + l) {
            let msg = format!("abandoned after {} s without progress", self.idle_limit.unwrap_or_default().as_secs());
            self.fail(Failure::Abandoned, Some((ErrorCode::NotDefined, msg)));
            return;
        }
        self.retries += 1;
        if self.retries > self.max_retries {
            let msg = format!("timed out after {} retransmissions", self.max_retries);
            self.fail(Failure::TimedOut, Some((ErrorCode::NotDefined, msg)));
            return;
        }
        match self.phase {
            Phase::Negotiating => {
                self.oack_pending = true;
                self.deadline = Some(self.cap(now + self.timeout));
            }
            Phase::Sending => {
                self.stats.retransmitted += self.highest_sent - self.acked;
                self.start_window(now);
            }
            Phase::Finished => {}
        }
    }

    /// Writes the next packet to send into `out`; false when there is nothing to send now.
    pub fn poll_transmit(&mut self, src: &mut dyn BlockSource, out: &mut Vec<u8>) -> bool {
        if let Some((code, msg)) = self.error_pending.take() {
            packet::encode_error(out, code, &msg);
            return true;
        }
        match self.phase {
            Phase::Negotiating if self.oack_pending => {
                self.oack_pending = false;
                packet::encode_oack(out, &self.oack);
                true
            }
            Phase::Sending if self.next <= self.window_end => {
                let block = self.next;
                let offset = (block - 1) * self.blksize;
                let len = self.blksize.min(self.file_len.saturating_sub(offset)) as usize;
                let filled = packet::encode_data_with(out, block as u16, len, |buf| read_exact_at(src, offset, buf));
                if let Err(e) = filled {
                    let msg = format!("read error: {e}");
                    self.fail(Failure::Read(msg.clone()), None);
                    packet::encode_error(out, ErrorCode::NotDefined, &msg);
                    return true;
                }
                self.next += 1;
                self.highest_sent = self.highest_sent.max(block);
                self.stats.data_sent += 1;
                true
            }
            _ => false,
        }
    }
}

fn read_exact_at(src: &mut dyn BlockSource, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = src.read_at(offset, buf)?;
        if n == 0 {
            // The size was fixed when the transfer started (tsize was announced from it).
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being served"));
        }
        offset += n as u64;
        buf = &mut buf[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tftp::packet::{encode_ack, encode_error, Mode};

    fn limits() -> Limits {
        Limits {
            max_blksize: 1468,
            max_windowsize: 16,
            default_timeout: Duration::from_secs(1),
            max_retries: 3,
            max_timeout: Duration::from_secs(10),
        }
    }

    fn req(opts: &[(&str, &str)]) -> Request {
        Request {
            filename: b"f".to_vec(),
            mode: Mode::Octet,
            options: opts.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        }
    }

    /// A packet as seen by the client, simplified for assertions.
    #[derive(Debug, PartialEq, Eq)]
    enum Out {
        Oack(Vec<(String, String)>),
        Data(u16, Vec<u8>),
        Error(u16, String),
    }

    fn drain(t: &mut Transfer, file: &[u8]) -> Vec<Out> {
        let mut src = file;
        let mut buf = Vec::new();
        let mut outs = Vec::new();
        while t.poll_transmit(&mut src, &mut buf) {
            outs.push(match packet::parse(&buf).unwrap() {
                Packet::Oack(o) => Out::Oack(o),
                Packet::Data { block, data } => Out::Data(block, data.to_vec()),
                Packet::Error { code, message } => Out::Error(code.to_u16(), message),
                other => panic!("server sent {other:?}"),
            });
        }
        outs
    }

    fn blocks(outs: &[Out]) -> Vec<u16> {
        outs.iter()
            .map(|o| match o {
                Out::Data(b, _) => *b,
                other => panic!("expected data, got {other:?}"),
            })
            .collect()
    }

    fn ack(t: &mut Transfer, now: Instant, block: u16) {
        let mut b = Vec::new();
        encode_ack(&mut b, block);
        t.handle_datagram(now, &b);
    }

    fn file(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn negotiates_and_clamps_options() {
        let n = negotiate(
            &req(&[("blksize", "9000"), ("tsize", "0"), ("timeout", "3"), ("windowsize", "64"), ("foo", "1")]),
            12345,
            &limits(),
        );
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.windowsize, 16);
        assert_eq!(n.timeout, Duration::from_secs(3));
        let expected: Vec<(String, String)> =
            [("blksize", "1468"), ("tsize", "12345"), ("timeout", "3"), ("windowsize", "16")]
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        assert_eq!(n.oack, expected);
    }

    #[test]
    fn declines_invalid_option_values() {
        let n = negotiate(
            &req(&[("blksize", "7"), ("timeout", "0"), ("windowsize", "0"), ("tsize", "abc")]),
            10,
            &limits(),
        );
        assert_eq!((n.blksize, n.windowsize, n.timeout), (512, 1, Duration::from_secs(1)));
        assert!(n.oack.is_empty());
        let n = negotiate(&req(&[("timeout", "256"), ("blksize", "8")]), 10, &limits());
        assert_eq!(n.oack, vec![("blksize".to_string(), "8".to_string())]);
        assert_eq!(n.timeout, Duration::from_secs(1));
    }

    #[test]
    fn timeouts_above_the_cap_are_declined() {
        let n = negotiate(&req(&[("timeout", "255"), ("tsize", "0")]), 10, &limits());
        assert_eq!(n.timeout, Duration::from_secs(1));
        assert_eq!(n.oack, vec![("tsize".to_string(), "10".to_string())]);
        let n = negotiate(&req(&[("timeout", "10")]), 10, &limits());
        assert_eq!(n.timeout, Duration::from_secs(10));
        assert_eq!(n.oack, vec![("timeout".to_string(), "10".to_string())]);
    }

    #[test]
    fn a_silent_client_is_abandoned_after_the_idle_limit() {
        let t0 = Instant::now();
        // Timeout 10 s with 3 retries would hold the slot 40 s; the limit cuts it at 15 s.
        let neg = negotiate(&req(&[("timeout", "10"), ("blksize", "512")]), 5000, &limits());
        let mut t = Transfer::new(neg, 5000, 3, t0).give_up_after(Duration::from_secs(15));
        assert!(matches!(drain(&mut t, &file(5000))[..], [Out::Oack(_)]));
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        t.handle_timeout(t0 + Duration::from_secs(10));
        assert!(matches!(drain(&mut t, &file(5000))[..], [Out::Oack(_)]));
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_secs(15)));
        t.handle_timeout(t0 + Duration::from_secs(15));
        assert_eq!(t.status(), &Status::Failed(Failure::Abandoned));
        assert_eq!(drain(&mut t, &file(5000)), vec![Out::Error(0, "abandoned after 15 s without progress".into())]);
        assert!(t.is_finished());

        // A client that acknowledges keeps the transfer alive past the limit.
        let neg = negotiate(&req(&[("blksize", "512")]), 5000, &limits());
        let mut t = Transfer::new(neg, 5000, 3, t0).give_up_after(Duration::from_secs(15));
        drain(&mut t, &file(5000));
        ack(&mut t, t0 + Duration::from_secs(9), 0);
        for (i, block) in (1..=9u16).enumerate() {
            drain(&mut t, &file(5000));
            ack(&mut t, t0 + Duration::from_secs(10 + i as u64 * 2), block);
        }
        drain(&mut t, &file(5000));
        ack(&mut t, t0 + Duration::from_secs(30), 10);
        assert_eq!(t.status(), &Status::Done);
    }

    #[test]
    fn blksize_is_capped_at_rfc_maximum_and_mtu() {
        let mut l = limits();
        l.max_blksize = u16::MAX;
        assert_eq!(negotiate(&req(&[("blksize", "70000")]), 1, &l).blksize, 65464);
        assert_eq!(blksize_for_mtu(1500, false), 1468);
        assert_eq!(blksize_for_mtu(1500, true), 1448);
        assert_eq!(blksize_for_mtu(9000, false), 8968);
        assert_eq!(blksize_for_mtu(20, false), 8);
    }

    #[test]
    fn lockstep_transfer_without_options() {
        let data = file(1300);
        let now = Instant::now();
        let mut t = Transfer::new(negotiate(&req(&[]), 1300, &limits()), 1300, 3, now);
        let outs = drain(&mut t, &data);
        assert_eq!(outs, vec![Out::Data(1, data[..512].to_vec())]);
        ack(&mut t, now, 1);
        assert_eq!(drain(&mut t, &data), vec![Out::Data(2, data[512..1024].to_vec())]);
        ack(&mut t, now, 2);
        assert_eq!(drain(&mut t, &data), vec![Out::Data(3, data[1024..].to_vec())]);
        assert_eq!(t.status(), &Status::Running);
        ack(&mut t, now, 3);
        assert_eq!(t.status(), &Status::Done);
        assert!(t.is_finished());
        assert_eq!(t.poll_timeout(), None);
        assert!(drain(&mut t, &data).is_empty());
    }

    #[test]
    fn exact_multiple_of_blksize_ends_with_empty_block() {
        let data = file(1024);
        let now = Instant::now();
        let mut t = Transfer::new(negotiate(&req(&[]), 1024, &limits()), 1024, 3, now);
        drain(&mut t, &data);
        ack(&mut t, now, 1);
        drain(&mut t, &data);
        ack(&mut t, now, 2);
        assert_eq!(drain(&mut t, &data), vec![Out::Data(3, vec![])]);
        ack(&mut t, now, 3);
        assert_eq!(t.status(), &Status::Done);
    }

    #[test]
    fn empty_file_is_one_empty_block() {
        let now = Instant::now();
        let mut t = Transfer::new(negotiate(&req(&[]), 0, &limits()), 0, 3, now);
        assert_eq!(drain(&mut t, &[]), vec![Out::Data(1, vec![])]);
        ack(&mut t, now, 1);
        assert_eq!(t.status(), &Status::Done);
    }

    #[test]
    fn oack_then_windowed_sends() {
        let data = file(100);
        let now = Instant::now();
        let neg = negotiate(&req(&[("blksize", "10"), ("windowsize", "4"), ("tsize", "0")]), 100, &limits());
        let mut t = Transfer::new(neg, 100, 3, now);
        let outs = drain(&mut t, &data);
        assert_eq!(
            outs,
            vec![Out::Oack(vec![
                ("blksize".into(), "10".into()),
                ("windowsize".into(), "4".into()),
                ("tsize".into(), "100".into())
            ])]
        );
        // A stray ACK other than 0 does not start the data.
        ack(&mut t, now, 1);
        assert!(drain(&mut t, &data).is_empty());
        ack(&mut t, now, 0);
        let outs = drain(&mut t, &data);
        assert_eq!(blocks(&outs), vec![1, 2, 3, 4]);
        assert_eq!(outs[3], Out::Data(4, data[30..40].to_vec()));
        ack(&mut t, now, 4);
        assert_eq!(blocks(&drain(&mut t, &data)), vec![5, 6, 7, 8]);
        ack(&mut t, now, 8);
        // 100 bytes / 10 = blocks 1..=10 full plus an empty block 11.
        assert_eq!(blocks(&drain(&mut t, &data)), vec![9, 10, 11]);
        ack(&mut t, now, 11);
        assert_eq!(t.status(), &Status::Done);
        assert_eq!(t.stats().data_sent, 11);
        assert_eq!(t.stats().retransmitted, 0);
    }

    #[test]
    fn ack_inside_window_goes_back_to_next_block() {
        let data = file(100);
        let now = Instant::now();
        let neg = negotiate(&req(&[("blksize", "10"), ("windowsize", "4")]), 100, &limits());
        let mut t = Transfer::new(neg, 100, 3, now);
        drain(&mut t, &data);
        ack(&mut t, now, 0);
        assert_eq!(blocks(&drain(&mut t, &data)), vec![1, 2, 3, 4]);
        // Block 3 was lost: the client acknowledges 2 and the window restarts at 3.
        ack(&mut t, now, 2);
        assert_eq!(blocks(&drain(&mut t, &data)), vec![3, 4, 5, 6]);
        assert_eq!(t.stats().retransmitted, 2);
    }

    #[test]
    fn duplicate_and_old_acks_are_ignored() {
        let data = file(100);
        let now = Instant::now();
        let neg = negotiate(&req(&[("blksize", "10"), ("windowsize", "2")]), 100, &limits());
        let mut t = Transfer::new(neg, 100, 3, now);
        drain(&mut t, &data);
        ack(&mut t, now, 0);
        assert_eq!(blocks(&drain(&mut t, &data)), vec![1, 2]);
        ack(&mut t, now, 2);
        assert_eq!(blocks(&drain(&mut t, &data)), vec![3, 4]);
        let deadline = t.poll_timeout();
        // Duplicate of the current ACK, an old ACK, the OACK's ACK again, and an ACK from the
        // future: none of them sends anything or moves the timer.
        for b in [2, 1, 0, 9, 60000] {
            ack(&mut t, now + Duration::from_millis(10), b);
            assert!(drain(&mut t, &data).is_empty(), "ack {b} caused a send");
            assert_eq!(t.poll_timeout(), deadline);
        }
        ack(&mut t, now, 4);
        assert_eq!(blocks(&drain(&mut t, &data)), vec![5, 6]);
    }

    #[test]
    fn timeout_retransmits_window_then_gives_up() {
        let data = file(50);
        let t0 = Instant::now();
        let neg = negotiate(&req(&[("blksize", "10"), ("windowsize", "3"), ("timeout", "2")]), 50, &limits());
        let mut t = Transfer::new(neg, 50, 2, t0);
        drain(&mut t, &data);
        ack(&mut t, t0, 0);
        assert_eq!(blocks(&drain(&mut t, &data)), vec![1, 2, 3]);
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        // Early timer wake-ups do nothing.
        t.handle_timeout(t0 + Duration::from_secs(1));
        assert!(drain(&mut t, &data).is_empty());
        let t1 = t0 + Duration::from_secs(2);
        t.handle_timeout(t1);
        assert_eq!(blocks(&drain(&mut t, &data)), vec![1, 2, 3]);
        assert_eq!(t.poll_timeout(), Some(t1 + Duration::from_secs(2)));
        // Progress resets the retry count.
        ack(&mut t, t1, 1);
        assert_eq!(blocks(&drain(&mut t, &data)), vec![2, 3, 4]);
        let mut now = t1;
        for _ in 0..2 {
            now += Duration::from_secs(2);
            t.handle_timeout(now);
            assert_eq!(blocks(&drain(&mut t, &data)), vec![2, 3, 4]);
        }
        now += Duration::from_secs(2);
        t.handle_timeout(now);
        assert_eq!(t.status(), &Status::Failed(Failure::TimedOut));
        let outs = drain(&mut t, &data);
        assert_eq!(outs, vec![Out::Error(0, "timed out after 2 retransmissions".into())]);
        assert!(t.is_finished());
        assert_eq!(t.stats().timeouts, 4);
    }

    #[test]
    fn lost_oack_is_resent_on_timeout() {
        let t0 = Instant::now();
        let mut t = Transfer::new(negotiate(&req(&[("tsize", "0")]), 5, &limits()), 5, 1, t0);
        assert_eq!(drain(&mut t, b"hello"), vec![Out::Oack(vec![("tsize".into(), "5".into())])]);
        t.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(drain(&mut t, b"hello"), vec![Out::Oack(vec![("tsize".into(), "5".into())])]);
        ack(&mut t, t0, 0);
        assert_eq!(drain(&mut t, b"hello"), vec![Out::Data(1, b"hello".to_vec())]);
    }

    #[test]
    fn block_numbers_roll_over_to_zero() {
        // blksize 8 and 70000 blocks: crosses 65535 → 0.
        let len = 8 * 70_000 + 3;
        let data = file(len);
        let now = Instant::now();
        let neg = negotiate(&req(&[("blksize", "8"), ("windowsize", "16")]), len as u64, &limits());
        let mut t = Transfer::new(neg, len as u64, 3, now);
        drain(&mut t, &data);
        ack(&mut t, now, 0);
        let mut received = Vec::with_capacity(len);
        let mut expected_abs: u64 = 1;
        loop {
            let outs = drain(&mut t, &data);
            assert!(!outs.is_empty());
            let mut last = 0;
            for o in outs {
                let Out::Data(b, d) = o else { panic!("expected data, got {o:?}") };
                assert_eq!(b, expected_abs as u16, "wire number of block {expected_abs}");
                expected_abs += 1;
                received.extend_from_slice(&d);
                last = b;
            }
            ack(&mut t, now, last);
            if t.status() == &Status::Done {
                break;
            }
        }
        assert_eq!(expected_abs - 1, 70_001);
        assert_eq!(received, data);
    }

    #[test]
    fn ack_around_rollover_is_resolved_correctly() {
        // Window straddling 65535 → 0: an ACK of wire block 1 means absolute block 65537.
        let len = 8 * 65_540;
        let data = file(len);
        let now = Instant::now();
        let neg = negotiate(&req(&[("blksize", "8"), ("windowsize", "4")]), len as u64, &limits());
        let mut t = Transfer::new(neg, len as u64, 3, now);
        drain(&mut t, &data);
        ack(&mut t, now, 0);
        let mut last = 0u16;
        while last != 65532 {
            last = *blocks(&drain(&mut t, &data)).last().unwrap();
            ack(&mut t, now, last);
        }
        assert_eq!(blocks(&drain(&mut t, &data)), vec![65533, 65534, 65535, 0]);
        // A stale ACK 65531 is old, not a block from the next cycle.
        ack(&mut t, now, 65531);
        assert!(drain(&mut t, &data).is_empty());
        ack(&mut t, now, 65535);
        let outs = drain(&mut t, &data);
        assert_eq!(blocks(&outs), vec![0, 1, 2, 3]);
        let Out::Data(_, first) = &outs[0] else { unreachable!() };
        assert_eq!(first[..], data[65535 * 8..65536 * 8]);
    }

    #[test]
    fn client_error_ends_transfer_silently() {
        let now = Instant::now();
        let mut t = Transfer::new(negotiate(&req(&[("blksize", "1024")]), 5, &limits()), 5, 3, now);
        drain(&mut t, b"hello");
        let mut b = Vec::new();
        encode_error(&mut b, ErrorCode::OptionNegotiation, "no thanks");
        t.handle_datagram(now, &b);
        assert_eq!(
            t.status(),
            &Status::Failed(Failure::ClientError { code: ErrorCode::OptionNegotiation, message: "no thanks".into() })
        );
        assert!(drain(&mut t, b"hello").is_empty());
        assert!(t.is_finished());
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn unexpected_packets_get_illegal_operation() {
        let now = Instant::now();
        let mut t = Transfer::new(negotiate(&req(&[]), 5, &limits()), 5, 3, now);
        drain(&mut t, b"hello");
        let mut b = Vec::new();
        packet::encode_data(&mut b, 1, b"upload");
        t.handle_datagram(now, &b);
        assert_eq!(drain(&mut t, b"hello"), vec![Out::Error(4, "unexpected data packet in a read transfer".into())]);
        assert!(matches!(t.status(), Status::Failed(Failure::Protocol(_))));

        let mut t = Transfer::new(negotiate(&req(&[]), 5, &limits()), 5, 3, now);
        drain(&mut t, b"hello");
        t.handle_datagram(now, b"\x00\x04\x00");
        assert_eq!(drain(&mut t, b"hello"), vec![Out::Error(4, "packet too short (3 bytes)".into())]);
    }

    #[test]
    fn shrunken_file_fails_with_read_error() {
        let now = Instant::now();
        // Announced 600 bytes, the source has 100.
        let mut t = Transfer::new(negotiate(&req(&[]), 600, &limits()), 600, 3, now);
        let outs = drain(&mut t, &file(100));
        assert_eq!(outs, vec![Out::Error(0, "read error: file shrank while being served".into())]);
        assert!(matches!(t.status(), Status::Failed(Failure::Read(_))));
    }
}
