//! Power control: the server talks to every node's BMC (IPMI 2.0 lanplus or Redfish), many at
//! once, and answers one result per node (`POST /api/v1/power`).
//!
//! - [`resolve`]: node → [`BmcTarget`] from the store alone (the `BMC` interface's address, the
//!   group's bmcsetup); a node that lacks one gets a named error, the others go on.
//! - [`Power::run`]: at most `parallel` BMCs at a time, each with a deadline of `timeout_secs`
//!   that covers both tries (each try gets half), one retry of a try that timed out or could not
//!   reach the BMC; `soft`, `reset` and `cycle` are retried only if the first try failed before
//!   the command went out (never done twice).
//! - [`Bmc`]: one trait; [`ipmi::IpmiBmc`] (ipmi-rs, blocking, run on tokio's blocking pool and
//!   counted against `parallel` until its thread returns) and [`redfish::RedfishBmc`] (reqwest
//!   with rustls). Message building and reply parsing are sans-IO in both.
//!
//! Invariant: the BMC password is a `Secret` from the store to the wire; it is in no error, log
//! line or answer.

pub mod http;
pub mod ipmi;
pub mod redfish;

#[cfg(test)]
mod fake;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use luna_core::api::API_PREFIX;
use luna_core::hostlist;
use luna_core::model::{AnyObject, BmcProtocol, Bmcsetup, Kind, Secret, BMC};
use luna_core::power::{PowerAction, PowerReply, PowerRequest, PowerResult, IDENTIFY_DEFAULT_SECONDS};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::service::{Service, ServiceError};

/// `[power]` in the server's config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PowerConfig {
    /// BMCs talked to at the same time.
    pub parallel: usize,
    /// Deadline per BMC and request, both tries included.
    pub timeout_secs: u64,
    /// Extra tries after a timeout or an unreachable BMC (0 or 1).
    pub retries: u8,
}

impl Default for PowerConfig {
    fn default() -> Self {
        PowerConfig { parallel: 64, timeout_secs: 5, retries: 1 }
    }
}

pub fn documented_defaults() -> String {
    let d = PowerConfig::default();
    format!(
        r#"[power]
# BMCs (IPMI or Redfish) lpower and POST {API_PREFIX}/power talk to at the same time.
parallel = {parallel}
# Deadline per BMC, retry included.
timeout_secs = {timeout}
# Retries of a BMC that did not answer (0 or 1); soft/reset/cycle only if the command never went out.
retries = {retries}
"#,
        parallel = d.parallel,
        timeout = d.timeout_secs,
        retries = d.retries
    )
}

/// Where a node's BMC is and how to log in. `Debug` masks the password.
#[derive(Debug, Clone, PartialEq)]
pub struct BmcTarget {
    pub node: String,
    pub addr: Ipv4Addr,
    /// 623 for IPMI, 443 for Redfish; tests point it elsewhere.
    pub port: u16,
    pub protocol: BmcProtocol,
    pub user: String,
    pub password: Secret,
    pub insecure_tls: bool,
}

/// One action for one BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub action: PowerAction,
    /// `identify` only.
    pub seconds: u8,
}

/// Why a BMC did not do what it was asked. Messages never contain the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BmcError {
    #[error("timeout after {}", secs(*.0))]
    Timeout(Duration),
    #[error("wrong BMC user or password")]
    Auth,
    #[error("BMC unreachable: {0}")]
    Unreachable(String),
    /// The session could not be set up for a reason other than the above.
    #[error("cannot open a session: {0}")]
    Session(String),
    /// The BMC answered the command with an error.
    #[error("BMC refused {action}: {detail}")]
    Refused { action: PowerAction, detail: String },
    #[error("unexpected BMC answer: {0}")]
    Protocol(String),
}

fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// How far a try got, so a retry never repeats a command that may have been done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryError {
    pub error: BmcError,
    /// The command may have reached the BMC.
    pub sent: bool,
}

