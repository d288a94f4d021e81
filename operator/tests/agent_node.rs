//! The agent's node-side work against a real file system and `file://` storage: hook request
//! files, archive upload and download with digests, path checks, cleanup.

use std::path::Path;
use std::sync::Arc;

use jiff::Timestamp;
use mapsnap::storage::{Manifest, ManifestMap, ManifestSource, StorageConfig};
mod common;

use mapsnap_operator::crd::{AgentOperation, AgentTask};
use mapsnap_operator::node::{HookRequest, NodeAgent, NodePaths, RestoreRequest, StorageBlobs};
use sha2::Digest;

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const UID: &str = "u";

fn t0() -> Timestamp {
    Timestamp::from_second(1_748_779_200).expect("time")
}

struct Node {
    agent: NodeAgent,
    images: Arc<common::KeptImages>,
    paths: NodePaths,
    store: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn node() -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = NodePaths {
        requests: dir.path().join("run/mapsnap/requests"),
        restores: dir.path().join("run/mapsnap/restores"),
        checkpoints: dir.path().join("var/lib/kubelet/checkpoints"),
    };
    std::fs::create_dir_all(&paths.checkpoints).expect("mkdir");
    let store = dir.path().join("store");
    let images = Arc::new(common::KeptImages::default());
    let agent = NodeAgent::new(
        paths.clone(),
        Arc::new(StorageBlobs::new(StorageConfig::default())),
    )
    .with_allowed_locations(vec![
        format!("file://{}", store.display()),
        "s3://snaps/mapsnap".into(),
        "s3://b".into(),
    ])
    .with_images(images.clone());
    Node {
        agent,
        images,
        paths,
        store: dir.path().join("store"),
        _dir: dir,
    }
}

fn task(op: AgentOperation) -> AgentTask {
    common::agent_task(op, "node-a", None, t0())
}

fn loc(p: &Path) -> String {
    format!("file://{}", p.display())
}

fn write_snapshot(snapshot: &Path, container: &str) {
    std::fs::create_dir_all(snapshot.parent().expect("dir")).expect("mkdir");
    std::fs::write(snapshot, b"snap").expect("snapshot");
    let m = Manifest {
        manifest_version: 1,
        format_version: 1,
        snapshot: loc(snapshot),
        sha256: hex::encode(sha2::Sha256::digest(b"snap")),
        size: 4,
        created: "2025-06-01T12:00:00Z".into(),
        created_unix: 0,
        tool: "t".into(),
        source: ManifestSource {
            container_id: Some(container.into()),
            ..ManifestSource::default()
        },
        maps: vec![ManifestMap {
            name: "counters".into(),
            map_type: "percpu_array".into(),
            entries: 64,
            bytes: 4096,
            pin_path: None,
            inner: false,
        }],
        skipped: Vec::new(),
    };
    std::fs::write(format!("{}.manifest.json", snapshot.display()), m.to_json()).expect("manifest");
}

