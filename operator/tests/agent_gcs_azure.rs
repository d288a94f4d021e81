//! The agent's archive upload, download and cleanup through `gs://` and `az://`, against real
//! protocol servers (fake-gcs-server and Azurite on loopback ports; scripts/install-gcs.sh and
//! scripts/install-azurite.sh install them), through `mapsnap::storage`.

mod common;
#[path = "../../mapsnap/tests/storage_common/emulators.rs"]
mod emulators;

use std::sync::Arc;

use emulators::{Emu, Emulator};
use jiff::Timestamp;
use mapsnap::storage::{Location, Storage, StorageConfig};
use mapsnap_operator::crd::{AgentOperation, AgentTask};
use mapsnap_operator::node::{NodeAgent, NodePaths, StorageBlobs};
use sha2::Digest;

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn config(emu: &Emulator) -> StorageConfig {
    let (section, opts) = emu.section();
    let opts: Vec<(String, String)> = opts.into_iter().map(|(k, v)| (k.into(), v)).collect();
    match section {
        "gcs" => StorageConfig {
            gcs: opts,
            ..StorageConfig::default()
        },
        _ => StorageConfig {
            azure: opts,
            ..StorageConfig::default()
        },
    }
}

fn agent(root: &std::path::Path, cfg: &StorageConfig, allowed: &str) -> NodeAgent {
    let paths = NodePaths {
        requests: root.join("requests"),
        restores: root.join("restores"),
        checkpoints: root.join("checkpoints"),
    };
    std::fs::create_dir_all(&paths.checkpoints).expect("mkdir");
    NodeAgent::new(paths, Arc::new(StorageBlobs::new(cfg.clone())))
        .with_allowed_locations(vec![allowed.to_string()])
}

/// Upload from node A (a 12 MiB archive: a multipart / resumable upload), download on node B
/// into a checkpoint image built from exactly those bytes, then cleanup of both objects.
fn task(op: AgentOperation) -> AgentTask {
    common::agent_task(op, "n", Some(ID), Timestamp::now())
}

fn round_trip(kind: Emu) {
    let emu = Emulator::start(kind);
    let scheme = emu.scheme();
    let cfg = config(&emu);
    let dir = tempfile::tempdir().expect("tempdir");
    let allowed = format!("{scheme}://snap/mapsnap");
    let images = Arc::new(common::KeptImages::default());
    let source = agent(&dir.path().join("node-a"), &cfg, &allowed);
    let target = agent(&dir.path().join("node-b"), &cfg, &allowed).with_images(images.clone());

    let snapshot = format!("{scheme}://snap/mapsnap/edge/lb/u1/maps.mapsnap");
    let archive = format!("{scheme}://snap/mapsnap/edge/lb/u1/checkpoint.tar");
    common::hook_writes_snapshot(&cfg, &snapshot, ID);
    let bytes: Vec<u8> = (0..12u32 << 20).map(|i| (i % 253) as u8).collect();
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
    assert!(r.succeeded, "{scheme}: {r:?}");
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    assert_eq!(r.archive_sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(r.archive_size, Some(12 << 20));
    let manifest = r
        .manifest
        .expect("the snapshot's manifest, read from the bucket");
    assert_eq!(manifest.maps[0].name, "flows");

    let mut down = task(AgentOperation::DownloadArchive);
    down.archive = Some(archive.clone());
    down.archive_sha256 = Some(sha.clone());
    down.archive_size = Some(12 << 20);
    down.snapshot = Some(snapshot.clone());
    down.restore_pod = Some("edge/lb-r".into());
    down.container = Some("lb".into());
    let r = target.execute("edge/lb", "u1", &down, "node-b", Timestamp::now());
    assert!(r.succeeded, "{scheme}: {r:?}");
    let pushed = images.pushed.lock().expect("lock").clone();
    assert_eq!(pushed.len(), 1);
    assert!(
        pushed[0].3 == bytes,
        "{scheme}: the image was built from other bytes"
    );

    let mut clean = task(AgentOperation::Cleanup);
    clean.container_id = None;
    clean.delete_objects = vec![snapshot.clone(), archive.clone()];
    let r = source.execute("edge/lb", "u1", &clean, "node-a", Timestamp::now());
    assert!(r.succeeded, "{scheme}: {r:?}");
    for loc in [&snapshot, &archive] {
        let s = Storage::open(Location::parse(loc).expect("loc"), &cfg).expect("open");
        assert!(s.head().expect("head").is_none(), "{loc} deleted");
        assert!(
            s.read_manifest().expect("manifest").is_none(),
            "{loc} manifest deleted"
        );
    }
}

#[test]
fn agent_round_trip_through_gcs() {
    round_trip(Emu::FakeGcs);
}

#[test]
fn agent_round_trip_through_azure() {
    round_trip(Emu::Azurite);
}