impl TryError {
    pub fn before(error: BmcError) -> Self {
        TryError { error, sent: false }
    }
    pub fn after(error: BmcError) -> Self {
        TryError { error, sent: true }
    }
}

/// One BMC protocol. `attempt` is one try: log in, do `op`, log out, within `budget`.
/// It returns what the node's result line says (`on`, `off`, `pxe`...).
#[async_trait]
pub trait Bmc: Send + Sync {
    async fn attempt(&self, target: &BmcTarget, op: Op, budget: Duration) -> Result<String, TryError>;
}

/// The text a successful action reports.
pub fn done_text(op: Op) -> String {
    match op.action {
        PowerAction::Identify if op.seconds == 0 => "identify off".into(),
        PowerAction::Identify => format!("identify {}s", op.seconds),
        a => a.as_str().into(),
    }
}

/// The power service: the protocols and the bound on concurrent BMCs.
pub struct Power {
    config: PowerConfig,
    slots: Arc<Semaphore>,
    ipmi: Arc<dyn Bmc>,
    redfish: Arc<dyn Bmc>,
}

#[derive(Debug, thiserror::Error)]
pub enum PowerConfigError {
    #[error("invalid [power] parallel {0}: must be 1 to 4096")]
    Parallel(usize),
    #[error("invalid [power] timeout_secs {0}: must be 1 to 300")]
    Timeout(u64),
    #[error("invalid [power] retries {0}: must be 0 or 1")]
    Retries(u8),
    #[error("cannot build the redfish https client: {0}")]
    Client(String),
}

impl Power {
    pub fn new(config: PowerConfig) -> Result<Self, PowerConfigError> {
        let redfish = redfish::RedfishBmc::new().map_err(|e| PowerConfigError::Client(e.to_string()))?;
        Self::with_protocols(config, Arc::new(ipmi::IpmiBmc), Arc::new(redfish))
    }

    pub fn with_protocols(
        config: PowerConfig,
        ipmi: Arc<dyn Bmc>,
        redfish: Arc<dyn Bmc>,
    ) -> Result<Self, PowerConfigError> {
        if !(1..=4096).contains(&config.parallel) {
            return Err(PowerConfigError::Parallel(config.parallel));
        }
        if !(1..=300).contains(&config.timeout_secs) {
            return Err(PowerConfigError::Timeout(config.timeout_secs));
        }
        if config.retries > 1 {
            return Err(PowerConfigError::Retries(config.retries));
        }
        let slots = Arc::new(Semaphore::new(config.parallel));
        Ok(Power { config, slots, ipmi, redfish })
    }

    pub fn config(&self) -> &PowerConfig {
        &self.config
    }

    /// Checks the request, resolves the nodes and runs the action on all of them.
    pub async fn handle(&self, service: &Service, req: PowerRequest) -> Result<PowerReply, ServiceError> {
        let op = op_of(&req)?;
        let names = node_names(service, &req).await?;
        let targets = resolve(service, &names).await?;
        let results = self.run(targets, op).await;
        for r in &results {
            let outcome = if r.error.is_none() { "ok" } else { "failed" };
            let labels = crate::metrics::l2("action", op.action.as_str(), "outcome", outcome);
            crate::metrics::global().power_actions.get_or_create(&labels).inc();
        }
        Ok(PowerReply { action: op.action, results })
    }

