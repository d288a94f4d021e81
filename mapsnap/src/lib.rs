//! mapsnap: dump eBPF maps with their metadata and BTF into a streaming, checksummed snapshot,
//! and restore them on this or another machine.
//!
//! Data flow: [`discover`] finds maps -> [`dump`] reads them through [`sys`] into a
//! [`format::SnapshotWriter`] -> bytes go to a file (or object storage) -> [`format::SnapshotReader`]
//! -> [`restore`] creates or fills maps through [`sys`].

pub mod btf_fmt;
pub mod format;
pub mod model;
