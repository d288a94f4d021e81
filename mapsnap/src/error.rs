//! The library's error type: every failure names the map or file and says what to do.

use std::path::PathBuf;

use crate::anchor::AnchorError;
use crate::discover::DiscoverError;
use crate::format::FormatError;
use crate::limits::LimitError;
use crate::sys::SysError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Discover(#[from] DiscoverError),
    #[error(transparent)]
    Anchor(#[from] AnchorError),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
    #[error(
        "{what}: the deadline passed; everything this restore created or pinned was removed, \
         so it can be retried"
    )]
    Deadline { what: String },
    #[error(
        "{map}: map type {map_type} is not supported: {reason} (use --skip-unsupported to skip it)"
    )]
    Unsupported {
        map: String,
        map_type: &'static str,
        reason: String,
    },
    #[error("{map}: cannot restore into the existing map: {reason}")]
    Incompatible { map: String, reason: String },
    #[error(
        "{map}: the snapshot has per-CPU values for {snapshot} possible CPUs, this machine has {here}; \
         use --cpu-mismatch fit to keep the first CPUs' values and zero the rest"
    )]
    CpuMismatch {
        map: String,
        snapshot: u32,
        here: u32,
    },
    #[error("{map}: {reason}")]
    Restore { map: String, reason: String },
    #[error("{path} already exists: remove it, or pass --overwrite to replace it atomically")]
    PinExists { path: PathBuf },
    #[error("pin path {path:?} in the snapshot is refused: {reason}")]
    UnsafePinPath { path: String, reason: &'static str },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
