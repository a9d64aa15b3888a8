//! Human output: aligned tables for lists, key/value lines for single objects.
//!
//! Rendering works on the server's JSON, not on typed objects, so a field the server adds later
//! shows up (at the end) instead of breaking the command.

use luna_core::Kind;
use serde_json::Value;

/// Columns separated by two spaces, each as wide as its widest cell; the last is not padded so
/// lines carry no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(cell);
            if i + 1 < widths.len() {
                l.extend(std::iter::repeat_n(' ', w.saturating_sub(cell.chars().count())));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// A scalar as a table cell: `-` for nothing, the first line of a long text.
fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.trim().is_empty() => "-".into(),
        Some(Value::String(s)) => s.lines().next().unwrap_or_default().to_string(),
        Some(Value::Array(a)) if a.is_empty() => "-".into(),
        Some(Value::Array(a)) => a.iter().map(|x| cell(Some(x))).collect::<Vec<_>>().join(","),
        Some(other) => other.to_string(),
    }
}

fn field<'a>(o: &'a Value, key: &str) -> Option<&'a Value> {
    o.get(key)
}

fn interface_ip(node: &Value, iface: &str) -> String {
    let found = node
        .get("interfaces")
        .and_then(Value::as_array)
        .and_then(|ifs| ifs.iter().find(|i| i.get("name").and_then(Value::as_str) == Some(iface)));
    cell(found.and_then(|i| i.get("ip")))
}

fn status(node: &Value) -> String {
    let Some(s) = node.get("status").filter(|s| !s.is_null()) else { return "-".into() };
    let step = cell(s.get("step"));
    match s.get("progress").and_then(Value::as_u64) {
        Some(p) => format!("{step} {p}%"),
        None => step,
    }
}

fn group_interfaces(group: &Value) -> String {
    let ifs = group.get("interfaces").and_then(Value::as_array).cloned().unwrap_or_default();
    if ifs.is_empty() {
        return "-".into();
    }
    ifs.iter().map(|i| format!("{}:{}", cell(i.get("name")), cell(i.get("network")))).collect::<Vec<_>>().join(",")
}

