//! The HTTP boot path in-process: iPXE scripts, the discovery menu, binding, kernel ranges,
//! install plans and status reports.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::Router;
use luna_core::model::Kind;
use luna_server::api::router;
use luna_server::boot::{self, BootContext, BootTokens};
use luna_server::http::AppState;
use luna_server::service::{unix_now, Service};
use serde_json::{json, Value};
use tower::ServiceExt;

const TOKEN: &str = "admin-token";

struct Env {
    app: Router,
    service: Service,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    env_on(luna_server::store::open("sqlite://:memory:").await.unwrap(), true).await
}

/// A boot server on `store`; `seed`: the first one, which creates the cluster's objects (a
/// second server on the same store finds them there).
async fn env_on(store: Arc<dyn luna_server::store::Store>, seed: bool) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let service = Service::new(store);
    service.ensure_cluster("test").await.unwrap();
    let boot = BootContext::new(BootTokens::new(TOKEN.as_bytes()), dir.path().to_path_buf());
    let state = Arc::new(AppState::new(service.clone(), TOKEN.into()));
    let app = router(state.clone()).merge(boot::router(state, boot));
    let e = Env { app, service, _dir: dir };
    // A published revision, as `luna osimage pack` leaves it (every server holds its files).
    let rev_dir = e._dir.path().join("images/compute/1");
    std::fs::create_dir_all(&rev_dir).unwrap();
    std::fs::write(rev_dir.join("vmlinuz"), (0..=255u8).cycle().take(10_000).collect::<Vec<u8>>()).unwrap();
    std::fs::write(rev_dir.join("initrd.img"), b"initrd").unwrap();
    if !seed {
        return e;
    }
    // Nodes reach the boot port at this address (their requests' Host says so too); an admin
    // preview, which comes over the API's port, is rendered with it.
    e.service.update(Kind::Cluster, "", json!({"frontend_address": "10.141.255.254"})).await.unwrap();
    for (path, body) in [
        (
            "/network",
            json!({"name": "cluster", "cidr": "10.141.0.0/16", "gateway": "10.141.255.254", "dns_server": "10.141.255.254"}),
        ),
        ("/osimage", json!({"name": "compute", "path": "/images/compute", "kernel_opts": "console=ttyS0"})),
        (
            "/group",
            json!({"name": "compute", "osimage": "compute", "interfaces": [{"name": "BOOTIF", "network": "cluster"}]}),
        ),
    ] {
        let (s, v) = e.call("POST", &format!("/api/v1{path}"), Some(body), true, None).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let patch = json!({"revisions": [{"id": 1, "created": 1, "kernel_version": "6.1.0-1-amd64", "archive": "compute.tar.zst",
        "archive_size": 10, "sha256": "ab", "kernel": "vmlinuz", "initrd": "initrd.img", "torrent": "compute.torrent",
        "info_hash": "cd"}], "current_revision": 1});
    let (s, v) = e.call("PATCH", "/api/v1/osimage/compute", Some(patch), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    e
}

impl Env {
    /// An admin adds `name` to group compute with `mac`.
    async fn add_node(&self, name: &str, mac: &str) {
        let node = json!({"name": name, "group": "compute", "mac": mac});
        let (s, v) = self.call("POST", "/api/v1/node", Some(node), true, None).await;
        assert_eq!(s, StatusCode::CREATED, "add {name}: {v}");
    }

    /// The node's token, as its iPXE gets it: the script fetched from the node's own address.
    async fn token(&self, mac: &str, from: &str) -> String {
        let (s, script) = self.raw("GET", &format!("/boot/ipxe?mac={mac}"), None, false, Some(from), None).await;
        assert_eq!(s, StatusCode::OK);
        let token = script.split("luna.token=").nth(1).unwrap_or_else(|| panic!("no token in {script}"));
        token.split_whitespace().next().unwrap().to_string()
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        admin: bool,
        from: Option<&str>,
    ) -> (StatusCode, Value) {
        let (s, text) = self.raw(method, path, body, admin, from, None).await;
        (s, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        admin: bool,
        from: Option<&str>,
        range: Option<&str>,
    ) -> (StatusCode, String) {
        let mut req = Request::builder().method(method).uri(path).header("host", "10.141.255.254:7050");
        if admin {
            req = req.header("authorization", format!("Bearer {TOKEN}"));
        }
        if let Some(r) = range {
            req = req.header("range", r);
        }
        let mut req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())).unwrap(),
            None => req.body(Body::empty()).unwrap(),
        };
        let from: SocketAddr = format!("{}:5000", from.unwrap_or("10.141.200.1")).parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(from));
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[tokio::test]
async fn known_node_gets_its_kernel_command_line() {
    let e = env().await;
    e.add_node("node001", "52:54:00:00:00:01").await;
    let (s, script) = e.raw("GET", "/boot/ipxe?mac=52:54:00:00:00:01", None, false, Some("10.141.0.1"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    assert!(script.contains("kernel http://10.141.255.254:7050/boot/node/node001/kernel "), "{script}");
    for needle in [
        "root=luna",
        "luna.url=http://10.141.255.254:7050",
        "luna.node=node001",
        "luna.mac=52:54:00:00:00:01",
        "ip=10.141.0.1::10.141.255.254:255.255.0.0:node001",
        "console=ttyS0",
        "luna.token=",
    ] {
        assert!(script.contains(needle), "{needle} missing in {script}");
    }
    wait_for_step(&e.service, "node001", "ipxe").await;

    // The admin preview is the same script without touching the status.
    e.service.set_node_status("node001", "booted", None, None).await.unwrap();
    let (s, preview) = e.raw("GET", "/boot/ipxe?mac=52:54:00:00:00:01&preview=1", None, true, None, None).await;
    assert_eq!(s, StatusCode::OK);
    let strip = |t: &str| t.lines().map(|l| l.split(" luna.token=").next().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(strip(&preview), strip(&script));
    assert!(preview.contains("luna.token=PER-BOOT-TOKEN"), "a preview carries no real token: {preview}");
    assert_eq!(e.service.node("node001").await.unwrap().status.unwrap().step, "booted");
    let (s, _) = e.raw("GET", "/boot/ipxe?mac=52:54:00:00:00:01&preview=1", None, false, None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    e.call("PATCH", "/api/v1/node/node001", Some(json!({"localboot": true})), true, None).await;
    let (_, script) = e.raw("GET", "/boot/ipxe?mac=52:54:00:00:00:01", None, false, Some("10.141.0.1"), None).await;
    assert!(script.contains("exit") && !script.contains("kernel http"), "{script}");
    e.call("PATCH", "/api/v1/node/node001", Some(json!({"localboot": false, "service": true})), true, None).await;
    let (_, script) = e.raw("GET", "/boot/ipxe?mac=52:54:00:00:00:01", None, false, Some("10.141.0.1"), None).await;
    assert!(script.contains("luna.service=1"), "{script}");

    // From any other address the MAC gets no script and no token.
    let (s, script) = e.raw("GET", "/boot/ipxe?mac=52:54:00:00:00:01", None, false, Some("10.141.0.9"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(script.contains("boot refused") && !script.contains("luna.token"), "{script}");
    assert!(!script.contains("node001") && !script.contains("10.141.0.1"), "names nothing: {script}");
}

#[tokio::test]
async fn unknown_mac_gets_the_menu_and_can_bind() {
    let e = env().await;
    e.call("POST", "/api/v1/node", Some(json!({"name": "node[001-002]", "group": "compute"})), true, None).await;
    e.add_node("node003", "52:54:00:00:00:03").await;
    let (s, menu) = e.raw("GET", "/boot/ipxe?mac=52:54:00:00:00:99", None, false, None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(menu.contains("menu ") && menu.contains("node001") && menu.contains("node002"), "{menu}");
    assert!(!menu.contains("node003"), "nodes with a MAC are not offered: {menu}");

    let bind = |mac: &'static str, node: &'static str, from: &'static str| {
        let e = &e;
        async move {
            let path = format!("/boot/ipxe/bind?mac={mac}&node={node}");
            e.raw("GET", &path, None, false, Some(from), None).await.1
        }
    };
    // Discovery off (no dhcp_range): nobody binds anything.
    let script = bind("52:54:00:00:00:99", "node002", "10.141.200.1").await;
    assert!(script.contains("discovery is off"), "{script}");
    assert!(e.service.node("node002").await.unwrap().mac.is_none());

    let (s, v) =
        e.call("PATCH", "/api/v1/cluster", Some(json!({"dhcp_range": "10.141.200.1-10.141.200.50"})), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Discovery on, but the request does not come from the address DHCP leased to that MAC.
    lease(&e.service, "52:54:00:00:00:99", "10.141.200.1").await;
    let script = bind("52:54:00:00:00:99", "node002", "10.141.200.2").await;
    assert!(script.contains("does not come from the address DHCP leased"), "{script}");
    let script = bind("52:54:00:00:00:98", "node002", "10.141.200.1").await;
    assert!(script.contains("does not come from the address DHCP leased"), "{script}");
    assert!(e.service.node("node002").await.unwrap().mac.is_none());

    // The machine itself binds: it is told to DHCP again, with no token yet.
    let script = bind("52:54:00:00:00:99", "node002", "10.141.200.1").await;
    assert!(script.contains("dhcp ") && script.contains("/boot/ipxe?mac="), "{script}");
    assert!(!script.contains("luna.token"), "{script}");
    assert_eq!(e.service.node("node002").await.unwrap().mac.unwrap().to_string(), "52:54:00:00:00:99");
    // Binding a node that already has a MAC is refused, and changes nothing.
    lease(&e.service, "52:54:00:00:00:98", "10.141.200.3").await;
    let script = bind("52:54:00:00:00:98", "node003", "10.141.200.3").await;
    assert!(script.contains("already has mac 52:54:00:00:00:03"), "{script}");
    assert_eq!(e.service.node("node003").await.unwrap().mac.unwrap().to_string(), "52:54:00:00:00:03");
    // With its own address now, node002 gets its script and token.
    let token = e.token("52:54:00:00:00:99", "10.141.0.2").await;
    assert!(!token.is_empty());
}

/// A bound DHCP lease of `ip` to `mac`, as the DHCP server writes it.
async fn lease(service: &Service, mac: &str, ip: &str) {
    use luna_server::dhcp::lease::{Lease, LeaseState};
    use luna_server::store::{Collection, Expect, Write};
    let l = Lease {
        mac: mac.parse().unwrap(),
        ip: ip.parse().unwrap(),
        network: "cluster".into(),
        expires: unix_now() + 3600,
        state: LeaseState::Bound,
        hostname: None,
    };
    let w = Write::Put {
        collection: Collection::Lease,
        key: Lease::ip_key(l.ip),
        expect: Expect::Absent,
        doc: l.to_value(),
    };
    service.store().commit(vec![w]).await.unwrap();
}

#[tokio::test]
async fn kernel_is_served_with_ranges() {
    let e = env().await;
    e.add_node("node001", "52:54:00:00:00:01").await;
    let (s, body) = e.raw("GET", "/boot/node/node001/kernel", None, false, None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body.len(), String::from_utf8_lossy(&(0..=255u8).cycle().take(10_000).collect::<Vec<u8>>()).len());
    wait_for_step(&e.service, "node001", "kernel").await;
    let (s, body) = e.raw("GET", "/boot/node/node001/initrd", None, false, None, Some("bytes=2-4")).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, "itr");
    let (s, _) = e.raw("GET", "/boot/node/node001/passwd", None, false, None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn only_the_node_itself_gets_its_plan() {
    let e = env().await;
    e.add_node("node001", "52:54:00:00:00:01").await;
    // The node's own address alone unlocks nothing.
    let (s, _) = e.call("GET", "/boot/plan?node=node001", None, false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = e.call("GET", "/boot/plan?node=node001&token=1.abc", None, false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let token = e.token("52:54:00:00:00:01", "10.141.0.1").await;
    let plan_path = format!("/boot/plan?node=node001&token={token}");
    // Not from another address, not for another node.
    let (s, _) = e.call("GET", &plan_path, None, false, Some("10.141.0.9")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) =
        e.call("GET", &format!("/boot/plan?node=node002&token={token}"), None, false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // A +- or 0-prefixed issue time is not the token.
    for bad in [format!("+{token}"), format!("0{token}")] {
        let (s, _) =
            e.call("GET", &format!("/boot/plan?node=node001&token={bad}"), None, false, Some("10.141.0.1")).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{bad}");
    }
    let (s, v) = e.call("GET", &plan_path, None, false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["hostname"], "node001");
    assert_eq!(v["interfaces"][0]["ip"], "10.141.0.1");
    assert_eq!(v["interfaces"][0]["prefix"], 16);
    assert_eq!(v["image"]["http_url"], "http://10.141.255.254:7050/images/compute/1/compute.tar.zst");
    // Once.
    let (s, _) = e.call("GET", &plan_path, None, false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let status = format!("/boot/status?node=node001&token={token}");
    let report = json!({"step": "download", "progress": 42, "message": "swarm"});
    let (s, v) = e.call("POST", &status, Some(report.clone()), false, Some("10.141.0.9")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = e.call("POST", &status, Some(report), false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let st = e.service.node("node001").await.unwrap().status.unwrap();
    assert_eq!((st.step.as_str(), st.progress), ("download", Some(42)));
    let (s, _) = e.call("POST", &status, Some(json!({"step": "x", "progress": 101})), false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // `installed` spends the token: afterwards it reports `booted` and nothing else.
    let (s, _) = e.call("POST", &status, Some(json!({"step": "installed"})), false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = e.call("POST", &status, Some(json!({"step": "download"})), false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = e.call("GET", &plan_path, None, false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = e.call("POST", &status, Some(json!({"step": "booted"})), false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(e.service.node("node001").await.unwrap().status.unwrap().step, "booted");
}

#[tokio::test]
async fn the_plan_carries_the_bmc_only_for_setupbmc_nodes() {
    let e = env().await;
    for (path, body) in [
        ("/network", json!({"name": "ipmi", "cidr": "10.148.0.0/16", "gateway": "10.148.255.254"})),
        ("/bmcsetup", json!({"name": "base", "user": "admin", "password": "s3cret", "userid": 3})),
    ] {
        let (s, v) = e.call("POST", &format!("/api/v1{path}"), Some(body), true, None).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let patch = json!({"bmcsetup": "base", "interfaces": [{"name": "BOOTIF", "network": "cluster"}, {"name": "BMC", "network": "ipmi"}]});
    let (s, v) = e.call("PATCH", "/api/v1/group/compute", Some(patch), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for (name, mac, setupbmc) in [("node001", "52:54:00:00:00:01", true), ("node002", "52:54:00:00:00:02", false)] {
        let node = json!({"name": name, "group": "compute", "mac": mac, "setupbmc": setupbmc});
        let (s, v) = e.call("POST", "/api/v1/node", Some(node), true, None).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let token = e.token("52:54:00:00:00:01", "10.141.0.1").await;
    let (s, v) =
        e.call("GET", &format!("/boot/plan?node=node001&token={token}"), None, false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["setupbmc"], true);
    let bmc = &v["bmc"];
    assert_eq!(
        (&bmc["userid"], &bmc["user"], &bmc["password"], &bmc["ip"], &bmc["prefix"], &bmc["gateway"]),
        (&json!(3), &json!("admin"), &json!("s3cret"), &json!("10.148.0.1"), &json!(16), &json!("10.148.255.254"))
    );
    // The BMC interface is not one the node's OS configures.
    assert!(v["interfaces"].as_array().unwrap().iter().all(|i| i["name"] != "BMC"), "{v}");
    let token = e.token("52:54:00:00:00:02", "10.141.0.2").await;
    let (s, v) =
        e.call("GET", &format!("/boot/plan?node=node002&token={token}"), None, false, Some("10.141.0.2")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((&v["setupbmc"], &v["bmc"]), (&json!(false), &Value::Null), "no password for nodes not asked");
}

#[tokio::test]
async fn per_node_bmc_passwords_are_generated_once_and_kept_secret() {
    let e = env().await;
    let bmc = json!({"name": "base", "user": "admin", "per_node_password": true});
    let (s, v) = e.call("POST", "/api/v1/bmcsetup", Some(bmc), true, None).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = e.call("PATCH", "/api/v1/group/compute", Some(json!({"bmcsetup": "base"})), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for (name, mac) in [("node001", "52:54:00:00:00:01"), ("node002", "52:54:00:00:00:02")] {
        let node = json!({"name": name, "group": "compute", "mac": mac, "setupbmc": true});
        let (s, v) = e.call("POST", "/api/v1/node", Some(node), true, None).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let plan = |mac: &'static str, name: &'static str, ip: &'static str| {
        let e = &e;
        async move {
            let token = e.token(mac, ip).await;
            let (s, v) = e.call("GET", &format!("/boot/plan?node={name}&token={token}"), None, false, Some(ip)).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["bmc"]["password"].as_str().unwrap().to_string()
        }
    };
    let p1 = plan("52:54:00:00:00:01", "node001", "10.141.0.1").await;
    let p2 = plan("52:54:00:00:00:02", "node002", "10.141.0.2").await;
    assert_eq!((p1.len(), p2.len()), (16, 16));
    assert_ne!(p1, p2, "each node has its own");
    assert!(p1.chars().all(|c| c.is_ascii_alphanumeric()), "{p1}");
    // Kept: the next boot gets the same one; shown only with ?secrets=1.
    assert_eq!(plan("52:54:00:00:00:01", "node001", "10.141.0.1").await, p1);
    let (_, v) = e.call("GET", "/api/v1/node/node001", None, true, None).await;
    assert_eq!(v["bmc_password"], "********");
    let (_, v) = e.call("GET", "/api/v1/node/node001?secrets=1", None, true, None).await;
    assert_eq!(v["bmc_password"], p1);
    // Not settable through the API.
    let (s, _) = e.call("PATCH", "/api/v1/node/node001", Some(json!({"bmc_password": "mine"})), true, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// Boot-path steps are recorded without the answer waiting for them (`status.rs`): the store
/// has them within about one group-commit round.
async fn wait_for_step(service: &luna_server::service::Service, node: &str, step: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let st = service.node(node).await.unwrap().status;
        if st.as_ref().is_some_and(|s| s.step == step) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "node {node} status is {st:?}, not step {step}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The agent's path from its boot script to `installed`.
async fn install(e: &Env, node: &str, mac: &str, ip: &str) {
    let token = e.token(mac, ip).await;
    let (s, v) = e.call("GET", &format!("/boot/plan?node={node}&token={token}"), None, false, Some(ip)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let status = format!("/boot/status?node={node}&token={token}");
    let (s, v) = e.call("POST", &status, Some(json!({"step": "installed"})), false, Some(ip)).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
}

/// `root = disk` (the group's, else the osimage's): the agent's `installed` sets `localboot`,
/// so the node's next script boots its disk; a tmpfs node is left alone; clearing the flag
/// (what `luna node reinstall` does first) brings the install script back.
#[tokio::test]
async fn installed_on_disk_boots_locally_until_reinstalled() {
    let e = env().await;
    e.add_node("node001", "52:54:00:00:00:01").await;
    e.add_node("node002", "52:54:00:00:00:02").await;
    // tmpfs (the default): installed changes no flag.
    install(&e, "node001", "52:54:00:00:00:01", "10.141.0.1").await;
    assert!(!e.service.node("node001").await.unwrap().localboot);

    // The group says disk: the plan says so and installed sets localboot.
    let (s, v) = e.call("PATCH", "/api/v1/group/compute", Some(json!({"root": "disk"})), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let token = e.token("52:54:00:00:00:02", "10.141.0.2").await;
    let (s, plan) =
        e.call("GET", &format!("/boot/plan?node=node002&token={token}"), None, false, Some("10.141.0.2")).await;
    assert_eq!((s, plan["root"].as_str()), (StatusCode::OK, Some("disk")), "{plan}");
    let status = format!("/boot/status?node=node002&token={token}");
    let (s, _) = e.call("POST", &status, Some(json!({"step": "bootloader"})), false, Some("10.141.0.2")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!e.service.node("node002").await.unwrap().localboot, "only installed sets it");
    let (s, _) = e
        .call("POST", &status, Some(json!({"step": "installed", "message": "on disk"})), false, Some("10.141.0.2"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let n = e.service.node("node002").await.unwrap();
    assert!(n.localboot);
    assert_eq!(
        n.status.as_ref().map(|s| (s.step.as_str(), s.message.as_deref())),
        Some(("installed", Some("on disk")))
    );
    let (s, script) = e.raw("GET", "/boot/ipxe?mac=52:54:00:00:00:02", None, false, Some("10.141.0.2"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(script.contains("sanboot --no-describe --drive 0x80") && script.contains("\nexit 1\n"), "{script}");
    assert!(!script.contains("luna.token="), "{script}");
    // The booted OS still reports booted with its (first boot's) token; the flag stays.
    let (s, _) = e.call("POST", &status, Some(json!({"step": "booted"})), false, Some("10.141.0.2")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(e.service.node("node002").await.unwrap().localboot);

    // luna node reinstall's first request: the install script is back.
    let (s, v) = e.call("PATCH", "/api/v1/node/node[001-002]", Some(json!({"localboot": false})), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, script) = e.raw("GET", "/boot/ipxe?mac=52:54:00:00:00:02", None, false, Some("10.141.0.2"), None).await;
    assert!(script.contains("root=luna") && script.contains("luna.token="), "{script}");
    // The osimage's root counts when the group inherits it.
    let (s, v) = e.call("PATCH", "/api/v1/group/compute", Some(json!({"root": null})), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = e.call("PATCH", "/api/v1/osimage/compute", Some(json!({"root": "disk"})), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    install(&e, "node001", "52:54:00:00:00:01", "10.141.0.1").await;
    assert!(e.service.node("node001").await.unwrap().localboot);
}

#[tokio::test]
async fn nocloud_data_goes_only_to_the_node_itself() {
    let e = env().await;
    let patch = json!({"ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdmin admin@head"]});
    let (s, v) = e.call("PATCH", "/api/v1/cluster", Some(patch), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) =
        e.call("PATCH", "/api/v1/cluster", Some(json!({"ssh_authorized_keys": ["not a key"]})), true, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("ssh key"), "{v}");
    e.add_node("node001", "52:54:00:00:00:01").await;
    e.add_node("node002", "52:54:00:00:00:02").await;
    let a = e.token("52:54:00:00:00:01", "10.141.0.1").await;
    let b = e.token("52:54:00:00:00:02", "10.141.0.2").await;

    let get = |node: &str, file: &str, token: &str| format!("/boot/nocloud/{file}?node={node}&token={token}");
    let (s, meta) = e.raw("GET", &get("node001", "meta-data", &a), None, false, Some("10.141.0.1"), None).await;
    assert_eq!(s, StatusCode::OK, "{meta}");
    assert!(
        meta.contains("local-hostname: \"node001\"") && meta.contains("instance-id: \"luna-node001-compute-1\""),
        "{meta}"
    );
    assert!(meta.contains("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdmin admin@head"), "{meta}");
    let (s, net) = e.raw("GET", &get("node001", "network-config", &a), None, false, Some("10.141.0.1"), None).await;
    assert_eq!(s, StatusCode::OK, "{net}");
    assert!(net.contains("macaddress: \"52:54:00:00:00:01\"") && net.contains("- \"10.141.0.1/16\""), "{net}");
    assert!(net.contains("via: \"10.141.255.254\""), "{net}");
    let (s, user) = e.raw("GET", &get("node001", "user-data", &a), None, false, Some("10.141.0.1"), None).await;
    assert_eq!(s, StatusCode::OK, "{user}");
    assert!(user.starts_with("#cloud-config\n") && user.contains("hostname: \"node001\""), "{user}");

    // Node A's token does not read node B's data: not with B's name, not from B's address.
    for (node, token, from) in
        [("node002", &a, "10.141.0.1"), ("node002", &a, "10.141.0.2"), ("node001", &b, "10.141.0.2")]
    {
        for file in ["meta-data", "user-data", "network-config"] {
            let (s, body) = e.raw("GET", &get(node, file, token), None, false, Some(from), None).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{node} {file} from {from}: {body}");
            assert!(!body.contains("10.141.0.") && !body.contains("hostname"), "{body}");
        }
    }
    // No token, another address, an unknown file.
    let (s, _) = e.raw("GET", "/boot/nocloud/meta-data?node=node001", None, false, Some("10.141.0.1"), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = e.raw("GET", &get("node001", "meta-data", &a), None, false, Some("10.141.0.9"), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, body) = e.raw("GET", &get("node001", "vendor-data", &a), None, false, Some("10.141.0.1"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");

    // The group's own user-data is served as it is.
    let (s, v) = e
        .call(
            "PATCH",
            "/api/v1/group/compute",
            Some(json!({"cloudinit_userdata": "#cloud-config\nruncmd: [true]\n"})),
            true,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, user) = e.raw("GET", &get("node001", "user-data", &a), None, false, Some("10.141.0.1"), None).await;
    assert_eq!(user, "#cloud-config\nruncmd: [true]\n");

    // Once the node is installed its token reads nothing more.
    let status = format!("/boot/status?node=node001&token={a}");
    let (s, _) = e.call("POST", &status, Some(json!({"step": "installed"})), false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = e.raw("GET", &get("node001", "meta-data", &a), None, false, Some("10.141.0.1"), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn overlay_nodes_get_the_squashfs_or_a_clear_error() {
    let e = env().await;
    e.add_node("node001", "52:54:00:00:00:01").await;
    e.add_node("node002", "52:54:00:00:00:02").await;
    let (s, v) = e.call("PATCH", "/api/v1/group/compute", Some(json!({"root": "overlay"})), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Revision 1 was packed without a squashfs: the plan says what to do.
    let token = e.token("52:54:00:00:00:01", "10.141.0.1").await;
    let plan = format!("/boot/plan?node=node001&token={token}");
    let (s, v) = e.call("GET", &plan, None, false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v.to_string().contains("has no squashfs for root mode overlay")
            && v.to_string().contains("luna osimage pack compute"),
        "{v}"
    );
    // A revision with one: the plan's image is the squashfs.
    let patch = json!({"revisions": [{"id": 1, "created": 1, "kernel_version": "6.1.0-1-amd64", "archive": "compute.tar.zst",
        "archive_size": 10, "sha256": "ab", "kernel": "vmlinuz", "initrd": "initrd.img", "torrent": "compute.torrent",
        "info_hash": "cd", "squashfs": {"file": "compute.squashfs", "size": 4096, "sha256": "ef", "torrent": "compute.squashfs.torrent",
        "info_hash": "01", "piece_length": 262144}}], "current_revision": 1});
    let (s, v) = e.call("PATCH", "/api/v1/osimage/compute", Some(patch), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = e.call("GET", &plan, None, false, Some("10.141.0.1")).await;
    assert_eq!(s, StatusCode::OK, "the failed plan did not spend the token: {v}");
    assert_eq!(v["root"], "overlay");
    assert_eq!(v["image"]["http_url"], "http://10.141.255.254:7050/images/compute/1/compute.squashfs");
    assert_eq!(v["image"]["torrent_url"], "http://10.141.255.254:7050/images/compute/1/compute.squashfs.torrent");
    assert_eq!(
        (&v["image"]["sha256"], &v["image"]["size"], &v["image"]["info_hash"]),
        (&json!("ef"), &json!(4096), &json!("01"))
    );
    // tmpfs nodes of the same revision still get the archive.
    let (s, v) = e.call("PATCH", "/api/v1/group/compute", Some(json!({"root": null})), true, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let token = e.token("52:54:00:00:00:02", "10.141.0.2").await;
    let (s, v) =
        e.call("GET", &format!("/boot/plan?node=node002&token={token}"), None, false, Some("10.141.0.2")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((&v["root"], &v["image"]["sha256"]), (&json!("tmpfs"), &json!("ab")));
}

/// Two boot servers on one MongoDB-wire store (nx-27017 as a one-member replica set, each
/// server with its own connection): the token ledger is in the store, so a token server A put
/// into a node's script fetches the plan from B and reports to B, and every refusal holds
/// across the two (the plan once, only from the node's address, only for that node, nothing
/// after `installed` but `booted`, a superseded token nothing). `LUNA_TEST_MONGO=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_minted_on_one_server_is_honoured_and_policed_by_another() {
    use luna_server::store::conformance::{mongo_gate, unique_db_name, NxServer};
    let Some(bin) = mongo_gate() else { return };
    let nx = NxServer::start(&bin).await.expect("nx-27017 starts");
    let url = nx.url(&unique_db_name("tokens"));
    let a = env_on(luna_server::store::open(&url).await.expect("store a"), true).await;
    let b = env_on(luna_server::store::open(&url).await.expect("store b"), false).await;
    a.add_node("node001", "52:54:00:00:00:01").await;
    a.add_node("node002", "52:54:00:00:00:02").await;
    let (ip, elsewhere) = ("10.141.0.1", "10.141.0.9");

    let token = a.token("52:54:00:00:00:01", ip).await;
    let plan_path = format!("/boot/plan?node=node001&token={token}");
    // Not from another address, not for another node, on either server.
    for e in [&a, &b] {
        let (s, _) = e.call("GET", &plan_path, None, false, Some(elsewhere)).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, _) = e.call("GET", &format!("/boot/plan?node=node002&token={token}"), None, false, Some(ip)).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
    }
    // A is gone: B hands the plan out, once, and A (back) does not hand it out again.
    let (s, v) = b.call("GET", &plan_path, None, false, Some(ip)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["hostname"], "node001");
    for e in [&a, &b] {
        let (s, _) = e.call("GET", &plan_path, None, false, Some(ip)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "the plan goes once");
    }
    // Reports go to B; `installed` there spends the token on A as well.
    let status = format!("/boot/status?node=node001&token={token}");
    let (s, v) = b.call("POST", &status, Some(json!({"step": "download", "progress": 7})), false, Some(ip)).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, _) = b.call("POST", &status, Some(json!({"step": "download"})), false, Some(elsewhere)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = b.call("POST", &status, Some(json!({"step": "installed"})), false, Some(ip)).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(a.service.node("node001").await.unwrap().status.unwrap().step, "installed");
    for e in [&a, &b] {
        let (s, _) = e.call("POST", &status, Some(json!({"step": "download"})), false, Some(ip)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "a spent token reports nothing but booted");
    }
    let (s, _) = a.call("POST", &status, Some(json!({"step": "booted"})), false, Some(ip)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // A newer token from B supersedes A's older one everywhere.
    let old = a.token("52:54:00:00:00:02", "10.141.0.2").await;
    let new = b.token("52:54:00:00:00:02", "10.141.0.2").await;
    let (s, _) = b.call("GET", &format!("/boot/plan?node=node002&token={old}"), None, false, Some("10.141.0.2")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "superseded");
    let (s, v) = a.call("GET", &format!("/boot/plan?node=node002&token={new}"), None, false, Some("10.141.0.2")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The store holds hashes, never a token.
    let store = luna_server::store::open(&url).await.unwrap();
    let recs = store.list(luna_server::store::Collection::BootToken, "").await.unwrap();
    assert_eq!(recs.len(), 2);
    for r in recs {
        for t in [&token, &old, &new] {
            assert!(!r.doc.to_string().contains(&t[t.len() - 64..]), "{}", r.doc);
        }
    }
}
