//! Shared by the agent's integration tests (each test binary uses a part of it).
#![allow(dead_code)]

use std::io::Write as _;
use std::sync::Mutex;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mapsnap::storage::{Location, Manifest, ManifestMap, ManifestSource, Storage, StorageConfig};
use mapsnap_operator::crd::{AgentOperation, AgentTask};

use mapsnap_operator::node::{CheckpointImages, NodeError};
use sha2::Digest;

pub const REPO: &str = "registry.test:5000/mapsnap/checkpoints";

/// One push: container, tag, reference, the archive's bytes.
pub type Pushed = (String, String, String, Vec<u8>);

/// Stands in for the registry (the real build and push are tested against a real registry
/// with `mapsnap_operator::ckptimage`): keeps what was pushed, names it by the archive's
/// SHA-256.
#[derive(Debug, Default)]
pub struct KeptImages {
    pub pushed: Mutex<Vec<Pushed>>,
    pub deleted: Mutex<Vec<String>>,
}

impl CheckpointImages for KeptImages {
    fn repository(&self) -> &str {
        REPO
    }

    fn build_and_push(
        &self,
        archive: std::fs::File,
        container: &str,
        tag: &str,
    ) -> Result<String, NodeError> {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut { archive }, &mut bytes)
            .map_err(|e| NodeError::io("cannot read", std::path::Path::new(tag), e))?;
        let reference = format!(
            "{REPO}@sha256:{}",
            hex::encode(sha2::Sha256::digest(&bytes))
        );
        self.pushed.lock().expect("lock").push((
            container.to_string(),
            tag.to_string(),
            reference.clone(),
            bytes,
        ));
        Ok(reference)
    }

    fn delete(&self, reference: &str) -> Result<(), NodeError> {
        self.deleted
            .lock()
            .expect("lock")
            .push(reference.to_string());
        Ok(())
    }
}

/// A task for the agent on `node`, created at `created` and valid for ten minutes.
pub fn agent_task(
    op: AgentOperation,
    node: &str,
    container_id: Option<&str>,
    created: Timestamp,
) -> AgentTask {
    AgentTask {
        id: "t-1".into(),
        node: node.into(),
        operation: Some(op),
        container_id: container_id.map(str::to_owned),
        pod: None,
        container: None,
        timeout_seconds: None,
        snapshot: None,
        stop_snapshot: None,
        archive: None,
        node_archive: None,
        archive_sha256: None,
        archive_size: None,
        restore_pod: None,
        delete_objects: Vec::new(),
        delete_images: Vec::new(),
        created: Time(created),
        expires: Time(
            created
                .saturating_add(std::time::Duration::from_secs(600))
                .expect("t"),
        ),
    }
}

/// What mapsnap-hook leaves at post-dump with the same storage settings: an 8-byte snapshot
/// and its manifest naming one map and the container.
pub fn hook_writes_snapshot(cfg: &StorageConfig, snapshot: &str, container_id: &str) {
    let s = Storage::open(Location::parse(snapshot).expect("location"), cfg).expect("open");
    let mut w = s.writer(true).expect("writer");
    w.write_all(b"snapshot").expect("write");
    w.commit().expect("commit");
    s.write_manifest(&Manifest {
        manifest_version: 1,
        format_version: 1,
        snapshot: snapshot.into(),
        sha256: hex::encode(sha2::Sha256::digest(b"snapshot")),
        size: 8,
        created: "2025-06-01T12:00:00Z".into(),
        created_unix: 0,
        tool: "t".into(),
        source: ManifestSource {
            container_id: Some(container_id.into()),
            ..ManifestSource::default()
        },
        maps: vec![ManifestMap {
            name: "flows".into(),
            map_type: "hash".into(),
            entries: 10,
            bytes: 80,
            pin_path: None,
            inner: false,
        }],
        skipped: Vec::new(),
    })
    .expect("manifest");
}
