//! `luna` against a real luna-server process (sqlite store in a temp dir).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

use common::{Run, Server};
use ipnet::Ipv4Net;
use serde_json::Value;

fn luna() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_luna"))
}

/// Networks `cluster` (BOOTIF) and `ipmi` (BMC), an image, a BMC setup and the group `compute`.
fn setup(s: &Server) {
    s.ok(&["network", "add", "cluster", "--cidr", "10.141.0.0/16", "--gateway", "10.141.255.254"]);
    s.ok(&["network", "add", "ipmi", "--cidr", "10.148.0.0/16"]);
    s.ok(&["osimage", "add", "rocky9", "--path", "/images/rocky9", "--kernel-version", "6.1.0-28-amd64"]);
    let r = s.run_stdin(&["bmcsetup", "add", "base", "--user", "admin", "--password-file", "-"], "s3cret\n");
    assert_eq!(r.code, 0, "{r:?}");
    s.ok(&[
        "group",
        "add",
        "compute",
        "--osimage",
        "rocky9",
        "--network",
        "cluster",
        "--bmcsetup",
        "base",
        "--bmc-network",
        "ipmi",
    ]);
}

fn names(list: &Value) -> Vec<String> {
    list.as_array().expect("a list").iter().map(|o| o["name"].as_str().expect("a name").to_string()).collect()
}

fn ip_of(node: &Value, iface: &str) -> Ipv4Addr {
    let ifs = node["interfaces"].as_array().unwrap_or_else(|| panic!("no interfaces in {node}"));
    let i = ifs.iter().find(|i| i["name"] == iface).unwrap_or_else(|| panic!("no {iface} in {node}"));
    i["ip"].as_str().unwrap_or_else(|| panic!("no ip on {iface} in {node}")).parse().expect("an ipv4 address")
}

/// Exit 1, nothing on stdout, one `error: ` line in lower case that contains every needle.
#[track_caller]
fn assert_error(r: &Run, needles: &[&str]) {
    assert_eq!(r.code, 1, "expected exit 1: {r:?}");
    assert!(r.stdout.is_empty(), "stdout not empty: {r:?}");
    let first = r.stderr.lines().next().unwrap_or_default();
    let msg = first.strip_prefix("error: ").unwrap_or_else(|| panic!("no 'error: ' prefix: {r:?}"));
    assert!(!msg.starts_with(|c: char| c.is_uppercase()), "message not lower-case: {first}");
    for n in needles {
        assert!(first.contains(n), "error does not name {n:?}: {first}");
    }
}

/// Everything the server holds, as `luna` prints it.
fn snapshot(s: &Server) -> Value {
    let mut all = serde_json::Map::new();
    for kind in ["network", "osimage", "bmcsetup", "group", "node", "switch", "otherdev"] {
        all.insert(kind.into(), s.json(&[kind, "list"]));
    }
    all.insert("cluster".into(), s.json(&["cluster", "show"]));
    Value::Object(all)
}

