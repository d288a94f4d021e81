//! The hook's error type. Every message is one line that names what was refused or failed and
//! why, because the runtime shows it to whoever started the container.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("config {file}: {msg}")]
    Config { file: String, msg: String },
    #[error("annotation {key}: {msg}")]
    Annotation { key: String, msg: String },
    /// A path, location or pin that would reach outside what the container owns.
    #[error("refused {what}: {reason}")]
    Refused { what: String, reason: String },
    #[error("container: {0}")]
    Container(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Spec { path: PathBuf, msg: String },
    #[error(transparent)]
    Mapsnap(#[from] mapsnap::Error),
    /// A path below a container's mount, the storage base or an image directory that the
    /// kernel refused to resolve (a link, an escape) or that failed.
    #[error(transparent)]
    Anchor(#[from] mapsnap::anchor::AnchorError),
    #[error(transparent)]
    Storage(#[from] mapsnap::storage::StorageError),
    #[error("snapshot {location}: {source}")]
    Snapshot {
        location: String,
        #[source]
        source: mapsnap::format::FormatError,
    },
    /// A snapshot refused by the node's trust settings (unsigned, another key, altered, not
    /// decryptable), or a key file that cannot be used.
    #[error("{what}: {source}")]
    Trust {
        what: String,
        #[source]
        source: mapsnap::trust::TrustError,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, HookError>;

impl HookError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub fn refused(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Refused {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// True for refusals (unsafe paths or locations), as opposed to failures.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::Refused { .. }
            | Self::Trust { .. }
            | Self::Mapsnap(mapsnap::Error::UnsafePinPath { .. }) => true,
            Self::Anchor(e) => matches!(e.errno(), Some(libc::ELOOP) | Some(libc::EXDEV)),
            _ => false,
        }
    }
}
