//! The plugin's error type. Every error ends up as one line in CRIU's log.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Mapsnap(#[from] mapsnap::Error),
    #[error(transparent)]
    Sys(#[from] mapsnap::sys::SysError),
    #[error(transparent)]
    Discover(#[from] mapsnap::discover::DiscoverError),
    #[error("{file}: {reason}")]
    Image { file: String, reason: String },
    /// A file of the image directory that cannot be opened as it must be (a link, a FIFO,
    /// a device, too large, ...).
    #[error(transparent)]
    Anchor(#[from] mapsnap::anchor::AnchorError),
    #[error("configuration: {0}")]
    Config(String),
    /// A key file that cannot be used, or a per-map snapshot its signature refuses.
    #[error("{what}: {source}")]
    Trust {
        what: String,
        #[source]
        source: mapsnap::trust::TrustError,
    },
    /// The deadline passed; `during` says what was being done (which map).
    #[error("the deadline of {} passed while {during}", mapsnap::storage::format_duration(*.limit))]
    Deadline {
        limit: std::time::Duration,
        during: String,
    },
    /// Restoring one map failed: names the map (as it was at dump time) and why.
    #[error("cannot restore {map} from {snapshot}: {source}")]
    Restore {
        map: String,
        snapshot: String,
        #[source]
        source: Box<PluginError>,
    },
}

impl PluginError {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// A positive errno for CRIU (which wants a negative return): the kernel's or I/O's own
    /// when there is one, else EIO.
    pub fn errno(&self) -> i32 {
        let io = match self {
            Self::Io { source, .. } => Some(source),
            Self::Sys(e) => Some(&e.source),
            Self::Mapsnap(mapsnap::Error::Sys(e)) => Some(&e.source),
            Self::Mapsnap(mapsnap::Error::Io { source, .. }) => Some(source),
            Self::Restore { source, .. } => return source.errno(),
            Self::Anchor(e) => Some(&e.source),
            Self::Deadline { .. } => return libc::ETIMEDOUT,
            _ => None,
        };
        io.and_then(io::Error::raw_os_error)
            .filter(|e| *e > 0 && *e != libc::ENOTSUP)
            .unwrap_or(libc::EIO)
    }
}
