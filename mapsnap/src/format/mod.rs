//! The snapshot file format (v1): a streaming, checksummed container for map metadata, BTF and
//! map entries. Pure codec, no kernel calls. The byte layout is specified in `docs/FORMAT.md`.
//!
//! Shape of a file:
//!
//! ```text
//! file header (16 B)
//! INFO
//! [CLOCKS]                       (optional; before the first MAP_BEGIN)
//! { BTF | MAP_BEGIN ENTRIES* MAP_END | unknown kinds }*
//! TRAILER (SHA-256 of everything before it)
//! ```
//!
//! Every section carries its own CRC32C so damage is found (and located) while streaming, and
//! the trailer's SHA-256 covers the whole file so a reader that reached [`Event::End`] has seen
//! exactly the bytes the writer wrote.

mod error;
mod hashio;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

pub use error::FormatError;
pub use reader::{SnapshotReader, VerifySummary, verify, verify_with_limits};
pub use writer::{SnapshotWriter, WriterOptions};

use crate::model::{Access, MapMeta, SnapshotInfo, access_of};

/// First 8 bytes of every snapshot. The high first byte catches 7-bit transfers and keeps the
/// file from being sniffed as text (same trick as PNG).
pub const MAGIC: [u8; 8] = [0x89, b'M', b'A', b'P', b'S', b'N', b'A', b'P'];

/// Format version written by this build, and the only one it reads.
pub const VERSION: u16 = 1;

/// Size of the file header: magic, u16 version, u16 flags, u32 reserved.
pub const FILE_HEADER_LEN: usize = 16;

/// Size of a section header: u16 kind, u16 flags, u32 stored_len, u32 raw_len, u32 crc32c.
pub const SECTION_HEADER_LEN: usize = 16;

/// Largest `stored_len` or `raw_len` a reader accepts (64 MiB): bounds reader memory whatever
/// the file claims.
pub const MAX_SECTION_LEN: u32 = 64 << 20;

/// Section flag bit 0: the payload is one zstd frame.
pub const FLAG_ZSTD: u16 = 1;

/// Section kinds. Kinds not listed here are skipped by readers (after their CRC is checked), so
/// later versions can add optional sections without breaking older readers.
pub mod kind {
    /// JSON `SnapshotInfo`; first section, exactly once.
    pub const INFO: u16 = 1;
    /// Raw BTF blob; numbered 0, 1, 2.. in order of appearance.
    pub const BTF: u16 = 2;
    /// JSON `MapMeta`; opens a map, numbered 0, 1, 2.. in order of appearance.
    pub const MAP_BEGIN: u16 = 3;
    /// u32 count, then count keys, then count values.
    pub const ENTRIES: u16 = 4;
    /// u64 total entries of the open map; closes it.
    pub const MAP_END: u16 = 5;
    /// JSON [`crate::clocks::ClockSample`]: the dumping host's clocks, read together at dump
    /// time. Optional, at most once, before the first MAP_BEGIN (so a restore knows it
    /// before any entry). Older readers skip it.
    pub const CLOCKS: u16 = 6;
    /// SHA-256 of every byte before this section's header; last thing in the file.
    pub const TRAILER: u16 = 0xFFFF;
}

/// Printable name of a section kind, for error messages.
pub fn kind_name(k: u16) -> &'static str {
    match k {
        kind::INFO => "INFO",
        kind::BTF => "BTF",
        kind::MAP_BEGIN => "MAP_BEGIN",
        kind::ENTRIES => "ENTRIES",
        kind::MAP_END => "MAP_END",
        kind::CLOCKS => "CLOCKS",
        kind::TRAILER => "TRAILER",
        _ => "unknown-kind",
    }
}

/// Digest of a whole snapshot stream, as written or as read.
///
/// `sha256` covers *every* byte of the file, trailer included, so it equals what `sha256sum`
/// prints for the file and can be recorded out of band (e.g. as an object-store checksum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamDigest {
    pub sha256: [u8; 32],
    /// Total file length in bytes.
    pub bytes: u64,
}

