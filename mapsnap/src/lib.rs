//! mapsnap: dump eBPF maps with their metadata and BTF into a streaming, checksummed snapshot,
//! and restore them on this or another machine.
//!
//! Data flow: [`discover`] finds maps -> [`dump`] reads them through [`sys`] into a
//! [`format::SnapshotWriter`] -> bytes go to a file (or object storage) -> [`format::verify`]
//! and [`format::SnapshotReader`] -> [`restore`] creates or fills maps through [`sys`].
//! [`diff`] compares snapshots and live maps; [`btf_fmt`] renders values by their BTF types.

pub mod anchor;
pub mod btf_fmt;
pub mod clocks;
pub mod convert;
pub mod diff;
pub mod discover;
pub mod dump;
pub mod error;
pub mod format;
pub mod limits;
pub mod model;
pub mod progress;
pub mod restore;
pub mod storage;
pub mod sys;
pub mod trust;

pub use error::{Error, Result};