/// The list table of a kind.
pub fn list(kind: Kind, items: &[Value]) -> String {
    type Col = (&'static str, fn(&Value) -> String);
    let cols: Vec<Col> = match kind {
        Kind::Cluster => {
            vec![("NAME", |o| cell(field(o, "name"))), ("FRONTEND", |o| cell(field(o, "frontend_address")))]
        }
        Kind::Network => vec![
            ("NAME", |o| cell(field(o, "name"))),
            ("CIDR", |o| cell(field(o, "cidr"))),
            ("GATEWAY", |o| cell(field(o, "gateway"))),
            ("DNS", |o| cell(field(o, "dns_server"))),
            ("MTU", |o| cell(field(o, "mtu"))),
            ("RESERVED", |o| cell(field(o, "reserved"))),
            ("COMMENT", |o| cell(field(o, "comment"))),
        ],
        Kind::Osimage => vec![
            ("NAME", |o| cell(field(o, "name"))),
            ("PATH", |o| cell(field(o, "path"))),
            ("KERNEL", |o| cell(field(o, "kernel_version"))),
            ("REVISION", |o| cell(field(o, "current_revision"))),
            ("COMMENT", |o| cell(field(o, "comment"))),
        ],
        Kind::Bmcsetup => vec![
            ("NAME", |o| cell(field(o, "name"))),
            ("USER", |o| cell(field(o, "user"))),
            ("USERID", |o| cell(field(o, "userid"))),
            ("PASSWORD", |o| cell(field(o, "password"))),
            ("PROTOCOL", |o| cell(field(o, "protocol"))),
            ("COMMENT", |o| cell(field(o, "comment"))),
        ],
        Kind::Group => vec![
            ("NAME", |o| cell(field(o, "name"))),
            ("OSIMAGE", |o| cell(field(o, "osimage"))),
            ("BMCSETUP", |o| cell(field(o, "bmcsetup"))),
            ("INTERFACES", group_interfaces),
            ("COMMENT", |o| cell(field(o, "comment"))),
        ],
        Kind::Node => vec![
            ("NAME", |o| cell(field(o, "name"))),
            ("GROUP", |o| cell(field(o, "group"))),
            ("MAC", |o| cell(field(o, "mac"))),
            ("BOOTIF-IP", |o| interface_ip(o, luna_core::model::BOOTIF)),
            ("STATUS", status),
            ("UPDATED", |o| {
                let t = o.get("status").and_then(|s| s.get("time")).and_then(Value::as_u64);
                t.map_or("-".into(), utc_seconds)
            }),
        ],
        Kind::Switch => vec![
            ("NAME", |o| cell(field(o, "name"))),
            ("NETWORK", |o| cell(field(o, "network"))),
            ("IP", |o| cell(field(o, "ip"))),
            ("COMMUNITY", |o| cell(field(o, "community"))),
            ("UPLINKS", |o| cell(field(o, "uplinks"))),
            ("COMMENT", |o| cell(field(o, "comment"))),
        ],
        Kind::Otherdev => vec![
            ("NAME", |o| cell(field(o, "name"))),
            ("NETWORK", |o| cell(field(o, "network"))),
            ("IP", |o| cell(field(o, "ip"))),
            ("COMMENT", |o| cell(field(o, "comment"))),
        ],
    };
    let headers: Vec<&str> = cols.iter().map(|c| c.0).collect();
    let rows: Vec<Vec<String>> = items.iter().map(|o| cols.iter().map(|c| (c.1)(o)).collect()).collect();
    table(&headers, &rows)
}

/// The order fields are shown in (the model's order, long texts last); others follow.
fn key_order(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Cluster => &[
            "name",
            "frontend_address",
            "http_port",
            "domain",
            "nodename_prefix",
            "nodename_digits",
            "dhcp_interfaces",
            "dhcp_range",
            "tracker_interval",
            "tracker_max_peers",
            "comment",
            "rev",
        ],
        Kind::Network => &["name", "cidr", "cidr6", "gateway", "dns_server", "mtu", "reserved", "comment", "rev"],
        Kind::Osimage => &[
            "name",
            "path",
            "kernel_version",
            "kernel_opts",
            "current_revision",
            "dracut_modules_add",
            "dracut_modules_omit",
            "dracut_drivers_add",
            "dracut_drivers_omit",
            "grab_exclude",
            "root",
            "revisions",
            "comment",
            "rev",
        ],
        Kind::Bmcsetup => &[
            "name",
            "user",
            "password",
            "per_node_password",
            "userid",
            "netchannel",
            "mgmtchannel",
            "protocol",
            "comment",
            "rev",
        ],
        Kind::Group => &[
            "name",
            "osimage",
            "bmcsetup",
            "interfaces",
            "torrent_interface",
            "root",
            "domain",
            "comment",
            "rev",
            "prescript",
            "partscript",
            "postscript",
        ],
        Kind::Node => &[
            "name",
            "group",
            "mac",
            "interfaces",
            "switch",
            "port",
            "localboot",
            "service",
            "setupbmc",
            "bmc_password",
            "status",
            "comment",
            "rev",
        ],
        Kind::Switch => &["name", "network", "ip", "community", "oid", "uplinks", "comment", "rev"],
        Kind::Otherdev => &["name", "network", "ip", "comment", "rev"],
    }
}

