//! Redfish over HTTPS (reqwest with rustls): `ComputerSystem.Reset`, `PowerState`,
//! `Boot.BootSourceOverrideTarget` with `Once`, `IndicatorLED`. HTTP basic authentication on
//! every request (no session to leave behind). The BMC's certificate is verified against the
//! system's roots unless the bmcsetup says `insecure_tls` (self-signed BMCs).
//! What to send and how to read the answers is sans-IO ([`plan`], [`system_path`],
//! [`power_state`], [`reset_target`], [`error_detail`]).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use luna_core::power::PowerAction;
use serde_json::{json, Value};

use super::{done_text, Bmc, BmcError, BmcTarget, Op, TryError};

/// HTTPS.
pub const PORT: u16 = 443;

/// What one action is in Redfish.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Read `PowerState`.
    Status,
    /// POST `{"ResetType": ...}` to the system's reset action.
    Reset(&'static str),
    /// PATCH the system with this body.
    Patch(Value),
}

pub fn plan(op: Op) -> Plan {
    match op.action {
        PowerAction::Status => Plan::Status,
        PowerAction::On => Plan::Reset("On"),
        PowerAction::Off => Plan::Reset("ForceOff"),
        PowerAction::Soft => Plan::Reset("GracefulShutdown"),
        PowerAction::Reset => Plan::Reset("ForceRestart"),
        PowerAction::Cycle => Plan::Reset("PowerCycle"),
        // Redfish has no blink time: lit until turned off.
        PowerAction::Identify => Plan::Patch(json!({"IndicatorLED": if op.seconds == 0 { "Off" } else { "Blinking" }})),
        PowerAction::Pxe => {
            Plan::Patch(json!({"Boot": {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}}))
        }
        PowerAction::Disk => {
            Plan::Patch(json!({"Boot": {"BootSourceOverrideTarget": "Hdd", "BootSourceOverrideEnabled": "Once"}}))
        }
    }
}

/// The first system of `/redfish/v1/Systems` (a BMC manages one).
pub fn system_path(collection: &Value) -> Result<String, BmcError> {
    collection["Members"]
        .as_array()
        .and_then(|m| m.first())
        .and_then(|m| m["@odata.id"].as_str())
        .map(str::to_string)
        .ok_or_else(|| BmcError::Protocol("/redfish/v1/Systems lists no system".into()))
}

pub fn power_state(system: &Value) -> Result<String, BmcError> {
    match system["PowerState"].as_str() {
        Some("On") => Ok("on".into()),
        Some("Off") => Ok("off".into()),
        Some(other) => Ok(other.to_ascii_lowercase()),
        None => Err(BmcError::Protocol("the system has no PowerState".into())),
    }
}

/// Where the system says its reset action is, else the standard path.
pub fn reset_target(system_path: &str, system: &Value) -> String {
    system["Actions"]["#ComputerSystem.Reset"]["target"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{system_path}/Actions/ComputerSystem.Reset"))
}

/// The reset type to send: `wanted`, or its stand-in when the system lists the types it allows
/// and `wanted` is not one of them (`PowerCycle` → `ForceRestart`, `On` → `ForceOn`;
/// sushy-emulator, for one, offers no `PowerCycle`).
pub fn reset_type(wanted: &'static str, system: &Value) -> &'static str {
    let Some(allowed) = system["Actions"]["#ComputerSystem.Reset"]["ResetType@Redfish.AllowableValues"].as_array()
    else {
        return wanted;
    };
    let allows = |t: &str| allowed.iter().any(|v| v.as_str() == Some(t));
    match wanted {
        w if allows(w) => w,
        "PowerCycle" if allows("ForceRestart") => "ForceRestart",
        "On" if allows("ForceOn") => "ForceOn",
        w => w,
    }
}

/// The message of a Redfish error body, if it has one.
pub fn error_detail(status: u16, body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let msg = e["@Message.ExtendedInfo"][0]["Message"].as_str().or_else(|| e["message"].as_str());
    match msg {
        Some(m) => format!("http {status}: {m}"),
        None => format!("http {status}"),
    }
}

/// The Redfish implementation of [`Bmc`].
pub struct RedfishBmc {
    verified: reqwest::Client,
    insecure: reqwest::Client,
}

impl RedfishBmc {
    pub fn new() -> Result<Self, reqwest::Error> {
        let builder = || reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1);
        Ok(RedfishBmc {
            verified: builder().build()?,
            insecure: builder().tls_danger_accept_invalid_certs(true).build()?,
        })
    }
}

struct Call<'a> {
    client: &'a reqwest::Client,
    base: String,
    target: &'a BmcTarget,
    deadline: Instant,
    budget: Duration,
}

impl Call<'_> {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, BmcError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(BmcError::Timeout(self.budget));
        }
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .basic_auth(&self.target.user, Some(&self.target.password.0))
            .header("Accept", "application/json")
            .timeout(left);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| transport_error(&e, self.budget))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| transport_error(&e, self.budget))?;
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(BmcError::Auth);
        }
        if !status.is_success() {
            return Err(BmcError::Protocol(error_detail(status.as_u16(), &text)));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| BmcError::Protocol(format!("{path}: not json: {e}")))
    }
}

