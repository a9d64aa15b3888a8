//! Per-boot tokens and what each one may still do (sans-IO: values in, decisions out).
//!
//! A token is `<issued>.<nonce>.<sig>`: issue time (unix seconds, plain decimal), 16 hex digits of
//! randomness and an HMAC-SHA256 over node name, MAC, BOOTIF address, issue time and nonce, keyed
//! with a key derived from the admin token. So a token names one node *as it was bound when the
//! token was issued*: a node whose MAC or address changed no longer accepts it.
//!
//! What a valid token unlocks is kept in a [`Ledger`] (in memory, one entry per node, so bounded by
//! the node count):
//! - the install plan (which may carry the BMC password) once, only with the node's latest token,
//!   only from the token's address, and only for a token issued since this server started (the
//!   ledger of an earlier run is gone, so an older token cannot prove it has not been used);
//! - status reports until the node reports `installed` with it; from then on (and for a token that
//!   a newer one replaced) only `booted`, which is what the booted OS reports with the token it
//!   finds on its kernel command line.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use hmac::{Hmac, Mac};
use luna_core::MacAddr;
use sha2::Sha256;

/// How long a boot token stays valid: an install that takes longer has bigger problems.
pub const BOOT_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// Clock skew tolerated for a token's issue time.
const FUTURE_SKEW_SECS: u64 = 300;
/// The step after which a token unlocks only [`STEP_BOOTED`].
pub const STEP_INSTALLED: &str = "installed";
/// The one step a spent token may still report.
pub const STEP_BOOTED: &str = "booted";

/// What a token is checked against: the node as the store has it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding<'a> {
    pub node: &'a str,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

/// A token's parts, once parsed strictly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parsed<'a> {
    issued: u64,
    nonce: &'a str,
    sig: &'a str,
}

/// Signs and checks per-boot tokens.
#[derive(Clone)]
pub struct BootTokens {
    key: Vec<u8>,
}

impl BootTokens {
    pub fn new(secret: &[u8]) -> Self {
        // Derived, so the admin token itself never travels on a kernel command line.
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key length");
        mac.update(b"luna boot token v2");
        BootTokens { key: mac.finalize().into_bytes().to_vec() }
    }

    fn sign(&self, b: &Binding<'_>, issued: u64, nonce: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac takes any key length");
        for part in [b.node, &b.mac.to_string(), &b.ip.to_string(), &issued.to_string(), nonce] {
            mac.update(part.as_bytes());
            mac.update(b"\0");
        }
        hex::encode(mac.finalize().into_bytes())
    }

    /// A token for `b`, issued at `now`; `nonce` makes two tokens of one second differ.
    pub fn issue(&self, b: &Binding<'_>, now: u64, nonce: u64) -> String {
        let nonce = format!("{nonce:016x}");
        format!("{now}.{nonce}.{}", self.sign(b, now, &nonce))
    }

    /// Whether `token` was issued for `b` and is still fresh; its issue time and nonce if so.
    fn verify<'t>(&self, b: &Binding<'_>, token: &'t str, now: u64) -> Option<Parsed<'t>> {
        let p = parse(token)?;
        if p.issued > now + FUTURE_SKEW_SECS || now.saturating_sub(p.issued) > BOOT_TOKEN_TTL_SECS {
            return None;
        }
        let want = self.sign(b, p.issued, p.nonce);
        crate::http::constant_time_eq(want.as_bytes(), p.sig.as_bytes()).then_some(p)
    }
}

/// Splits a token, accepting only the exact form [`BootTokens::issue`] writes: no sign, no leading
/// zero, lower-case hex of the exact lengths.
fn parse(token: &str) -> Option<Parsed<'_>> {
    let mut parts = token.split('.');
    let (ts, nonce, sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let digits = !ts.is_empty() && ts.len() <= 20 && ts.bytes().all(|c| c.is_ascii_digit());
    if !digits || (ts.len() > 1 && ts.starts_with('0')) {
        return None;
    }
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if !hex(nonce, 16) || !hex(sig, 64) {
        return None;
    }
    Some(Parsed { issued: ts.parse().ok()?, nonce, sig })
}

