//! The namespace plumbing of the test bed: links, addresses, code and processes inside
//! namespaces, and that everything is gone after the guards drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use luna_tests::{cargo_bin, free_port, privileged, Netns};

#[test]
fn veth_between_namespaces_carries_tcp_from_code_and_processes() {
    if !privileged() {
        return;
    }
    let server = Netns::new().unwrap();
    let client = Netns::new().unwrap();
    assert_ne!(server.name(), client.name());
    assert!(server.name().starts_with(&format!("luna-{}-", std::process::id())));
    server.add_veth("veth-s", &client, "veth-c").unwrap();
    server.add_addr("veth-s", "10.78.0.1/24").unwrap();
    client.add_addr("veth-c", "10.78.0.2/24").unwrap();

    // a listener made by a thread inside `server` lives there: only 10.78.0.1 reaches it
    let listener = server.enter(|| TcpListener::bind("10.78.0.1:7000")).unwrap().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf).unwrap();
        peer
    });
    let reply = client
        .enter(|| {
            let mut s = TcpStream::connect("10.78.0.1:7000").unwrap();
            s.write_all(b"hello").unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            buf
        })
        .unwrap();
    assert_eq!(&reply, b"hello");
    assert_eq!(echo.join().unwrap().ip().to_string(), "10.78.0.2");

    // a namespace without the link has no route there (fails locally, sends nothing)
    let isolated = Netns::new().unwrap();
    let err = isolated
        .enter(|| TcpStream::connect_timeout(&"10.78.0.1:7000".parse().unwrap(), Duration::from_secs(2)))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NetworkUnreachable, "{err}");

    // a process in the client namespace reaches the server namespace
    let ping = client.run("ping", &["-c", "1", "-W", "5", "10.78.0.1"]);
    if let Err(e) = &ping {
        // iputils-ping may be absent; busybox has one
        assert!(e.to_string().contains("No such file"), "{e}");
        client.run("busybox", &["ping", "-c", "1", "-W", "5", "10.78.0.1"]).unwrap();
    }
    assert_eq!(client.mac_of("veth-c").unwrap().split(':').count(), 6);
}

#[test]
fn tokio_runtime_inside_namespace() {
    if !privileged() {
        return;
    }
    let ns = Netns::new().unwrap();
    ns.add_bridge("br0").unwrap();
    ns.add_addr("br0", "10.79.0.1/24").unwrap();
    let port = free_port().unwrap();
    let got = ns
        .block_on(|| async move {
            let listener = tokio::net::TcpListener::bind(("10.79.0.1", port)).await.unwrap();
            let accept = tokio::spawn(async move {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = String::new();
                tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut buf).await.unwrap();
                buf
            });
            let mut c = tokio::net::TcpStream::connect(("10.79.0.1", port)).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut c, b"from tokio").await.unwrap();
            drop(c);
            accept.await.unwrap()
        })
        .unwrap();
    assert_eq!(got, "from tokio");
}

#[test]
fn drop_kills_processes_and_removes_namespace() {
    if !privileged() {
        return;
    }
    let ns = Netns::new().unwrap();
    let name = ns.name().to_string();
    // a child spawned outside any guard: the namespace's Drop must still kill it
    let mut orphan = ns.command("sleep").arg("300").spawn().unwrap();
    let guarded = ns.spawn("sleeper", "sh", &["-c", "echo up; exec sleep 300"]).unwrap();
    guarded.wait_for("up", Duration::from_secs(10)).unwrap();
    let pids = ns.pids().unwrap();
    assert!(pids.contains(&(orphan.id() as i32)), "{pids:?}");
    assert!(pids.contains(&(guarded.pid() as i32)), "{pids:?}");

    // a thread inside is in the namespace (same inode), the test's own thread is not
    let ns_ino = std::fs::metadata(ns.path()).unwrap().ino();
    let inside = ns.enter(|| std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino())).unwrap().unwrap();
    let outside = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
    assert_eq!(inside, ns_ino);
    assert_ne!(outside, ns_ino);

    drop(ns);
    let status = orphan.wait().unwrap();
    assert!(!status.success(), "sleep was not killed: {status}");
    assert!(!Path::new("/run/netns").join(&name).exists(), "netns {name} still there");
    drop(guarded);
}

#[test]
fn cargo_bin_finds_workspace_binaries() {
    // not privileged: only looks in (or builds into) the target dir
    let path = cargo_bin("luna").unwrap();
    assert!(path.is_file(), "{}", path.display());
}
