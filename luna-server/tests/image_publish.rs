//! Publishing: revisions appear whole or not at all, keep-N, rollback, partial packs, the
//! lchroot lock, one pack at a time, the API and the HTTP downloads.

mod image_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use image_support::{fake_dracut, sha256_file, Env, KVER};
use luna_server::image::{self, metainfo, pack, ImageError, JobState, PackRequest};
use tower::ServiceExt;

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn pack_publishes_a_whole_revision() {
    let env = Env::new(|_, _| {}).await;
    let rev = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    assert_eq!(rev.id, 1);
    let img = env.image().await;
    assert_eq!(img.current_revision, Some(1));
    assert_eq!(img.revisions, vec![rev.clone()]);
    let dir = env.rev_dir(1);
    assert_eq!(
        files(&dir),
        [
            ".verified",
            "compute.tar.zst",
            "compute.torrent",
            &format!("initramfs-{KVER}.img"),
            &format!("vmlinuz-{KVER}")
        ]
    );
    assert_eq!(files(&env.data_dir.join("images/compute")), [".pack.lock", "1"], "no tmp left");
    assert_eq!(sha256_file(&dir.join(&rev.archive)), rev.sha256);
    assert_eq!(rev.archive_size, std::fs::metadata(dir.join(&rev.archive)).unwrap().len());
    assert_eq!(rev.kernel_version, KVER);
    // the kernel is the image's, the initramfs came from dracut with the image's modules
    assert_eq!(std::fs::read(dir.join(&rev.kernel)).unwrap(), b"not really a kernel");
    let initrd = std::fs::read_to_string(dir.join(&rev.initrd)).unwrap();
    assert!(initrd.contains(&format!("--kmoddir {}/usr/lib/modules/{KVER}", env.chroot.display())), "{initrd}");
    assert!(initrd.contains("--add luna network-legacy base") && initrd.contains("--no-hostonly"), "{initrd}");
    // the torrent: ours, private, no web seed (the HTTP URL is for agents' plans only), info hash recorded
    let t = metainfo::parse(&std::fs::read(dir.join(&rev.torrent)).unwrap()).unwrap();
    assert_eq!(hex::encode(t.info_hash), rev.info_hash);
    assert_eq!(t.announce, "http://127.0.0.1:7050/announce");
    assert!(t.url_list.is_empty(), "{:?}", t.url_list);
    assert!(t.private);
    assert_eq!((t.name.as_str(), t.length, t.piece_length), ("compute.tar.zst", rev.archive_size, rev.piece_length));
    // other BitTorrent tools read the same info hash, size and privacy from our .torrent
    let show = std::process::Command::new("transmission-show").arg(dir.join(&rev.torrent)).output().unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains(&format!("Hash: {}", rev.info_hash)) && show.contains("Private torrent"), "{show}");
    let aria = std::process::Command::new("aria2c").arg("--show-files").arg(dir.join(&rev.torrent)).output().unwrap();
    let aria = String::from_utf8_lossy(&aria.stdout).replace(',', "");
    assert!(aria.contains(&format!("Info Hash: {}", rev.info_hash)), "{aria}");
    assert!(aria.contains(&format!("({})", rev.archive_size)), "{aria}");
    // excluded paths are not in the archive
    let listing =
        std::process::Command::new("tar").args(["--zstd", "-tf"]).arg(dir.join(&rev.archive)).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("boot/vmlinuz-"), "{listing}");
    // the default grab_exclude leaves the node's identity out (the agent writes each node's)
    assert!(!listing.contains("etc/hostname"), "{listing}");
    assert!(!listing.contains("should-not-be-packed") && !listing.contains("pkgcache"), "{listing}");
}

#[tokio::test]
async fn a_failed_pack_leaves_no_trace() {
    let env =
        Env::new(|dir, c| c.dracut = fake_dracut(dir, "echo dracut broke >&2; exit 3", true).display().to_string())
            .await;
    let e = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap_err().to_string();
    assert!(e.contains("dracut broke"), "{e}");
    assert_eq!(files(&env.data_dir.join("images/compute")), [".pack.lock"]);
    let img = env.image().await;
    assert!(img.revisions.is_empty() && img.current_revision.is_none());

    let env = Env::new(|dir, c| c.dracut = fake_dracut(dir, "", false).display().to_string()).await;
    let e = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap_err().to_string();
    assert!(e.contains("no 'luna' module") && e.contains("95luna"), "{e}");
    assert_eq!(files(&env.data_dir.join("images/compute")), [".pack.lock"]);
}

