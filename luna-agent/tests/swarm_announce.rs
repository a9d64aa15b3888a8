//! The agent tells the tracker when it is done: `completed` (left=0) then `stopped`, with the
//! peer id librqbit announced with, so luna's tracker counts the node once and stops listing
//! it at once (librqbit sends neither event). A plain TCP listener plays the tracker.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use luna_agent::torrent::{Swarm, SwarmOptions, DEFAULT_WINDOW};

/// Records every request target and answers with an empty peer list.
fn fake_tracker() -> (String, Arc<Mutex<Vec<String>>>) {
    fake_tracker_with(|_| b"d8:intervali30e5:peers0:e".to_vec())
}

/// Records every request target and answers with `answer(every target so far, this one last)`.
fn fake_tracker_with(answer: impl Fn(&[String]) -> Vec<u8> + Send + 'static) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/announce", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            // the rest of the head
            let mut h = String::new();
            while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            if let Some(target) = line.split_whitespace().nth(1) {
                log.lock().unwrap().push(target.to_string());
            }
            let body = answer(&log.lock().unwrap());
            let _ = write!(conn, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(&body);
        }
    });
    (url, seen)
}

fn param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let query = target.split_once('?')?.1;
    query.split('&').find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
}

/// Percent-decoded (clients differ in what they escape and in the case of hex digits).
fn decoded(value: Option<&str>) -> Vec<u8> {
    let v = value.unwrap_or_default().as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' && i + 2 < v.len() {
            out.push(u8::from_str_radix(std::str::from_utf8(&v[i + 1..i + 3]).unwrap(), 16).unwrap());
            i += 3;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_agent_announces_completed_then_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("image.tar.zst");
    std::fs::write(&file, vec![7u8; 300 * 1024]).unwrap();
    let (url, seen) = fake_tracker();
    let spawner = librqbit::spawn_utils::BlockingSpawner::new(1);
    let opts = librqbit::CreateTorrentOptions { name: None, trackers: vec![url], piece_length: Some(64 * 1024) };
    let torrent = librqbit::create_torrent(&file, opts, &spawner).await.unwrap().as_bytes().unwrap().to_vec();

    let scratch = dir.path().join("scratch");
    let swarm = Swarm::start(
        torrent.into(),
        &scratch,
        SwarmOptions { listen_ip: Some("127.0.0.1".parse().unwrap()), window: DEFAULT_WINDOW, ..Default::default() },
    )
    .await
    .unwrap();
    // librqbit's own first announce
    for _ in 0..100 {
        if !seen.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let port = swarm.listen_port().unwrap().to_string();
    swarm.stop(true).await;

    let seen = seen.lock().unwrap().clone();
    let first = seen.first().expect("librqbit announced");
    let ours: Vec<&String> = seen.iter().filter(|t| param(t, "event").is_some_and(|e| e != "started")).collect();
    assert_eq!(ours.len(), 2, "{seen:?}");
    assert_eq!(param(ours[0], "event"), Some("completed"));
    assert_eq!(param(ours[1], "event"), Some("stopped"));
    for t in &ours {
        assert_eq!(param(t, "left"), Some("0"), "{t}");
        assert_eq!(decoded(param(t, "peer_id")), decoded(param(first, "peer_id")), "same peer id as librqbit's");
        assert_eq!(decoded(param(t, "info_hash")), decoded(param(first, "info_hash")));
        assert_eq!(param(t, "port"), Some(port.as_str()));
    }
}

/// An installed node seeds on while the tracker lists nodes still downloading, telling it that
/// it has everything (left=0, no event, no peers wanted), and stops once none is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installed_agent_seeds_on_until_no_node_downloads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("image.tar.zst");
    std::fs::write(&file, vec![7u8; 300 * 1024]).unwrap();
    // Two nodes still downloading for the first two polls, then none.
    let (url, seen) = fake_tracker_with(|targets| {
        let polls = targets.iter().filter(|t| param(t, "numwant") == Some("0")).count();
        let incomplete = if polls < 3 { 2 } else { 0 };
        format!("d8:completei1e10:incompletei{incomplete}e8:intervali30e5:peers0:e").into_bytes()
    });
    let spawner = librqbit::spawn_utils::BlockingSpawner::new(1);
    let opts = librqbit::CreateTorrentOptions { name: None, trackers: vec![url], piece_length: Some(64 * 1024) };
    let torrent = librqbit::create_torrent(&file, opts, &spawner).await.unwrap().as_bytes().unwrap().to_vec();
    let swarm = Swarm::start(
        torrent.into(),
        &dir.path().join("scratch"),
        SwarmOptions { listen_ip: Some("127.0.0.1".parse().unwrap()), window: DEFAULT_WINDOW, ..Default::default() },
    )
    .await
    .unwrap();
    for _ in 0..100 {
        if !seen.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(swarm.linger(Duration::ZERO).await, "lingering is off (luna.linger=0)");
    let why = tokio::time::timeout(Duration::from_secs(20), swarm.linger(Duration::from_secs(60))).await.unwrap();
    assert_eq!(why, "no node is downloading any more");
    swarm.stop(true).await;
    let seen = seen.lock().unwrap().clone();
    let polls: Vec<&String> = seen.iter().filter(|t| param(t, "numwant") == Some("0")).collect();
    assert_eq!(polls.len(), 3, "polled until the tracker listed nobody downloading: {seen:?}");
    for t in &polls {
        assert_eq!((param(t, "left"), param(t, "event")), (Some("0"), None), "{t}");
    }
}
