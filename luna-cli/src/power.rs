//! `lpower` and `luna node reinstall`: one `POST /api/v1/power` per step, one line per node.
//! The words are checked here (hostlist, action, seconds) before anything is sent.

use anyhow::{bail, Context as _, Result};
use luna_core::power::{PowerAction, PowerReply, PowerRequest, PowerResult};

use crate::args::LpowerCli;
use crate::client::Client;

/// What the command line asks for.
pub fn request_of(cli: &LpowerCli) -> Result<PowerRequest> {
    let words: Vec<&str> = cli.words.iter().map(String::as_str).collect();
    let (nodes, rest) = match (&cli.group, words.as_slice()) {
        (Some(_), rest) => (None, rest),
        (None, [hostlist, rest @ ..]) => {
            crate::commands::check_hostlist(hostlist)?;
            (Some(hostlist.to_string()), rest)
        }
        (None, []) => bail!("give a HOSTLIST and an ACTION"),
    };
    let (action, seconds) = match rest {
        [] => bail!("give an ACTION: status, on, off, soft, reset, cycle, identify, pxe or disk"),
        [action] => (action.parse::<PowerAction>()?, None),
        [action, arg] => {
            let action = action.parse::<PowerAction>()?;
            if action != PowerAction::Identify {
                bail!("unexpected '{arg}' after {action}: only identify takes SECONDS or off");
            }
            let seconds = match *arg {
                "off" => 0,
                s => s
                    .parse::<u8>()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("invalid identify time '{s}': expected 1 to 255 seconds or off"))?,
            };
            (action, Some(seconds))
        }
        [_, _, extra, ..] => bail!("unexpected '{extra}': lpower takes HOSTLIST ACTION [SECONDS|off]"),
    };
    if let Some(g) = &cli.group {
        luna_core::model::validate_name(luna_core::Kind::Group, g)?;
    }
    Ok(PowerRequest { nodes, group: cli.group.clone(), action, seconds })
}

pub fn send(client: &Client, req: &PowerRequest) -> Result<PowerReply> {
    let body = serde_json::to_value(req).expect("power request serialises");
    let answer = client.write("POST", "/power", Some(&body))?;
    serde_json::from_value(answer).context("unexpected answer from the server to the power request")
}

/// `node001: on` / `node007: timeout after 5s`, in the server's (hostlist) order.
pub fn lines(results: &[PowerResult]) -> String {
    let mut out = String::new();
    for r in results {
        let text = r.error.as_deref().or(r.state.as_deref()).unwrap_or("");
        out.push_str(&format!("{}: {text}\n", r.node));
    }
    out
}

pub fn render(results: &[PowerResult], json: bool) -> String {
    if json {
        let mut s = serde_json::to_string_pretty(results).expect("results serialise");
        s.push('\n');
        s
    } else {
        lines(results)
    }
}

/// `lpower`: prints the results; `Ok(false)` when some node failed.
pub fn run(cli: &LpowerCli) -> Result<(String, bool)> {
    let req = request_of(cli)?;
    let client = Client::from_args(&cli.global);
    let reply = send(&client, &req)?;
    let all_ok = reply.results.iter().all(PowerResult::ok);
    Ok((render(&reply.results, cli.json), all_ok))
}

