//! The seeder on 127.0.0.1: a librqbit client downloads a packed image from it alone, a damaged
//! archive is detected at restart and reported unhealthy, dropped revisions stop being seeded.

mod image_support;

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image_support::{sha256_file, Env};
use librqbit::{AddTorrent, AddTorrentOptions, Session, SessionOptions};
use luna_server::image::seeder::{PeerRegistrar, Seeder};
use luna_server::image::{self, PackRequest, SeedStatus};

async fn seeding_env(keep: u32) -> Env {
    Env::new(move |_, c| {
        c.seed_listen = "127.0.0.1:0".parse().unwrap();
        c.keep_revisions = keep;
    })
    .await
}

async fn wait_status(seeder: &Seeder, info_hash: &str, want: impl Fn(&SeedStatus) -> bool) -> SeedStatus {
    let mut last = None;
    for _ in 0..300 {
        seeder.refresh().await;
        if let Some(s) = seeder.status().get(info_hash) {
            if want(s) {
                return s.clone();
            }
            last = Some(s.clone());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("seeder status for {info_hash} never matched; last {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_downloads_the_image_from_the_seeder_alone() {
    let env = seeding_env(3).await;
    let rev = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    type Calls = Vec<([u8; 20], SocketAddrV4)>;
    let calls: Arc<Mutex<Calls>> = Arc::default();
    let c = calls.clone();
    let reg: PeerRegistrar = Arc::new(move |h, a| c.lock().unwrap().push((h, a)));
    let seeder = Seeder::start(env.state.clone(), Some(reg)).await.unwrap();
    let addr = seeder.listen_addr();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);
    let st = wait_status(&seeder, &rev.info_hash, |s| s.healthy).await;
    assert_eq!(st.total_bytes, rev.archive_size);
    let SocketAddr::V4(a4) = addr else { panic!("v4 expected") };
    assert_eq!(calls.lock().unwrap().as_slice(), [(hex::decode(&rev.info_hash).unwrap().try_into().unwrap(), a4)]);

    // a plain BitTorrent client with no tracker, told only the seeder's address
    let out = tempfile::tempdir().unwrap();
    let leech = Session::new_with_opts(
        out.path().to_path_buf(),
        SessionOptions { dht: None, disable_local_service_discovery: true, listen: None, ..Default::default() },
    )
    .await
    .unwrap();
    let torrent = std::fs::read(env.rev_dir(1).join(&rev.torrent)).unwrap();
    let h = leech
        .add_torrent(
            AddTorrent::from_bytes(torrent),
            Some(AddTorrentOptions {
                initial_peers: Some(vec![addr]),
                disable_trackers: true,
                output_folder: Some(out.path().to_string_lossy().into_owned()),
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_handle()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(120), h.wait_until_completed())
        .await
        .expect("download timed out")
        .unwrap();
    assert_eq!(sha256_file(&out.path().join(&rev.archive)), rev.sha256);
    let up = wait_status(&seeder, &rev.info_hash, |s| s.uploaded_bytes >= rev.archive_size).await;
    assert!(up.healthy);
    leech.stop().await;
    seeder.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_archive_is_found_at_restart() {
    let env = seeding_env(3).await;
    let rev = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    let seeder = Seeder::start(env.state.clone(), None).await.unwrap();
    wait_status(&seeder, &rev.info_hash, |s| s.healthy).await;
    seeder.stop().await;
    drop(seeder);
    // packing knew every piece: the fast-resume bitfield says "all present", so librqbit only
    // spot-checks instead of hashing the whole archive
    let pieces = rev.archive_size.div_ceil(rev.piece_length) as usize;
    let bitv = std::fs::read(env.data_dir.join("seeder").join(format!("{}.bitv", rev.info_hash))).unwrap();
    assert_eq!(bitv, luna_server::image::seeder::full_bitfield(pieces));

    // restart untouched: still healthy (fast-resume, no full re-hash needed)
    env.state.seeding.write().unwrap().clear();
    let seeder = Seeder::start(env.state.clone(), None).await.unwrap();
    wait_status(&seeder, &rev.info_hash, |s| s.healthy).await;
    seeder.stop().await;
    drop(seeder);

    // three more restarts in a row: nothing is re-hashed (librqbit leaves the complete
    // archive, and so its mtime, alone; the marker keeps matching)
    let path = env.rev_dir(1).join(&rev.archive);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    for round in 1..=3 {
        env.state.seeding.write().unwrap().clear();
        let seeder = Seeder::start(env.state.clone(), None).await.unwrap();
        wait_status(&seeder, &rev.info_hash, |s| s.healthy).await;
        assert_eq!(seeder.full_checks(), 0, "restart {round} re-hashed the archive");
        seeder.stop().await;
        drop(seeder);
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime, "restart {round} touched the archive");
    }

    // flip one byte in the middle of the archive
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    env.state.seeding.write().unwrap().clear();
    let seeder = Seeder::start(env.state.clone(), None).await.unwrap();
    let st = wait_status(&seeder, &rev.info_hash, |s| s.state == "live").await;
    assert!(!st.healthy, "{st:?}");
    assert_eq!(seeder.full_checks(), 1);
    assert!(st.have_bytes < st.total_bytes && st.total_bytes - st.have_bytes <= rev.piece_length, "{st:?}");
    assert!(st.error.as_deref().unwrap_or_default().contains("damaged"), "{st:?}");
    seeder.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_no_longer_kept_stop_being_seeded() {
    let env = seeding_env(1).await;
    let r1 = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    let seeder = Seeder::start(env.state.clone(), None).await.unwrap();
    wait_status(&seeder, &r1.info_hash, |s| s.healthy).await;
    // a file that is packed (etc/hostname is in the default grab_exclude)
    std::fs::write(env.chroot.join("etc/motd"), b"v2\n").unwrap();
    let r2 = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    seeder.reconcile().await.unwrap();
    wait_status(&seeder, &r2.info_hash, |s| s.healthy).await;
    let st = seeder.status();
    assert!(!st.contains_key(&r1.info_hash), "{st:?}");
    assert_eq!(st.len(), 1);
    seeder.stop().await;
}
