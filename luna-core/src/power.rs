//! Power control wire types: `POST /api/v1/power` (the server talks to the BMCs; the CLI only
//! sends this request and prints the answer).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What to do with each node's BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    /// Read the chassis power state.
    Status,
    On,
    /// Hard power off.
    Off,
    /// ACPI (graceful) shutdown.
    Soft,
    /// Hard reset.
    Reset,
    /// Off, then on.
    Cycle,
    /// Blink the chassis identify light (`seconds`, 0 = off).
    Identify,
    /// Next boot from the network, once.
    Pxe,
    /// Next boot from the local disk, once.
    Disk,
}

impl PowerAction {
    pub const ALL: [PowerAction; 9] = [
        PowerAction::Status,
        PowerAction::On,
        PowerAction::Off,
        PowerAction::Soft,
        PowerAction::Reset,
        PowerAction::Cycle,
        PowerAction::Identify,
        PowerAction::Pxe,
        PowerAction::Disk,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::Status => "status",
            PowerAction::On => "on",
            PowerAction::Off => "off",
            PowerAction::Soft => "soft",
            PowerAction::Reset => "reset",
            PowerAction::Cycle => "cycle",
            PowerAction::Identify => "identify",
            PowerAction::Pxe => "pxe",
            PowerAction::Disk => "disk",
        }
    }

    /// Safe to send twice: a retry after a lost answer cannot do the action twice over.
    /// `reset`, `cycle` and `soft` are retried only when the first try never reached the command.
    pub fn idempotent(self) -> bool {
        !matches!(self, PowerAction::Reset | PowerAction::Cycle | PowerAction::Soft)
    }
}

impl fmt::Display for PowerAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown power action '{0}': expected one of status, on, off, soft, reset, cycle, identify, pxe, disk")]
pub struct UnknownPowerAction(pub String);

impl FromStr for PowerAction {
    type Err = UnknownPowerAction;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PowerAction::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| UnknownPowerAction(s.into()))
    }
}

/// Default identify time when none is given (the IPMI default interval).
pub const IDENTIFY_DEFAULT_SECONDS: u8 = 15;

/// `POST /api/v1/power`: one action on the nodes of a hostlist, or on every node of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerRequest {
    /// A hostlist (`node[001-128]`); exactly one of `nodes` and `group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub action: PowerAction,
    /// `identify` only: how long to blink (0 turns it off; default 15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u8>,
}

/// One node's outcome. Exactly one of `state` and `error` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerResult {
    pub node: String,
    /// What the BMC reports or was told: `on`, `off`, `soft`, `reset`, `cycle`, `identify 15s`,
    /// `identify off` (Redfish: `identify on`, it has no time), `pxe`, `disk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PowerResult {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// The answer: one result per node, in hostlist order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerReply {
    pub action: PowerAction,
    pub results: Vec<PowerResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_and_print_the_same_words() {
        for a in PowerAction::ALL {
            assert_eq!(a.as_str().parse::<PowerAction>().unwrap(), a);
            assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{a}\""));
        }
        let e = "boot".parse::<PowerAction>().unwrap_err().to_string();
        assert!(e.contains("'boot'") && e.contains("cycle"), "{e}");
    }

    #[test]
    fn request_is_strict() {
        let r: PowerRequest = serde_json::from_str(r#"{"nodes":"n[1-2]","action":"pxe"}"#).unwrap();
        assert_eq!(r.action, PowerAction::Pxe);
        assert!(serde_json::from_str::<PowerRequest>(r#"{"nodes":"n1","action":"pxe","x":1}"#).is_err());
        assert!(serde_json::from_str::<PowerRequest>(r#"{"nodes":"n1","action":"boot"}"#).is_err());
    }

    #[test]
    fn only_repeatable_actions_are_idempotent() {
        let once: Vec<_> = PowerAction::ALL.into_iter().filter(|a| !a.idempotent()).collect();
        assert_eq!(once, [PowerAction::Soft, PowerAction::Reset, PowerAction::Cycle]);
    }
}