#[tokio::test]
async fn readers_never_see_half_a_revision() {
    let env = Env::new(|dir, c| {
        c.keep_revisions = 2;
        // slow enough for the reader to look many times mid-pack
        c.dracut = fake_dracut(dir, "sleep 0.3", true).display().to_string();
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (svc, data, st) = (env.service.clone(), env.data_dir.clone(), stop.clone());
    let reader = tokio::spawn(async move {
        let mut looks = 0;
        while !st.load(Ordering::Relaxed) {
            let img = image::osimage(&svc, "compute").await.unwrap();
            for r in &img.revisions {
                let dir = data.join("images/compute").join(r.id.to_string());
                for f in [&r.archive, &r.torrent, &r.kernel, &r.initrd] {
                    assert!(dir.join(f).is_file(), "listed revision {} lacks {f}", r.id);
                }
            }
            if let Some(cur) = img.current_revision {
                assert!(img.revisions.iter().any(|r| r.id == cur));
            }
            // every published directory is complete
            if let Ok(rd) = std::fs::read_dir(data.join("images/compute")) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.parse::<u32>().is_ok() {
                        if let Ok(list) = std::fs::read_dir(e.path()) {
                            let count = list.count();
                            assert!(count == 0 || count == 5, "revision dir {n} has {count} files");
                        }
                    }
                }
            }
            looks += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        looks
    });
    for _ in 0..3 {
        image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let looks = reader.await.unwrap();
    assert!(looks > 20, "reader looked {looks} times");
    let img = env.image().await;
    assert_eq!(img.revisions.iter().map(|r| r.id).collect::<Vec<_>>(), [2, 3], "keep 2");
    assert_eq!(img.current_revision, Some(3));
    assert!(!env.rev_dir(1).exists(), "dropped revision deleted");
}

#[tokio::test]
async fn rollback_and_partial_packs() {
    let env = Env::new(|_, _| {}).await;
    let r1 = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    std::fs::write(env.chroot.join("etc/issue"), b"changed\n").unwrap();
    let r2 = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    assert_ne!(r1.sha256, r2.sha256);
    assert_ne!(r1.info_hash, r2.info_hash);

    // boot-only: same archive (hard link) and info hash, new kernel/initramfs
    let r3 =
        image::pack_now(&env.state, "compute", PackRequest { boot_only: true, ..Default::default() }).await.unwrap();
    use std::os::unix::fs::MetadataExt;
    let ino = |rev: u32, f: &str| std::fs::metadata(env.rev_dir(rev).join(f)).unwrap().ino();
    assert_eq!(ino(3, &r3.archive), ino(2, &r2.archive));
    assert_eq!((r3.sha256.as_str(), r3.info_hash.as_str()), (r2.sha256.as_str(), r2.info_hash.as_str()));
    assert_ne!(ino(3, &r3.initrd), ino(2, &r2.initrd));
    let t3 = metainfo::parse(&std::fs::read(env.rev_dir(3).join(&r3.torrent)).unwrap()).unwrap();
    assert!(t3.url_list.is_empty());

    // image-only: new archive, kernel and initramfs linked from the current revision
    std::fs::write(env.chroot.join("etc/motd"), b"hi\n").unwrap();
    let r4 =
        image::pack_now(&env.state, "compute", PackRequest { image_only: true, ..Default::default() }).await.unwrap();
    assert_eq!(ino(4, &r4.initrd), ino(3, &r3.initrd));
    assert_ne!(r4.sha256, r3.sha256);

    let img = env.image().await;
    assert_eq!(img.revisions.iter().map(|r| r.id).collect::<Vec<_>>(), [2, 3, 4], "keep 3 by default");
    assert!(!env.rev_dir(1).exists());

    let o = image::rollback(&env.state, "compute", None).await.unwrap();
    assert_eq!(o.current_revision, Some(3));
    let o = image::rollback(&env.state, "compute", None).await.unwrap();
    assert_eq!(o.current_revision, Some(2));
    let e = image::rollback(&env.state, "compute", None).await.unwrap_err().to_string();
    assert!(e.contains("no revision older than 2"), "{e}");
    let e = image::rollback(&env.state, "compute", Some(1)).await.unwrap_err().to_string();
    assert!(e.contains("no revision 1") && e.contains("2, 3, 4"), "{e}");
    let o = image::rollback(&env.state, "compute", Some(4)).await.unwrap();
    assert_eq!(o.current_revision, Some(4));

    // a partial pack needs a revision to reuse
    let fresh = Env::new(|_, _| {}).await;
    let e = image::pack_now(&fresh.state, "compute", PackRequest { boot_only: true, ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Pack(pack::PackError::NothingToReuse { .. })), "{e}");
}

#[tokio::test]
async fn lchroot_lock_and_concurrent_packs_are_refused() {
    let env = Env::new(|dir, c| c.dracut = fake_dracut(dir, "sleep 1", true).display().to_string()).await;
    let lock = env.data_dir.join("lchroot/compute.lock");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    std::fs::write(&lock, format!("{}\n", std::process::id())).unwrap();
    // what an lchroot session holds (luna-cli's lchroot/lock.rs): a shared flock
    let session = std::fs::File::open(&lock).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&session), libc::LOCK_SH) }, 0);
    let e = image::start_pack(&env.state, "compute", PackRequest::default()).await.unwrap_err().to_string();
    assert_eq!(
        e,
        format!("osimage 'compute' is open in lchroot (pid {}); close it or use --force", std::process::id())
    );
    let job =
        image::start_pack(&env.state, "compute", PackRequest { force: true, ..Default::default() }).await.unwrap();
    assert!(image::job(&env.state, job).unwrap().warning.unwrap().contains("--force"));
    // a second pack while the first runs
    let e =
        image::start_pack(&env.state, "compute", PackRequest { force: true, ..Default::default() }).await.unwrap_err();
    assert!(matches!(e, ImageError::AlreadyPacking { job: Some(j), .. } if j == job), "{e}");
    let done = wait_job(&env, job).await;
    assert_eq!(done.revision, Some(1));
    // a session that ended (its flock gone) is no session, whatever the file lists
    drop(session);
    let r = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    assert_eq!(r.id, 2);
}

