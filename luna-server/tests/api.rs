//! REST API tests: the whole router in-process (`tower::ServiceExt::oneshot`), embedded store.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use luna_server::api::router;
use luna_server::http::AppState;
use luna_server::service::Service;
use serde_json::{json, Value};
use tower::ServiceExt;

const TOKEN: &str = "test-token";

async fn app() -> Router {
    let store = luna_server::store::open("sqlite://:memory:").await.unwrap();
    let service = Service::new(store);
    service.ensure_cluster("test").await.unwrap();
    router(Arc::new(AppState::new(service, TOKEN.into())))
}

async fn call(app: &Router, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    call_with(app, method, path, body, Some(TOKEN)).await
}

async fn call_with(
    app: &Router,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(format!("/api/v1{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())).unwrap(),
        None => req.body(Body::empty()).unwrap(),
    };
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let v = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    (status, v)
}

async fn seed(app: &Router) {
    for (path, body) in [
        ("/network", json!({"name": "cluster", "cidr": "10.141.0.0/16", "gateway": "10.141.255.254"})),
        ("/network", json!({"name": "ipmi", "cidr": "10.148.0.0/16"})),
        ("/osimage", json!({"name": "compute", "path": "/trinity/images/compute"})),
        ("/bmcsetup", json!({"name": "base", "user": "admin", "password": "s3cret"})),
        (
            "/group",
            json!({"name": "compute", "osimage": "compute", "bmcsetup": "base",
                   "interfaces": [{"name": "BOOTIF", "network": "cluster"}, {"name": "BMC", "network": "ipmi"}]}),
        ),
    ] {
        let (s, v) = call(app, "POST", path, Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{path}: {v}");
    }
}

fn ips(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|n| n["interfaces"][0]["ip"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn writes_need_the_token() {
    let app = app().await;
    let (s, v) = call_with(&app, "POST", "/network", Some(json!({"name": "n", "cidr": "10.0.0.0/24"})), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["code"], "unauthorized");
    let (s, _) = call_with(&app, "GET", "/network", None, Some("wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = call(&app, "GET", "/network", None).await;
    assert_eq!((s, v), (StatusCode::OK, json!([])));
}

#[tokio::test]
async fn node_add_allocates_lowest_free_and_keeps_padding() {
    let app = app().await;
    seed(&app).await;
    let (s, v) = call(&app, "POST", "/node", Some(json!({"name": "node[001-003]", "group": "compute"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let names: Vec<&str> = v.as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["node001", "node002", "node003"]);
    assert_eq!(ips(&v), ["10.141.0.1", "10.141.0.2", "10.141.0.3"]);
    assert_eq!(v[0]["interfaces"][1], json!({"name": "BMC", "network": "ipmi", "ip": "10.148.0.1"}));

    // Deleting the middle node frees its address for the next add.
    let (s, _) = call(&app, "DELETE", "/node/node002", None).await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = call(&app, "POST", "/node", Some(json!({"name": "node004", "group": "compute"}))).await;
    assert_eq!(ips(&v), ["10.141.0.2"]);
}

#[tokio::test]
async fn explicit_ip_is_checked() {
    let app = app().await;
    seed(&app).await;
    call(&app, "POST", "/node", Some(json!({"name": "node001", "group": "compute"}))).await;
    for (ip, code, needle) in [
        ("10.142.0.5", "bad_request", "10.142.0.5 is not a host address of network cluster"),
        ("10.141.255.254", "bad_request", "ip 10.141.255.254 is reserved"),
        ("10.141.0.1", "already_exists", "ip 10.141.0.1 on network cluster is already taken by node node001"),
    ] {
        let (s, v) =
            call(&app, "POST", "/node", Some(json!({"name": "node002", "group": "compute", "ips": {"BOOTIF": ip}})))
                .await;
        assert!(s.is_client_error(), "{ip}: {v}");
        assert_eq!(v["code"], code, "{v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{v}");
    }
    let (_, v) = call(&app, "GET", "/node", None).await;
    assert_eq!(v.as_array().unwrap().len(), 1, "nothing was created");
    let (s, v) = call(&app, "PATCH", "/node/node001", Some(json!({"ips": {"BOOTIF": "10.141.7.7"}}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ips(&v), ["10.141.7.7"]);
    // The old address is free again.
    let (_, v) = call(&app, "POST", "/node", Some(json!({"name": "node002", "group": "compute"}))).await;
    assert_eq!(ips(&v), ["10.141.0.1"]);
}

#[tokio::test]
async fn macs_are_unique_and_lookups_follow() {
    let app = app().await;
    seed(&app).await;
    let (s, v) =
        call(&app, "POST", "/node", Some(json!({"name": "node001", "group": "compute", "mac": "52:54:00:00:00:01"})))
            .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) =
        call(&app, "POST", "/node", Some(json!({"name": "node002", "group": "compute", "mac": "52-54-00-00-00-01"})))
            .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["error"], "mac 52:54:00:00:00:01 is already taken by node node001");
    let (s, v) = call(
        &app,
        "POST",
        "/node",
        Some(json!({"name": "node[002-003]", "group": "compute", "mac": "52:54:00:00:00:02"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Move the MAC: the old one is released.
    let (s, _) = call(&app, "PATCH", "/node/node001", Some(json!({"mac": "52:54:00:00:00:09"}))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) =
        call(&app, "POST", "/node", Some(json!({"name": "node002", "group": "compute", "mac": "52:54:00:00:00:01"})))
            .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn deleting_used_objects_is_refused_with_users() {
    let app = app().await;
    seed(&app).await;
    call(&app, "POST", "/node", Some(json!({"name": "node[001-004]", "group": "compute"}))).await;
    let (s, v) = call(&app, "DELETE", "/group/compute", None).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["error"], "group 'compute' is used by node node[001-004]");
    let (s, v) = call(&app, "DELETE", "/network/cluster", None).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["error"], "network 'cluster' is used by group compute, node node[001-004]");
    let (s, _) = call(&app, "DELETE", "/node/node[001-004]", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&app, "DELETE", "/group/compute", None).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn renames_follow_through() {
    let app = app().await;
    seed(&app).await;
    call(&app, "POST", "/node", Some(json!({"name": "node001", "group": "compute", "mac": "52:54:00:00:00:01"}))).await;
    let (s, v) = call(&app, "POST", "/network/cluster/rename", Some(json!({"new_name": "prov"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, g) = call(&app, "GET", "/group/compute", None).await;
    assert_eq!(g["interfaces"][0]["network"], "prov");
    let (_, n) = call(&app, "GET", "/node/node001", None).await;
    assert_eq!(n["interfaces"][0], json!({"name": "BOOTIF", "network": "prov", "ip": "10.141.0.1"}));
    // The address stays held under the new network name.
    let (s, v) = call(
        &app,
        "POST",
        "/node",
        Some(json!({"name": "node002", "group": "compute", "ips": {"BOOTIF": "10.141.0.1"}})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = call(&app, "POST", "/node/node001/rename", Some(json!({"new_name": "cn001"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) =
        call(&app, "POST", "/node", Some(json!({"name": "x1", "group": "compute", "mac": "52:54:00:00:00:01"}))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(v["error"].as_str().unwrap().ends_with("taken by node cn001"), "{v}");
}

#[tokio::test]
async fn group_change_reallocates_where_the_network_changes() {
    let app = app().await;
    seed(&app).await;
    call(&app, "POST", "/network", Some(json!({"name": "gpu-net", "cidr": "10.150.0.0/24"}))).await;
    call(
        &app,
        "POST",
        "/group",
        Some(json!({"name": "gpu", "osimage": "compute", "interfaces": [
            {"name": "BOOTIF", "network": "cluster"}, {"name": "ib0", "network": "gpu-net"}]})),
    )
    .await;
    call(&app, "POST", "/node", Some(json!({"name": "node001", "group": "compute"}))).await;
    let (s, v) = call(&app, "PATCH", "/node/node001", Some(json!({"group": "gpu"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v[0]["interfaces"],
        json!([{"name": "BOOTIF", "network": "cluster", "ip": "10.141.0.1"}, {"name": "ib0", "network": "gpu-net", "ip": "10.150.0.1"}])
    );
    // The BMC address on ipmi was released.
    let (_, v) = call(&app, "POST", "/node", Some(json!({"name": "node002", "group": "compute"}))).await;
    assert_eq!(v[0]["interfaces"][1]["ip"], "10.148.0.1");
}

#[tokio::test]
async fn bad_input_names_the_input_and_changes_nothing() {
    let app = app().await;
    seed(&app).await;
    for (path, body, needle) in [
        ("/network", json!({"name": "bad", "cidr": "10.0.0.0/33"}), "10.0.0.0/33"),
        ("/network", json!({"name": "bad", "cidr": "10.0.0.1/24"}), "'10.0.0.1/24'"),
        ("/network", json!({"name": "cluster", "cidr": "10.9.0.0/24"}), "network 'cluster' already exists"),
        ("/network", json!({"name": "n2", "cidr": "10.9.0.0/24", "colour": "red"}), "colour"),
        ("/node", json!({"name": "node[1-", "group": "compute"}), "'node[1-'"),
        ("/node", json!({"name": "node001", "group": "nope"}), "group 'nope' does not exist"),
        ("/group", json!({"name": "g2", "osimage": "nope"}), "osimage 'nope' does not exist"),
        ("/node", json!({"name": "node001", "group": "compute", "mac": "zz"}), "'zz'"),
    ] {
        let (s, v) = call(&app, "POST", path, Some(body.clone())).await;
        assert!(s.is_client_error(), "{body}: {s} {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
        assert!(msg.starts_with(|c: char| c.is_ascii_lowercase()), "lower-case: {msg}");
    }
    let (_, nets) = call(&app, "GET", "/network", None).await;
    assert_eq!(nets.as_array().unwrap().len(), 2);
    let (_, nodes) = call(&app, "GET", "/node", None).await;
    assert_eq!(nodes, json!([]));
}

#[tokio::test]
async fn secrets_are_redacted_unless_asked() {
    let app = app().await;
    seed(&app).await;
    let (_, v) = call(&app, "GET", "/bmcsetup/base", None).await;
    assert_eq!(v["password"], "********");
    let (_, v) = call(&app, "GET", "/bmcsetup/base?secrets=1", None).await;
    assert_eq!(v["password"], "s3cret");
}

#[tokio::test]
async fn reserve_release_and_cas() {
    let app = app().await;
    seed(&app).await;
    call(&app, "POST", "/node", Some(json!({"name": "node001", "group": "compute"}))).await;
    let (s, v) = call(&app, "POST", "/network/cluster/reserve", Some(json!({"range": "10.141.0.1-10.141.0.10"}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["error"].as_str().unwrap().contains("node node001 (10.141.0.1)"), "{v}");
    let (s, v) = call(&app, "POST", "/network/cluster/reserve", Some(json!({"range": "10.141.0.2-10.141.0.10"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, v) = call(&app, "POST", "/node", Some(json!({"name": "node002", "group": "compute"}))).await;
    assert_eq!(ips(&v), ["10.141.0.11"]);
    let (s, v) = call(&app, "POST", "/network/cluster/release", Some(json!({"range": "10.141.0.2-10.141.0.10"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["reserved"], json!([]));

    let (_, n) = call(&app, "GET", "/network/cluster", None).await;
    let rev = n["rev"].as_u64().unwrap();
    let (s, _) = call(&app, "PATCH", "/network/cluster", Some(json!({"mtu": 9000, "rev": rev}))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = call(&app, "PATCH", "/network/cluster", Some(json!({"mtu": 1500, "rev": rev}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["code"], "conflict");
}

#[tokio::test]
async fn clone_gives_fresh_identity() {
    let app = app().await;
    seed(&app).await;
    call(&app, "POST", "/node", Some(json!({"name": "node001", "group": "compute", "mac": "52:54:00:00:00:01"}))).await;
    let (s, v) = call(&app, "POST", "/node/node001/clone", Some(json!({"new_name": "node002"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["mac"], Value::Null);
    assert_eq!(v["interfaces"][0]["ip"], "10.141.0.2");
    let (s, v) = call(&app, "POST", "/group/compute/clone", Some(json!({"new_name": "compute2"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["osimage"], "compute");
}

#[tokio::test]
async fn concurrent_hostlist_adds_never_share_an_address() {
    let app = app().await;
    seed(&app).await;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("n{t:02}x[01-16]");
            let (s, v) = call(&app, "POST", "/node", Some(json!({"name": name, "group": "compute"}))).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, v) = call(&app, "GET", "/node", None).await;
    let all = ips(&v);
    assert_eq!(all.len(), 256);
    let distinct: std::collections::BTreeSet<_> = all.iter().collect();
    assert_eq!(distinct.len(), 256);
}
