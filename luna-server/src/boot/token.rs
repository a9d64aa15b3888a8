//! Per-boot tokens and what each one may still do (sans-IO: values in, decisions out).
//!
//! A token is `<issued>.<nonce>.<sig>`: issue time (unix seconds, plain decimal), 16 hex digits of
//! randomness and an HMAC-SHA256 over node name, MAC, BOOTIF address, issue time and nonce, keyed
//! with a key derived from the admin token. So a token names one node *as it was bound when the
//! token was issued*: a node whose MAC or address changed no longer accepts it.
//!
//! What a valid token unlocks is kept in the ledger: one [`TokenRecord`] per node in the store
//! ([`Collection::BootToken`], so bounded by the node count and shared by every server: a token
//! minted by one server is honoured by the others, and by the same server after a restart). The
//! record holds the SHA-256 of the node's latest token, never the token, with the MAC and address
//! it was issued for and what it has been used for. A token unlocks:
//! - the install plan (which may carry the BMC password) once, only if it is the node's latest
//!   token, only from the token's address;
//! - status reports until the node reports `installed` with it; from then on (and for a token that
//!   a newer one replaced) only `booted`, which is what the booted OS reports with the token it
//!   finds on its kernel command line.
//!
//! The rules are pure functions of (record, token, request) → decision and new record
//! ([`BootTokens::check_plan`] and friends); [`Ledger`] applies them to the store, each change a
//! compare-and-swap on the node's record (two servers racing for one plan: one wins, the other
//! re-reads and refuses). Records past their token's lifetime are deleted by [`Ledger::sweep`].

use std::net::Ipv4Addr;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use luna_core::MacAddr;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Collection, Expect, Store, StoreError, Write};

/// How long a boot token stays valid: an install that takes longer has bigger problems.
pub const BOOT_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// How often each server deletes the ledger records of expired tokens.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);
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
    #[error("the ledger holds no token of this node (none issued since the ledger moved into the store, or swept)")]
    NotIssued,
    #[error("a newer token was issued to the node")]
    Superseded,
    #[error("the install plan was already fetched with this token")]
    PlanTaken,
    #[error("token was spent when the node reported installed; only '{STEP_BOOTED}' may be reported")]
    Spent,
}

/// The ledger's record of a node's latest token (`boot_token/<node>`): its SHA-256 (never the
/// token: a store dump unlocks nothing), what it was issued for, and what it has done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// Lower-case hex SHA-256 of the token.
    pub sha256: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// Issue time (unix seconds).
    pub issued: u64,
    /// When the token dies ([`BOOT_TOKEN_TTL_SECS`] after issue); the sweep deletes the record then.
    pub expires: u64,
    pub plan_taken: bool,
    pub spent: bool,
}

impl TokenRecord {
    /// Whether the token this record stands for can no longer be valid at `now`.
    pub fn expired(&self, now: u64) -> bool {
        now > self.expires
    }
}