    /// Runs `op` on every target (an `Err` is already that node's answer); results keep the
    /// order of `targets`.
    pub async fn run(&self, targets: Vec<Result<BmcTarget, (String, String)>>, op: Op) -> Vec<PowerResult> {
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(targets.len());
        for t in targets {
            match t {
                Err((node, error)) => tasks.push(Err(PowerResult { node, state: None, error: Some(error) })),
                Ok(target) => {
                    let bmc = match target.protocol {
                        BmcProtocol::Ipmi => self.ipmi.clone(),
                        BmcProtocol::Redfish => self.redfish.clone(),
                    };
                    let slots = self.slots.clone();
                    let config = self.config.clone();
                    tasks.push(Ok(tokio::spawn(async move {
                        // Closed only when the server shuts down.
                        let _slot = slots.acquire_owned().await.ok();
                        let r = one(bmc.as_ref(), &target, op, &config).await;
                        (target.node, r)
                    })));
                }
            }
        }
        let mut out = Vec::with_capacity(tasks.len());
        let (mut good, mut bad) = (0usize, 0usize);
        for t in tasks {
            let result = match t {
                Err(r) => r,
                Ok(handle) => match handle.await {
                    Ok((node, Ok(state))) => PowerResult { node, state: Some(state), error: None },
                    Ok((node, Err(e))) => PowerResult { node, state: None, error: Some(e.to_string()) },
                    Err(e) => PowerResult { node: String::new(), state: None, error: Some(format!("internal: {e}")) },
                },
            };
            if result.ok() {
                good += 1;
            } else {
                bad += 1;
            }
            out.push(result);
        }
        tracing::info!(action = %op.action, ok = good, failed = bad, ms = started.elapsed().as_millis() as u64, "power");
        out
    }
}

/// One BMC: a try, and one retry when it may help and cannot do the action twice. Both within
/// the deadline.
pub async fn one(bmc: &dyn Bmc, target: &BmcTarget, op: Op, config: &PowerConfig) -> Result<String, BmcError> {
    let deadline = Duration::from_secs(config.timeout_secs);
    let tries = 1 + u32::from(config.retries);
    let start = Instant::now();
    let mut last = BmcError::Timeout(deadline);
    for n in 0..tries {
        let left = deadline.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        // Each try gets an equal share of what is left, so a retry still has its time.
        let budget = left / (tries - n);
        let outcome = match tokio::time::timeout(budget, bmc.attempt(target, op, budget)).await {
            Ok(r) => r,
            Err(_) => Err(TryError { error: BmcError::Timeout(deadline), sent: true }),
        };
        match outcome {
            Ok(state) => return Ok(state),
            Err(TryError { error, sent }) => {
                let retryable = matches!(error, BmcError::Timeout(_) | BmcError::Unreachable(_));
                tracing::debug!(node = %target.node, addr = %target.addr, action = %op.action, error = %error, "power try failed");
                last = match error {
                    BmcError::Timeout(_) => BmcError::Timeout(deadline),
                    e => e,
                };
                if !retryable || (sent && !op.action.idempotent()) {
                    break;
                }
            }
        }
    }
    // The node, its BMC and what went wrong (never the user's password: no error holds it).
    tracing::warn!(node = %target.node, addr = %target.addr, action = %op.action, error = %last, "power failed");
    Err(last)
}

fn op_of(req: &PowerRequest) -> Result<Op, ServiceError> {
    let seconds = match (req.action, req.seconds) {
        (PowerAction::Identify, s) => s.unwrap_or(IDENTIFY_DEFAULT_SECONDS),
        (_, None) => 0,
        (a, Some(_)) => return Err(ServiceError::BadRequest(format!("'seconds' is only for identify, not {a}"))),
    };
    Ok(Op { action: req.action, seconds })
}

async fn node_names(service: &Service, req: &PowerRequest) -> Result<Vec<String>, ServiceError> {
    match (&req.nodes, &req.group) {
        (Some(list), None) => Ok(hostlist::expand(list)?),
        (None, Some(group)) => {
            service.group(group).await?;
            let mut names: Vec<String> = service
                .list(Kind::Node)
                .await?
                .into_iter()
                .filter_map(|o| match o {
                    AnyObject::Node(n) if &n.group == group => Some(n.name),
                    _ => None,
                })
                .collect();
            names.sort();
            if names.is_empty() {
                return Err(ServiceError::BadRequest(format!("group '{group}' has no nodes")));
            }
            Ok(names)
        }
        _ => Err(ServiceError::BadRequest("give either 'nodes' (a hostlist) or 'group', not both".into())),
    }
}