/// Why a token was refused (for the log; the client only learns "forbidden").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("token is malformed, expired or not issued for this node's mac and address")]
    Invalid,
    #[error("request comes from {from}, not from the node's address {ip}")]
    WrongAddress { from: Ipv4Addr, ip: Ipv4Addr },
    #[error("token was issued before this server started")]
    BeforeStart,
    #[error("a newer token was issued to the node")]
    Superseded,
    #[error("the install plan was already fetched with this token")]
    PlanTaken,
    #[error("token was spent when the node reported installed; only '{STEP_BOOTED}' may be reported")]
    Spent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Issued {
    nonce: String,
    plan_taken: bool,
    spent: bool,
}

/// What every node's latest token may still do.
pub struct Ledger {
    tokens: BootTokens,
    started: u64,
    nodes: HashMap<String, Issued>,
}

impl Ledger {
    /// A ledger of a server that started at `started` (unix seconds).
    pub fn new(tokens: BootTokens, started: u64) -> Self {
        Ledger { tokens, started, nodes: HashMap::new() }
    }

    /// Issues a node's token for its boot script; the node's earlier tokens are superseded.
    /// Only to a request from the node's own address (`from`).
    pub fn issue(&mut self, b: &Binding<'_>, from: Ipv4Addr, now: u64, nonce: u64) -> Result<String, Refusal> {
        if from != b.ip {
            return Err(Refusal::WrongAddress { from, ip: b.ip });
        }
        let token = self.tokens.issue(b, now, nonce);
        let nonce = format!("{nonce:016x}");
        self.nodes.insert(b.node.to_string(), Issued { nonce, plan_taken: false, spent: false });
        Ok(token)
    }

    fn latest(&self, node: &str, nonce: &str) -> Option<&Issued> {
        self.nodes.get(node).filter(|i| i.nonce == nonce)
    }

    /// Checks a plan request and, if it may have the plan, uses the token up for plans. Call only
    /// once the plan is ready to send.
    pub fn check_plan(&self, b: &Binding<'_>, token: &str, from: Ipv4Addr, now: u64) -> Result<(), Refusal> {
        let p = self.tokens.verify(b, token, now).ok_or(Refusal::Invalid)?;
        if from != b.ip {
            return Err(Refusal::WrongAddress { from, ip: b.ip });
        }
        if p.issued < self.started {
            return Err(Refusal::BeforeStart);
        }
        let issued = self.latest(b.node, p.nonce).ok_or(Refusal::Superseded)?;
        if issued.spent {
            return Err(Refusal::Spent);
        }
        if issued.plan_taken {
            return Err(Refusal::PlanTaken);
        }
        Ok(())
    }

    /// Marks the plan taken with `token` (after [`Ledger::check_plan`] said yes).
    pub fn take_plan(&mut self, b: &Binding<'_>, token: &str, from: Ipv4Addr, now: u64) -> Result<(), Refusal> {
        self.check_plan(b, token, from, now)?;
        let nonce = parse(token).map(|p| p.nonce).unwrap_or_default();
        if let Some(i) = self.nodes.get_mut(b.node).filter(|i| i.nonce == nonce) {
            i.plan_taken = true;
        }
        Ok(())
    }

    /// Checks a request for the node's own data besides the plan (its cloud-init NoCloud
    /// files): what the agent may fetch while it installs, so the plan's rule without the
    /// once-only: a valid token of this run, from the node's address, the node's latest, not yet
    /// spent by `installed`.
    pub fn check_agent(&self, b: &Binding<'_>, token: &str, from: Ipv4Addr, now: u64) -> Result<(), Refusal> {
        let p = self.tokens.verify(b, token, now).ok_or(Refusal::Invalid)?;
        if from != b.ip {
            return Err(Refusal::WrongAddress { from, ip: b.ip });
        }
        if p.issued < self.started {
            return Err(Refusal::BeforeStart);
        }
        let issued = self.latest(b.node, p.nonce).ok_or(Refusal::Superseded)?;
        if issued.spent {
            return Err(Refusal::Spent);
        }
        Ok(())
    }