impl StreamDigest {
    /// Lowercase hex of `sha256`, as `sha256sum` prints it.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// One entry batch of the open map, as stored in one ENTRIES section.
///
/// Keys and values are kept as two columns (all keys, then all values) so they can be handed
/// to the kernel's batch update call without copying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryChunk {
    pub count: usize,
    /// `count * key_len()` bytes.
    pub keys: Vec<u8>,
    /// `count * value_len()` bytes.
    pub values: Vec<u8>,
    key_len: usize,
    value_len: usize,
}

impl EntryChunk {
    /// Builds a chunk, checking the column lengths against `count`.
    pub fn new(
        key_len: usize,
        value_len: usize,
        count: usize,
        keys: Vec<u8>,
        values: Vec<u8>,
    ) -> Result<Self, FormatError> {
        check_columns(count, key_len, value_len, keys.len(), values.len())?;
        Ok(Self {
            count,
            keys,
            values,
            key_len,
            value_len,
        })
    }

    /// Bytes per key (0 for queues and stacks).
    pub fn key_len(&self) -> usize {
        self.key_len
    }

    /// Bytes per value (see [`MapMeta::value_len`]).
    pub fn value_len(&self) -> usize {
        self.value_len
    }

    /// Key of entry `i`.
    ///
    /// # Panics
    /// If `i >= count` (like slice indexing).
    pub fn key(&self, i: usize) -> &[u8] {
        &self.keys[i * self.key_len..(i + 1) * self.key_len]
    }

    /// Value of entry `i`.
    ///
    /// # Panics
    /// If `i >= count` (like slice indexing).
    pub fn value(&self, i: usize) -> &[u8] {
        &self.values[i * self.value_len..(i + 1) * self.value_len]
    }

    /// `(key, value)` pairs in order. (Not `chunks_exact`: key_len is 0 for queues.)
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + '_ {
        (0..self.count).map(move |i| (self.key(i), self.value(i)))
    }
}

/// What a [`SnapshotReader`] yields, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Info(SnapshotInfo),
    Btf {
        index: u32,
        blob: Vec<u8>,
    },
    MapBegin {
        index: u32,
        meta: MapMeta,
    },
    Entries(EntryChunk),
    MapEnd {
        index: u32,
        entries: u64,
    },
    /// The trailer checked out; no event follows.
    End(StreamDigest),
}

/// Checks that key/value columns hold exactly `count` entries.
pub(crate) fn check_columns(
    count: usize,
    key_len: usize,
    value_len: usize,
    keys: usize,
    values: usize,
) -> Result<(), FormatError> {
    let want_k = count.checked_mul(key_len);
    let want_v = count.checked_mul(value_len);
    if want_k != Some(keys) || want_v != Some(values) {
        return Err(FormatError::Usage(format!(
            "{count} entries of {key_len}-byte keys and {value_len}-byte values need \
             {} key bytes and {} value bytes, got {keys} and {values}",
            fmt_opt(want_k),
            fmt_opt(want_v)
        )));
    }
    Ok(())
}

fn fmt_opt(v: Option<usize>) -> String {
    v.map_or_else(|| "an overflowing number of".to_string(), |n| n.to_string())
}

/// Bytes per key and per value in this map's ENTRIES, or why the map cannot be stored.
///
/// Guards `MapMeta::value_len` against overflow on hostile metadata (it multiplies u32s), and
/// refuses 0-byte entries: verification derives entry counts from section lengths, which is
/// impossible when an entry takes no bytes (and no kernel map type has such entries).
pub(crate) fn entry_layout(meta: &MapMeta) -> Result<(usize, usize), String> {
    if access_of(meta.map_type) == Ok(Access::PerCpu) {
        let slot = u64::from(meta.value_size).div_ceil(8) * 8;
        let cpus = u64::from(meta.possible_cpus.unwrap_or(1));
        let width = slot.checked_mul(cpus).and_then(|v| usize::try_from(v).ok());
        if meta.value_size > u32::MAX - 7 || width.is_none() {
            return Err(format!(
                "per-CPU value_size {} x {} CPUs does not fit in memory",
                meta.value_size, cpus
            ));
        }
    }
    let (k, v) = (meta.key_len(), meta.value_len());
    match k.checked_add(v) {
        Some(0) => Err(format!(
            "map {:?} has 0-byte keys and 0-byte values, which a snapshot cannot store",
            meta.name
        )),
        Some(_) => Ok((k, v)),
        None => Err(format!("map {:?} has entries too wide to store", meta.name)),
    }
}