/// The BMC of each node, or that node's error. A name that is not a node fails the request
/// (nothing is done to any BMC).
pub async fn resolve(
    service: &Service,
    names: &[String],
) -> Result<Vec<Result<BmcTarget, (String, String)>>, ServiceError> {
    let mut nodes = Vec::with_capacity(names.len());
    let mut missing = Vec::new();
    for name in names {
        match service.node(name).await {
            Ok(n) => nodes.push(n),
            Err(ServiceError::NotFound { .. }) => missing.push(name.clone()),
            Err(e) => return Err(e),
        }
    }
    if !missing.is_empty() {
        return Err(ServiceError::NotFound { kind: Kind::Node, name: hostlist::compress(&missing) });
    }
    let mut setups: HashMap<String, Option<Bmcsetup>> = HashMap::new();
    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        if !setups.contains_key(&node.group) {
            let group = service.group(&node.group).await?;
            let setup = match group.bmcsetup {
                Some(b) => match service.get(Kind::Bmcsetup, &b).await? {
                    AnyObject::Bmcsetup(b) => Some(b),
                    _ => None,
                },
                None => None,
            };
            setups.insert(node.group.clone(), setup);
        }
        let Some(setup) = setups.get(&node.group).and_then(Option::as_ref) else {
            out.push(Err((node.name.clone(), format!("no bmcsetup in group '{}'", node.group))));
            continue;
        };
        let Some(addr) = node.interface(BMC).and_then(|i| i.ip) else {
            out.push(Err((node.name.clone(), "no BMC address".into())));
            continue;
        };
        out.push(Ok(BmcTarget {
            node: node.name.clone(),
            addr,
            port: match setup.protocol {
                BmcProtocol::Ipmi => ipmi::PORT,
                BmcProtocol::Redfish => redfish::PORT,
            },
            protocol: setup.protocol,
            user: setup.user.clone(),
            password: setup.password.clone(),
            insecure_tls: setup.insecure_tls,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeBmc, Script};
    use super::*;

    fn target(node: &str, last: u8) -> BmcTarget {
        BmcTarget {
            node: node.into(),
            addr: Ipv4Addr::new(10, 0, 0, last),
            port: 623,
            protocol: BmcProtocol::Ipmi,
            user: "admin".into(),
            password: Secret("hunter2".into()),
            insecure_tls: false,
        }
    }

    fn power(fake: Arc<FakeBmc>, config: PowerConfig) -> Power {
        Power::with_protocols(config, fake.clone(), fake).unwrap()
    }

    fn op(action: PowerAction) -> Op {
        Op { action, seconds: 0 }
    }

    #[tokio::test]
    async fn results_keep_hostlist_order_and_errors_do_not_hide_others() {
        let fake = Arc::new(FakeBmc::default());
        fake.script(Ipv4Addr::new(10, 0, 0, 2), Script::Fail(BmcError::Auth, false));
        let p = power(fake.clone(), PowerConfig::default());
        let targets = vec![
            Ok(target("n1", 1)),
            Ok(target("n2", 2)),
            Err(("n3".to_string(), "no BMC address".to_string())),
            Ok(target("n4", 4)),
        ];
        let r = p.run(targets, op(PowerAction::On)).await;
        let lines: Vec<String> =
            r.iter().map(|r| format!("{}: {}", r.node, r.state.clone().or(r.error.clone()).unwrap())).collect();
        assert_eq!(lines, ["n1: on", "n2: wrong BMC user or password", "n3: no BMC address", "n4: on"]);
        // A wrong password is not retried (a BMC may lock the user out).
        assert_eq!(fake.calls_to(Ipv4Addr::new(10, 0, 0, 2)), 1);
    }

    #[tokio::test]
    async fn a_timeout_is_retried_once_within_one_deadline() {
        let fake = Arc::new(FakeBmc::default());
        fake.script(Ipv4Addr::new(10, 0, 0, 1), Script::Hang);
        let config = PowerConfig { timeout_secs: 1, ..Default::default() };
        let p = power(fake.clone(), config);
        let start = Instant::now();
        let r = p.run(vec![Ok(target("n1", 1)), Ok(target("n2", 2))], op(PowerAction::Status)).await;
        let took = start.elapsed();
        assert_eq!(r[0].error.as_deref(), Some("timeout after 1s"));
        assert_eq!(r[1].state.as_deref(), Some("off"));
        assert_eq!(fake.calls_to(Ipv4Addr::new(10, 0, 0, 1)), 2);
        assert!(took >= Duration::from_millis(950) && took < Duration::from_millis(1500), "{took:?}");
    }

    #[tokio::test]
    async fn cycle_is_not_repeated_once_it_may_have_gone_out() {
        let fake = Arc::new(FakeBmc::default());
        fake.script(Ipv4Addr::new(10, 0, 0, 1), Script::Fail(BmcError::Timeout(Duration::ZERO), true));
        fake.script(Ipv4Addr::new(10, 0, 0, 2), Script::Fail(BmcError::Unreachable("refused".into()), false));
        let p = power(fake.clone(), PowerConfig::default());
        let r = p.run(vec![Ok(target("n1", 1)), Ok(target("n2", 2))], op(PowerAction::Cycle)).await;
        assert_eq!(r[0].error.as_deref(), Some("timeout after 5s"));
        assert_eq!(fake.calls_to(Ipv4Addr::new(10, 0, 0, 1)), 1);
        // Failed before the command: retried.
        assert_eq!(fake.calls_to(Ipv4Addr::new(10, 0, 0, 2)), 2);
        assert!(r[1].error.as_deref().unwrap().contains("unreachable"));
    }

    #[tokio::test]
    async fn no_more_than_parallel_bmcs_at_once() {
        let fake = Arc::new(FakeBmc::default());
        fake.set_delay(Duration::from_millis(30));
        let p = power(fake.clone(), PowerConfig { parallel: 4, ..Default::default() });
        let targets = (1..=20).map(|i| Ok(target(&format!("n{i}"), i))).collect();
        let r = p.run(targets, op(PowerAction::Off)).await;
        assert!(r.iter().all(PowerResult::ok));
        assert_eq!(fake.max_in_flight(), 4);
        assert_eq!(fake.calls().len(), 20);
    }

    #[tokio::test]
    async fn the_password_is_in_no_result_or_error() {
        let fake = Arc::new(FakeBmc::default());
        fake.script(Ipv4Addr::new(10, 0, 0, 1), Script::Fail(BmcError::Auth, false));
        let p = power(fake.clone(), PowerConfig::default());
        let r = p.run(vec![Ok(target("n1", 1)), Ok(target("n2", 2))], op(PowerAction::Status)).await;
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!format!("{:?}", target("n1", 1)).contains("hunter2"));
    }

    #[test]
    fn seconds_only_for_identify() {
        let req = |action, seconds| PowerRequest { nodes: Some("n1".into()), group: None, action, seconds };
        assert_eq!(op_of(&req(PowerAction::Identify, None)).unwrap().seconds, IDENTIFY_DEFAULT_SECONDS);
        assert_eq!(op_of(&req(PowerAction::Identify, Some(0))).unwrap().seconds, 0);
        let e = op_of(&req(PowerAction::On, Some(3))).unwrap_err().to_string();
        assert!(e.contains("identify") && e.contains("on"), "{e}");
    }

    #[test]
    fn bad_config_is_named() {
        let fake = Arc::new(FakeBmc::default());
        let e = Power::with_protocols(PowerConfig { parallel: 0, ..Default::default() }, fake.clone(), fake.clone())
            .err()
            .unwrap();
        assert!(e.to_string().contains("parallel 0"), "{e}");
        let e =
            Power::with_protocols(PowerConfig { retries: 3, ..Default::default() }, fake.clone(), fake).err().unwrap();
        assert!(e.to_string().contains("retries 3"), "{e}");
    }
}