    /// Checks a status report of `step`; reporting [`STEP_INSTALLED`] spends the token.
    pub fn report(
        &mut self,
        b: &Binding<'_>,
        token: &str,
        step: &str,
        from: Ipv4Addr,
        now: u64,
    ) -> Result<(), Refusal> {
        let p = self.tokens.verify(b, token, now).ok_or(Refusal::Invalid)?;
        if from != b.ip {
            return Err(Refusal::WrongAddress { from, ip: b.ip });
        }
        if step == STEP_BOOTED {
            return Ok(());
        }
        if p.issued >= self.started {
            // A token of this run: only the latest one, and only until it is spent.
            let issued = match self.nodes.get_mut(b.node) {
                Some(i) if i.nonce == p.nonce => i,
                _ => return Err(Refusal::Superseded),
            };
            if issued.spent {
                return Err(Refusal::Spent);
            }
            if step == STEP_INSTALLED {
                issued.spent = true;
            }
        }
        // A token of an earlier run reports an install that outlived a server restart: it can
        // no longer fetch a plan, and reports carry no secret.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: Ipv4Addr = Ipv4Addr::new(10, 141, 0, 1);
    const OTHER: Ipv4Addr = Ipv4Addr::new(10, 141, 0, 9);

    fn bind(node: &str) -> Binding<'_> {
        Binding { node, mac: "52:54:00:00:00:01".parse().unwrap(), ip: IP }
    }

    #[test]
    fn tokens_bind_node_mac_address_and_time() {
        let t = BootTokens::new(b"admin");
        let b = bind("node001");
        let tok = t.issue(&b, 1_000_000, 7);
        assert!(t.verify(&b, &tok, 1_000_100).is_some());
        assert!(t.verify(&bind("node002"), &tok, 1_000_100).is_none());
        let other_mac = Binding { mac: "52:54:00:00:00:02".parse().unwrap(), ..b };
        assert!(t.verify(&other_mac, &tok, 1_000_100).is_none());
        assert!(t.verify(&Binding { ip: OTHER, ..b }, &tok, 1_000_100).is_none());
        assert!(t.verify(&b, &tok, 1_000_000 + BOOT_TOKEN_TTL_SECS + 1).is_none());
        assert!(t.verify(&b, &tok, 1_000_000 - FUTURE_SKEW_SECS - 1).is_none());
        assert!(BootTokens::new(b"other").verify(&b, &tok, 1_000_100).is_none());
        assert_ne!(tok, t.issue(&b, 1_000_000, 8), "the nonce makes tokens of one second differ");
    }

    #[test]
    fn only_the_exact_form_parses() {
        let t = BootTokens::new(b"admin");
        let b = bind("node001");
        let tok = t.issue(&b, 1_000_000, 7);
        let (ts, rest) = tok.split_once('.').unwrap();
        for bad in [
            format!("+{ts}.{rest}"),
            format!("0{ts}.{rest}"),
            format!("00{ts}.{rest}"),
            format!(" {ts}.{rest}"),
            format!("{ts}.{}", rest.to_uppercase()),
            format!("{tok}."),
            format!("{tok}.00"),
            tok.replace('.', ""),
            tok[..tok.len() - 1].to_string(),
            "garbage".into(),
            String::new(),
        ] {
            assert!(t.verify(&b, &bad, 1_000_100).is_none(), "{bad} accepted");
        }
        assert!(t.verify(&b, &tok, 1_000_100).is_some());
    }

