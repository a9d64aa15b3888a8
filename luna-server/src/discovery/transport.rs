//! The SNMP manager's I/O: datagrams behind a trait, and the GETBULK exchange over it
//! (request ids, timeouts, retries, stale or garbled answers skipped).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;

use super::snmp::{DecodeError, Message, Oid, PduType, Value};
use super::walk::{Walk, WalkError};

/// Datagrams to and from one agent.
#[async_trait]
pub trait Channel: Send {
    async fn send(&mut self, datagram: &[u8]) -> io::Result<()>;
    /// The next datagram from the agent.
    async fn recv(&mut self) -> io::Result<Vec<u8>>;
}

/// Opens channels to agents (UDP in production).
#[async_trait]
pub trait Transport: Send + Sync {
    async fn open(&self, target: SocketAddr) -> io::Result<Box<dyn Channel>>;
}

/// UDP: one connected socket per poll of a switch, so only that switch's answers arrive.
pub struct Udp;

struct UdpChannel(tokio::net::UdpSocket);

#[async_trait]
impl Transport for Udp {
    async fn open(&self, target: SocketAddr) -> io::Result<Box<dyn Channel>> {
        let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
        let sock = tokio::net::UdpSocket::bind(bind).await?;
        sock.connect(target).await?;
        Ok(Box::new(UdpChannel(sock)))
    }
}

#[async_trait]
impl Channel for UdpChannel {
    async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        self.0.send(datagram).await.map(|_| ())
    }
    async fn recv(&mut self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 65_535];
        let n = self.0.recv(&mut buf).await?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// Why a poll of a switch failed. Never contains the community.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("no answer from {target} within {timeout_ms} ms ({tries} tries): switch down or community wrong")]
    Timeout { target: SocketAddr, timeout_ms: u128, tries: u32 },
    #[error("garbled answer from {target}: {error}")]
    Garbage { target: SocketAddr, error: DecodeError },
    #[error("{target} answered error-status {status} (index {index}) for {oid}")]
    Agent { target: SocketAddr, status: i64, index: i64, oid: Oid },
    #[error("{target}: {error}")]
    Walk { target: SocketAddr, error: WalkError },
    #[error("switch object: {0}")]
    Config(String),
    #[error("cannot reach {target}: {error}")]
    Io { target: SocketAddr, error: io::Error },
}

/// GETBULK walks over a channel.
#[derive(Debug, Clone)]
pub struct Client {
    pub timeout: Duration,
    /// Sends of one request before giving up (1 = no retry).
    pub tries: u32,
    pub max_repetitions: u32,
}

/// One conversation with one agent.
pub struct Session<'a> {
    pub client: &'a Client,
    pub target: SocketAddr,
    pub community: &'a [u8],
    pub channel: Box<dyn Channel>,
    pub next_id: i32,
}

impl Session<'_> {
    /// Reads the subtree under `root`.
    pub async fn walk(&mut self, root: Oid) -> Result<Vec<(Vec<u32>, Value)>, PollError> {
        let mut walk = Walk::new(root);
        while let Some(oid) = walk.next_oid() {
            let oid = oid.clone();
            let varbinds = self.get_bulk(&oid).await?;
            walk.feed(varbinds).map_err(|error| PollError::Walk { target: self.target, error })?;
        }
        Ok(walk.into_rows())
    }

    async fn get_bulk(&mut self, oid: &Oid) -> Result<Vec<(Oid, Value)>, PollError> {
        let target = self.target;
        let io = |error| PollError::Io { target, error };
        let mut garbage = None;
        for _ in 0..self.client.tries.max(1) {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1) & 0x7fff_ffff;
            let req = Message::get_bulk(self.community, id, self.client.max_repetitions, std::slice::from_ref(oid));
            self.channel.send(&req.encode()).await.map_err(io)?;
            let deadline = tokio::time::Instant::now() + self.client.timeout;
            loop {
                let got = match tokio::time::timeout_at(deadline, self.channel.recv()).await {
                    Err(_) => break,
                    Ok(r) => r.map_err(io)?,
                };
                let msg = match Message::decode(&got) {
                    Ok(m) => m,
                    Err(e) => {
                        garbage = Some(e);
                        continue;
                    }
                };
                // A late answer to an earlier try, or not an answer: not ours.
                if msg.request_id != id || msg.pdu != PduType::Response || msg.community != self.community {
                    continue;
                }
                if msg.error_status != 0 {
                    return Err(PollError::Agent {
                        target,
                        status: msg.error_status,
                        index: msg.error_index,
                        oid: oid.clone(),
                    });
                }
                return Ok(msg.varbinds);
            }
        }
        Err(match garbage {
            Some(error) => PollError::Garbage { target, error },
            None => {
                PollError::Timeout { target, timeout_ms: self.client.timeout.as_millis(), tries: self.client.tries }
            }
        })
    }
}
