//! Streaming snapshot writer.

use std::fmt;
use std::io::{BufWriter, Write};

use sha2::Digest;
use zstd::bulk::Compressor;

use super::hashio::HashingWriter;
use super::{
    FILE_HEADER_LEN, FLAG_ZSTD, FormatError, MAGIC, MAX_SECTION_LEN, SECTION_HEADER_LEN,
    StreamDigest, VERSION, check_columns, entry_layout, kind, kind_name,
};
use crate::clocks::ClockSample;
use crate::model::{MapMeta, SnapshotInfo};

/// Tuning knobs of [`SnapshotWriter`]; they change the bytes written but never what a reader
/// gets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// zstd level for BTF and ENTRIES. 1 is fast and already shrinks typical map data well;
    /// dumping is usually I/O- or syscall-bound, not worth a slower level.
    pub zstd_level: i32,
    /// Upper bound on the raw (uncompressed) payload of one ENTRIES section, count prefix
    /// included. A section always holds at least one entry, so a single wider entry still gets
    /// written. Capped at [`MAX_SECTION_LEN`].
    pub chunk_bytes: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            zstd_level: 1,
            chunk_bytes: 1 << 20,
        }
    }
}

struct OpenMap {
    index: u32,
    name: String,
    key_len: usize,
    value_len: usize,
    entries: u64,
}

/// Writes a snapshot as a stream: header and INFO on [`new`](Self::new), then BTF and maps in
/// call order, then the trailer on [`finish`](Self::finish).
///
/// Misuse (entries with no open map, wrong column lengths, dangling references) is refused
/// with [`FormatError::Usage`] before anything is written, so the stream stays valid. After an
/// I/O error the stream is incomplete and every further call fails.
pub struct SnapshotWriter<W: Write> {
    out: HashingWriter<BufWriter<W>>,
    compressor: Compressor<'static>,
    opts: WriterOptions,
    /// Reused ENTRIES raw payload, so steady-state writing does not allocate.
    raw: Vec<u8>,
    /// Reused compression output.
    stored: Vec<u8>,
    btf_count: u32,
    map_count: u32,
    open: Option<OpenMap>,
    failed: bool,
    clocks_written: bool,
}

