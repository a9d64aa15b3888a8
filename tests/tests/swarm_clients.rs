//! The swarm with real third-party BitTorrent clients (LUNA_TEST_PRIVILEGED=1; needs aria2c,
//! transmission-daemon + transmission-remote and qbittorrent-nox from scripts/install-deps.sh).
//!
//! luna-server (the real binary) packs the busybox test image and seeds it; each client runs in
//! its own network namespace on the server's bridge and knows nothing but the revision's
//! `.torrent` (private, no `url-list`: every byte comes from luna's seeder or from the other
//! clients, found through luna's tracker). The seeder's upload is limited so that downloads last
//! long enough to restart the server under them.
//!
//! Phase 1, a server restart mid-swarm: transmission-daemon (default settings: µTP first) and
//! aria2c download while luna-server is stopped (SIGTERM) and started again. The tracker lists
//! both right after the restart (it saved its swarms at the stop and restored them), both
//! finish with the revision's SHA-256, and no server start re-hashes the archive (librqbit
//! patch 3). Then
//! transmission's torrent is removed with its data and added again on the same port: the
//! seeder has seen that address before and must serve it again. (Sampling transmission's peer
//! flags in one run showed luna's seeder connecting to it over TCP, librqbit patch 4 re-queuing
//! the address the tracker names again, not transmission reaching the seeder over µTP.)
//!
//! Phase 2, the counters over a full libtorrent announce cycle: qbittorrent-nox, aria2c (exits
//! when done: `started`, then `stopped` with `left=0`), a seeding aria2c and transmission
//! (re-added with its data) download or re-check. Checked: every download's SHA-256; the
//! tracker's `completed` went up once per finished client (a re-added complete client is not a
//! completion); seeders/leechers after a stop and after a re-add; a client killed without
//! `stopped` stays listed for the peer lifetime and is gone after it; qBittorrent (libtorrent
//! announces at most every 300 s, whatever the tracker asks) stays listed over its whole
//! announce cycle, also across a second server restart. Who is listed is read with a probe announce (a seeder that takes the peer
//! list and stops at once), counters from `GET /api/v1/osimage/<name>/revisions`.
//!
//! Timing: the tracker asks for a 20 s interval (`tracker_interval`) so aria2 and transmission
//! announce often; `[tracker] min_peer_lifetime_s` is 320 instead of the default 360: still
//! longer than libtorrent's 300 s cycle (the property under test) but it keeps the wait for the
//! killed client shorter. qBittorrent's cycle cannot be shortened (libtorrent's
//! `min_announce_interval`), so the test takes about six minutes.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use luna_tests::{privileged, require_tool, ChildGuard, Cluster, ClusterOptions, Netns};
use serde_json::Value;
use sha2::Digest;

const SUBNET: &str = "10.216.0";
const IMAGE: &str = "lt-swarm";
const INTERVAL_S: u64 = 20;
const LIFETIME_S: u64 = 320;
/// libtorrent's `min_announce_interval`: qBittorrent announces no more often than this.
const LIBTORRENT_CYCLE_S: u64 = 300;
/// The seeder's upload limit (bytes/s): a download from it alone takes several seconds.
const UPLOAD_LIMIT: u64 = 500_000;
const ARIA2_PORT: u16 = 6891;
const ARIA2_SEED_PORT: u16 = 6892;
const TRANSMISSION_PORT: u16 = 51413;
const QBT_PORT: u16 = 6893;
/// luna's own seeder announces to its tracker too (librqbit does, at the interval) and is then
/// one of the seeders the counters show (once: as an announcing peer, not also as permanent).
const OWN: u64 = 1;

fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Polls `f` every 500 ms until it gives a value; panics with `what` and the last state after
/// `timeout`.
fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => panic!("{what}: not after {timeout:?}; last: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// A client's namespace on the server's bridge.
struct Host {
    ns: Netns,
    ip: Ipv4Addr,
}

impl Host {
    fn new(c: &Cluster, n: u8) -> Host {
        let ns = Netns::new().unwrap();
        let port = format!("sw{n}");
        ns.add_veth("eth0", &c.ns, &port).unwrap();
        c.ns.set_master(&port, "br0").unwrap();
        let ip: Ipv4Addr = format!("{SUBNET}.{}", 10 + n).parse().unwrap();
        ns.add_addr("eth0", &format!("{ip}/24")).unwrap();
        Host { ns, ip }
    }

    fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, port)
    }
}

/// The swarm's counters as the revision listing shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    seeders: u64,
    leechers: u64,
    completed: u64,
}

fn counters(c: &Cluster) -> Counters {
    let rev = c.current_revision(IMAGE).unwrap();
    let t = &rev["tracker"];
    Counters {
        seeders: t["seeders"].as_u64().unwrap_or(0),
        leechers: t["leechers"].as_u64().unwrap_or(0),
        completed: t["completed"].as_u64().unwrap_or(0),
    }
}

fn wait_counters(c: &Cluster, what: &str, want: Counters) {
    wait_until(what, Duration::from_secs(2 * INTERVAL_S + 10), || {
        let now = counters(c);
        if now == want {
            Ok(())
        } else {
            Err(format!("{now:?}, want {want:?}"))
        }
    })
}

/// Who the tracker lists: a probe seeder (from the server's own address, port 1) announces with
/// `numwant=200`, reads the compact peer list and stops at once. The server's own seeder is
/// left out.
fn listed(c: &Cluster, info_hash: &str) -> HashSet<SocketAddrV4> {
    let hash: String = hex::decode(info_hash).unwrap().iter().map(|b| format!("%{b:02x}")).collect();
    let peer_id = "-LT0001-swarmproof00";
    let url = |event: &str| {
        format!(
            "{}/announce?info_hash={hash}&peer_id={peer_id}&port=1&uploaded=0&downloaded=0&left=0&numwant=200&compact=1&event={event}",
            c.url()
        )
    };
    let body = c.ns.command("curl").args(["-sS", "--max-time", "10"]).arg(url("started")).output().unwrap();
    let stop = c.ns.command("curl").args(["-sS", "--max-time", "10", "-o", "/dev/null"]).arg(url("stopped")).status();
    assert!(stop.is_ok_and(|s| s.success()), "probe stop");
    assert!(body.status.success(), "probe announce: {}", String::from_utf8_lossy(&body.stderr));
    let peers = compact_peers(&body.stdout)
        .unwrap_or_else(|| panic!("no peers in {:?}", String::from_utf8_lossy(&body.stdout)));
    let own = SocketAddrV4::new(format!("{SUBNET}.1").parse().unwrap(), 6881);
    peers.into_iter().filter(|a| *a != own).collect()
}

/// The `peers` string of a bencoded announce answer (compact: 6 bytes a peer).
fn compact_peers(body: &[u8]) -> Option<Vec<SocketAddrV4>> {
    let key = b"5:peers";
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &body[at..];
    let colon = rest.iter().position(|b| *b == b':')?;
    let len: usize = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
    let data = rest.get(colon + 1..colon + 1 + len)?;
    Some(
        data.chunks_exact(6)
            .map(|p| SocketAddrV4::new(Ipv4Addr::new(p[0], p[1], p[2], p[3]), u16::from_be_bytes([p[4], p[5]])))
            .collect(),
    )
}

/// Touched by aria2c's `--on-bt-download-complete` hook once the download in `dir` is done.
fn done_marker(dir: &Path) -> PathBuf {
    dir.with_extension("done")
}

