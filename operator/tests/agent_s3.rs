//! The agent's archive upload and download against a real S3 server (moto, started on a free
//! loopback port; `scripts/install-s3.sh` installs it, `MAPSNAP_TEST_PYTHON` picks the
//! interpreter), through `mapsnap::storage`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use mapsnap::storage::{Location, Storage, StorageConfig};
mod common;

use mapsnap_operator::crd::{AgentOperation, AgentTask};
use mapsnap_operator::node::{NodeAgent, NodePaths, StorageBlobs};
use sha2::Digest;

const BUCKET: &str = "snap";
const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

struct Moto {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(port: u16, method: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

fn moto() -> Moto {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = std::fs::File::create(dir.path().join("moto.log")).expect("log");
    let python = std::env::var("MAPSNAP_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let child = Command::new(&python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start moto ({python} -m moto.server): {e}; run make deps")
        });
    let mut m = Moto {
        port,
        child,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(port, "GET", "/moto-api/") != Some(200) {
        if let Ok(Some(status)) = m.child.try_wait() {
            panic!("moto exited at once ({status}); run make deps (scripts/install-s3.sh)");
        }
        assert!(Instant::now() < deadline, "moto did not answer within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        http(port, "PUT", &format!("/{BUCKET}")),
        Some(200),
        "create bucket"
    );
    m.port = port;
    m
}

fn config(m: &Moto) -> StorageConfig {
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    StorageConfig {
        s3: vec![
            kv("endpoint", &format!("http://127.0.0.1:{}", m.port)),
            kv("allow_http", "true"),
            kv("region", "us-east-1"),
            kv("access_key_id", "mapsnap-test"),
            kv("secret_access_key", "mapsnap-test-secret"),
        ],
        ..StorageConfig::default()
    }
}

fn paths(root: &std::path::Path) -> NodePaths {
    let p = NodePaths {
        requests: root.join("requests"),
        restores: root.join("restores"),
        checkpoints: root.join("checkpoints"),
    };
    std::fs::create_dir_all(&p.checkpoints).expect("mkdir");
    p
}

fn task(op: AgentOperation) -> AgentTask {
    common::agent_task(op, "n", Some(ID), Timestamp::now())
}

#[test]
fn archive_round_trip_through_s3() {
    let m = moto();
    let cfg = config(&m);
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = Arc::new(StorageBlobs::new(cfg.clone()));
    let allowed = vec![format!("s3://{BUCKET}/mapsnap")];
    let images = Arc::new(common::KeptImages::default());
    let source = NodeAgent::new(paths(&dir.path().join("node-a")), blobs.clone())
        .with_allowed_locations(allowed.clone());
    let target = NodeAgent::new(paths(&dir.path().join("node-b")), blobs)
        .with_allowed_locations(allowed)
        .with_images(images.clone());

    let snapshot = format!("s3://{BUCKET}/mapsnap/edge/lb/u1/maps.mapsnap");
    let archive = format!("s3://{BUCKET}/mapsnap/edge/lb/u1/checkpoint.tar");
    common::hook_writes_snapshot(&cfg, &snapshot, ID);
    // 12 MiB: more than one multipart part (8 MiB).
    let bytes: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
    let local = source
        .paths
        .checkpoints
        .join("checkpoint-lb-0_edge-lb-x.tar");
    std::fs::write(&local, &bytes).expect("archive");

    let mut up = task(AgentOperation::UploadArchive);
    up.node_archive = Some(local.display().to_string());
    up.archive = Some(archive.clone());
    up.snapshot = Some(snapshot.clone());
    let r = source.execute("edge/lb", "u1", &up, "node-a", Timestamp::now());
    assert!(r.succeeded, "{r:?}");
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    assert_eq!(r.archive_sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(r.archive_size, Some(12 << 20));
    let manifest = r.manifest.expect("manifest read from S3");
    assert_eq!(manifest.maps[0].name, "flows");

    let mut down = task(AgentOperation::DownloadArchive);
    down.archive = Some(archive.clone());
    down.archive_sha256 = Some(sha.clone());
    down.archive_size = Some(12 << 20);
    down.snapshot = Some(snapshot.clone());
    down.restore_pod = Some("edge/lb-r".into());
    down.container = Some("lb".into());
    let r = target.execute("edge/lb", "u1", &down, "node-b", Timestamp::now());
    assert!(r.succeeded, "{r:?}");
    let pushed = images.pushed.lock().expect("lock").clone();
    assert_eq!(pushed.len(), 1);
    assert!(
        pushed[0].3 == bytes,
        "the image was built from another archive"
    );
    assert_eq!(r.image.as_deref(), Some(pushed[0].2.as_str()));
    assert!(
        !target
            .paths
            .checkpoints
            .join("mapsnap-restore-u1.tar")
            .exists(),
        "the node copy of the archive goes once the image is pushed"
    );

    // Someone replaces the stored archive: the download refuses it.
    let s = Storage::open(Location::parse(&archive).expect("loc"), &cfg).expect("open");
    let mut w = s.writer(true).expect("writer");
    w.write_all(b"not the archive").expect("write");
    w.commit().expect("commit");
    let r = target.execute("edge/lb", "u1", &down, "node-b", Timestamp::now());
    assert!(!r.succeeded && r.permanent, "{r:?}");
    assert_eq!(r.reason.as_deref(), Some("DataMismatch"));

    // Cleanup deletes the remote objects and their manifests; a second cleanup (a retried
    // finalizer) finds nothing and still succeeds.
    let mut clean = task(AgentOperation::Cleanup);
    clean.container_id = None;
    clean.delete_objects = vec![snapshot.clone(), archive.clone()];
    let r = source.execute("edge/lb", "u1", &clean, "node-a", Timestamp::now());
    assert!(r.succeeded, "{r:?}");
    for loc in [&snapshot, &archive] {
        let s = Storage::open(Location::parse(loc).expect("loc"), &cfg).expect("open");
        assert!(s.head().expect("head").is_none(), "{loc} deleted");
        assert!(
            s.read_manifest().expect("manifest").is_none(),
            "{loc} manifest deleted"
        );
    }
    let r = source.execute("edge/lb", "u1", &clean, "node-a", Timestamp::now());
    assert!(r.succeeded, "{r:?}");
}

#[test]
fn unreachable_storage_is_a_transient_failure() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    let cfg = StorageConfig {
        s3: vec![
            kv("endpoint", &format!("http://127.0.0.1:{port}")),
            kv("allow_http", "true"),
            kv("region", "us-east-1"),
            kv("access_key_id", "k"),
            kv("secret_access_key", "s"),
        ],
        retries: 0,
        timeout: Duration::from_secs(10),
        ..StorageConfig::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = NodeAgent::new(paths(dir.path()), Arc::new(StorageBlobs::new(cfg)))
        .with_allowed_locations(vec![format!("s3://{BUCKET}/a")]);
    let local = agent.paths.checkpoints.join("checkpoint-x.tar");
    std::fs::write(&local, b"x").expect("archive");
    let mut up = task(AgentOperation::UploadArchive);
    up.node_archive = Some(local.display().to_string());
    up.archive = Some(format!("s3://{BUCKET}/a/edge/lb/u/checkpoint.tar"));
    up.snapshot = Some(format!("s3://{BUCKET}/a/edge/lb/u/maps.mapsnap"));
    let r = agent.execute("edge/lb", "u", &up, "n", Timestamp::now());
    assert!(!r.succeeded, "{r:?}");
    assert!(!r.permanent, "an unreachable endpoint may come back: {r:?}");
    assert_eq!(r.reason.as_deref(), Some("StorageFailed"));
}