impl<W: Write> fmt::Debug for SnapshotWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotWriter")
            .field("opts", &self.opts)
            .field("bytes_written", &self.out.count())
            .field("btf_count", &self.btf_count)
            .field("map_count", &self.map_count)
            .field("open_map", &self.open.as_ref().map(|m| m.index))
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the file header and the INFO section.
    pub fn new(w: W, info: &SnapshotInfo, opts: WriterOptions) -> Result<Self, FormatError> {
        let compressor = Compressor::new(opts.zstd_level)?;
        let mut this = Self {
            out: HashingWriter::new(BufWriter::with_capacity(256 << 10, w)),
            compressor,
            opts,
            raw: Vec::new(),
            stored: Vec::new(),
            btf_count: 0,
            map_count: 0,
            open: None,
            failed: false,
            clocks_written: false,
        };
        let mut header = [0u8; FILE_HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..10].copy_from_slice(&VERSION.to_le_bytes());
        // flags (u16) and reserved (u32) stay 0.
        this.out.write_all(&header)?;
        let json = serde_json::to_vec(info).map_err(|source| FormatError::Json {
            offset: this.out.count(),
            source,
        })?;
        this.section(kind::INFO, Payload::Given(&json), false)?;
        Ok(this)
    }

    /// Records the dumping host's clocks (the CLOCKS section). At most once, and before the
    /// first [`begin_map`](Self::begin_map), so a restore knows them before any entry.
    /// [`crate::dump::dump`] calls it with a sample taken as the dump starts.
    pub fn add_clocks(&mut self, sample: &ClockSample) -> Result<(), FormatError> {
        self.usable()?;
        if self.clocks_written || self.map_count > 0 {
            return Err(FormatError::Usage(
                "add_clocks must be called once, before the first begin_map".into(),
            ));
        }
        let json = serde_json::to_vec(sample).map_err(|source| FormatError::Json {
            offset: self.out.count(),
            source,
        })?;
        self.section(kind::CLOCKS, Payload::Given(&json), false)?;
        self.clocks_written = true;
        Ok(())
    }

    /// Stores one BTF blob and returns its index, for [`crate::model::BtfRef::index`].
    pub fn add_btf(&mut self, blob: &[u8]) -> Result<u32, FormatError> {
        self.usable()?;
        if let Some(m) = &self.open {
            return Err(FormatError::Usage(format!(
                "add_btf called while map {} ({:?}) is open; add BTF before begin_map or after \
                 end_map",
                m.index, m.name
            )));
        }
        let index = self.btf_count;
        let next = index
            .checked_add(1)
            .ok_or_else(|| FormatError::Usage("too many BTF sections".into()))?;
        self.section(kind::BTF, Payload::Given(blob), true)?;
        self.btf_count = next;
        Ok(index)
    }

    /// Opens a map and returns its index (for `inner_template` and map-of-maps values).
    /// Checks that `meta.btf` and `meta.inner_template` refer to what was already written.
    pub fn begin_map(&mut self, meta: &MapMeta) -> Result<u32, FormatError> {
        self.usable()?;
        if let Some(m) = &self.open {
            return Err(FormatError::Usage(format!(
                "begin_map({:?}) called while map {} ({:?}) is still open; call end_map first",
                meta.name, m.index, m.name
            )));
        }
        if let Some(b) = &meta.btf
            && b.index >= self.btf_count
        {
            return Err(FormatError::Usage(format!(
                "map {:?} refers to BTF index {}, but only {} BTF blobs were added; add_btf \
                 must come first",
                meta.name, b.index, self.btf_count
            )));
        }
        if let Some(t) = meta.inner_template
            && t >= self.map_count
        {
            return Err(FormatError::Usage(format!(
                "map {:?} uses map {t} as inner template, but only {} maps were written before \
                 it; write the template map first",
                meta.name, self.map_count
            )));
        }
        let (key_len, value_len) = entry_layout(meta).map_err(FormatError::Usage)?;
        let index = self.map_count;
        let next = index
            .checked_add(1)
            .ok_or_else(|| FormatError::Usage("too many maps".into()))?;
        let json = serde_json::to_vec(meta).map_err(|source| FormatError::Json {
            offset: self.out.count(),
            source,
        })?;
        self.section(kind::MAP_BEGIN, Payload::Given(&json), false)?;
        self.map_count = next;
        self.open = Some(OpenMap {
            index,
            name: meta.name.clone(),
            key_len,
            value_len,
            entries: 0,
        });
        Ok(index)
    }

    /// Appends `count` entries to the open map: `keys` holds `count * key_len` bytes (all keys
    /// back to back), `values` holds `count * value_len` bytes. Split into ENTRIES sections
    /// of at most `chunk_bytes` raw bytes each.
    pub fn write_entries(
        &mut self,
        count: usize,
        keys: &[u8],
        values: &[u8],
    ) -> Result<(), FormatError> {
        self.usable()?;
        let Some(m) = &self.open else {
            return Err(FormatError::Usage(
                "write_entries called with no open map; call begin_map first".into(),
            ));
        };
        let (k, v) = (m.key_len, m.value_len);
        check_columns(count, k, v, keys.len(), values.len())?;
        if count == 0 {
            return Ok(());
        }
        // entry_layout guarantees width >= 1.
        let width = k + v;
        let max = MAX_SECTION_LEN as usize;
        if width > max - 4 {
            return Err(FormatError::Usage(format!(
                "one entry of map {:?} takes {width} bytes, more than a section can hold \
                 ({max} bytes)",
                m.name
            )));
        }
        let budget = self.opts.chunk_bytes.min(max).saturating_sub(4);
        let per_chunk = (budget / width).clamp(1, (max - 4) / width);

        let mut start = 0;
        while start < count {
            let n = per_chunk.min(count - start);
            self.raw.clear();
            // n <= 64 MiB / width, so it fits in u32.
            self.raw.extend_from_slice(&(n as u32).to_le_bytes());
            self.raw
                .extend_from_slice(&keys[start * k..(start + n) * k]);
            self.raw
                .extend_from_slice(&values[start * v..(start + n) * v]);
            self.section(kind::ENTRIES, Payload::Raw, true)?;
            if let Some(m) = &mut self.open {
                m.entries += n as u64;
            }
            start += n;
        }
        Ok(())
    }

    /// Closes the open map and returns how many entries were written for it.
    pub fn end_map(&mut self) -> Result<u64, FormatError> {
        self.usable()?;
        let Some(m) = &self.open else {
            return Err(FormatError::Usage("end_map called with no open map".into()));
        };
        let entries = m.entries;
        self.section(kind::MAP_END, Payload::Given(&entries.to_le_bytes()), false)?;
        self.open = None;
        Ok(entries)
    }

    /// Bytes written to the underlying writer so far (some may still sit in the internal
    /// buffer until [`finish`](Self::finish)).
    pub fn bytes_written(&self) -> u64 {
        self.out.count()
    }

    /// Writes the trailer, flushes, and returns the writer with the digest of the whole file.
    pub fn finish(mut self) -> Result<(W, StreamDigest), FormatError> {
        self.usable()?;
        if let Some(m) = &self.open {
            return Err(FormatError::Usage(format!(
                "finish called while map {} ({:?}) is still open; call end_map first",
                m.index, m.name
            )));
        }
        let before: [u8; 32] = self.out.hasher().finalize().into();
        self.section(kind::TRAILER, Payload::Given(&before), false)?;
        let digest = StreamDigest {
            sha256: self.out.hasher().finalize().into(),
            bytes: self.out.count(),
        };
        self.out.flush()?;
        let w = self
            .out
            .into_inner()
            .into_inner()
            .map_err(|e| FormatError::Io(e.into_error()))?;
        Ok((w, digest))
    }

    fn usable(&self) -> Result<(), FormatError> {
        if self.failed {
            return Err(FormatError::Usage(
                "the snapshot writer failed earlier (I/O error); the snapshot is incomplete and \
                 must be written again"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Writes one section; poisons the writer if the stream may now be half-written.
    fn section(
        &mut self,
        kind: u16,
        payload: Payload<'_>,
        compress: bool,
    ) -> Result<(), FormatError> {
        let raw: &[u8] = match payload {
            Payload::Given(p) => p,
            Payload::Raw => &self.raw,
        };
        let res = put_section(
            &mut self.out,
            &mut self.compressor,
            &mut self.stored,
            kind,
            raw,
            compress,
        );
        if matches!(res, Err(FormatError::Io(_))) {
            self.failed = true;
        }
        res
    }
}

/// Where a section's raw payload lives (`Raw` = the writer's own buffer, which cannot be
/// borrowed separately from `&mut self`).
enum Payload<'a> {
    Given(&'a [u8]),
    Raw,
}

fn put_section<W: Write>(
    out: &mut HashingWriter<W>,
    compressor: &mut Compressor<'static>,
    stored: &mut Vec<u8>,
    kind: u16,
    raw: &[u8],
    compress: bool,
) -> Result<(), FormatError> {
    let raw_len = u32::try_from(raw.len())
        .ok()
        .filter(|&n| n <= MAX_SECTION_LEN)
        .ok_or_else(|| {
            FormatError::Usage(format!(
                "{} section of {} bytes exceeds the {MAX_SECTION_LEN}-byte section limit",
                kind_name(kind),
                raw.len()
            ))
        })?;
    let (flags, payload) = if compress {
        stored.clear();
        stored.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        let n = compressor.compress_to_buffer(raw, stored)?;
        // Incompressible data (random keys, tiny chunks) is stored as-is: smaller, faster to
        // read, and keeps stored_len within the limit for a full 64 MiB chunk.
        match stored.get(..n) {
            Some(c) if n < raw.len() => (FLAG_ZSTD, c),
            _ => (0, raw),
        }
    } else {
        (0, raw)
    };
    // payload.len() <= raw.len() <= MAX_SECTION_LEN, checked above.
    let stored_len = payload.len() as u32;
    let mut header = [0u8; SECTION_HEADER_LEN];
    header[0..2].copy_from_slice(&kind.to_le_bytes());
    header[2..4].copy_from_slice(&flags.to_le_bytes());
    header[4..8].copy_from_slice(&stored_len.to_le_bytes());
    header[8..12].copy_from_slice(&raw_len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..12]), payload);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    out.write_all(&header)?;
    out.write_all(payload)?;
    Ok(())
}
