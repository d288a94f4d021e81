//! Shared by the agent's integration tests.

use std::sync::Mutex;

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
