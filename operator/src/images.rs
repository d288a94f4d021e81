//! The agent's checkpoint images: [`crate::ckptimage`] over the registry named in the chart
//! (`restore.registry`), behind the node work's synchronous [`CheckpointImages`] interface.

use crate::ckptimage::{self, ImageError, Registry};
use crate::node::{CheckpointImages, NodeError};

/// Checkpoint images pushed to one registry repository.
#[derive(Debug)]
pub struct RegistryImages {
    pub registry: Registry,
    /// The agent's runtime (the node work runs on blocking threads).
    pub runtime: tokio::runtime::Handle,
}

fn image_error(e: ImageError) -> NodeError {
    match e {
        // Credentials or a reference the configuration got wrong: retrying cannot help.
        ImageError::Auth(m) | ImageError::Reference(m) => NodeError::Refused(m),
        ImageError::Archive(m) => NodeError::Mismatch(format!("checkpoint archive {m}")),
        other => NodeError::Image(other.to_string()),
    }
}

impl CheckpointImages for RegistryImages {
    fn repository(&self) -> &str {
        &self.registry.repository
    }

    fn build_and_push(
        &self,
        file: std::fs::File,
        container: &str,
        tag: &str,
    ) -> Result<String, NodeError> {
        let pushed = self
            .runtime
            .block_on(ckptimage::build_and_push(
                file,
                container,
                tag,
                &self.registry,
            ))
            .map_err(image_error)?;
        Ok(pushed.reference)
    }

    fn delete(&self, reference: &str) -> Result<(), NodeError> {
        self.runtime
            .block_on(ckptimage::delete(reference, &self.registry))
            .map_err(image_error)
    }
}