/// Lower-case hex SHA-256 of a token, as the ledger keeps it.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl BootTokens {
    /// Issues a node's token for its boot script and the ledger record that makes it the node's
    /// latest (superseding every earlier one). Only to a request from the node's address (`from`).
    pub fn issue_record(
        &self,
        b: &Binding<'_>,
        from: Ipv4Addr,
        now: u64,
        nonce: u64,
    ) -> Result<(String, TokenRecord), Refusal> {
        if from != b.ip {
            return Err(Refusal::WrongAddress { from, ip: b.ip });
        }
        let token = self.issue(b, now, nonce);
        let record = TokenRecord {
            sha256: token_hash(&token),
            mac: b.mac,
            ip: b.ip,
            issued: now,
            expires: now + BOOT_TOKEN_TTL_SECS,
            plan_taken: false,
            spent: false,
        };
        Ok((token, record))
    }

    /// The checks every use shares: a valid token for `b`, from `b`'s address, and the node's
    /// latest (its hash and binding are the record's).
    fn latest<'r>(
        &self,
        rec: Option<&'r TokenRecord>,
        b: &Binding<'_>,
        token: &str,
        from: Ipv4Addr,
        now: u64,
    ) -> Result<&'r TokenRecord, Refusal> {
        self.verify(b, token, now).ok_or(Refusal::Invalid)?;
        if from != b.ip {
            return Err(Refusal::WrongAddress { from, ip: b.ip });
        }
        let rec = rec.ok_or(Refusal::NotIssued)?;
        let same = crate::http::constant_time_eq(rec.sha256.as_bytes(), token_hash(token).as_bytes());
        if !same || rec.mac != b.mac || rec.ip != b.ip {
            return Err(Refusal::Superseded);
        }
        if rec.spent {
            return Err(Refusal::Spent);
        }
        Ok(rec)
    }

    /// Whether `token` may fetch the plan now (the node's latest token, from its address, plan
    /// not yet taken, not spent).
    pub fn check_plan(
        &self,
        rec: Option<&TokenRecord>,
        b: &Binding<'_>,
        token: &str,
        from: Ipv4Addr,
        now: u64,
    ) -> Result<(), Refusal> {
        match self.latest(rec, b, token, from, now)?.plan_taken {
            true => Err(Refusal::PlanTaken),
            false => Ok(()),
        }
    }

    /// The record once the plan went out with `token` (after [`BootTokens::check_plan`]'s rule).
    pub fn take_plan(
        &self,
        rec: Option<&TokenRecord>,
        b: &Binding<'_>,
        token: &str,
        from: Ipv4Addr,
        now: u64,
    ) -> Result<TokenRecord, Refusal> {
        self.check_plan(rec, b, token, from, now)?;
        let mut next = rec.cloned().ok_or(Refusal::NotIssued)?;
        next.plan_taken = true;
        Ok(next)
    }

    /// Whether `token` may fetch the node's own data besides the plan (its cloud-init NoCloud
    /// files): what the agent may fetch while it installs, so the plan's rule without the
    /// once-only.
    pub fn check_agent(
        &self,
        rec: Option<&TokenRecord>,
        b: &Binding<'_>,
        token: &str,
        from: Ipv4Addr,
        now: u64,
    ) -> Result<(), Refusal> {
        self.latest(rec, b, token, from, now).map(|_| ())
    }

    /// Whether `token` may report `step`; the new record when the report changes it (reporting
    /// [`STEP_INSTALLED`] spends the token). [`STEP_BOOTED`] needs only a valid token from the
    /// node's address: the booted OS has the token its kernel command line carried.
    pub fn report(
        &self,
        rec: Option<&TokenRecord>,
        b: &Binding<'_>,
        token: &str,
        step: &str,
        from: Ipv4Addr,
        now: u64,
    ) -> Result<Option<TokenRecord>, Refusal> {
        if step == STEP_BOOTED {
            self.verify(b, token, now).ok_or(Refusal::Invalid)?;
            return match from == b.ip {
                true => Ok(None),
                false => Err(Refusal::WrongAddress { from, ip: b.ip }),
            };
        }
        let rec = self.latest(rec, b, token, from, now)?;
        Ok((step == STEP_INSTALLED).then(|| TokenRecord { spent: true, ..rec.clone() }))
    }
}

/// Why the ledger said no: the token's rules, or the store.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("boot token record of node '{node}' is not valid: {reason}")]
    Corrupt { node: String, reason: String },
}

/// How often a ledger change re-reads and re-decides after a concurrent change of the same
/// node's record (another server issuing or using the node's token at the same moment).
const MAX_ATTEMPTS: usize = 8;

/// The boot-token ledger in the store: [`BootTokens`]' rules applied to each node's
/// [`TokenRecord`], every change a compare-and-swap on it.
#[derive(Clone)]
pub struct Ledger {
    tokens: BootTokens,
    store: Arc<dyn Store>,
}

impl Ledger {
    pub fn new(tokens: BootTokens, store: Arc<dyn Store>) -> Self {
        Ledger { tokens, store }
    }

    /// The node's record and its revision.
    async fn load(&self, node: &str) -> Result<Option<(u64, TokenRecord)>, LedgerError> {
        let Some(rec) = self.store.get(Collection::BootToken, node).await? else { return Ok(None) };
        let decoded = serde_json::from_value(rec.doc)
            .map_err(|e| LedgerError::Corrupt { node: node.to_string(), reason: e.to_string() })?;
        Ok(Some((rec.rev, decoded)))
    }

