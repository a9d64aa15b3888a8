//! Issue 12, items 1-4, performed as an attacker would: the real luna-server in a namespace
//! (`Cluster`), the attacker in a second namespace on the provisioning bridge, and the node's
//! own boot (and a process on the booted node) in a third one with the node's address.
//! Privileged (`LUNA_TEST_PRIVILEGED=1`): namespaces, veths, a bridge. No VM: a few seconds.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use luna_tests::{privileged, Cluster, ClusterOptions, Netns};
use serde_json::{json, Value};

const SUBNET: &str = "10.83.0";
const MAC: &str = "52:54:00:83:00:01";
const BMC_PASSWORD: &str = "bmc-Secret-83";

/// A namespace on the cluster's bridge with `ip`.
fn join(c: &Cluster, veth: &str, ip: &str) -> Netns {
    let ns = Netns::new().expect("namespace");
    c.ns.add_veth(veth, &ns, "eth0").expect("veth");
    c.ns.set_master(veth, "br0").expect("bridge port");
    ns.add_addr("eth0", &format!("{ip}/24")).expect("address");
    ns
}

/// One HTTP request from inside `ns`: status and body.
fn http(ns: &Netns, method: &str, url: &str, body: Option<&Value>) -> (u16, String) {
    let mut cmd = ns.command("curl");
    cmd.args(["-sS", "--max-time", "20", "-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data"]).arg(b.to_string());
    }
    let out = cmd.arg(url).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or_else(|_| panic!("curl {url}: {text} {}", String::from_utf8_lossy(&out.stderr))),
        body.into(),
    )
}