fn aria2(host: &Host, name: &str, port: u16, dir: &Path, torrent: &Path, seed: bool) -> ChildGuard {
    std::fs::create_dir_all(dir).unwrap();
    let mut args: Vec<String> = [
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=false",
        "--summary-interval=0",
        "--console-log-level=notice",
        "--file-allocation=none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--listen-port={port}"));
    // its console output is block-buffered into a pipe: a hook marks the finished download
    let hook = dir.with_extension("done.sh");
    std::fs::write(&hook, format!("#!/bin/sh\ntouch '{}'\n", done_marker(dir).display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    args.push(format!("--on-bt-download-complete={}", hook.display()));
    // seed: until killed; else stop (and announce `stopped`) as soon as the download is done
    args.push(if seed { "--seed-ratio=0.0".into() } else { "--seed-time=0".into() });
    args.push(format!("--dir={}", dir.display()));
    args.push(torrent.display().to_string());
    host.ns.spawn(name, "aria2c", &args).unwrap()
}

/// transmission-daemon with default settings (µTP on) but no DHT/LPD/PEX/port mapping, and an
/// RPC port inside its namespace only.
struct Transmission {
    /// Killed on drop.
    _daemon: ChildGuard,
    dir: PathBuf,
}

impl Transmission {
    fn start(host: &Host, work: &Path) -> Transmission {
        let cfg = work.join("transmission-config");
        let dir = work.join("transmission");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        let settings = serde_json::json!({
            "dht-enabled": false, "lpd-enabled": false, "pex-enabled": false,
            "port-forwarding-enabled": false, "peer-port": TRANSMISSION_PORT, "peer-port-random-on-start": false,
            "rpc-bind-address": "127.0.0.1", "rpc-port": 9091, "rpc-authentication-required": false,
            "rpc-whitelist-enabled": false, "download-dir": dir, "incomplete-dir-enabled": false,
            "message-level": 2,
        });
        std::fs::write(cfg.join("settings.json"), settings.to_string()).unwrap();
        let daemon =
            host.ns.spawn("transmission-daemon", "transmission-daemon", &["-f", "-g", cfg.to_str().unwrap()]).unwrap();
        let t = Transmission { _daemon: daemon, dir };
        wait_until("transmission rpc", Duration::from_secs(20), || t.remote(host, &["-l"]).map(drop));
        t
    }

    fn remote(&self, host: &Host, args: &[&str]) -> Result<String, String> {
        let out = host.ns.command("transmission-remote").arg("127.0.0.1:9091").args(args).output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("transmission-remote {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    fn percent_done(&self, host: &Host) -> Result<String, String> {
        let info = self.remote(host, &["-t", "all", "-i"])?;
        info.lines()
            .find_map(|l| l.trim().strip_prefix("Percent Done:").map(|p| p.trim().to_string()))
            .ok_or_else(|| format!("no torrent in {info}"))
    }

    fn wait_done(&self, host: &Host, what: &str) {
        wait_until(what, Duration::from_secs(120), || {
            let p = self.percent_done(host)?;
            if p == "100%" {
                Ok(())
            } else {
                Err(p)
            }
        })
    }
}

/// qbittorrent-nox with its profile under `work`; WebUI on 127.0.0.1 of its namespace without
/// login, DHT/LSD/PEX and UPnP off.
fn qbittorrent(host: &Host, work: &Path, torrent: &Path) -> (ChildGuard, PathBuf) {
    let profile = work.join("qbt-profile");
    let dir = work.join("qbt");
    let conf_dir = profile.join("qBittorrent/config");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let conf = format!(
        "[LegalNotice]\nAccepted=true\n\n[BitTorrent]\nSession\\DHTEnabled=false\nSession\\LSDEnabled=false\n\
         Session\\PeXEnabled=false\nSession\\Port={QBT_PORT}\nSession\\DefaultSavePath={dir}\n\n\
         [Preferences]\nConnection\\PortRangeMin={QBT_PORT}\nConnection\\UPnP=false\nDownloads\\SavePath={dir}\n\
         WebUI\\Address=127.0.0.1\nWebUI\\Port=18080\nWebUI\\LocalHostAuth=false\nWebUI\\CSRFProtection=false\n\
         WebUI\\HostHeaderValidation=false\n",
        dir = dir.display()
    );
    std::fs::write(conf_dir.join("qBittorrent.conf"), conf).unwrap();
    let args = [
        format!("--profile={}", profile.display()),
        format!("--save-path={}", dir.display()),
        "--skip-dialog=true".into(),
        torrent.display().to_string(),
    ];
    (host.ns.spawn("qbittorrent-nox", "qbittorrent-nox", &args).unwrap(), dir)
}

fn qbt_torrents(host: &Host) -> Result<Value, String> {
    let out = host
        .ns
        .command("curl")
        .args(["-sS", "--max-time", "5", "http://127.0.0.1:18080/api/v2/torrents/info"])
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!("qbittorrent webui: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("qbittorrent webui: {e}"))
}

#[test]
fn aria2_transmission_and_qbittorrent_swarm_with_restarts_and_honest_counters() {
    if !privileged() {
        return;
    }
    for tool in ["aria2c", "transmission-daemon", "transmission-remote", "qbittorrent-nox", "curl"] {
        require_tool(tool).unwrap();
    }
    let mut c = Cluster::start(ClusterOptions {
        subnet: SUBNET.into(),
        upload_limit: UPLOAD_LIMIT,
        extra_config: format!("[tracker]\nmin_peer_lifetime_s = {LIFETIME_S}\n"),
        ..ClusterOptions::default()
    })
    .expect("start luna-server in a namespace");
    c.cli(&["cluster", "change", "--tracker-interval", &INTERVAL_S.to_string()]).unwrap();
    c.add_test_osimage(IMAGE, "console=ttyS0").unwrap();
    let rev_id = c.pack(IMAGE, Duration::from_secs(600)).unwrap();
    let rev = c.current_revision(IMAGE).unwrap();
    let (info_hash, sha256) = (rev["info_hash"].as_str().unwrap().to_string(), rev["sha256"].as_str().unwrap());
    let archive = rev["archive"].as_str().unwrap().to_string();
    let size = rev["archive_size"].as_u64().unwrap();
    let torrent =
        c.dir().join("data/images").join(IMAGE).join(rev_id.to_string()).join(rev["torrent"].as_str().unwrap());
    assert!(torrent.is_file(), "{}", torrent.display());
    println!("archive {archive}: {size} bytes; seeder limited to {UPLOAD_LIMIT} B/s");
    wait_until("seeder healthy", Duration::from_secs(60), || {
        let r = c.current_revision(IMAGE).map_err(|e| e.to_string())?;
        if r["seeder"]["healthy"] == Value::Bool(true) {
            Ok(())
        } else {
            Err(r["seeder"].to_string())
        }
    });
    let work = c.dir().join("clients");
    let (h_aria, h_tr, h_qbt) = (Host::new(&c, 1), Host::new(&c, 2), Host::new(&c, 3));

    // ---- Phase 1: luna-server restarts under a download; a removed client comes back.
    let tr = Transmission::start(&h_tr, &work);
    tr.remote(&h_tr, &["-a", torrent.to_str().unwrap()]).unwrap();
    let mut a1 = aria2(&h_aria, "aria2c-1", ARIA2_PORT, &work.join("aria2-1"), &torrent, false);
    // both have a part, neither has all: restart the server under them
    wait_until("transmission under way", Duration::from_secs(60), || match tr.percent_done(&h_tr)?.as_str() {
        "0%" | "None" | "100%" => Err("not under way".to_string()),
        p => Ok(p.to_string()),
    });
    let both = HashSet::from([h_aria.addr(ARIA2_PORT), h_tr.addr(TRANSMISSION_PORT)]);
    wait_until("both listed", Duration::from_secs(30), || {
        let l = listed(&c, &info_hash);
        if l == both {
            Ok(())
        } else {
            Err(format!("{l:?}"))
        }
    });
    let before = counters(&c);
    let t_restart = Instant::now();
    c.restart(true).unwrap();
    println!("server restarted in {:?}", t_restart.elapsed());
    // the tracker kept its swarm: both still listed before either announced again
    let after = counters(&c);
    let l = listed(&c, &info_hash);
    assert!(t_restart.elapsed() < Duration::from_secs(INTERVAL_S), "restart too slow to tell");
    assert_eq!(l, both, "listed right after the restart (before: {before:?}, after: {after:?})");
    assert!(after.completed >= before.completed, "completions lost in the restart: {before:?} -> {after:?}");
    tr.wait_done(&h_tr, "transmission finishes after the server restart");
    assert!(a1.wait_timeout(Duration::from_secs(120)).unwrap().success(), "aria2c: {}", a1.output().tail(20));
    assert_eq!(sha256_file(&tr.dir.join(&archive)), sha256, "transmission's download");
    assert_eq!(sha256_file(&work.join("aria2-1").join(&archive)), sha256, "aria2c's download");
    // removed with its data and added again at the same address: served again
    tr.remote(&h_tr, &["-t", "all", "--remove-and-delete"]).unwrap();
    wait_until("transmission's data removed", Duration::from_secs(20), || {
        if tr.dir.join(&archive).exists() {
            Err("still there".into())
        } else {
            Ok(())
        }
    });
    let t_rejoin = Instant::now();
    tr.remote(&h_tr, &["-a", torrent.to_str().unwrap()]).unwrap();
    tr.wait_done(&h_tr, "transmission re-added on the same port downloads again");
    assert_eq!(sha256_file(&tr.dir.join(&archive)), sha256, "transmission's second download");
    println!("transmission rejoined and downloaded again in {:?}", t_rejoin.elapsed());
    // the server's second start found its archive as packed: no piece was hashed again
    let log = c.server_log();
    assert_eq!(log.matches("seeder listening").count(), 2, "two server starts:\n{log}");
    assert!(!log.contains("checking every piece"), "a server start re-hashed the archive:\n{log}");

    // ---- Phase 2: the counters, over a full libtorrent announce cycle.
    // transmission stops (removed, data kept): nobody is listed
    tr.remote(&h_tr, &["-t", "all", "-r"]).unwrap();
    wait_until("nobody listed", Duration::from_secs(30), || {
        let l = listed(&c, &info_hash);
        let n = counters(&c);
        if l.is_empty() && n.seeders == OWN && n.leechers == 0 {
            Ok(())
        } else {
            Err(format!("{l:?} {n:?}"))
        }
    });
    let base = counters(&c).completed;
    let t2 = Instant::now();
    let (_qbt, qbt_dir) = qbittorrent(&h_qbt, &work, &torrent);
    let mut a2 = aria2(&h_aria, "aria2c-2", ARIA2_PORT, &work.join("aria2-2"), &torrent, false);
    let mut ghost = aria2(&h_aria, "aria2c-seed", ARIA2_SEED_PORT, &work.join("aria2-seed"), &torrent, true);
    // a restart of a complete client: re-added, it checks its data and seeds; no completion
    tr.remote(&h_tr, &["-a", torrent.to_str().unwrap()]).unwrap();
    let qbt_first_seen = wait_until("qbittorrent listed", Duration::from_secs(30), || {
        if listed(&c, &info_hash).contains(&h_qbt.addr(QBT_PORT)) {
            Ok(Instant::now())
        } else {
            Err("not yet".to_string())
        }
    });
    // libtorrent announces `completed` at once and then every 300 s: its next announce is
    // due about 300 s after this
    let qbt_done = wait_until("qbittorrent done", Duration::from_secs(120), || {
        let v = qbt_torrents(&h_qbt)?;
        if v[0]["progress"].as_f64() == Some(1.0) {
            Ok(Instant::now())
        } else {
            Err(v.to_string())
        }
    });
    assert!(a2.wait_timeout(Duration::from_secs(120)).unwrap().success(), "aria2c: {}", a2.output().tail(20));
    wait_until("the seeding aria2c done", Duration::from_secs(120), || {
        if done_marker(&work.join("aria2-seed")).exists() {
            Ok(())
        } else {
            Err(ghost.output().tail(3))
        }
    });
    tr.wait_done(&h_tr, "transmission re-checks its data");
    for (who, path) in [
        ("qbittorrent", qbt_dir.join(&archive)),
        ("aria2c", work.join("aria2-2").join(&archive)),
        ("seeding aria2c", work.join("aria2-seed").join(&archive)),
        ("transmission", tr.dir.join(&archive)),
    ] {
        assert_eq!(sha256_file(&path), sha256, "{who}'s download");
    }
    println!("phase 2 downloads done after {:?}", t2.elapsed());
    // qbittorrent, aria2c (stopped with left=0) and the seeding aria2c each finished once;
    // transmission had its data already
    wait_counters(
        &c,
        "three completions, three seeders",
        Counters { seeders: OWN + 3, leechers: 0, completed: base + 3 },
    );
    assert_eq!(
        listed(&c, &info_hash),
        HashSet::from([h_qbt.addr(QBT_PORT), h_aria.addr(ARIA2_SEED_PORT), h_tr.addr(TRANSMISSION_PORT)])
    );
    // transmission restarts: removed (`stopped`) and added again with its data
    tr.remote(&h_tr, &["-t", "all", "-r"]).unwrap();
    wait_counters(&c, "transmission stopped", Counters { seeders: OWN + 2, leechers: 0, completed: base + 3 });
    tr.remote(&h_tr, &["-a", torrent.to_str().unwrap()]).unwrap();
    tr.wait_done(&h_tr, "transmission re-checks its data again");
    wait_counters(
        &c,
        "transmission back, not counted again",
        Counters { seeders: OWN + 3, leechers: 0, completed: base + 3 },
    );
    // the seeding aria2c dies without a word: listed for the peer lifetime after its last announce
    ghost.kill();
    let t_kill = Instant::now();
    tr.remote(&h_tr, &["-t", "all", "-r"]).unwrap();
    let two = Counters { seeders: OWN + 2, leechers: 0, completed: base + 3 };
    wait_counters(&c, "transmission stopped, the killed aria2c still listed", two);
    // a second server restart: qBittorrent will not announce for minutes, so only the saved
    // swarm can list it now
    c.restart(true).unwrap();
    assert_eq!(counters(&c), two, "counters right after the second restart");
    assert_eq!(
        listed(&c, &info_hash),
        HashSet::from([h_qbt.addr(QBT_PORT), h_aria.addr(ARIA2_SEED_PORT)]),
        "listed right after the second restart"
    );

    // qBittorrent announces at most every 300 s: it must be listed all along, the killed aria2c
    // until about LIFETIME_S after it died and not after.
    let qbt_cycle_end = qbt_done + Duration::from_secs(LIBTORRENT_CYCLE_S + INTERVAL_S);
    let ghost_listed_until = t_kill + Duration::from_secs(LIFETIME_S - INTERVAL_S - 5);
    let ghost_gone_by = t_kill + Duration::from_secs(LIFETIME_S + INTERVAL_S + 10);
    let mut ghost_gone_at = None;
    loop {
        let now = Instant::now();
        let l = listed(&c, &info_hash);
        assert!(
            l.contains(&h_qbt.addr(QBT_PORT)),
            "qbittorrent not listed {:?} after it was first seen: {l:?}",
            now - qbt_first_seen
        );
        let ghost_listed = l.contains(&h_aria.addr(ARIA2_SEED_PORT));
        if now < ghost_listed_until {
            assert!(ghost_listed, "the killed aria2c vanished {:?} after it died", now - t_kill);
        } else if !ghost_listed && ghost_gone_at.is_none() {
            ghost_gone_at = Some(now - t_kill);
        }
        if now > ghost_gone_by {
            assert!(!ghost_listed, "the killed aria2c is still listed {:?} after it died", now - t_kill);
        }
        if now > qbt_cycle_end && now > ghost_gone_by {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    println!(
        "killed aria2c gone {ghost_gone_at:?} after it died; qbittorrent listed for {:?}",
        qbt_first_seen.elapsed()
    );
    assert_eq!(counters(&c), Counters { seeders: OWN + 1, leechers: 0, completed: base + 3 });
    let log = c.server_log();
    assert!(!log.contains("checking every piece"), "a server start re-hashed the archive:\n{log}");
}