#[test]
fn prepare_writes_the_hook_request_atomically_and_private() {
    let n = node();
    let mut t = task(AgentOperation::PrepareCheckpoint);
    t.container_id = Some(ID.into());
    t.snapshot = Some("s3://snaps/mapsnap/edge/lb/u/maps.mapsnap".into());
    let r = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
    assert!(r.succeeded, "{r:?}");
    let path = n.paths.requests.join(format!("{ID}.json"));
    let req: HookRequest =
        serde_json::from_slice(&std::fs::read(&path).expect("file")).expect("json");
    assert_eq!(
        req,
        HookRequest {
            checkpoint: "edge/lb".into(),
            snapshot: "s3://snaps/mapsnap/edge/lb/u/maps.mapsnap".into(),
            stop_snapshot: None,
            created: "2025-06-01T12:00:00Z".into(),
            expires: "2025-06-01T12:10:00Z".into(),
        }
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // No temporary file left behind; running it again is harmless.
    assert_eq!(
        std::fs::read_dir(&n.paths.requests).expect("dir").count(),
        1
    );
    assert!(
        n.agent
            .execute("edge/lb", UID, &t, "node-a", t0())
            .succeeded
    );
}

#[test]
fn bad_container_ids_and_locations_are_refused() {
    let n = node();
    for id in ["../../etc/passwd", "", "a/b", ".hidden"] {
        let mut t = task(AgentOperation::PrepareCheckpoint);
        t.container_id = Some(id.into());
        t.snapshot = Some("s3://b/k".into());
        let r = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
        assert!(!r.succeeded && r.permanent, "{id}: {r:?}");
    }
    let mut t = task(AgentOperation::PrepareCheckpoint);
    t.container_id = Some(ID.into());
    t.snapshot = Some("s3://key:secret@b/k".into());
    let r = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
    assert!(!r.succeeded && r.permanent, "{r:?}");
    assert!(!n.paths.requests.join(format!("{ID}.json")).exists());
}

#[test]
fn upload_sends_the_archive_and_reads_the_manifest() {
    let n = node();
    let archive = n.paths.checkpoints.join("checkpoint-lb-0_edge-lb-2025.tar");
    std::fs::write(&archive, vec![7u8; 3 << 20]).expect("archive");
    let snapshot = n.store.join("edge/lb/u/maps.mapsnap");
    write_snapshot(&snapshot, ID);
    std::fs::create_dir_all(&n.paths.requests).expect("mkdir");
    std::fs::write(n.paths.requests.join(format!("{ID}.json")), b"{}").expect("request");
    let dest = n.store.join("edge/lb/u/checkpoint.tar");
    let mut t = task(AgentOperation::UploadArchive);
    t.container_id = Some(ID.into());
    t.node_archive = Some(archive.display().to_string());
    t.archive = Some(loc(&dest));
    t.snapshot = Some(loc(&snapshot));
    let r = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
    assert!(r.succeeded, "{r:?}");
    assert_eq!(r.archive_size, Some(3 << 20));
    assert_eq!(
        r.archive_sha256.as_deref(),
        Some(hex::encode(sha2::Sha256::digest(vec![7u8; 3 << 20])).as_str())
    );
    let m = r.manifest.expect("manifest");
    assert_eq!((m.maps.len(), m.maps[0].entries, m.size), (1, 64, 4));
    assert_eq!(m.signer_key_id, None, "no signature beside the snapshot");
    assert_eq!(std::fs::read(&dest).expect("uploaded").len(), 3 << 20);
    assert!(
        !n.paths.requests.join(format!("{ID}.json")).exists(),
        "request removed"
    );
    // The node-local archive stays until the answer is recorded, then goes.
    assert!(archive.exists());
    n.agent.after_upload(&t).expect("after upload");
    assert!(!archive.exists());
}

/// The hook signed the snapshot: the status names the key id its signature names.
#[test]
fn upload_records_the_signers_key_id() {
    let n = node();
    let archive = n.paths.checkpoints.join("checkpoint-signed.tar");
    std::fs::write(&archive, b"archive").expect("archive");
    let snapshot = n.store.join("edge/lb/u/maps.mapsnap");
    write_snapshot(&snapshot, ID);
    let pair = mapsnap::trust::keygen(None).expect("keygen");
    let mut w = mapsnap::trust::SigningWriter::new(Vec::new(), &pair.secret);
    std::io::Write::write_all(&mut w, b"snap").expect("sign");
    let (_, signed) = w.finish(None).expect("finish");
    std::fs::write(format!("{}.minisig", snapshot.display()), &signed.signature).expect("sig");
    let mut t = task(AgentOperation::UploadArchive);
    t.container_id = Some(ID.into());
    t.node_archive = Some(archive.display().to_string());
    t.archive = Some(loc(&n.store.join("edge/lb/u/checkpoint.tar")));
    t.snapshot = Some(loc(&snapshot));
    let r = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
    assert!(r.succeeded, "{r:?}");
    let want = pair.public.key_id().to_string();
    assert_eq!(want.len(), 16);
    assert_eq!(
        r.manifest.expect("manifest").signer_key_id.as_deref(),
        Some(want.as_str())
    );
    // Not a minisign signature: no key id, never a guess.
    assert_eq!(
        mapsnap_operator::node::signature_key_id(b"garbage\nAAAA\n"),
        None
    );
}

#[test]
fn upload_without_a_snapshot_goes_on_without_maps_but_refuses_another_containers() {
    let n = node();
    let archive = n.paths.checkpoints.join("checkpoint-x.tar");
    std::fs::write(&archive, b"a").expect("archive");
    let snapshot = n.store.join("edge/lb/u/maps.mapsnap");
    let mut t = task(AgentOperation::UploadArchive);
    t.container_id = Some(ID.into());
    t.node_archive = Some(archive.display().to_string());
    t.archive = Some(loc(&n.store.join("edge/lb/u/checkpoint.tar")));
    t.snapshot = Some(loc(&snapshot));
    let r = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
    assert!(r.succeeded, "{r:?}");
    assert!(r.manifest.is_none());
    assert!(
        r.message
            .as_deref()
            .is_some_and(|m| m.contains("no map snapshot"))
    );

    write_snapshot(&snapshot, "ffff0000");
    let r = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
    assert!(!r.succeeded && r.permanent, "{r:?}");
    assert_eq!(r.reason.as_deref(), Some("DataMismatch"));
}

#[test]
fn archive_paths_outside_the_checkpoint_directory_are_refused() {
    let n = node();
    let outside = n.store.join("secret.tar");
    std::fs::create_dir_all(&n.store).expect("mkdir");
    std::fs::write(&outside, b"x").expect("file");
    let link = n.paths.checkpoints.join("link.tar");
    std::os::unix::fs::symlink(&outside, &link).expect("symlink");
    let traversal = format!(
        "{}/../../../store/secret.tar",
        n.paths.checkpoints.display()
    );
    for p in [
        outside.display().to_string(),
        link.display().to_string(),
        traversal,
        "/etc/shadow".into(),
        n.paths.checkpoints.join("not-a-tar").display().to_string(),
    ] {
        let mut t = task(AgentOperation::UploadArchive);
        t.node_archive = Some(p.clone());
        t.archive = Some(loc(&n.store.join("out.tar")));
        t.snapshot = Some(loc(&n.store.join("maps.mapsnap")));
        let r = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
        assert!(!r.succeeded && r.permanent, "{p}: {r:?}");
        assert_eq!(r.reason.as_deref(), Some("TaskRefused"), "{p}");
        assert!(!n.store.join("out.tar").exists());
    }
    // Cleanup refuses them too (and deletes nothing).
    let mut t = task(AgentOperation::Cleanup);
    t.node_archive = Some(link.display().to_string());
    let r = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
    assert!(!r.succeeded, "{r:?}");
    assert!(outside.exists() && link.exists());
}

#[test]
fn download_checks_the_digest_and_writes_the_restore_request() {
    let n = node();
    let stored = n.store.join("edge/lb/u/checkpoint.tar");
    std::fs::create_dir_all(stored.parent().expect("dir")).expect("mkdir");
    let bytes = vec![42u8; 100_000];
    std::fs::write(&stored, &bytes).expect("stored");
    let mut t = task(AgentOperation::DownloadArchive);
    t.archive = Some(loc(&stored));
    t.archive_sha256 = Some(hex::encode(sha2::Sha256::digest(&bytes)));
    t.archive_size = Some(100_000);
    t.snapshot = Some("s3://b/edge/lb/u/maps.mapsnap".into());
    t.restore_pod = Some("edge/lb-0-3fa9c".into());
    t.container = Some("lb".into());
    let r = n.agent.execute("edge/lb", UID, &t, "node-b", t0());
    assert!(r.succeeded, "{r:?}");
    let local = n
        .paths
        .checkpoints
        .join(format!("mapsnap-restore-{UID}.tar"));
    let pushed = n.images.pushed.lock().expect("lock").clone();
    assert_eq!(pushed.len(), 1);
    let (container, tag, image, built_from) = pushed[0].clone();
    assert_eq!((container.as_str(), tag.as_str()), ("lb", "mapsnap-u"));
    assert!(built_from == bytes, "the image holds the fetched archive");
    assert_eq!(r.image.as_deref(), Some(image.as_str()));
    assert!(
        !local.exists(),
        "the node copy goes once the image is pushed"
    );
    let req: RestoreRequest = serde_json::from_slice(
        &std::fs::read(n.paths.restores.join("edge_lb-0-3fa9c.json")).expect("request"),
    )
    .expect("json");
    assert_eq!(req.pod, "edge/lb-0-3fa9c");
    assert_eq!(req.snapshot, "s3://b/edge/lb/u/maps.mapsnap");
    assert_eq!(req.archive, image);
    // Again (a retried task): fetched and pushed again, same image.
    let again = n.agent.execute("edge/lb", UID, &t, "node-b", t0());
    assert!(again.succeeded, "{again:?}");
    assert_eq!(again.image.as_deref(), Some(image.as_str()));

    // A stored archive that changed is refused, and nothing is left in the directory.
    std::fs::write(&stored, vec![43u8; 100_000]).expect("tamper");
    let r = n.agent.execute("edge/lb", UID, &t, "node-b", t0());
    assert!(!r.succeeded && r.permanent, "{r:?}");
    assert_eq!(r.reason.as_deref(), Some("DataMismatch"));
    let left: Vec<_> = std::fs::read_dir(&n.paths.checkpoints)
        .expect("dir")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // A missing stored archive is a (permanent) not-found.
    std::fs::remove_file(&stored).expect("rm");
    let r = n.agent.execute("edge/lb", UID, &t, "node-b", t0());
    assert!(!r.succeeded, "{r:?}");
}

#[test]
fn cleanup_removes_everything_and_is_idempotent() {
    let n = node();
    let snapshot = n.store.join("edge/lb/u/maps.mapsnap");
    write_snapshot(&snapshot, ID);
    let archive = n.store.join("edge/lb/u/checkpoint.tar");
    std::fs::write(&archive, b"a").expect("archive");
    let local = n.paths.checkpoints.join("checkpoint-lb.tar");
    std::fs::write(&local, b"a").expect("local");
    std::fs::create_dir_all(&n.paths.requests).expect("mkdir");
    std::fs::write(n.paths.requests.join(format!("{ID}.json")), b"{}").expect("req");
    std::fs::create_dir_all(&n.paths.restores).expect("mkdir");
    std::fs::write(n.paths.restores.join("edge_lb-r.json"), b"{}").expect("req");
    let mut t = task(AgentOperation::Cleanup);
    t.container_id = Some(ID.into());
    t.node_archive = Some(local.display().to_string());
    t.restore_pod = Some("edge/lb-r".into());
    t.delete_objects = vec![loc(&snapshot), loc(&archive)];
    let r = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
    assert!(r.succeeded, "{r:?}");
    for p in [
        snapshot.clone(),
        std::path::PathBuf::from(format!("{}.manifest.json", snapshot.display())),
        archive,
        local,
        n.paths.requests.join(format!("{ID}.json")),
        n.paths.restores.join("edge_lb-r.json"),
    ] {
        assert!(!p.exists(), "{} still there", p.display());
    }
    let again = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
    assert!(again.succeeded, "{again:?}");
    assert_eq!(again.message.as_deref(), Some("nothing (already clean)"));
}

/// Whoever can patch an object's status (every agent's token can) writes agent tasks. A task
/// naming foreign paths and locations, against real files: nothing outside the task's own
/// object changes.
#[test]
fn a_status_patch_with_foreign_paths_and_locations_changes_nothing_outside() {
    let n = node();
    // Another tenant's stored snapshot and archive, a host file, and a symlink planted in the
    // checkpoint directory pointing at the host file.
    let other_snap = n.store.join("edge/other/u2/maps.mapsnap");
    write_snapshot(&other_snap, ID);
    let other_ns = n.store.join("prod/lb/u/checkpoint.tar");
    std::fs::create_dir_all(other_ns.parent().expect("dir")).expect("mkdir");
    std::fs::write(&other_ns, b"prod archive").expect("prod");
    let host_file = n.store.parent().expect("root").join("etc-passwd");
    std::fs::write(&host_file, b"root:x:0:0").expect("host file");
    let link = n.paths.checkpoints.join("evil.tar");
    std::os::unix::fs::symlink(&host_file, &link).expect("symlink");
    let before = |p: &Path| std::fs::read(p).ok();
    let watched = [
        other_snap.clone(),
        std::path::PathBuf::from(format!("{}.manifest.json", other_snap.display())),
        other_ns.clone(),
        host_file.clone(),
    ];
    let snapshot_of = |paths: &[std::path::PathBuf]| -> Vec<Option<Vec<u8>>> {
        paths.iter().map(|p| before(p)).collect()
    };
    let start = snapshot_of(&watched);

    let attacks: Vec<(&str, AgentTask)> = vec![
        ("cleanup of another object's snapshot", {
            let mut t = task(AgentOperation::Cleanup);
            t.delete_objects = vec![loc(&other_snap)];
            t
        }),
        ("cleanup of another namespace's archive", {
            let mut t = task(AgentOperation::Cleanup);
            t.delete_objects = vec![loc(&other_ns)];
            t
        }),
        ("cleanup through .. and percent-encoding", {
            let mut t = task(AgentOperation::Cleanup);
            t.delete_objects = vec![
                format!(
                    "file://{}/edge/lb/u/../../other/u2/maps.mapsnap",
                    n.store.display()
                ),
                format!(
                    "file://{}/edge/lb/u/%2e%2e/%2e%2e/other/u2/maps.mapsnap",
                    n.store.display()
                ),
            ];
            t
        }),
        ("cleanup of a host file as node archive", {
            let mut t = task(AgentOperation::Cleanup);
            t.node_archive = Some(host_file.display().to_string());
            t
        }),
        ("cleanup of a symlink to a host file", {
            let mut t = task(AgentOperation::Cleanup);
            t.node_archive = Some(link.display().to_string());
            t
        }),
        ("upload over another namespace's archive", {
            let local = n.paths.checkpoints.join("checkpoint-x.tar");
            std::fs::write(&local, b"attacker bytes").expect("local");
            let mut t = task(AgentOperation::UploadArchive);
            t.node_archive = Some(local.display().to_string());
            t.archive = Some(loc(&other_ns));
            t.snapshot = Some(loc(&n.store.join("edge/lb/u/maps.mapsnap")));
            t
        }),
        ("upload of a host file through a symlink", {
            let mut t = task(AgentOperation::UploadArchive);
            t.node_archive = Some(link.display().to_string());
            t.archive = Some(loc(&n.store.join("edge/lb/u/checkpoint.tar")));
            t.snapshot = Some(loc(&n.store.join("edge/lb/u/maps.mapsnap")));
            t
        }),
        ("hook request pointing the snapshot at another object", {
            let mut t = task(AgentOperation::PrepareCheckpoint);
            t.container_id = Some(ID.into());
            t.snapshot = Some(loc(&other_snap));
            t
        }),
        ("a location outside every allowed prefix", {
            let mut t = task(AgentOperation::PrepareCheckpoint);
            t.container_id = Some(ID.into());
            t.snapshot = Some(format!("file://{}", host_file.display()));
            t
        }),
        ("deleting an image of another repository", {
            let mut t = task(AgentOperation::Cleanup);
            t.delete_images = vec![format!("registry.other/x@sha256:{}", "a".repeat(64))];
            t
        }),
    ];
    for (what, t) in attacks {
        let r = n.agent.execute("edge/lb", UID, &t, "node-a", t0());
        assert!(!r.succeeded, "{what}: {r:?}");
        assert!(r.permanent, "{what}: refusals are permanent: {r:?}");
        assert_eq!(
            snapshot_of(&watched),
            start,
            "{what} changed a file outside"
        );
        assert!(
            std::fs::symlink_metadata(&link).is_ok(),
            "{what} removed the planted link"
        );
    }
    assert!(
        !n.paths.requests.join(format!("{ID}.json")).exists(),
        "no hook request was written for a foreign snapshot"
    );
    assert!(n.images.deleted.lock().expect("lock").is_empty());
}
