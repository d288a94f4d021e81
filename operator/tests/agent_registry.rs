//! The target node's DownloadArchive against a real registry (`docker-registry` on 127.0.0.1):
//! the agent fetches the archive from storage, builds the checkpoint image, pushes it, reports
//! it by digest and removes its node copy; the agent's Cleanup deletes that image again.
//! Needs what `make deps` installs (scripts/install-registry.sh: docker-registry, skopeo).

mod common;
mod podman;

use std::io::Write as _;
use std::process::Command;
use std::sync::Arc;

use jiff::Timestamp;
use mapsnap::storage::StorageConfig;
use mapsnap_operator::ckptimage::{Registry, RegistryAuth, annotations};
use mapsnap_operator::crd::{AgentOperation, AgentTask};
use mapsnap_operator::images::RegistryImages;
use mapsnap_operator::node::{NodeAgent, NodePaths, StorageBlobs};
use podman::{RegistryServer, require_root, sha256_file, skopeo_inspect};
use sha2::Digest as _;

const UID: &str = "c0ffee00-0000-4000-8000-000000000001";

fn task(op: AgentOperation) -> AgentTask {
    common::agent_task(op, "node-b", None, Timestamp::now())
}

/// A checkpoint archive with the files a runtime writes (the image build checks for them).
fn archive_bytes() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let config = serde_json::json!({"id": "feed", "name": "lb", "runtime": "runc",
        "rootfsImageName": "registry.example/lb:1"})
    .to_string();
    let pages: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    for (name, data) in [
        ("config.dump", config.as_bytes()),
        ("spec.dump", br#"{"ociVersion":"1.0.2"}"#.as_slice()),
        ("checkpoint/inventory.img", b"inventory".as_slice()),
        ("checkpoint/pages-1.img", pages.as_slice()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        b.append_data(&mut h, name, data).expect("append");
    }
    b.into_inner().expect("tar")
}

#[test]
fn the_target_agent_pushes_the_checkpoint_image_and_cleanup_deletes_it() {
    require_root();
    let reg = RegistryServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let stored = store.join(format!("edge/lb-ckpt/{UID}/checkpoint.tar"));
    std::fs::create_dir_all(stored.parent().expect("dir")).expect("mkdir");
    let bytes = archive_bytes();
    std::fs::File::create(&stored)
        .and_then(|mut f| f.write_all(&bytes))
        .expect("stored archive");
    let paths = NodePaths {
        requests: dir.path().join("requests"),
        restores: dir.path().join("restores"),
        checkpoints: dir.path().join("checkpoints"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let repository = format!("{}/mapsnap/checkpoints", reg.addr);
    let images = RegistryImages {
        registry: Registry {
            repository: repository.clone(),
            auth: RegistryAuth::Anonymous,
            insecure_http: true,
            ca_file: None,
        },
        runtime: rt.handle().clone(),
    };
    let agent = Arc::new(
        NodeAgent::new(
            paths.clone(),
            Arc::new(StorageBlobs::new(StorageConfig::default())),
        )
        .with_allowed_locations(vec![format!("file://{}", store.display())])
        .with_images(Arc::new(images)),
    );

    let mut t = task(AgentOperation::DownloadArchive);
    t.archive = Some(format!("file://{}", stored.display()));
    t.archive_sha256 = Some(hex::encode(sha2::Sha256::digest(&bytes)));
    t.archive_size = Some(bytes.len() as i64);
    t.restore_pod = Some("edge/lb-restored".into());
    t.container = Some("lb".into());
    // The agent runs node work on blocking threads of its runtime, as here.
    let (a, tk) = (agent.clone(), t.clone());
    let r = rt
        .block_on(async move {
            tokio::task::spawn_blocking(move || {
                a.execute("edge/lb-restore", UID, &tk, "node-b", Timestamp::now())
            })
            .await
        })
        .expect("join");
    assert!(r.succeeded, "{r:?}");
    let image = r.image.clone().expect("image");
    let (repo, digest) = image.split_once("@sha256:").expect("by digest");
    assert_eq!(repo, repository);
    assert_eq!(digest.len(), 64);
    assert!(
        !paths
            .checkpoints
            .join(format!("mapsnap-restore-{UID}.tar"))
            .exists(),
        "the node copy of the archive is gone once pushed"
    );

    // What the registry holds: one layer, the archive's bytes, the container's name for
    // every runtime.
    let manifest = skopeo_inspect(&image, &["--raw"]);
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["digest"], sha256_file(&stored));
    for key in [annotations::CRIO_NAME, annotations::CRIU_NAME] {
        assert_eq!(manifest["annotations"][key], "lb", "{key}");
    }

    // Cleanup on deletion removes the image (and refuses one of another repository).
    let mut c = task(AgentOperation::Cleanup);
    c.delete_images = vec![image.clone()];
    let a = agent.clone();
    let r = rt
        .block_on(async move {
            tokio::task::spawn_blocking(move || {
                a.execute("edge/lb-restore", UID, &c, "node-b", Timestamp::now())
            })
            .await
        })
        .expect("join");
    assert!(r.succeeded, "{r:?}");
    let gone = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{image}"))
        .output()
        .expect("skopeo");
    assert!(!gone.status.success(), "the image is still there");
    rt.shutdown_background();
}