    #[test]
    fn the_plan_goes_once_to_the_latest_token_from_the_nodes_address() {
        let mut l = Ledger::new(BootTokens::new(b"admin"), 1_000);
        let b = bind("node001");
        assert_eq!(l.issue(&b, OTHER, 2_000, 1), Err(Refusal::WrongAddress { from: OTHER, ip: IP }));
        let first = l.issue(&b, IP, 2_000, 1).unwrap();
        let tok = l.issue(&b, IP, 2_001, 2).unwrap();
        assert_eq!(l.check_plan(&b, &first, IP, 2_002), Err(Refusal::Superseded));
        assert_eq!(l.take_plan(&b, &tok, OTHER, 2_002), Err(Refusal::WrongAddress { from: OTHER, ip: IP }));
        assert_eq!(l.take_plan(&b, "1.2.3", IP, 2_002), Err(Refusal::Invalid));
        assert_eq!(l.take_plan(&b, &tok, IP, 2_002), Ok(()));
        assert_eq!(l.take_plan(&b, &tok, IP, 2_003), Err(Refusal::PlanTaken));
        // Status until installed; afterwards only booted.
        assert_eq!(l.report(&b, &tok, "download", IP, 2_004), Ok(()));
        assert_eq!(l.report(&b, &tok, "download", OTHER, 2_004), Err(Refusal::WrongAddress { from: OTHER, ip: IP }));
        assert_eq!(l.report(&b, &first, "download", IP, 2_004), Err(Refusal::Superseded));
        assert_eq!(l.report(&b, &tok, STEP_INSTALLED, IP, 2_005), Ok(()));
        assert_eq!(l.report(&b, &tok, "download", IP, 2_006), Err(Refusal::Spent));
        assert_eq!(l.report(&b, &tok, STEP_INSTALLED, IP, 2_006), Err(Refusal::Spent));
        assert_eq!(l.check_plan(&b, &tok, IP, 2_006), Err(Refusal::Spent));
        assert_eq!(l.report(&b, &tok, STEP_BOOTED, IP, 2_007), Ok(()));
        assert_eq!(l.report(&b, &first, STEP_BOOTED, IP, 2_007), Ok(()));
    }

    #[test]
    fn agent_data_follows_the_plan_rule_without_the_once() {
        let mut l = Ledger::new(BootTokens::new(b"admin"), 1_000);
        let b = bind("node001");
        let other = Binding { node: "node002", mac: "52:54:00:00:00:02".parse().unwrap(), ip: OTHER };
        let first = l.issue(&b, IP, 2_000, 1).unwrap();
        let tok = l.issue(&b, IP, 2_001, 2).unwrap();
        let theirs = l.issue(&other, OTHER, 2_001, 3).unwrap();
        assert_eq!(l.check_agent(&b, &tok, IP, 2_002), Ok(()));
        assert_eq!(l.take_plan(&b, &tok, IP, 2_002), Ok(()));
        assert_eq!(l.check_agent(&b, &tok, IP, 2_003), Ok(()), "after the plan, again");
        assert_eq!(l.check_agent(&b, &tok, OTHER, 2_003), Err(Refusal::WrongAddress { from: OTHER, ip: IP }));
        assert_eq!(l.check_agent(&b, &first, IP, 2_003), Err(Refusal::Superseded));
        // Another node's token, even from the other node's own address, is not this node's.
        assert_eq!(l.check_agent(&b, &theirs, OTHER, 2_003), Err(Refusal::Invalid));
        assert_eq!(l.check_agent(&b, &theirs, IP, 2_003), Err(Refusal::Invalid));
        assert_eq!(l.report(&b, &tok, STEP_INSTALLED, IP, 2_004), Ok(()));
        assert_eq!(l.check_agent(&b, &tok, IP, 2_005), Err(Refusal::Spent));
        let old = BootTokens::new(b"admin").issue(&b, 2_900, 4);
        let restarted = Ledger::new(BootTokens::new(b"admin"), 3_000);
        assert_eq!(restarted.check_agent(&b, &old, IP, 3_001), Err(Refusal::BeforeStart));
    }

    #[test]
    fn a_token_from_before_a_restart_fetches_no_plan() {
        let tokens = BootTokens::new(b"admin");
        let b = bind("node001");
        let mut before = Ledger::new(tokens.clone(), 1_000);
        let tok = before.issue(&b, IP, 1_500, 1).unwrap();
        let mut after = Ledger::new(tokens, 1_600);
        assert_eq!(after.check_plan(&b, &tok, IP, 1_700), Err(Refusal::BeforeStart));
        assert_eq!(after.report(&b, &tok, "download", IP, 1_700), Ok(()));
        assert_eq!(after.report(&b, &tok, STEP_BOOTED, IP, 1_700), Ok(()));
    }
}