/// `k=v k=v`: `name`, `network`, `ip` first, empty values left out.
fn pairs(o: &serde_json::Map<String, Value>) -> String {
    const FIRST: [&str; 3] = ["name", "network", "ip"];
    let mut keys: Vec<&String> = o.keys().filter(|k| cell(o.get(k.as_str())) != "-").collect();
    keys.sort_by_key(|k| (FIRST.iter().position(|f| f == k).unwrap_or(FIRST.len()), k.as_str()));
    keys.iter().map(|k| format!("{k}={}", cell(o.get(k.as_str())))).collect::<Vec<_>>().join(" ")
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC.
/// `luna switch listmacs`: one row per learned MAC, then one line per switch whose last poll
/// failed or that has not answered yet.
pub fn listmacs(switches: &[luna_core::api::SwitchMacs]) -> String {
    let dash = || "-".to_string();
    let mut rows = Vec::new();
    for s in switches {
        for m in &s.macs {
            let mut note = match &m.uplink {
                Some(u) => format!("uplink ({u})"),
                None => String::new(),
            };
            if let Some(n) = &m.note {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                note.push_str(n);
            }
            rows.push(vec![
                s.switch.clone(),
                m.port.to_string(),
                m.port_name.clone().unwrap_or_else(dash),
                m.mac.to_string(),
                format!("{}s", m.seen_secs),
                m.node.clone().unwrap_or_else(dash),
                if note.is_empty() { dash() } else { note },
            ]);
        }
    }
    let mut out = table(&["switch", "port", "name", "mac", "seen", "node", "note"], &rows);
    for s in switches {
        let age = s.age_secs.map(|a| format!("table {a}s old")).unwrap_or_else(|| "no table yet".into());
        match &s.error {
            Some(e) => out.push_str(&format!("switch {}: {age}; last poll failed: {e}\n", s.switch)),
            None if s.polled_at.is_none() => out.push_str(&format!("switch {}: not polled yet\n", s.switch)),
            None => {}
        }
    }
    out
}

pub fn utc_seconds(secs: u64) -> String {
    format!("{}:{:02}", utc_minutes(secs), secs % 60)
}

/// Unix seconds as `YYYY-MM-DD HH:MM` UTC (days to civil date after Howard Hinnant's algorithm).
pub fn utc_minutes(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}", rem / 3600, rem % 3600 / 60)
}

/// A list of server ids as one cell (`-` for none or an older server that does not say).
fn servers_of(r: &Value, key: &str) -> String {
    let ids: Vec<&str> = r
        .get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if ids.is_empty() {
        "-".into()
    } else {
        ids.join(",")
    }
}

