//! Errors of the snapshot codec.
//!
//! Messages are shown to users as-is, so each one says what is wrong, where (byte offset in the
//! file) and what to do about it.

use super::{MAX_SECTION_LEN, kind_name};

/// Everything that can go wrong while writing, reading or verifying a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The underlying reader or writer failed.
    #[error("I/O error while reading or writing the snapshot: {0}")]
    Io(#[from] std::io::Error),

    /// The first bytes are not the snapshot magic.
    #[error(
        "not a mapsnap snapshot: the file does not start with the snapshot magic bytes \
         (89 4d 41 50 53 4e 41 50, \"\\x89MAPSNAP\"); check that you passed the right file"
    )]
    NotASnapshot,

    /// The header names a format version this build cannot read.
    #[error(
        "snapshot format version {found} is not supported: this mapsnap reads format version \
         {supported}; use a mapsnap release that supports format version {found}"
    )]
    UnsupportedVersion { found: u16, supported: u16 },

    /// The input ended before the snapshot did.
    #[error(
        "snapshot is truncated at byte {offset} ({what}): the file is incomplete; copy or \
         download it again"
    )]
    Truncated { offset: u64, what: String },

    /// A section's CRC32C does not match its header and payload.
    #[error(
        "snapshot is corrupt: the {} section at byte {offset} fails its CRC32C check; the file \
         was damaged in storage or transfer; copy it again from the source",
        kind_name(*kind)
    )]
    ChunkCrc { offset: u64, kind: u16 },

    /// The trailer's SHA-256 does not match the bytes before it.
    #[error(
        "snapshot is corrupt: the SHA-256 stored in the trailer is {} but the file's bytes hash \
         to {}; the file was damaged or modified; copy it again from the source",
        hex::encode(expected),
        hex::encode(actual)
    )]
    Checksum {
        expected: [u8; 32],
        actual: [u8; 32],
    },

    /// The bytes are intact (checksums match) but do not follow the format's rules.
    #[error(
        "snapshot is malformed at byte {offset}: {reason}; it was not written by a compatible \
         mapsnap, or was edited"
    )]
    Malformed { offset: u64, reason: String },

    /// A section declares more than [`MAX_SECTION_LEN`] bytes, the bound that keeps readers'
    /// memory use in check.
    #[error(
        "snapshot section at byte {offset} declares {len} bytes, over the limit of {} bytes per \
         section; the file is corrupt or was not written by mapsnap",
        MAX_SECTION_LEN
    )]
    TooLarge { offset: u64, len: u64 },

    /// The JSON metadata of an INFO or MAP_BEGIN section could not be (de)serialized.
    #[error(
        "invalid JSON metadata in the snapshot section at byte {offset}: {source}; the file is \
         corrupt or was written by an incompatible mapsnap"
    )]
    Json {
        offset: u64,
        #[source]
        source: serde_json::Error,
    },

    /// The API was used the wrong way (a bug in the calling code, not in the file).
    #[error("snapshot refused: {0}")]
    Limit(#[from] crate::limits::LimitError),
    #[error("invalid use of the snapshot codec: {0}")]
    Usage(String),
}

impl FormatError {
    pub(crate) fn malformed(offset: u64, reason: impl Into<String>) -> Self {
        Self::Malformed {
            offset,
            reason: reason.into(),
        }
    }

    pub(crate) fn truncated(offset: u64, what: impl Into<String>) -> Self {
        Self::Truncated {
            offset,
            what: what.into(),
        }
    }
}