#[test]
fn admin_flow() {
    let s = Server::start(luna());
    let out = s.ok(&["cluster", "init", "--frontend-address", "10.141.255.254", "--dhcp-interfaces", "eth1"]);
    assert!(out.lines().any(|l| l.starts_with("frontend_address:") && l.ends_with("10.141.255.254")), "{out}");
    // Init is safe to repeat.
    s.ok(&["cluster", "init", "--frontend-address", "10.141.255.254"]);
    let c = s.json(&["cluster", "show"]);
    assert_eq!(
        (c["frontend_address"].as_str(), c["dhcp_interfaces"].clone()),
        (Some("10.141.255.254"), serde_json::json!(["eth1"]))
    );

    setup(&s);
    assert_eq!(s.ok(&["node", "add", "node[001-004]", "--group", "compute"]).trim(), "added 4 nodes: node[001-004]");

    let nodes = s.json(&["node", "list"]);
    assert_eq!(names(&nodes), ["node001", "node002", "node003", "node004"]);
    let cluster_net: Ipv4Net = "10.141.0.0/16".parse().unwrap();
    let ipmi_net: Ipv4Net = "10.148.0.0/16".parse().unwrap();
    let mut boot_ips = BTreeSet::new();
    for n in nodes.as_array().unwrap() {
        assert_eq!(n["group"], "compute");
        assert!(n["mac"].is_null(), "{n}");
        for i in n["interfaces"].as_array().unwrap() {
            assert!(i["name"].is_string() && i["network"].is_string() && i["ip"].is_string(), "{i}");
        }
        assert!(cluster_net.contains(&ip_of(n, "BOOTIF")) && ipmi_net.contains(&ip_of(n, "BMC")), "{n}");
        assert_ne!(ip_of(n, "BOOTIF"), "10.141.255.254".parse::<Ipv4Addr>().unwrap(), "gateway handed out");
        boot_ips.insert(ip_of(n, "BOOTIF"));
    }
    assert_eq!(boot_ips.len(), 4, "boot addresses not distinct: {nodes}");

    // The table: header plus one row per node, with its address.
    let table = s.ok(&["node", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "GROUP", "MAC", "BOOTIF-IP", "STATUS", "UPDATED"]
    );
    assert_eq!(lines.len(), 5, "{table}");
    for (line, n) in lines[1..].iter().zip(nodes.as_array().unwrap()) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells, [n["name"].as_str().unwrap(), "compute", "-", &ip_of(n, "BOOTIF").to_string(), "-", "-"]);
    }
    let shown = s.ok(&["node", "show", "node001"]);
    assert!(shown.lines().any(|l| l.starts_with("group:") && l.ends_with("compute")), "{shown}");

    // change --ip: the node moves, and its old address is free for someone else.
    let old_ip = ip_of(&s.json(&["node", "show", "node002"]), "BOOTIF");
    s.ok(&["node", "change", "node002", "--ip", "BOOTIF=10.141.0.100"]);
    assert_eq!(ip_of(&s.json(&["node", "show", "node002"]), "BOOTIF"), "10.141.0.100".parse::<Ipv4Addr>().unwrap());
    s.ok(&["node", "add", "node005", "--group", "compute", "--ip", &format!("BOOTIF={old_ip}")]);
    assert_eq!(ip_of(&s.json(&["node", "show", "node005"]), "BOOTIF"), old_ip);

    // change --mac (normalised), then the MAC moves to another node once released.
    s.ok(&["node", "change", "node001", "--mac", "52-54-00-AA-BB-01"]);
    assert_eq!(s.json(&["node", "show", "node001"])["mac"], "52:54:00:aa:bb:01");
    s.ok(&["node", "change", "node001", "--mac", "52:54:00:aa:bb:02"]);
    s.ok(&["node", "change", "node003", "--mac", "52:54:00:aa:bb:01"]);
    assert_eq!(s.json(&["node", "show", "node003"])["mac"], "52:54:00:aa:bb:01");
    s.ok(&["node", "change", "node003", "--unset", "mac"]);
    assert!(s.json(&["node", "show", "node003"])["mac"].is_null());

    // Flags on a hostlist.
    s.ok(&["node", "change", "node[001-002]", "--localboot", "yes", "--comment", "rack 3"]);
    for n in ["node001", "node002"] {
        let j = s.json(&["node", "show", n]);
        assert_eq!((j["localboot"].clone(), j["comment"].clone()), (Value::Bool(true), Value::from("rack 3")), "{j}");
    }

    // rename keeps the addresses.
    let n4 = s.json(&["node", "show", "node004"]);
    assert_eq!(s.ok(&["node", "rename", "node004", "node010"]).trim(), "renamed node node004 to node010");
    assert_error(&s.run(&["node", "show", "node004"]), &["node004"]);
    assert_eq!(s.json(&["node", "show", "node010"])["interfaces"], n4["interfaces"]);

    // clone: same group, fresh addresses, no MAC.
    s.ok(&["node", "clone", "node001", "node011"]);
    let clone = s.json(&["node", "show", "node011"]);
    assert_eq!(clone["group"], "compute");
    assert!(clone["mac"].is_null(), "{clone}");
    let others: BTreeSet<Ipv4Addr> = s
        .json(&["node", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["name"] != "node011")
        .map(|n| ip_of(n, "BOOTIF"))
        .collect();
    assert!(!others.contains(&ip_of(&clone, "BOOTIF")), "clone reuses an address: {clone}");

    // --group filter.
    s.ok(&["group", "clone", "compute", "gpu"]);
    s.ok(&["node", "add", "gpu[1-2]", "--group", "gpu"]);
    assert_eq!(names(&s.json(&["node", "list", "--group", "gpu"])), ["gpu1", "gpu2"]);
    assert_eq!(s.ok(&["node", "delete", "gpu[1-2]"]).trim(), "deleted 2 nodes: gpu[1-2]");
    s.ok(&["group", "delete", "gpu"]);

    assert_eq!(s.ok(&["node", "delete", "node[002-003]"]).trim(), "deleted 2 nodes: node[002-003]");
    assert_eq!(names(&s.json(&["node", "list"])), ["node001", "node005", "node010", "node011"]);

    // Networks: reserve, release, change, rename (users follow).
    s.ok(&["network", "reserve", "cluster", "10.141.0.200-10.141.0.210"]);
    assert_eq!(s.json(&["network", "show", "cluster"])["reserved"], serde_json::json!(["10.141.0.200-10.141.0.210"]));
    s.ok(&["network", "release", "cluster", "10.141.0.200-10.141.0.210"]);
    s.ok(&["network", "change", "cluster", "--mtu", "9000", "--dns", "10.141.255.253", "--unset", "gateway"]);
    let net = s.json(&["network", "show", "cluster"]);
    assert_eq!(
        (net["mtu"].as_u64(), net["gateway"].is_null(), net["dns_server"].as_str()),
        (Some(9000), true, Some("10.141.255.253"))
    );
    s.ok(&["network", "rename", "ipmi", "bmcnet"]);
    assert!(s.json(&["group", "show", "compute"])["interfaces"].to_string().contains("bmcnet"));
    assert!(s.json(&["node", "show", "node001"])["interfaces"].to_string().contains("bmcnet"));

    // Groups: interfaces and scripts from a file and from stdin.
    s.ok(&["network", "add", "ib", "--cidr", "10.150.0.0/16"]);
    s.ok(&["group", "change", "compute", "--interface", "ib0=ib"]);
    let ifs = s.json(&["group", "show", "compute"])["interfaces"].clone();
    assert_eq!(
        ifs.as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect::<Vec<_>>(),
        ["BOOTIF", "BMC", "ib0"]
    );
    s.ok(&["group", "change", "compute", "--remove-interface", "ib0"]);
    assert!(!s.json(&["group", "show", "compute"])["interfaces"].to_string().contains("ib0"));
    let post = s.dir.path().join("post.sh");
    std::fs::write(&post, "#!/bin/sh\necho post\n").unwrap();
    let r = s.run_stdin(
        &["group", "change", "compute", "--postscript", &format!("@{}", post.display()), "--prescript", "-"],
        "echo pre\n",
    );
    assert_eq!(r.code, 0, "{r:?}");
    let g = s.json(&["group", "show", "compute"]);
    assert_eq!(
        (g["postscript"].as_str(), g["prescript"].as_str()),
        (Some("#!/bin/sh\necho post\n"), Some("echo pre\n"))
    );
    let shown = s.ok(&["group", "show", "compute"]);
    assert!(shown.contains("postscript:\n    #!/bin/sh\n    echo post\n"), "{shown}");

    // Secrets show only when asked for.
    assert_eq!(s.json(&["bmcsetup", "show", "base"])["password"], "********");
    assert_eq!(s.json(&["bmcsetup", "show", "base", "--show-secrets"])["password"], "s3cret");
    let r = s.run_stdin(&["bmcsetup", "change", "base", "--password-file", "-", "--userid", "3"], "n3w\n");
    assert_eq!(r.code, 0, "{r:?}");
    let b = s.json(&["bmcsetup", "list", "--show-secrets"]);
    assert_eq!((b[0]["password"].as_str(), b[0]["userid"].as_u64()), (Some("n3w"), Some(3)));
    // From a file, from the environment; never from the command line, never empty.
    let file = s.dir.path().join("bmc-password");
    std::fs::write(&file, "fr0m-file\n").unwrap();
    s.ok(&["bmcsetup", "change", "base", "--password-file", file.to_str().unwrap()]);
    assert_eq!(s.json(&["bmcsetup", "show", "base", "--show-secrets"])["password"], "fr0m-file");
    let r = s.run_env(&["bmcsetup", "change", "base", "--password-from-env"], &[("LUNA_BMC_PASSWORD", "fr0m-env")]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(s.json(&["bmcsetup", "show", "base", "--show-secrets"])["password"], "fr0m-env");
    let r = s.run(&["bmcsetup", "change", "base", "--password", "on-the-command-line"]);
    assert!(r.code != 0 && r.stderr.contains("--password-file"), "{r:?}");
    let r = s.run_env(&["bmcsetup", "change", "base", "--password-from-env"], &[("LUNA_BMC_PASSWORD", "")]);
    assert!(r.code != 0 && r.stderr.contains("empty"), "{r:?}");
    let r = s.run(&["bmcsetup", "add", "nopw", "--user", "admin"]);
    assert!(r.code != 0 && r.stderr.contains("LUNA_BMC_PASSWORD"), "{r:?}");
    assert_eq!(
        s.json(&["bmcsetup", "show", "base", "--show-secrets"])["password"],
        "fr0m-env",
        "refusals change nothing"
    );

    // Switches and other devices.
    s.ok(&[
        "switch",
        "add",
        "sw1",
        "--network",
        "cluster",
        "--ip",
        "10.141.253.1",
        "--community",
        "private",
        "--uplinks",
        "49,50",
    ]);
    let sw = s.json(&["switch", "show", "sw1"]);
    assert_eq!((sw["community"].as_str(), sw["uplinks"].clone()), (Some("********"), serde_json::json!([49, 50])));
    assert_eq!(s.json(&["switch", "show", "sw1", "--show-secrets"])["community"], "private");
    s.ok(&["switch", "change", "sw1", "--uplinks", "52"]);
    s.ok(&["node", "change", "node001", "--switch", "sw1", "--port", "7"]);
    assert_eq!(s.json(&["node", "show", "node001"])["port"], 7);
    s.ok(&["switch", "rename", "sw1", "leaf1"]);
    assert_eq!(s.json(&["node", "show", "node001"])["switch"], "leaf1");
    s.ok(&["otherdev", "add", "pdu1", "--network", "cluster", "--ip", "10.141.253.10", "--comment", "rack 3 pdu"]);
    s.ok(&["otherdev", "clone", "pdu1", "pdu2"]);
    let devs = s.json(&["otherdev", "list"]);
    assert_eq!(names(&devs), ["pdu1", "pdu2"]);
    assert_ne!(devs[0]["ip"], devs[1]["ip"]);
    s.ok(&["otherdev", "change", "pdu2", "--ip", "10.141.253.20"]);
    assert_eq!(s.json(&["otherdev", "show", "pdu2"])["ip"], "10.141.253.20");
    let table = s.ok(&["otherdev", "list"]);
    assert!(
        table
            .lines()
            .nth(2)
            .is_some_and(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["pdu2", "cluster", "10.141.253.20", "rack", "3", "pdu"]),
        "{table}"
    );

    // OS images: rename follows into the group, clone, delete.
    s.ok(&["osimage", "change", "rocky9", "--kernel-opts", "quiet nosplash"]);
    s.ok(&["osimage", "rename", "rocky9", "rocky9.4"]);
    assert_eq!(s.json(&["group", "show", "compute"])["osimage"], "rocky9.4");
    s.ok(&["osimage", "clone", "rocky9.4", "rocky10"]);
    assert_eq!(s.json(&["osimage", "show", "rocky10"])["kernel_opts"], "quiet nosplash");
    s.ok(&["osimage", "delete", "rocky10"]);

    // Tear everything down in dependency order; every list ends empty.
    s.ok(&["node", "delete", "node001,node005,node0[10-11]"]);
    for (kind, name) in [
        ("switch", "leaf1"),
        ("otherdev", "pdu1"),
        ("otherdev", "pdu2"),
        ("group", "compute"),
        ("osimage", "rocky9.4"),
        ("bmcsetup", "base"),
        ("network", "cluster"),
        ("network", "bmcnet"),
        ("network", "ib"),
    ] {
        assert_eq!(s.ok(&[kind, "delete", name]).trim(), format!("deleted {kind} {name}"));
    }
    for kind in ["network", "osimage", "bmcsetup", "group", "node", "switch", "otherdev"] {
        assert_eq!(s.json(&[kind, "list"]), serde_json::json!([]), "{kind}");
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let s = Server::start(luna());
    setup(&s);
    s.ok(&["node", "add", "node[001-002]", "--group", "compute"]);
    s.ok(&["node", "change", "node001", "--mac", "52:54:00:00:00:01"]);
    let ip1 = ip_of(&s.json(&["node", "show", "node001"]), "BOOTIF").to_string();
    let before = snapshot(&s);

    // Caught locally: the same error with no server at all proves no request was needed.
    let dead = format!("https://127.0.0.1:{}", common::free_port());
    let local: &[(&[&str], &[&str])] = &[
        (&["network", "add", "bad", "--cidr", "10.0.0.0/33"], &["'10.0.0.0/33'"]),
        (&["network", "add", "bad", "--cidr", "10.141.0.1/16"], &["10.141.0.1/16", "10.141.0.0/16"]),
        (&["network", "add", "bad", "--cidr", "10.0.0.0/8", "--gateway", "192.168.1.1"], &["192.168.1.1"]),
        (&["network", "add", "bad_", "--cidr", "10.0.0.0/8", "--mtu", "100"], &["mtu", "100"]),
        (&["node", "add", "node[001-", "--group", "compute"], &["malformed hostlist 'node[001-'"]),
        (&["node", "add", "node_1", "--group", "compute"], &["node_1"]),
        (&["node", "delete", "node[3-1]"], &["node[3-1]"]),
        (&["node", "change", "node001", "--mac", "52:54:00:zz:00:01"], &["'52:54:00:zz:00:01'"]),
        (&["node", "add", "node009", "--group", "compute", "--mac", "52:54:00:00:00"], &["'52:54:00:00:00'"]),
        (&["node", "change", "node001", "--ip", "10.141.0.9"], &["'10.141.0.9'", "IF=ADDR"]),
        (&["node", "change", "node001", "--ip", "BOOTIF=10.141.0.300"], &["'10.141.0.300'"]),
        (
            &["node", "add", "n[1-2]", "--group", "compute", "--mac", "52:54:00:00:00:09"],
            &["52:54:00:00:00:09", "'n[1-2]'"],
        ),
        (&["node", "change", "node001", "--localboot", "maybe"], &["'maybe'"]),
        (&["group", "add", "g2", "--osimage", "rocky9", "--interface", "ib0"], &["'ib0'", "IF=NET"]),
        (&["osimage", "add", "img", "--path", "relative/dir"], &["relative/dir"]),
        (&["bmcsetup", "add", "b2", "--user", "admin", "--password-from-env", "--protocol", "snmp"], &["'snmp'"]),
        (&["network", "reserve", "cluster", "10.141.0.9-10.141.0.1"], &["10.141.0.9-10.141.0.1"]),
        (&["node", "rename", "node001", "node_x"], &["node_x"]),
    ];
    for (args, needles) in local {
        assert_error(&s.run(args), needles);
        let mut offline = args.to_vec();
        offline.extend(["--server", &dead]);
        assert_error(&s.run(&offline), needles);
    }

    // Refused by the server, which names the input.
    let server: &[(&[&str], &[&str])] = &[
        (&["network", "add", "cluster", "--cidr", "10.142.0.0/16"], &["cluster", "exists"]),
        (&["node", "add", "node001", "--group", "compute"], &["node001", "exists"]),
        (&["node", "add", "node[002-003]", "--group", "compute"], &["node002"]),
        (&["node", "add", "node003", "--group", "compute", "--mac", "52:54:00:00:00:01"], &["52:54:00:00:00:01"]),
        (&["node", "change", "node002", "--mac", "52-54-00-00-00-01"], &["52:54:00:00:00:01"]),
        (&["node", "change", "node002", "--ip", "BOOTIF=192.168.0.5"], &["192.168.0.5"]),
        (&["node", "add", "node003", "--group", "compute", "--ip", "BOOTIF=10.142.0.5"], &["10.142.0.5"]),
        (&["node", "change", "node002", "--ip", &format!("BOOTIF={ip1}")], &[&ip1]),
        (&["node", "add", "node003", "--group", "compute", "--ip", &format!("BOOTIF={ip1}")], &[&ip1]),
        (&["node", "add", "node003", "--group", "nope"], &["nope"]),
        (&["node", "change", "node002", "--group", "nope"], &["nope"]),
        (&["node", "delete", "node404"], &["node404"]),
        (&["node", "rename", "node001", "node002"], &["node002"]),
        (&["network", "delete", "cluster"], &["cluster", "used"]),
        (&["network", "delete", "ipmi"], &["ipmi", "used"]),
        (&["osimage", "delete", "rocky9"], &["rocky9", "used"]),
        (&["bmcsetup", "delete", "base"], &["base", "used"]),
        (&["group", "delete", "compute"], &["compute", "used"]),
        (&["group", "add", "g2", "--osimage", "nope-image", "--network", "cluster"], &["nope-image"]),
        (&["group", "add", "g2", "--osimage", "rocky9", "--network", "nope-net"], &["nope-net"]),
        (&["switch", "add", "sw1", "--network", "cluster", "--ip", &ip1], &[&ip1]),
        (&["otherdev", "add", "pdu1", "--network", "cluster", "--ip", "10.200.0.1"], &["10.200.0.1"]),
        (&["network", "change", "nope-net", "--mtu", "9000"], &["nope-net"]),
        (&["network", "show", "nope-net"], &["nope-net"]),
    ];
    for (args, needles) in server {
        assert_error(&s.run(args), needles);
    }

    // No token, a wrong token.
    let r = s
        .cmd()
        .args(["network", "add", "x", "--cidr", "10.9.0.0/16"])
        .env("LUNA_TOKEN_FILE", "/nonexistent/token")
        .output()
        .unwrap();
    assert_error(&r.into(), &["/nonexistent/token"]);
    let r = s.cmd().args(["network", "add", "x", "--cidr", "10.9.0.0/16"]).env("LUNA_TOKEN", "wrong").output().unwrap();
    assert_error(&r.into(), &["token"]);

    assert_eq!(snapshot(&s), before, "a refused command changed something");
}

#[test]
fn unreachable_server_is_named() {
    let url = format!("https://127.0.0.1:{}", common::free_port());
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/assets/test-ca.pem");
    let r: Run = std::process::Command::new(luna())
        .args(["node", "list", "--server", &url, "--ca", ca])
        .output()
        .unwrap()
        .into();
    assert_error(&r, &[&format!("cannot reach luna-server at {url}: ")]);
}

#[test]
fn concurrent_node_adds_lose_nothing() {
    let s = Server::start(luna());
    setup(&s);
    const PROCS: usize = 16;
    const EACH: usize = 32;
    let runs: Vec<Run> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..PROCS)
            .map(|p| {
                let expr = format!("n[{:03}-{:03}]", p * EACH + 1, (p + 1) * EACH);
                let s = &s;
                scope.spawn(move || s.run(&["node", "add", &expr, "--group", "compute"]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for r in &runs {
        assert_eq!(r.code, 0, "{r:?}\nserver log:\n{}", s.log());
    }
    let nodes = s.json(&["node", "list"]);
    let got: BTreeSet<String> = names(&nodes).into_iter().collect();
    let want: BTreeSet<String> = (1..=PROCS * EACH).map(|i| format!("n{i:03}")).collect();
    assert_eq!(got, want);
    let boot: BTreeSet<Ipv4Addr> = nodes.as_array().unwrap().iter().map(|n| ip_of(n, "BOOTIF")).collect();
    let bmc: BTreeSet<Ipv4Addr> = nodes.as_array().unwrap().iter().map(|n| ip_of(n, "BMC")).collect();
    assert_eq!((boot.len(), bmc.len()), (PROCS * EACH, PROCS * EACH), "addresses handed out twice");
}

#[test]
fn cluster_init_is_idempotent_and_validated() {
    let s = Server::start(luna());
    let first = s.json(&["cluster", "show"]);
    s.ok(&["cluster", "init"]);
    assert_eq!(s.json(&["cluster", "show"]), first, "init without options changed the cluster");
    s.ok(&["cluster", "init", "--domain", "hpc.example", "--dhcp-range", "10.141.200.1-10.141.200.50"]);
    s.ok(&["cluster", "init", "--domain", "hpc.example", "--dhcp-range", "10.141.200.1-10.141.200.50"]);
    let c = s.json(&["cluster", "show"]);
    assert_eq!(
        (c["domain"].as_str(), c["dhcp_range"].as_str()),
        (Some("hpc.example"), Some("10.141.200.1-10.141.200.50"))
    );
    assert_error(&s.run(&["cluster", "change", "--tracker-interval", "1"]), &["tracker_interval", "1"]);
    assert_error(&s.run(&["cluster", "change", "--domain", "bad..domain"]), &["bad..domain"]);
    assert_error(&s.run(&["cluster", "change"]), &["nothing to change"]);
    s.ok(&["cluster", "change", "--unset", "dhcp_range"]);
    assert!(s.json(&["cluster", "show"])["dhcp_range"].is_null());
}

#[test]
fn boot_script_needs_a_mac() {
    let s = Server::start(luna());
    setup(&s);
    s.ok(&["node", "add", "node001", "--group", "compute"]);
    assert_error(&s.run(&["node", "show", "node001", "--script", "boot"]), &["node001", "no mac", "--mac"]);
}

/// `--script boot` asks the admin API for the node, then `/boot/ipxe?mac=<its mac>&preview=1`
/// over the same HTTPS port with the token; the boot port itself refuses the token.
#[test]
fn boot_script_is_fetched_by_mac_over_https() {
    let s = Server::start(luna());
    setup(&s);
    s.ok(&["node", "add", "node001", "--group", "compute", "--mac", "52:54:00:00:00:01"]);
    let r = s.run(&["node", "show", "node001", "--script", "boot"]);
    assert_eq!(r.code, 0, "{r:?}\n{}", s.log());
    assert!(r.stdout.starts_with("#!ipxe"), "{r:?}");
    // The preview names the plain boot port, not the HTTPS port it was asked over.
    assert!(!r.stdout.contains(&s.url.replace("https://", "")), "{}", r.stdout);
    let r = s.run(&["node", "show", "node001", "--script", "boot", "--server", &s.boot_url]);
    assert_error(&r, &["plain HTTP", &s.boot_url]);
}

#[test]
fn completions_and_man_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let r: Run = std::process::Command::new(luna()).args(["completions", shell]).output().unwrap().into();
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.stdout.contains("osimage") && r.stdout.contains("reserve"), "{shell}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let r: Run = std::process::Command::new(luna()).args(["manpages"]).arg(&out).output().unwrap().into();
    assert_eq!(r.code, 0, "{r:?}");
    for page in ["luna.1", "luna-node-add.1", "luna-group-change.1", "luna-network-reserve.1"] {
        assert!(out.join(page).is_file(), "{page} missing");
    }
    let r: Run = std::process::Command::new(luna()).args(["node", "frobnicate"]).output().unwrap().into();
    assert_eq!(r.code, 1, "usage errors exit 1: {r:?}");
}

/// A chroot with a kernel, and a stand-in dracut that fails while `<dir>/dracut-fails` exists
/// (the real dracut is exercised by luna-server's image tests).
fn packable_image(dir: &Path) -> (std::path::PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let kver = "6.1.0-99-amd64";
    let root = dir.join("image");
    std::fs::create_dir_all(root.join(format!("lib/modules/{kver}"))).unwrap();
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join(format!("lib/modules/{kver}/modules.dep")), b"").unwrap();
    std::fs::write(root.join(format!("boot/vmlinuz-{kver}")), b"a kernel").unwrap();
    std::fs::write(root.join("etc/hostname"), b"image\n").unwrap();
    std::fs::write(root.join("etc/data"), "some text\n".repeat(100_000)).unwrap();
    let dracut = dir.join("fake-dracut");
    let fail = dir.join("dracut-fails");
    std::fs::write(
        &dracut,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --list-modules ]; then printf 'base\\nluna\\nnetwork-legacy\\n'; exit 0; fi\n\
             if [ -e {} ]; then echo dracut broke >&2; exit 3; fi\nfor a; do out=\"$a\"; done\necho initramfs > \"$out\"\n",
            fail.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&dracut, std::fs::Permissions::from_mode(0o755)).unwrap();
    (root, format!("dracut = \"{}\"", dracut.display()))
}

fn current_revision(s: &Server) -> Value {
    s.json(&["osimage", "show", "img"])["current_revision"].clone()
}

#[test]
fn osimage_pack_show_and_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let (root, dracut) = packable_image(dir.path());
    let s = Server::try_start_with(luna(), None, &dracut).unwrap_or_else(|e| panic!("{e}"));
    s.ok(&["osimage", "add", "img", "--path", root.to_str().unwrap()]);

    // No frontend address yet: nodes could not reach the tracker, so the pack is refused.
    let r = s.run(&["osimage", "pack", "img"]);
    assert_error(&r, &["frontend_address"]);
    assert!(current_revision(&s).is_null());

    s.ok(&["cluster", "change", "--frontend-address", "127.0.0.1"]);
    let r = s.run(&["osimage", "pack", "img"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, s.log());
    assert_eq!(r.stdout.trim(), "packed osimage img as revision 1");
    // stderr is not a terminal here: one line per step seen while polling (a small image
    // packs between two polls), ending with `done`.
    let steps = ["queued", "scanning", "archiving", "kernel", "initramfs", "torrent", "publishing", "done"];
    assert!(r.stderr.lines().all(|l| steps.contains(&l)), "{:?}", r.stderr);
    assert_eq!(r.stderr.lines().last(), Some("done"), "{:?}", r.stderr);
    assert_eq!(s.ok(&["osimage", "pack", "img", "--image-only"]).trim(), "packed osimage img as revision 2");
    assert_eq!(current_revision(&s), 2);

    let shown = s.ok(&["osimage", "show", "img"]);
    assert!(shown.contains("revisions:") && shown.contains("SEEDERS"), "{shown}");
    let rows: Vec<&str> = shown.lines().skip_while(|l| !l.starts_with("revisions:")).skip(2).collect();
    assert_eq!(rows.len(), 2, "{shown}");
    assert!(rows[0].trim_start().starts_with("1  ") && rows[1].trim_start().starts_with("2*"), "{shown}");
    assert!(rows[1].contains("6.1.0-99-amd64"), "{shown}");
    let json = s.json(&["osimage", "show", "img"]);
    let revs = json["revisions"].as_array().unwrap();
    assert_eq!(revs.len(), 2);
    assert_eq!(revs[1]["current"], true);
    assert!(revs[1]["urls"]["torrent"].as_str().unwrap().starts_with("/images/img/2/"), "{json}");
    assert_eq!(revs[0]["sha256"], revs[1]["sha256"], "the tree did not change, so neither did the archive");

    // A failing dracut fails the command with dracut's words and publishes nothing.
    std::fs::write(dir.path().join("dracut-fails"), b"").unwrap();
    let r = s.run(&["osimage", "pack", "img", "--boot-only"]);
    assert_eq!(r.code, 1, "{r:?}");
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: packing osimage img failed at step initramfs: "), "{r:?}");
    assert!(last.ends_with("dracut broke"), "{r:?}");
    assert_eq!(current_revision(&s), 2);
    std::fs::remove_file(dir.path().join("dracut-fails")).unwrap();

    assert_eq!(s.ok(&["osimage", "rollback", "img"]).trim(), "osimage img now boots revision 1");
    assert_eq!(current_revision(&s), 1);
    let r = s.run(&["osimage", "rollback", "img", "9"]);
    assert_error(&r, &["9"]);
    assert_eq!(current_revision(&s), 1);
    assert_eq!(s.ok(&["osimage", "rollback", "img", "2"]).trim(), "osimage img now boots revision 2");

    assert_error(&s.run(&["osimage", "pack", "nosuch"]), &["nosuch"]);
    assert_error(&s.run(&["osimage", "pack", "img", "--boot-only", "--image-only"]), &["--image-only"]);
    let started = s.ok(&["osimage", "pack", "img", "--no-wait"]);
    assert!(started.starts_with("started pack job ") && started.contains("img"), "{started}");
}

/// A TCP relay that records every byte in both directions: what a packet capture between the
/// CLI and the server would see, without needing root.
struct Relay {
    addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Relay {
    fn start(on: Ipv4Addr, to: std::net::SocketAddr) -> Relay {
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind((on, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rec = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(to) else { return };
                for (mut from, mut into) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let rec = rec.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = std::io::Read::read(&mut from, &mut buf) {
                            if n == 0 || into.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            rec.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        let _ = into.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Relay { addr, seen }
    }

    fn seen(&self) -> Vec<u8> {
        self.seen.lock().unwrap().clone()
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The admin API is HTTPS only: the CLI verifies the server against its CA, a CLI trusting
/// another CA fails naming the server and the CA file, the token and the bodies are not visible
/// on the wire, a plain-HTTP request to the API port gets no answer and the boot port refuses
/// the token; the keys are owner-only.
#[test]
fn the_api_is_https_only_verified_and_the_token_never_in_clear() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start(luna());
    let tls = s.dir.path().join("data/tls");
    let mode = |f: &str| std::fs::metadata(tls.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("server.key"), mode("ca.key")), (0o600, 0o600));
    assert_eq!(std::fs::metadata(&tls).unwrap().permissions().mode() & 0o777, 0o700);
    let token = std::fs::read_to_string(&s.token_file).unwrap().trim().to_string();
    let api: std::net::SocketAddr = s.url.trim_start_matches("https://").parse().unwrap();

    // Through a recording relay: works, and neither the token nor the request shows.
    let relay = Relay::start(Ipv4Addr::LOCALHOST, api);
    let via = format!("https://{}", relay.addr);
    let r = s.run_env(&["network", "add", "wiretap", "--cidr", "10.77.0.0/16"], &[("LUNA_SERVER", &via)]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = s.run_env(&["network", "show", "wiretap"], &[("LUNA_SERVER", &via)]);
    assert!(r.code == 0 && r.stdout.contains("10.77.0.0/16"), "{r:?}");
    let wire = relay.seen();
    assert!(wire.len() > 1000, "the relay saw {} bytes", wire.len());
    for clear in [token.as_bytes(), b"Bearer", b"wiretap", b"10.77.0.0", b"/api/v1"] {
        assert!(!contains(&wire, clear), "{:?} crossed the wire in clear", String::from_utf8_lossy(clear));
    }

    // A CLI that trusts another CA refuses the server, naming it and the CA file.
    let other_ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/assets/test-ca.pem");
    let r = s.run_env(&["network", "list"], &[("LUNA_CA", other_ca)]);
    assert_error(
        &r,
        &[&format!("cannot verify luna-server at {} against the CA in '{other_ca}'", s.url), "not signed by this CA"],
    );
    // The right CA but an address the certificate does not name (127.0.0.2 is loopback too).
    let elsewhere = Relay::start(Ipv4Addr::new(127, 0, 0, 2), api);
    let r = s.run_env(&["network", "list"], &[("LUNA_SERVER", &format!("https://{}", elsewhere.addr))]);
    assert_error(&r, &["cannot verify luna-server at https://127.0.0.2:", "not valid for this host name"]);

    // Plain HTTP to the API port: no HTTP answer, let alone the cluster.
    let mut plain = std::net::TcpStream::connect(api).unwrap();
    plain.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    // (The server may close the connection as soon as it sees no TLS, failing the write.)
    let _ = write!(plain, "GET /api/v1/cluster HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(!contains(&answer, b"HTTP/1.1 200") && !contains(&answer, b"\"name\""), "{answer:?}");

    // The boot port refuses the API and the token, saying where the API is.
    let r = s.run_env(&["network", "list"], &[("LUNA_SERVER", &s.boot_url)]);
    assert_error(&r, &["plain HTTP"]);
    let boot: std::net::SocketAddr = s.boot_url.trim_start_matches("http://").parse().unwrap();
    let mut plain = std::net::TcpStream::connect(boot).unwrap();
    write!(
        plain,
        "GET /api/v1/cluster HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut plain, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403") && answer.contains(&format!("port {}", api.port())), "{answer}");
    assert!(!answer.contains(&token), "{answer}");
}
