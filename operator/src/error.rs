//! Errors of the controller's and the agent's API layer. Failures of the work itself (a pod
//! missing, a kubelet error) are not errors here: they are outcomes recorded in the status.

/// An error that makes a reconcile fail (and be retried by the runtime's error policy).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("encoding: {0}")]
    Json(#[from] serde_json::Error),
    #[error("object {0} has no namespace, name or UID")]
    Incomplete(String),
    #[error("agent task panicked or was cancelled: {0}")]
    Join(String),
}

impl Error {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Json(_) => "json",
            Error::Incomplete(_) => "incomplete",
            Error::Join(_) => "join",
        }
    }
}