    /// Replaces the node's record (expected at `rev`, or absent); `Ok(false)` when it changed
    /// meanwhile (re-read and re-decide).
    async fn store(&self, node: &str, rev: Option<u64>, rec: &TokenRecord) -> Result<bool, LedgerError> {
        let doc = serde_json::to_value(rec).expect("a token record serialises");
        let expect = rev.map_or(Expect::Absent, Expect::Rev);
        match self
            .store
            .commit(vec![Write::Put { collection: Collection::BootToken, key: node.into(), expect, doc }])
            .await
        {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Issues the node's token (see [`BootTokens::issue_record`]) and records it as its latest.
    pub async fn issue(&self, b: &Binding<'_>, from: Ipv4Addr, now: u64, nonce: u64) -> Result<String, LedgerError> {
        let (token, record) = self.tokens.issue_record(b, from, now, nonce)?;
        for _ in 0..MAX_ATTEMPTS {
            let rev = self.load(b.node).await?.map(|(rev, _)| rev);
            if self.store(b.node, rev, &record).await? {
                return Ok(token);
            }
        }
        Err(StoreError::Conflict {
            collection: Collection::BootToken,
            key: b.node.into(),
            expected: "a quiet record".into(),
            found: format!("{MAX_ATTEMPTS} concurrent changes"),
        }
        .into())
    }

    /// [`BootTokens::check_plan`] against the node's record now.
    pub async fn check_plan(&self, b: &Binding<'_>, token: &str, from: Ipv4Addr, now: u64) -> Result<(), LedgerError> {
        let rec = self.load(b.node).await?;
        Ok(self.tokens.check_plan(rec.as_ref().map(|(_, r)| r), b, token, from, now)?)
    }

    /// Marks the plan taken with `token`, if it may still be (at most once, across servers).
    pub async fn take_plan(&self, b: &Binding<'_>, token: &str, from: Ipv4Addr, now: u64) -> Result<(), LedgerError> {
        self.change(b.node, |rec| self.tokens.take_plan(rec, b, token, from, now).map(Some)).await
    }

    /// [`BootTokens::check_agent`] against the node's record now.
    pub async fn check_agent(&self, b: &Binding<'_>, token: &str, from: Ipv4Addr, now: u64) -> Result<(), LedgerError> {
        let rec = self.load(b.node).await?;
        Ok(self.tokens.check_agent(rec.as_ref().map(|(_, r)| r), b, token, from, now)?)
    }

    /// [`BootTokens::report`]: checks a status report and records what it spends.
    pub async fn report(
        &self,
        b: &Binding<'_>,
        token: &str,
        step: &str,
        from: Ipv4Addr,
        now: u64,
    ) -> Result<(), LedgerError> {
        self.change(b.node, |rec| self.tokens.report(rec, b, token, step, from, now)).await
    }

    /// Decides on the node's record with `decide` and writes the new record it returns, with
    /// compare-and-swap; a concurrent change re-reads and decides again.
    async fn change<F>(&self, node: &str, decide: F) -> Result<(), LedgerError>
    where
        F: Fn(Option<&TokenRecord>) -> Result<Option<TokenRecord>, Refusal>,
    {
        for _ in 0..MAX_ATTEMPTS {
            let cur = self.load(node).await?;
            let Some(next) = decide(cur.as_ref().map(|(_, r)| r))? else { return Ok(()) };
            if self.store(node, cur.map(|(rev, _)| rev), &next).await? {
                return Ok(());
            }
        }
        Err(StoreError::Conflict {
            collection: Collection::BootToken,
            key: node.into(),
            expected: "a quiet record".into(),
            found: format!("{MAX_ATTEMPTS} concurrent changes"),
        }
        .into())
    }

    /// Deletes the records whose token expired by `now` (each only if unchanged since read: a
    /// record re-issued meanwhile stays); a record that does not decode is deleted too (it
    /// unlocks nothing). Returns how many went.
    pub async fn sweep(&self, now: u64) -> Result<usize, StoreError> {
        let mut gone = 0;
        for rec in self.store.list(Collection::BootToken, "").await? {
            let expired = serde_json::from_value::<TokenRecord>(rec.doc.clone()).map_or(true, |r| r.expired(now));
            if !expired {
                continue;
            }
            let del =
                Write::Delete { collection: Collection::BootToken, key: rec.key.clone(), expect: Expect::Rev(rec.rev) };
            match self.store.commit(vec![del]).await {
                Ok(()) => gone += 1,
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(gone)
    }

    /// Sweeps every `every` until `cancel`; a failed sweep is logged and tried again next time.
    pub async fn sweep_every(self, every: std::time::Duration, cancel: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.sweep(crate::service::unix_now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "expired boot tokens swept"),
                Err(e) => tracing::warn!(error = %e, "boot token sweep failed"),
            }
        }
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

    /// The pure rules over one node's record, as the ledger applies them.
    struct Rules {
        t: BootTokens,
        rec: Option<TokenRecord>,
    }

    impl Rules {
        fn new() -> Self {
            Rules { t: BootTokens::new(b"admin"), rec: None }
        }
        fn issue(&mut self, b: &Binding<'_>, from: Ipv4Addr, now: u64, nonce: u64) -> Result<String, Refusal> {
            let (tok, rec) = self.t.issue_record(b, from, now, nonce)?;
            self.rec = Some(rec);
            Ok(tok)
        }
        fn take_plan(&mut self, b: &Binding<'_>, tok: &str, from: Ipv4Addr, now: u64) -> Result<(), Refusal> {
            self.rec = Some(self.t.take_plan(self.rec.as_ref(), b, tok, from, now)?);
            Ok(())
        }
        fn report(&mut self, b: &Binding<'_>, tok: &str, step: &str, from: Ipv4Addr, now: u64) -> Result<(), Refusal> {
            if let Some(next) = self.t.report(self.rec.as_ref(), b, tok, step, from, now)? {
                self.rec = Some(next);
            }
            Ok(())
        }
    }

    #[test]
    fn the_plan_goes_once_to_the_latest_token_from_the_nodes_address() {
        let mut l = Rules::new();
        let b = bind("node001");
        assert_eq!(l.issue(&b, OTHER, 2_000, 1), Err(Refusal::WrongAddress { from: OTHER, ip: IP }));
        let first = l.issue(&b, IP, 2_000, 1).unwrap();
        let tok = l.issue(&b, IP, 2_001, 2).unwrap();
        let rec = l.rec.clone().unwrap();
        assert_eq!(rec.sha256, token_hash(&tok));
        assert!(!serde_json::to_string(&rec).unwrap().contains(&tok[tok.len() - 64..]), "the token is not kept");
        assert_eq!((rec.issued, rec.expires), (2_001, 2_001 + BOOT_TOKEN_TTL_SECS));
        assert_eq!(l.t.check_plan(l.rec.as_ref(), &b, &first, IP, 2_002), Err(Refusal::Superseded));
        assert_eq!(l.take_plan(&b, &tok, OTHER, 2_002), Err(Refusal::WrongAddress { from: OTHER, ip: IP }));
        assert_eq!(l.take_plan(&b, "1.2.3", IP, 2_002), Err(Refusal::Invalid));
        assert_eq!(l.t.check_plan(None, &b, &tok, IP, 2_002), Err(Refusal::NotIssued));
        assert_eq!(l.take_plan(&b, &tok, IP, 2_002), Ok(()));
        assert_eq!(l.take_plan(&b, &tok, IP, 2_003), Err(Refusal::PlanTaken));
        // Status until installed; afterwards only booted.
        assert_eq!(l.report(&b, &tok, "download", IP, 2_004), Ok(()));
        assert_eq!(l.report(&b, &tok, "download", OTHER, 2_004), Err(Refusal::WrongAddress { from: OTHER, ip: IP }));
        assert_eq!(l.report(&b, &first, "download", IP, 2_004), Err(Refusal::Superseded));
        assert_eq!(l.report(&b, &tok, STEP_INSTALLED, IP, 2_005), Ok(()));
        assert!(l.rec.as_ref().unwrap().spent);
        assert_eq!(l.report(&b, &tok, "download", IP, 2_006), Err(Refusal::Spent));
        assert_eq!(l.report(&b, &tok, STEP_INSTALLED, IP, 2_006), Err(Refusal::Spent));
        assert_eq!(l.t.check_plan(l.rec.as_ref(), &b, &tok, IP, 2_006), Err(Refusal::Spent));
        assert_eq!(l.report(&b, &tok, STEP_BOOTED, IP, 2_007), Ok(()));
        assert_eq!(l.report(&b, &first, STEP_BOOTED, IP, 2_007), Ok(()));
        assert_eq!(l.report(&b, &tok, STEP_BOOTED, OTHER, 2_007), Err(Refusal::WrongAddress { from: OTHER, ip: IP }));
        assert_eq!(l.report(&b, "1.2.3", STEP_BOOTED, IP, 2_007), Err(Refusal::Invalid));
    }

    #[test]
    fn a_record_for_another_binding_or_an_expired_token_unlocks_nothing() {
        let mut l = Rules::new();
        let b = bind("node001");
        let tok = l.issue(&b, IP, 2_000, 1).unwrap();
        // The record names the binding it was issued for: a record of another MAC (a node
        // re-created under the name) does not let the token through, even with its hash.
        let mut other = l.rec.clone().unwrap();
        other.mac = "52:54:00:00:00:09".parse().unwrap();
        assert_eq!(l.t.check_plan(Some(&other), &b, &tok, IP, 2_001), Err(Refusal::Superseded));
        let rec = l.rec.clone().unwrap();
        let end = rec.expires;
        assert!(!rec.expired(end) && rec.expired(end + 1));
        assert_eq!(l.t.check_plan(Some(&rec), &b, &tok, IP, end + 1), Err(Refusal::Invalid));
        assert_eq!(l.t.report(Some(&rec), &b, &tok, STEP_BOOTED, IP, end + 1), Err(Refusal::Invalid));
    }

    #[test]
    fn agent_data_follows_the_plan_rule_without_the_once() {
        let mut l = Rules::new();
        let b = bind("node001");
        let other = Binding { node: "node002", mac: "52:54:00:00:00:02".parse().unwrap(), ip: OTHER };
        let first = l.issue(&b, IP, 2_000, 1).unwrap();
        let tok = l.issue(&b, IP, 2_001, 2).unwrap();
        let (theirs, their_rec) = l.t.issue_record(&other, OTHER, 2_001, 3).unwrap();
        let check =
            |l: &Rules, b: &Binding<'_>, tok: &str, from, now| l.t.check_agent(l.rec.as_ref(), b, tok, from, now);
        assert_eq!(check(&l, &b, &tok, IP, 2_002), Ok(()));
        assert_eq!(l.take_plan(&b, &tok, IP, 2_002), Ok(()));
        assert_eq!(check(&l, &b, &tok, IP, 2_003), Ok(()), "after the plan, again");
        assert_eq!(check(&l, &b, &tok, OTHER, 2_003), Err(Refusal::WrongAddress { from: OTHER, ip: IP }));
        assert_eq!(check(&l, &b, &first, IP, 2_003), Err(Refusal::Superseded));
        // Another node's token, even from the other node's own address, is not this node's.
        assert_eq!(check(&l, &b, &theirs, OTHER, 2_003), Err(Refusal::Invalid));
        assert_eq!(check(&l, &b, &theirs, IP, 2_003), Err(Refusal::Invalid));
        assert_eq!(l.t.check_agent(Some(&their_rec), &b, &tok, IP, 2_003), Err(Refusal::Superseded));
        assert_eq!(l.report(&b, &tok, STEP_INSTALLED, IP, 2_004), Ok(()));
        assert_eq!(check(&l, &b, &tok, IP, 2_005), Err(Refusal::Spent));
    }

    async fn ledger() -> (Ledger, Arc<dyn Store>) {
        let store = crate::store::open("sqlite://:memory:").await.unwrap();
        (Ledger::new(BootTokens::new(b"admin"), store.clone()), store)
    }

    #[tokio::test]
    async fn the_store_ledger_is_shared_and_keeps_only_the_hash() {
        let (a, store) = ledger().await;
        // A second server on the same store (same admin token).
        let b_srv = Ledger::new(BootTokens::new(b"admin"), store.clone());
        let b = bind("node001");
        assert!(matches!(a.issue(&b, OTHER, 2_000, 1).await, Err(LedgerError::Refused(Refusal::WrongAddress { .. }))));
        assert!(store.get(Collection::BootToken, "node001").await.unwrap().is_none(), "a refusal writes nothing");
        let tok = a.issue(&b, IP, 2_000, 1).await.unwrap();
        let rec = store.get(Collection::BootToken, "node001").await.unwrap().unwrap();
        let sig = &tok[tok.len() - 64..];
        assert!(!rec.doc.to_string().contains(sig), "the store holds no token: {}", rec.doc);
        assert_eq!(rec.doc["sha256"], token_hash(&tok));
        b_srv.check_plan(&b, &tok, IP, 2_001).await.unwrap();
        b_srv.take_plan(&b, &tok, IP, 2_001).await.unwrap();
        assert!(matches!(a.take_plan(&b, &tok, IP, 2_002).await, Err(LedgerError::Refused(Refusal::PlanTaken))));
        a.report(&b, &tok, "download", IP, 2_003).await.unwrap();
        b_srv.report(&b, &tok, STEP_INSTALLED, IP, 2_004).await.unwrap();
        assert!(matches!(a.report(&b, &tok, "download", IP, 2_005).await, Err(LedgerError::Refused(Refusal::Spent))));
        assert!(matches!(a.check_agent(&b, &tok, IP, 2_005).await, Err(LedgerError::Refused(Refusal::Spent))));
        a.report(&b, &tok, STEP_BOOTED, IP, 2_006).await.unwrap();
        // A new boot supersedes it on every server.
        let next = b_srv.issue(&b, IP, 2_010, 2).await.unwrap();
        assert!(matches!(a.check_plan(&b, &tok, IP, 2_011).await, Err(LedgerError::Refused(Refusal::Superseded))));
        a.check_plan(&b, &next, IP, 2_011).await.unwrap();
        // A token of a node the ledger holds nothing for fetches nothing.
        let n2 = Binding { node: "node002", ..b };
        let stray = BootTokens::new(b"admin").issue(&n2, 2_000, 5);
        assert!(matches!(a.check_plan(&n2, &stray, IP, 2_001).await, Err(LedgerError::Refused(Refusal::NotIssued))));
    }

    #[tokio::test]
    async fn racing_servers_hand_out_the_plan_once() {
        let (a, store) = ledger().await;
        let b = bind("node001");
        let tok = a.issue(&b, IP, 2_000, 1).await.unwrap();
        let servers: Vec<Ledger> = (0..8).map(|_| Ledger::new(BootTokens::new(b"admin"), store.clone())).collect();
        let tasks: Vec<_> = servers
            .into_iter()
            .map(|l| {
                let tok = tok.clone();
                tokio::spawn(async move {
                    let b = bind("node001");
                    l.take_plan(&b, &tok, IP, 2_001).await
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => won += 1,
                Err(LedgerError::Refused(Refusal::PlanTaken)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(won, 1);
    }

    #[tokio::test]
    async fn the_sweep_deletes_expired_records_only() {
        let (l, store) = ledger().await;
        let old = bind("node001");
        let new = Binding { node: "node002", mac: "52:54:00:00:00:02".parse().unwrap(), ip: OTHER };
        l.issue(&old, IP, 1_000, 1).await.unwrap();
        l.issue(&new, OTHER, 50_000, 2).await.unwrap();
        store
            .commit(vec![Write::Put {
                collection: Collection::BootToken,
                key: "garbled".into(),
                expect: Expect::Absent,
                doc: serde_json::json!({"sha256": 1}),
            }])
            .await
            .unwrap();
        assert_eq!(l.sweep(1_000 + BOOT_TOKEN_TTL_SECS).await.unwrap(), 1, "only the garbled record");
        assert_eq!(l.sweep(1_000 + BOOT_TOKEN_TTL_SECS + 1).await.unwrap(), 1);
        let left: Vec<String> =
            store.list(Collection::BootToken, "").await.unwrap().into_iter().map(|r| r.key).collect();
        assert_eq!(left, ["node002"]);
    }
}