async fn wait_job(env: &Env, job: u64) -> image::JobStatus {
    for _ in 0..600 {
        let j = image::job(&env.state, job).unwrap();
        match j.state {
            JobState::Running => tokio::time::sleep(Duration::from_millis(50)).await,
            JobState::Done => return j,
            JobState::Failed => panic!("job failed: {:?}", j.error),
        }
    }
    panic!("job {job} did not finish");
}

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec();
    (status, headers, body)
}

#[tokio::test]
async fn api_and_downloads() {
    let env = Env::new(|_, _| {}).await;
    let api = image::http::router(env.state.clone());
    let files = image::http::files_router(env.state.clone());
    let post = |uri: &str, body: &str| {
        Request::post(uri).header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_string())).unwrap()
    };
    let (s, _, b) =
        call(&api, post("/api/v1/osimage/compute/pack", r#"{"boot_only":false,"image_only":false,"force":false}"#))
            .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&b));
    let job = serde_json::from_slice::<serde_json::Value>(&b).unwrap()["job"].as_u64().unwrap();
    let j = loop {
        let (s, _, b) = call(&api, Request::get(format!("/api/v1/jobs/{job}")).body(Body::empty()).unwrap()).await;
        assert_eq!(s, StatusCode::OK);
        let j: serde_json::Value = serde_json::from_slice(&b).unwrap();
        if j["state"] != "running" {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!(j["revision"], 1);
    assert!(j["total"].as_u64().unwrap() > 10_000_000 && j["bytes"] == j["total"], "{j}");

    let (s, _, b) = call(&api, post("/api/v1/osimage/compute/pack", r#"{"bootonly":true}"#)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&b));
    let (s, _, _) = call(&api, post("/api/v1/osimage/nope/pack", "")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = call(&api, Request::get("/api/v1/jobs/999").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    let (s, _, b) = call(&api, Request::get("/api/v1/osimage/compute/revisions").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    let list: Vec<image::RevisionInfo> = serde_json::from_slice(&b).unwrap();
    assert_eq!(list.iter().map(|r| (r.revision.id, r.current)).collect::<Vec<_>>(), [(1, false), (2, true)]);
    assert_eq!(list[0].urls.archive, "/images/compute/1/compute.tar.zst");

    let (s, _, b) = call(&api, post("/api/v1/osimage/compute/rollback", r#"{"revision":null}"#)).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&b).unwrap()["current_revision"], 1);
    let (s, _, _) = call(&api, post("/api/v1/osimage/compute/rollback", r#"{"revision":9}"#)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // downloads, with Range
    let archive = std::fs::read(env.rev_dir(1).join("compute.tar.zst")).unwrap();
    let (s, h, b) = call(&files, Request::get("/images/compute/1/compute.tar.zst").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b, archive);
    assert_eq!(h[header::CONTENT_LENGTH], archive.len().to_string().as_str());
    let (s, h, b) = call(
        &files,
        Request::get("/images/compute/1/compute.tar.zst")
            .header(header::RANGE, "bytes=100-199")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(b, &archive[100..200]);
    assert_eq!(h[header::CONTENT_RANGE], format!("bytes 100-199/{}", archive.len()).as_str());
    for bad in [
        "/images/compute/1/.verified",
        "/images/compute/..%2F..%2Fluna.db/x",
        "/images/compute/.1.tmp/compute.tar.zst",
        "/images/compute/7/compute.tar.zst",
        "/images/..%2Fetc/1/passwd",
    ] {
        let (s, _, _) = call(&files, Request::get(bad).body(Body::empty()).unwrap()).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{bad}");
    }
}

/// A group in overlay mode makes the pack build the squashfs too: its own torrent and marker in
/// the same revision directory, recorded on the revision; a boot-only pack reuses it (same
/// bytes, same info hash); an image nobody boots in overlay mode gets none.
#[tokio::test]
async fn overlay_groups_get_a_squashfs_in_the_same_revision() {
    use luna_core::model::Kind;
    let env = Env::new(|_, _| {}).await;
    let r1 = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    assert_eq!(r1.squashfs, None, "nobody uses overlay: no squashfs");
    assert!(!files(&env.rev_dir(1)).iter().any(|f| f.contains("squashfs")));

    let group = serde_json::json!({"name": "ovl", "osimage": "compute", "root": "overlay"});
    env.service.create(Kind::Group, group).await.unwrap();
    let r2 = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    let sq = r2.squashfs.clone().expect("a squashfs for the overlay group");
    let dir = env.rev_dir(2);
    assert_eq!(
        files(&dir),
        [
            ".verified",
            ".verified-squashfs",
            "compute.squashfs",
            "compute.squashfs.torrent",
            "compute.tar.zst",
            "compute.torrent",
            &format!("initramfs-{KVER}.img"),
            &format!("vmlinuz-{KVER}")
        ]
    );
    assert_eq!(sha256_file(&dir.join(&sq.file)), sq.sha256);
    assert_eq!(std::fs::metadata(dir.join(&sq.file)).unwrap().len(), sq.size);
    let t = metainfo::parse(&std::fs::read(dir.join(&sq.torrent)).unwrap()).unwrap();
    assert_eq!(hex::encode(t.info_hash), sq.info_hash);
    assert_ne!(sq.info_hash, r2.info_hash);
    assert!(t.private && t.url_list.is_empty());
    assert_eq!((t.name.as_str(), t.length, t.piece_length), ("compute.squashfs", sq.size, sq.piece_length));
    let marker = pack::Verified::read_named(&dir, pack::SQUASHFS_VERIFIED_MARKER).unwrap();
    assert!(marker.matches(&dir.join(&sq.file)) && marker.info_hash == sq.info_hash);
    // What is in it: the tree without the excluded paths.
    let ls = std::process::Command::new("unsquashfs").arg("-lc").arg(dir.join(&sq.file)).output().unwrap();
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.contains("boot/vmlinuz-"), "{ls}");
    assert!(!ls.contains("etc/hostname") && !ls.contains("should-not-be-packed") && !ls.contains("pkgcache"), "{ls}");
    // The same tree packed again: the same squashfs, byte for byte.
    let r3 = image::pack_now(&env.state, "compute", PackRequest::default()).await.unwrap();
    assert_eq!(r3.squashfs.as_ref().map(|s| &s.sha256), Some(&sq.sha256));
    // Boot-only reuses it.
    let r4 =
        image::pack_now(&env.state, "compute", PackRequest { boot_only: true, ..Default::default() }).await.unwrap();
    assert_eq!(r4.squashfs.as_ref().map(|s| (&s.sha256, &s.info_hash)), Some((&sq.sha256, &sq.info_hash)));
    // The revisions listing names its files.
    let listed = image::revisions(&env.state, "compute").await.unwrap();
    let last = listed.last().unwrap();
    assert_eq!(last.urls.squashfs.as_deref(), Some("/images/compute/4/compute.squashfs"));
    assert_eq!(last.urls.squashfs_torrent.as_deref(), Some("/images/compute/4/compute.squashfs.torrent"));
}