/// `luna node reinstall`: `localboot` cleared (a node installed to disk boots from it while the
/// flag is set), then one-time PXE boot, then a power cycle of the nodes that are on and power
/// on of those that are off. A node that fails a step is not taken further; its error is its
/// result. If the flag cannot be cleared, no node is powered.
pub fn reinstall(client: &Client, hostlist: &str) -> Result<Vec<PowerResult>> {
    let names = crate::commands::check_hostlist(hostlist)?;
    let patch = luna_core::api::NodePatch { localboot: Some(false), ..Default::default() };
    let patch = serde_json::to_value(patch).expect("node patch serialises");
    client
        .write("PATCH", &crate::commands::object_path(luna_core::Kind::Node, hostlist), Some(&patch))
        .with_context(|| format!("clear localboot of {hostlist} (nothing was powered)"))?;
    let step = |action, nodes: &[String]| -> Result<Vec<PowerResult>> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let req =
            PowerRequest { nodes: Some(luna_core::hostlist::compress(nodes)), group: None, action, seconds: None };
        Ok(send(client, &req)?.results)
    };
    let mut done: std::collections::HashMap<String, PowerResult> = std::collections::HashMap::new();
    let failed = |results: Vec<PowerResult>, done: &mut std::collections::HashMap<String, PowerResult>| {
        let mut ok = Vec::new();
        for r in results {
            if r.ok() {
                ok.push(r);
            } else {
                done.insert(r.node.clone(), r);
            }
        }
        ok
    };
    let pxe = failed(step(PowerAction::Pxe, &names)?, &mut done);
    let booted: Vec<String> = pxe.iter().map(|r| r.node.clone()).collect();
    let status = failed(step(PowerAction::Status, &booted)?, &mut done);
    let (on, off): (Vec<_>, Vec<_>) = status.into_iter().partition(|r| r.state.as_deref() == Some("on"));
    let on: Vec<String> = on.into_iter().map(|r| r.node).collect();
    let off: Vec<String> = off.into_iter().map(|r| r.node).collect();
    for r in step(PowerAction::Cycle, &on)?.into_iter().chain(step(PowerAction::On, &off)?) {
        let r = match (r.ok(), r.state.as_deref()) {
            (true, Some("cycle")) => PowerResult { state: Some("pxe, cycle".into()), ..r },
            (true, _) => PowerResult { state: Some("pxe, on".into()), ..r },
            (false, _) => r,
        };
        done.insert(r.node.clone(), r);
    }
    Ok(names.into_iter().filter_map(|n| done.remove(&n)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn req(args: &[&str]) -> Result<PowerRequest> {
        let cli = LpowerCli::try_parse_from(std::iter::once("lpower").chain(args.iter().copied()))?;
        request_of(&cli)
    }

    #[test]
    fn words_become_a_request() {
        let r = req(&["node[01-08]", "on"]).unwrap();
        assert_eq!(
            (r.nodes.as_deref(), r.group, r.action, r.seconds),
            (Some("node[01-08]"), None, PowerAction::On, None)
        );
        let r = req(&["-g", "compute", "status"]).unwrap();
        assert_eq!((r.nodes, r.group.as_deref(), r.action), (None, Some("compute"), PowerAction::Status));
        assert_eq!(req(&["n1", "identify", "30"]).unwrap().seconds, Some(30));
        assert_eq!(req(&["n1", "identify", "off"]).unwrap().seconds, Some(0));
        assert_eq!(req(&["n1", "identify"]).unwrap().seconds, None);
    }

    #[test]
    fn bad_words_are_named() {
        let e = |args: &[&str]| req(args).unwrap_err().to_string();
        assert!(e(&["n1", "boot"]).contains("'boot'"));
        assert!(e(&["n1"]).contains("ACTION"));
        assert!(e(&["n1", "on", "5"]).contains("'5'"));
        assert!(e(&["n1", "identify", "soon"]).contains("'soon'"));
        assert!(e(&["n1", "identify", "0"]).contains("'0'"));
        assert!(e(&["node[3-1]", "on"]).contains("node[3-1]"));
    }

    #[test]
    fn one_line_per_node() {
        let results = vec![
            PowerResult { node: "node001".into(), state: Some("on".into()), error: None },
            PowerResult { node: "node007".into(), state: None, error: Some("timeout after 5s".into()) },
        ];
        assert_eq!(lines(&results), "node001: on\nnode007: timeout after 5s\n");
        let json: Vec<PowerResult> = serde_json::from_str(&render(&results, true)).unwrap();
        assert_eq!(json, results);
    }
}
