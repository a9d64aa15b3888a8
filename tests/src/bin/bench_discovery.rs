//! One round of switch-port learning: 20 simulated 48-port switches (one MAC per access port,
//! Q-BRIDGE forwarding table, dot1dBasePortIfIndex, ifName), polled by luna's discovery
//! (`Discovery::poll_all`, every switch at once), against net-snmp's `snmpbulkwalk` reading the
//! same three columns of every switch (60 processes started at once, as a script would).
//!
//! ```text
//! apt-get install -y snmp
//! cargo run --release -p luna-tests --bin bench_discovery -- [switches] [ports] [rounds]
//! ```
//!
//! The switches are in-process UDP agents on 127.0.78.N:16170 answering GETBULK with luna's
//! own SNMP codec (the same for both clients). Prints each round's time, the median of each
//! and the ratio luna/snmpbulkwalk, and checks that luna learned every MAC. Target: one round
//! of 20 × 48 under 2 s. Not a test: the numbers depend on the machine.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use luna_server::discovery::snmp::{Message, Oid, PduType, Value};
use luna_server::discovery::{self, Discovery, DiscoveryConfig};
use luna_server::service::Service;
use serde_json::json;

const PORT: u16 = 16170;
const COMMUNITY: &str = "bench";

fn oid(s: &str) -> Oid {
    s.parse().expect("valid oid")
}

/// The MIB of switch `sw` with `ports` access ports.
fn mib(sw: u32, ports: u32) -> BTreeMap<Oid, Value> {
    let mut m = BTreeMap::new();
    for p in 1..=ports {
        let mac = [0x52, 0x54, 0x00, 0x78, sw, p];
        m.insert(oid("1.3.6.1.2.1.17.7.1.2.2.1.2.1").child(&mac), Value::Integer(i64::from(p)));
        m.insert(oid("1.3.6.1.2.1.17.1.4.1.2").child(&[p]), Value::Integer(i64::from(1000 + p)));
        m.insert(
            oid("1.3.6.1.2.1.31.1.1.1.1").child(&[1000 + p]),
            Value::OctetString(format!("Gi1/0/{p}").into_bytes()),
        );
        m.insert(
            oid("1.3.6.1.2.1.2.2.1.2").child(&[1000 + p]),
            Value::OctetString(format!("GigabitEthernet1/0/{p}").into_bytes()),
        );
    }
    m
}

/// Answers GETBULK (and GETNEXT) from `mib` until the process ends.
async fn agent(sock: tokio::net::UdpSocket, mib: Arc<BTreeMap<Oid, Value>>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else { continue };
        let Ok(req) = Message::decode(&buf[..n]) else { continue };
        if req.community != COMMUNITY.as_bytes() {
            continue;
        }
        let reps = match req.pdu {
            PduType::GetBulk => req.error_index.clamp(1, 100) as usize,
            PduType::GetNext => 1,
            _ => continue,
        };
        let mut varbinds = Vec::new();
        for (start, _) in &req.varbinds {
            let mut it = mib.range((std::ops::Bound::Excluded(start.clone()), std::ops::Bound::Unbounded));
            for _ in 0..reps {
                match it.next() {
                    Some((o, v)) => varbinds.push((o.clone(), v.clone())),
                    None => {
                        varbinds.push((start.clone(), Value::EndOfMibView));
                        break;
                    }
                }
            }
        }
        let resp = Message { pdu: PduType::Response, error_status: 0, error_index: 0, varbinds, ..req };
        let _ = sock.send_to(&resp.encode(), from).await;
    }
}

fn addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 78, i as u8)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The baseline: `snmpbulkwalk` of the three columns of every switch, all at once.
fn net_snmp_round(switches: u32, reps: u32) -> Result<Duration> {
    let t = Instant::now();
    let mut children = Vec::new();
    for i in 1..=switches {
        for col in ["1.3.6.1.2.1.17.7.1.2.2.1.2", "1.3.6.1.2.1.17.1.4.1.2", "1.3.6.1.2.1.31.1.1.1.1"] {
            let child = Command::new("snmpbulkwalk")
                .args(["-v2c", "-c", COMMUNITY, &format!("-Cr{reps}"), "-On", "-t", "1", "-r", "1"])
                .arg(format!("{}:{PORT}", addr(i)))
                .arg(col)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("run snmpbulkwalk (apt-get install snmp)")?;
            children.push(child);
        }
    }
    for mut c in children {
        let st = c.wait()?;
        if !st.success() {
            bail!("snmpbulkwalk failed: {st}");
        }
    }
    Ok(t.elapsed())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .context("usage: bench_discovery [switches] [ports] [rounds]")?;
    let switches = args.first().copied().unwrap_or(20).clamp(1, 250);
    let ports = args.get(1).copied().unwrap_or(48).clamp(1, 255);
    let rounds = args.get(2).copied().unwrap_or(5).max(1);
    for i in 1..=switches {
        let sock = tokio::net::UdpSocket::bind(SocketAddr::new(addr(i).into(), PORT))
            .await
            .with_context(|| format!("bind {}:{PORT}", addr(i)))?;
        tokio::spawn(agent(sock, Arc::new(mib(i, ports))));
    }
    let store = luna_server::store::open("sqlite://:memory:").await?;
    let service = Service::new(store);
    service.ensure_cluster("bench").await?;
    service.create(luna_core::Kind::Network, json!({"name": "mgmt", "cidr": "127.0.78.0/24"})).await?;
    for i in 1..=switches {
        service
            .create(
                luna_core::Kind::Switch,
                json!({"name": format!("sw{i:02}"), "network": "mgmt", "ip": addr(i).to_string(), "community": COMMUNITY}),
            )
            .await?;
    }
    let config = DiscoveryConfig { snmp_port: PORT, ..Default::default() };
    let reps = config.max_repetitions;
    let mut luna = Vec::new();
    let mut base = Vec::new();
    for r in 0..rounds {
        // A fresh Discovery per round: a cold round, nothing remembered.
        let d = Discovery::new(service.clone(), config.clone(), Arc::new(discovery::transport::Udp));
        let t = Instant::now();
        d.poll_all().await?;
        let took = t.elapsed();
        let learned = d.list(None).await?;
        let macs: usize = learned.iter().map(|s| s.macs.len()).sum();
        if let Some(s) = learned.iter().find(|s| s.error.is_some()) {
            bail!("switch {} failed: {:?}", s.switch, s.error);
        }
        if macs != (switches * ports) as usize {
            bail!("learned {macs} MACs, expected {}", switches * ports);
        }
        let b = tokio::task::spawn_blocking(move || net_snmp_round(switches, reps)).await??;
        println!("round {}: luna {:.1} ms ({macs} MACs), snmpbulkwalk {:.1} ms", r + 1, ms(took), ms(b));
        luna.push(took);
        base.push(b);
    }
    let (l, b) = (median(luna), median(base));
    println!(
        "{switches} switches x {ports} ports, one round (median of {rounds}): luna {:.1} ms, snmpbulkwalk {:.1} ms, ratio luna/snmpbulkwalk {:.2}x; target < 2000 ms: {}",
        ms(l),
        ms(b),
        l.as_secs_f64() / b.as_secs_f64(),
        if l < Duration::from_secs(2) { "met" } else { "MISSED" }
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