/// The `revisions:` block of `luna osimage show`: one row per kept revision (`*` marks the one
/// nodes boot) with the tracker's swarm counters and the seeder's state.
pub fn revisions(revs: &[Value]) -> String {
    if revs.is_empty() {
        return "revisions: none (luna osimage pack NAME publishes one)\n".into();
    }
    let num =
        |o: &Value, path: &[&str]| -> Option<u64> { path.iter().try_fold(o, |v, k| v.get(*k)).and_then(Value::as_u64) };
    let count = |o: &Value, path: &[&str]| num(o, path).map_or("-".into(), |n| n.to_string());
    let rows: Vec<Vec<String>> = revs
        .iter()
        .map(|r| {
            let current = r.get("current").and_then(Value::as_bool) == Some(true);
            let sha = r.get("sha256").and_then(Value::as_str).unwrap_or("-");
            vec![
                format!("{}{}", count(r, &["id"]), if current { "*" } else { "" }),
                num(r, &["created"]).map_or("-".into(), utc_minutes),
                cell(r.get("kernel_version")),
                num(r, &["archive_size"]).map_or("-".into(), crate::progress::human_bytes),
                sha.chars().take(12).collect(),
                count(r, &["tracker", "seeders"]),
                count(r, &["tracker", "leechers"]),
                count(r, &["tracker", "completed"]),
                cell(r.get("seeder").and_then(|s| s.get("state"))),
                num(r, &["seeder", "uploaded_bytes"]).map_or("-".into(), crate::progress::human_bytes),
                servers_of(r, "held_by"),
                servers_of(r, "seeded_by"),
            ]
        })
        .collect();
    let headers = [
        "REV",
        "CREATED",
        "KERNEL",
        "SIZE",
        "SHA256",
        "SEEDERS",
        "LEECHERS",
        "COMPLETED",
        "SEEDER",
        "UPLOADED",
        "HELD BY",
        "SEEDED BY",
    ];
    let mut out = String::from("revisions:\n");
    for line in table(&headers, &rows).lines() {
        out.push_str("    ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// One object as aligned `key: value` lines; lists of objects and multi-line texts go on
/// indented lines below their key.
pub fn show(kind: Kind, obj: &Value) -> String {
    let Some(map) = obj.as_object() else { return format!("{obj}\n") };
    let order = key_order(kind);
    let mut keys: Vec<&str> = order.iter().copied().filter(|k| map.contains_key(*k)).collect();
    let mut rest: Vec<&str> = map.keys().map(String::as_str).filter(|k| !order.contains(k)).collect();
    rest.sort_unstable();
    keys.extend(rest);
    let width = keys.iter().map(|k| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for k in keys {
        let v = &map[k];
        let label = format!("{k}:");
        let block: Option<Vec<String>> = match v {
            Value::String(s) if s.contains('\n') => Some(s.lines().map(String::from).collect()),
            Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_object) => {
                Some(a.iter().filter_map(Value::as_object).map(pairs).collect())
            }
            _ => None,
        };
        match block {
            Some(lines) => {
                out.push_str(&label);
                out.push('\n');
                for l in lines {
                    out.push_str(format!("    {l}").trim_end());
                    out.push('\n');
                }
            }
            None => {
                let value = match v {
                    Value::Object(o) => pairs(o),
                    other => cell(Some(other)),
                };
                out.push_str(&format!("{label:width$} {value}\n"));
            }
        }
    }
    out
}

/// The servers of `GET /cluster/servers` as a table: id, last heartbeat, addresses, slice and
/// how many revisions each holds and seeds.
pub fn servers(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let age = s.get("age_secs").and_then(Value::as_u64);
            let stale = s.get("stale").and_then(Value::as_bool).unwrap_or(false);
            let beat = match age {
                Some(a) if stale => format!("{a}s ago (stale)"),
                Some(a) => format!("{a}s ago"),
                None => "-".into(),
            };
            let holds = s.get("holds").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            let seeding = holds.iter().filter(|h| h.get("seeding").and_then(Value::as_bool) == Some(true)).count();
            let urls: Vec<&str> = s
                .get("urls")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            vec![
                cell(s.get("id")),
                beat,
                if urls.is_empty() { "-".into() } else { urls.join(",") },
                cell(s.get("seeder")),
                cell(s.get("dhcp_slice")),
                format!("{}/{}", holds.len(), seeding),
            ]
        })
        .collect();
    table(&["SERVER", "HEARTBEAT", "URLS", "SEEDER", "DHCP SLICE", "HELD/SEEDED"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_without_trailing_blanks() {
        let t = table(
            &["NAME", "IP", "X"],
            &[vec!["node001".into(), "10.0.0.1".into(), "".into()], vec!["n2".into(), "-".into(), "z".into()]],
        );
        assert_eq!(t, "NAME     IP        X\nnode001  10.0.0.1\nn2       -         z\n");
    }

    #[test]
    fn node_list_columns() {
        let nodes = [
            json!({"name": "node001", "group": "compute", "mac": "52:54:00:00:00:01",
                   "interfaces": [{"name": "BMC", "network": "ipmi", "ip": "10.148.0.1"},
                                  {"name": "BOOTIF", "network": "cluster", "ip": "10.141.0.1"}],
                   "status": {"step": "download", "progress": 42, "time": 1}}),
            json!({"name": "node002", "group": "compute", "mac": null, "interfaces": [], "status": null}),
        ];
        assert_eq!(
            list(Kind::Node, &nodes),
            "NAME     GROUP    MAC                BOOTIF-IP   STATUS        UPDATED\n\
             node001  compute  52:54:00:00:00:01  10.141.0.1  download 42%  1970-01-01 00:00:01\n\
             node002  compute  -                  -           -             -\n"
        );
    }

    #[test]
    fn group_and_network_lists() {
        let g = [json!({"name": "compute", "osimage": "rocky9", "bmcsetup": null,
                        "interfaces": [{"name": "BOOTIF", "network": "cluster", "params": ""}], "comment": "first\nsecond"})];
        assert_eq!(
            list(Kind::Group, &g),
            "NAME     OSIMAGE  BMCSETUP  INTERFACES      COMMENT\ncompute  rocky9   -         BOOTIF:cluster  first\n"
        );
        let n = [json!({"name": "cluster", "cidr": "10.141.0.0/16", "gateway": null, "dns_server": null, "mtu": 1500,
                        "reserved": ["10.141.0.1-10.141.0.9", "10.141.0.20"], "comment": ""})];
        assert_eq!(
            list(Kind::Network, &n),
            "NAME     CIDR           GATEWAY  DNS  MTU   RESERVED                           COMMENT\n\
             cluster  10.141.0.0/16  -        -    1500  10.141.0.1-10.141.0.9,10.141.0.20  -\n"
        );
    }

    #[test]
    fn revisions_table() {
        assert_eq!(utc_minutes(0), "1970-01-01 00:00");
        assert_eq!(utc_minutes(1_795_000_000), "2026-11-18 11:06");
        assert_eq!(utc_minutes(951_782_400), "2000-02-29 00:00");
        let revs = [
            json!({"id": 1, "created": 0, "kernel_version": "6.1.0-1-amd64", "archive_size": 2048,
                   "sha256": "abcdef0123456789", "current": false, "tracker": null, "seeder": null}),
            json!({"id": 2, "created": 60, "kernel_version": "6.1.0-1-amd64", "archive_size": 3 << 20,
                   "sha256": "0123456789abcdef", "current": true,
                   "tracker": {"seeders": 3, "leechers": 1, "completed": 7},
                   "seeder": {"state": "live", "uploaded_bytes": 1 << 30},
                   "held_by": ["a", "b"], "seeded_by": ["a"]}),
        ];
        let out = revisions(&revs);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "revisions:");
        assert!(lines[1].trim_start().starts_with("REV  CREATED"), "{out}");
        assert!(lines[2].contains("1  ") && lines[2].contains("2.0 KiB") && lines[2].contains("abcdef012345"));
        assert!(!lines[2].contains("abcdef0123456"), "digest shortened: {out}");
        assert!(lines[3].trim_start().starts_with("2*"), "{out}");
        assert!(lines[3].contains("live") && lines[3].contains("1.0 GiB"), "{out}");
        assert!(lines[1].contains("HELD BY  SEEDED BY"), "{out}");
        assert!(lines[3].trim_end().ends_with("a,b      a"), "{out}");
        assert!(revisions(&[]).contains("none"));
    }

    #[test]
    fn empty_list_is_just_the_header() {
        assert_eq!(list(Kind::Otherdev, &[]), "NAME  NETWORK  IP  COMMENT\n");
    }

    #[test]
    fn show_orders_keys_and_indents_blocks() {
        let node = json!({"rev": 3, "name": "node001", "group": "compute", "mac": "52:54:00:00:00:01",
            "interfaces": [{"name": "BOOTIF", "network": "cluster", "ip": "10.141.0.1"}],
            "switch": null, "port": null, "status": {"step": "booted", "time": 5}, "comment": "", "extra": true});
        assert_eq!(
            show(Kind::Node, &node),
            "name:       node001\n\
             group:      compute\n\
             mac:        52:54:00:00:00:01\n\
             interfaces:\n    name=BOOTIF network=cluster ip=10.141.0.1\n\
             switch:     -\n\
             port:       -\n\
             status:     step=booted time=5\n\
             comment:    -\n\
             rev:        3\n\
             extra:      true\n"
        );
        let group = json!({"name": "g", "postscript": "#!/bin/sh\necho hi\n", "prescript": ""});
        assert_eq!(
            show(Kind::Group, &group),
            "name:       g\nprescript:  -\npostscript:\n    #!/bin/sh\n    echo hi\n"
        );
    }

    #[test]
    fn listmacs_shows_uplinks_nodes_and_failed_switches() {
        let sw: Vec<luna_core::api::SwitchMacs> = serde_json::from_value(json!([
            {"switch": "sw1", "polled_at": 100, "age_secs": 3, "error": null, "macs": [
                {"port": 7, "port_name": "Gi1/0/7", "if_index": 1007, "mac": "52:54:00:aa:00:07", "seen_secs": 40,
                 "uplink": null, "node": "node007", "note": null},
                {"port": 48, "port_name": "Te1/1/1", "if_index": 1048, "mac": "52:54:00:aa:00:64", "seen_secs": 1,
                 "uplink": "threshold", "node": null, "note": null}]},
            {"switch": "sw2", "polled_at": 50, "age_secs": 90, "error": "no answer from 127.0.0.1:161", "macs": []},
            {"switch": "sw3", "polled_at": null, "age_secs": null, "error": null, "macs": []}
        ]))
        .unwrap();
        let out = listmacs(&sw);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "switch  port  name     mac                seen  node     note");
        assert_eq!(lines[1], "sw1     7     Gi1/0/7  52:54:00:aa:00:07  40s   node007  -");
        assert_eq!(lines[2], "sw1     48    Te1/1/1  52:54:00:aa:00:64  1s    -        uplink (threshold)");
        assert_eq!(lines[3], "switch sw2: table 90s old; last poll failed: no answer from 127.0.0.1:161");
        assert_eq!(lines[4], "switch sw3: not polled yet");
    }
}