/// reqwest's error and its causes (the URL has no credentials in it).
fn transport_error(e: &reqwest::Error, budget: Duration) -> BmcError {
    if e.is_timeout() {
        return BmcError::Timeout(budget);
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    BmcError::Unreachable(text)
}

#[async_trait]
impl Bmc for RedfishBmc {
    async fn attempt(&self, target: &BmcTarget, op: Op, budget: Duration) -> Result<String, TryError> {
        let call = Call {
            client: if target.insecure_tls { &self.insecure } else { &self.verified },
            base: format!("https://{}:{}", target.addr, target.port),
            target,
            deadline: Instant::now() + budget,
            budget,
        };
        let get = reqwest::Method::GET;
        let systems = call.send(get.clone(), "/redfish/v1/Systems", None).await.map_err(TryError::before)?;
        let path = system_path(&systems).map_err(TryError::before)?;
        match plan(op) {
            Plan::Status => {
                let system = call.send(get, &path, None).await.map_err(TryError::before)?;
                power_state(&system).map_err(TryError::before)
            }
            Plan::Reset(kind) => {
                let system = call.send(get, &path, None).await.map_err(TryError::before)?;
                let action = reset_target(&path, &system);
                let kind = reset_type(kind, &system);
                call.send(reqwest::Method::POST, &action, Some(&json!({"ResetType": kind})))
                    .await
                    .map_err(|e| refused(op, e))?;
                Ok(done_text(op))
            }
            Plan::Patch(body) => {
                call.send(reqwest::Method::PATCH, &path, Some(&body)).await.map_err(|e| refused(op, e))?;
                Ok(match op.action {
                    // Redfish blinks until told otherwise: no time to report.
                    PowerAction::Identify if op.seconds > 0 => "identify on".into(),
                    _ => done_text(op),
                })
            }
        }
    }
}

/// An error answer to the command itself is the BMC refusing it; a transport error after the
/// request left may have done it.
fn refused(op: Op, e: BmcError) -> TryError {
    match e {
        BmcError::Protocol(detail) => TryError::after(BmcError::Refused { action: op.action, detail }),
        e => TryError::after(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(action: PowerAction, seconds: u8) -> Op {
        Op { action, seconds }
    }

    #[test]
    fn actions_map_to_redfish() {
        assert_eq!(plan(op(PowerAction::On, 0)), Plan::Reset("On"));
        assert_eq!(plan(op(PowerAction::Off, 0)), Plan::Reset("ForceOff"));
        assert_eq!(plan(op(PowerAction::Soft, 0)), Plan::Reset("GracefulShutdown"));
        assert_eq!(plan(op(PowerAction::Reset, 0)), Plan::Reset("ForceRestart"));
        assert_eq!(plan(op(PowerAction::Cycle, 0)), Plan::Reset("PowerCycle"));
        assert_eq!(
            plan(op(PowerAction::Pxe, 0)),
            Plan::Patch(json!({"Boot": {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}}))
        );
        assert_eq!(
            plan(op(PowerAction::Disk, 0)),
            Plan::Patch(json!({"Boot": {"BootSourceOverrideTarget": "Hdd", "BootSourceOverrideEnabled": "Once"}}))
        );
        assert_eq!(plan(op(PowerAction::Identify, 15)), Plan::Patch(json!({"IndicatorLED": "Blinking"})));
        assert_eq!(plan(op(PowerAction::Identify, 0)), Plan::Patch(json!({"IndicatorLED": "Off"})));
    }

    #[test]
    fn answers_are_read() {
        let systems = json!({"Members": [{"@odata.id": "/redfish/v1/Systems/abc"}]});
        assert_eq!(system_path(&systems).unwrap(), "/redfish/v1/Systems/abc");
        assert!(system_path(&json!({"Members": []})).is_err());
        assert_eq!(power_state(&json!({"PowerState": "On"})).unwrap(), "on");
        assert_eq!(power_state(&json!({"PowerState": "PoweringOff"})).unwrap(), "poweringoff");
        assert!(power_state(&json!({})).is_err());
        let sys = json!({"Actions": {"#ComputerSystem.Reset": {"target": "/x/reset"}}});
        assert_eq!(reset_target("/s", &sys), "/x/reset");
        assert_eq!(reset_target("/s", &json!({})), "/s/Actions/ComputerSystem.Reset");
        let allowed = json!({"Actions": {"#ComputerSystem.Reset": {
            "ResetType@Redfish.AllowableValues": ["On", "ForceOff", "ForceRestart"]}}});
        assert_eq!(reset_type("PowerCycle", &allowed), "ForceRestart");
        assert_eq!(reset_type("On", &allowed), "On");
        assert_eq!(reset_type("PowerCycle", &json!({})), "PowerCycle");
        let body = r#"{"error": {"message": "bad", "@Message.ExtendedInfo": [{"Message": "no such reset"}]}}"#;
        assert_eq!(error_detail(400, body), "http 400: no such reset");
        assert_eq!(error_detail(500, "<html>"), "http 500");
    }
}