fn token_of(script: &str) -> Option<String> {
    Some(script.split("luna.token=").nth(1)?.split_whitespace().next()?.to_string())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

#[test]
fn boot_credentials_go_only_to_the_nodes_own_boot_once() {
    if !privileged() {
        return;
    }
    let mut c = Cluster::start(ClusterOptions { subnet: SUBNET.into(), seed: false, ..ClusterOptions::default() })
        .expect("start luna-server in a namespace");
    let server = c.server_ip();
    c.api(
        "POST",
        "/api/v1/network",
        Some(&json!({"name": "prov", "cidr": format!("{SUBNET}.0/24"), "gateway": server})),
    )
    .unwrap();
    c.api(
        "POST",
        "/api/v1/bmcsetup",
        Some(&json!({"name": "base", "user": "admin", "password": BMC_PASSWORD, "userid": 3})),
    )
    .unwrap();
    c.api("POST", "/api/v1/osimage", Some(&json!({"name": "img", "path": c.dir().join("img")}))).unwrap();
    // A published revision as `luna osimage pack` records it (the files are not fetched here).
    let rev = json!({"revisions": [{"id": 1, "created": 1, "kernel_version": "6.1.0", "archive": "img.tar.zst",
        "archive_size": 10, "sha256": "ab", "kernel": "vmlinuz", "initrd": "initrd.img", "torrent": "img.torrent",
        "info_hash": "cd"}], "current_revision": 1});
    c.api("PATCH", "/api/v1/osimage/img", Some(&rev)).unwrap();
    c.api(
        "POST",
        "/api/v1/group",
        Some(&json!({"name": "compute", "osimage": "img", "bmcsetup": "base",
            "interfaces": [{"name": "BOOTIF", "network": "prov"}]})),
    )
    .unwrap();
    c.api("POST", "/api/v1/node", Some(&json!({"name": "node001", "group": "compute", "mac": MAC, "setupbmc": true})))
        .unwrap();
    c.api("POST", "/api/v1/node", Some(&json!({"name": "node002", "group": "compute", "setupbmc": true}))).unwrap();
    let node_ip = c.node("node001").unwrap()["interfaces"][0]["ip"].as_str().unwrap().to_string();

    let attacker = join(&c, "atk0", &format!("{SUBNET}.200"));
    let node = join(&c, "nod0", &node_ip);
    let url = c.url();
    let mut seen_by_attacker = String::new();
    let mut attack = |method: &str, path: &str, body: Option<&Value>| {
        let (code, text) = http(&attacker, method, &format!("{url}{path}"), body);
        seen_by_attacker.push_str(&text);
        (code, text)
    };

    // 1. Knowing the MAC is not enough: from another address the script carries no token.
    let (code, script) = attack("GET", &format!("/boot/ipxe?mac={MAC}"), None);
    assert_eq!(code, 200);
    assert!(token_of(&script).is_none() && script.contains("boot refused"), "{script}");
    assert!(!script.contains("node001") && !script.contains(&node_ip), "the refusal names nothing: {script}");
    let (code, _) = attack("GET", "/boot/plan?node=node001", None);
    assert_eq!(code, 403);

    // The node's own boot gets its token, and the plan with the BMC password, once.
    let (code, script) = http(&node, "GET", &format!("{url}/boot/ipxe?mac={MAC}"), None);
    assert_eq!(code, 200, "{script}");
    let token = token_of(&script).unwrap_or_else(|| panic!("no token for the node's own request: {script}"));
    let plan_path = format!("/boot/plan?node=node001&token={token}");
    // A token copied off the wire is worthless from another address.
    let (code, _) = attack("GET", &plan_path, None);
    assert_eq!(code, 403);
    let (code, _) = attack("POST", &format!("/boot/status?node=node001&token={token}"), Some(&json!({"step": "x"})));
    assert_eq!(code, 403);
    // A `+`- or `0`-prefixed issue time is not the same token.
    for bad in [format!("%2B{token}"), format!("0{token}")] {
        let (code, _) = http(&node, "GET", &format!("{url}/boot/plan?node=node001&token={bad}"), None);
        assert_eq!(code, 403, "{bad}");
    }
    let (code, plan) = http(&node, "GET", &format!("{url}{plan_path}"), None);
    assert_eq!(code, 200, "{plan}");
    let plan: Value = serde_json::from_str(&plan).unwrap();
    assert_eq!(plan["bmc"]["password"], BMC_PASSWORD);
    let (code, _) = http(&node, "GET", &format!("{url}{plan_path}"), None);
    assert_eq!(code, 403, "the plan goes once");

    // 3. A process on the booted node: its address alone unlocks nothing, and the token it
    // reads from /proc/cmdline is spent once the agent reported `installed`.
    let (code, _) = http(&node, "GET", &format!("{url}/boot/plan?node=node001"), None);
    assert_eq!(code, 403);
    let status = format!("{url}/boot/status?node=node001&token={token}");
    for step in ["download", "installed"] {
        let (code, text) = http(&node, "POST", &status, Some(&json!({"step": step})));
        assert_eq!(code, 204, "{step}: {text}");
    }
    let (code, _) = http(&node, "POST", &status, Some(&json!({"step": "download"})));
    assert_eq!(code, 403, "a spent token reports nothing but booted");
    let (code, _) = http(&node, "GET", &format!("{url}{plan_path}"), None);
    assert_eq!(code, 403);
    let (code, text) = http(&node, "POST", &status, Some(&json!({"step": "booted"})));
    assert_eq!(code, 204, "{text}");
    assert_eq!(c.node("node001").unwrap()["status"]["step"], "booted");

    // 2. Binding a MAC to an unbound node: refused while discovery is off, and with discovery
    // on from an address DHCP did not lease to that MAC.
    let bind = "/boot/ipxe/bind?mac=52:54:00:83:00:66&node=node002";
    let (_, script) = attack("GET", bind, None);
    assert!(script.contains("discovery is off"), "{script}");
    c.api("PATCH", "/api/v1/cluster", Some(&json!({"dhcp_range": format!("{SUBNET}.100-{SUBNET}.150")}))).unwrap();
    let (_, script) = attack("GET", bind, None);
    assert!(script.contains("does not come from the address DHCP leased"), "{script}");
    assert_eq!(c.node("node002").unwrap()["mac"], Value::Null, "nothing was bound");

    assert!(!seen_by_attacker.contains(BMC_PASSWORD), "the attacker saw the BMC password");
    let log = c.server_log();
    assert!(!log.contains(BMC_PASSWORD), "the BMC password reached the log");
    assert!(log.contains("boot script refused") && log.contains("boot menu binding refused"), "refusals are logged");

    // 4. Files: the data directory and the database (with WAL and shm) are owner-only, and
    // loose permissions left by an older version are tightened at start-up.
    let (dir, data) = (c.dir().to_path_buf(), c.dir().join("data"));
    let db = dir.join("luna.db");
    let wal = dir.join("luna.db-wal");
    let shm = dir.join("luna.db-shm");
    assert_eq!((mode(&data), mode(&db), mode(&wal), mode(&shm)), (0o700, 0o600, 0o600, 0o600));
    for (p, m) in [(&data, 0o755), (&db, 0o644), (&wal, 0o644)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    c.restart(false).unwrap();
    assert_eq!((mode(&data), mode(&db), mode(&wal)), (0o700, 0o600, 0o600));
    assert!(c.server_log().contains("tightened"), "the fix is logged");
    // The ledger is in the store: after the restart the spent token still fetches no plan.
    let (code, _) = http(&node, "GET", &format!("{url}{plan_path}"), None);
    assert_eq!(code, 403);
}
