//! A recording BMC for unit tests: remembers every try, answers from a per-address script, keeps
//! a power state per address, counts how many tries ran at once.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use luna_core::power::PowerAction;

use super::{done_text, Bmc, BmcError, BmcTarget, Op, TryError};

#[derive(Debug, Clone)]
pub enum Script {
    /// Never answers.
    Hang,
    /// Fails every try with this error; `true`: after the command went out.
    Fail(BmcError, bool),
}

#[derive(Default)]
pub struct FakeBmc {
    calls: Mutex<Vec<(Ipv4Addr, PowerAction)>>,
    scripts: Mutex<HashMap<Ipv4Addr, Script>>,
    power: Mutex<HashMap<Ipv4Addr, bool>>,
    delay: Mutex<Duration>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl FakeBmc {
    pub fn script(&self, addr: Ipv4Addr, s: Script) {
        self.scripts.lock().unwrap().insert(addr, s);
    }
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }
    pub fn calls(&self) -> Vec<(Ipv4Addr, PowerAction)> {
        self.calls.lock().unwrap().clone()
    }
    pub fn calls_to(&self, addr: Ipv4Addr) -> usize {
        self.calls().iter().filter(|(a, _)| *a == addr).count()
    }
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Bmc for FakeBmc {
    async fn attempt(&self, target: &BmcTarget, op: Op, _budget: Duration) -> Result<String, TryError> {
        self.calls.lock().unwrap().push((target.addr, op.action));
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let script = self.scripts.lock().unwrap().get(&target.addr).cloned();
        match script {
            Some(Script::Hang) => std::future::pending().await,
            Some(Script::Fail(error, sent)) => Err(TryError { error, sent }),
            None => {
                let mut power = self.power.lock().unwrap();
                let on = power.entry(target.addr).or_insert(false);
                match op.action {
                    PowerAction::Status => return Ok(if *on { "on" } else { "off" }.into()),
                    PowerAction::On | PowerAction::Cycle | PowerAction::Reset => *on = true,
                    PowerAction::Off | PowerAction::Soft => *on = false,
                    _ => {}
                }
                Ok(done_text(op))
            }
        }
    }
}
