//! Streaming snapshot reader and verifier.

use std::fmt;
use std::io::{BufReader, Read};

use sha2::Digest;
use zstd::bulk::Decompressor;

use super::hashio::HashingReader;
use super::{
    EntryChunk, Event, FILE_HEADER_LEN, FLAG_ZSTD, FormatError, MAGIC, MAX_SECTION_LEN,
    SECTION_HEADER_LEN, StreamDigest, VERSION, entry_layout, kind, kind_name,
};
use crate::clocks::ClockSample;
use crate::limits::Limits;
use crate::model::{Access, MapMeta, SnapshotInfo, access_of};

/// Whether ENTRIES payloads are decoded (reader) or only checked and counted (verify).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Decode,
    Verify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Header read; the next section must be INFO.
    ExpectInfo,
    Body,
    /// Trailer checked; nothing follows.
    Done,
    /// An error was returned; the rest of the stream cannot be trusted.
    Failed,
}

struct OpenMap {
    index: u32,
    key_len: usize,
    value_len: usize,
    entries: u64,
}

/// Result of reading one section.
enum Step {
    Event(Event),
    /// An ENTRIES section checked but not decoded (verify mode): its entry count.
    Counted(u64),
    /// A section of a kind this version does not know, checked and skipped.
    Skipped,
}

/// Reads a snapshot as a stream of [`Event`]s.
///
/// Every section's CRC is checked before its content is used, and the trailer's SHA-256 is
/// checked before [`Event::End`]. Events before an error are intact (their CRC matched), but
/// only a stream that reached `End` is known to be complete and unmodified: callers that
/// apply data as it streams should be ready to undo it on error.
///
/// Memory use is bounded by the largest section (at most [`MAX_SECTION_LEN`] stored plus
/// the same decompressed), whatever the file claims.
pub struct SnapshotReader<R: Read> {
    input: HashingReader<BufReader<R>>,
    mode: Mode,
    decompressor: Decompressor<'static>,
    /// Reused stored-payload buffer.
    stored: Vec<u8>,
    /// Reused decompression buffer.
    raw: Vec<u8>,
    /// Column buffers handed back through [`recycle`](Self::recycle).
    spare: Vec<(Vec<u8>, Vec<u8>)>,
    state: State,
    btf_count: u32,
    map_count: u32,
    open: Option<OpenMap>,
    limits: Limits,
    /// Raw BTF bytes seen so far (all of them are kept by a restore).
    btf_total: u64,
    /// Map-of-maps nesting depth of every map so far, by index (bounded by `max_maps`).
    depths: Vec<u32>,
    /// The CLOCKS section, once read.
    clocks: Option<ClockSample>,
}

impl<R: Read> fmt::Debug for SnapshotReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotReader")
            .field("mode", &self.mode)
            .field("state", &self.state)
            .field("bytes_read", &self.input.count())
            .field("btf_count", &self.btf_count)
            .field("map_count", &self.map_count)
            .field("open_map", &self.open.as_ref().map(|m| m.index))
            .finish_non_exhaustive()
    }
}

impl<R: Read> SnapshotReader<R> {
    /// Reads and checks the file header (magic, version), with the default [`Limits`].
    /// Input is buffered internally.
    pub fn new(r: R) -> Result<Self, FormatError> {
        Self::with_mode(r, Mode::Decode, Limits::default())
    }

    /// Like [`new`](Self::new), with these limits on sections, BTF, maps and nesting.
    pub fn with_limits(r: R, limits: &Limits) -> Result<Self, FormatError> {
        Self::with_mode(r, Mode::Decode, *limits)
    }

    fn with_mode(r: R, mode: Mode, limits: Limits) -> Result<Self, FormatError> {
        let mut input = HashingReader::new(BufReader::with_capacity(256 << 10, r));
        let mut header = [0u8; FILE_HEADER_LEN];
        let n = input.read_full(&mut header)?;
        // Compare what we got before complaining about length: a short non-snapshot file is
        // "not a snapshot", a short snapshot is "truncated".
        let got_magic = n.min(MAGIC.len());
        if header[..got_magic] != MAGIC[..got_magic] {
            return Err(FormatError::NotASnapshot);
        }
        if n < FILE_HEADER_LEN {
            return Err(FormatError::truncated(
                n as u64,
                "inside the 16-byte file header",
            ));
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        // Header flags and reserved bytes are ignored (reserved for compatible extensions);
        // the trailer hash still covers them.
        Ok(Self {
            input,
            mode,
            decompressor: Decompressor::new()?,
            stored: Vec::new(),
            raw: Vec::new(),
            spare: Vec::new(),
            state: State::ExpectInfo,
            btf_count: 0,
            map_count: 0,
            open: None,
            limits,
            btf_total: 0,
            depths: Vec::new(),
            clocks: None,
        })
    }

    /// Next event, or `None` after [`Event::End`]. After an error, every further call fails.
    pub fn next_event(&mut self) -> Result<Option<Event>, FormatError> {
        loop {
            match self.advance()? {
                None => return Ok(None),
                Some(Step::Event(e)) => return Ok(Some(e)),
                Some(Step::Counted(_) | Step::Skipped) => {}
            }
        }
    }

    /// Bytes consumed from the input so far.
    pub fn bytes_read(&self) -> u64 {
        self.input.count()
    }

    /// The dumping host's clocks at dump time (the CLOCKS section), once the reader has
    /// passed it: always before the first [`Event::MapBegin`]. `None` for snapshots written
    /// before clocks were recorded (or by writers that do not record them).
    pub fn clocks(&self) -> Option<&ClockSample> {
        self.clocks.as_ref()
    }

    /// Hands a chunk's buffers back so the next [`Event::Entries`] reuses them instead of
    /// allocating. Optional.
    pub fn recycle(&mut self, chunk: EntryChunk) {
        if self.spare.len() < 2 {
            self.spare.push((chunk.keys, chunk.values));
        }
    }

    fn advance(&mut self) -> Result<Option<Step>, FormatError> {
        match self.state {
            State::Done => return Ok(None),
            State::Failed => {
                return Err(FormatError::Usage(
                    "the snapshot reader already reported an error; the rest of the snapshot \
                     cannot be trusted"
                        .into(),
                ));
            }
            State::ExpectInfo | State::Body => {}
        }
        match self.section() {
            Ok(step) => Ok(Some(step)),
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    /// Reads, checks and interprets one section.
    fn section(&mut self) -> Result<Step, FormatError> {
        let off = self.input.count();
        // The trailer hashes everything before its own header, so keep the state from here.
        let hash_before = self.input.hasher();
        let mut header = [0u8; SECTION_HEADER_LEN];
        let n = self.input.read_full(&mut header)?;
        if n < SECTION_HEADER_LEN {
            let what = if n == 0 {
                "where a section should start: the TRAILER section is missing"
            } else {
                "inside a section header"
            };
            return Err(FormatError::truncated(self.input.count(), what));
        }
        let kind = u16::from_le_bytes([header[0], header[1]]);
        let flags = u16::from_le_bytes([header[2], header[3]]);
        let stored_len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let raw_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let crc = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        for len in [stored_len, raw_len] {
            if len > MAX_SECTION_LEN.max(self.limits.max_section) {
                return Err(FormatError::TooLarge {
                    offset: off,
                    len: len.into(),
                });
            }
            Limits::check(
                || format!("the {} section at byte {off}", kind_name(kind)),
                "its size (bytes)",
                len.into(),
                self.limits.max_section.into(),
                "max-section",
            )?;
        }
        // Limits on what is kept are checked from the header, before reading the payload.
        match kind {
            kind::BTF => {
                let what = || format!("BTF section {} at byte {off}", self.btf_count);
                let l = &self.limits;
                Limits::check(
                    what,
                    "its size (bytes)",
                    raw_len.into(),
                    l.max_btf_blob,
                    "max-btf-blob",
                )?;
                let total = self.btf_total + u64::from(raw_len);
                Limits::check(
                    what,
                    "the BTF of the snapshot so far (bytes)",
                    total,
                    l.max_btf_total,
                    "max-btf-bytes",
                )?;
                self.btf_total = total;
            }
            kind::MAP_BEGIN => {
                Limits::check(
                    || format!("snapshot map {} at byte {off}", self.map_count),
                    "the number of maps (inner maps included)",
                    u64::from(self.map_count) + 1,
                    self.limits.max_maps.into(),
                    "max-maps",
                )?;
            }
            _ => {}
        }

        let known = matches!(
            kind,
            kind::INFO
                | kind::BTF
                | kind::MAP_BEGIN
                | kind::ENTRIES
                | kind::MAP_END
                | kind::CLOCKS
                | kind::TRAILER
        );
        // Payloads we do not need in memory are streamed through the CRC: unknown kinds, and
        // ENTRIES when only verifying.
        let buffer = known && !(self.mode == Mode::Verify && kind == kind::ENTRIES);
        let what = || {
            format!(
                "inside the {} section that starts at byte {off}",
                kind_name(kind)
            )
        };
        let crc_head = crc32c::crc32c(&header[..12]);
        let actual_crc = if buffer {
            self.stored.clear();
            self.stored.reserve(stored_len as usize);
            (&mut self.input)
                .take(stored_len.into())
                .read_to_end(&mut self.stored)?;
            if self.stored.len() < stored_len as usize {
                return Err(FormatError::truncated(self.input.count(), what()));
            }
            crc32c::crc32c_append(crc_head, &self.stored)
        } else {
            self.stream_payload(stored_len, crc_head, what)?
        };
        if actual_crc != crc {
            return Err(FormatError::ChunkCrc { offset: off, kind });
        }

        // The section is intact; from here on errors are about structure.
        let malformed = |reason: String| FormatError::malformed(off, reason);
        if self.state == State::ExpectInfo && kind != kind::INFO {
            return Err(malformed(format!(
                "the first section must be INFO, but it is {} (kind {kind:#06x})",
                kind_name(kind)
            )));
        }
        if !known {
            return Ok(Step::Skipped);
        }
        if flags & !FLAG_ZSTD != 0 {
            return Err(malformed(format!(
                "the {} section has flags {flags:#06x}, which use bits this version does not \
                 define",
                kind_name(kind)
            )));
        }
        let compressed = flags & FLAG_ZSTD != 0;
        if !compressed && raw_len != stored_len {
            return Err(malformed(format!(
                "the uncompressed {} section declares raw_len {raw_len} but stored_len \
                 {stored_len}; they must be equal",
                kind_name(kind)
            )));
        }
        let raw_len = raw_len as usize;
        // Every known section is decoded here, once; but a verify pass's ENTRIES (counted
        // from their length) and the TRAILER (which must not be compressed; checked by itself).
        let counting = kind == kind::ENTRIES && self.mode == Mode::Verify;
        let payload: &[u8] = if counting || kind == kind::TRAILER {
            &[]
        } else {
            decode(
                &mut self.decompressor,
                &self.stored,
                &mut self.raw,
                off,
                compressed,
                raw_len,
            )?
        };

        match kind {
            kind::INFO => {
                if self.state != State::ExpectInfo {
                    return Err(malformed(
                        "a second INFO section (there must be exactly one)".into(),
                    ));
                }
                let info: SnapshotInfo =
                    serde_json::from_slice(payload).map_err(|source| FormatError::Json {
                        offset: off,
                        source,
                    })?;
                self.state = State::Body;
                Ok(Step::Event(Event::Info(info)))
            }
            kind::BTF => {
                if let Some(m) = &self.open {
                    return Err(malformed(format!(
                        "a BTF section inside map {} (between its MAP_BEGIN and MAP_END)",
                        m.index
                    )));
                }
                let index = self.btf_count;
                self.btf_count = index
                    .checked_add(1)
                    .ok_or_else(|| malformed("too many BTF sections".into()))?;
                let blob = payload.to_vec();
                Ok(Step::Event(Event::Btf { index, blob }))
            }
            kind::MAP_BEGIN => {
                if let Some(m) = &self.open {
                    return Err(malformed(format!(
                        "MAP_BEGIN while map {} is still open (maps cannot nest; MAP_END is \
                         missing)",
                        m.index
                    )));
                }
                let meta: MapMeta =
                    serde_json::from_slice(payload).map_err(|source| FormatError::Json {
                        offset: off,
                        source,
                    })?;
                if let Some(b) = &meta.btf
                    && b.index >= self.btf_count
                {
                    return Err(malformed(format!(
                        "map {:?} refers to BTF section {}, but only {} BTF sections come \
                         before it",
                        meta.name, b.index, self.btf_count
                    )));
                }
                if let Some(t) = meta.inner_template
                    && t >= self.map_count
                {
                    return Err(malformed(format!(
                        "map {:?} uses map {t} as inner template, but only {} maps come before \
                         it",
                        meta.name, self.map_count
                    )));
                }
                let (key_len, value_len) = entry_layout(&meta).map_err(malformed)?;
                let index = self.map_count;
                let depth = match (access_of(meta.map_type), meta.inner_template) {
                    (Ok(Access::MapOfMaps), Some(t)) => {
                        self.depths.get(t as usize).copied().unwrap_or(0) + 1
                    }
                    (Ok(Access::MapOfMaps), None) => 1,
                    _ => 0,
                };
                Limits::check(
                    || format!("snapshot map {index} {:?}", meta.name),
                    "its map-of-maps nesting depth",
                    depth.into(),
                    self.limits.max_nesting.into(),
                    "max-nesting",
                )?;
                self.depths.push(depth);
                self.map_count = index
                    .checked_add(1)
                    .ok_or_else(|| malformed("too many maps".into()))?;
                self.open = Some(OpenMap {
                    index,
                    key_len,
                    value_len,
                    entries: 0,
                });
                Ok(Step::Event(Event::MapBegin { index, meta }))
            }
            kind::ENTRIES => {
                let Some(m) = &mut self.open else {
                    return Err(malformed(
                        "an ENTRIES section outside a map (no MAP_BEGIN before it)".into(),
                    ));
                };
                let (k, v, map_index) = (m.key_len, m.value_len, m.index);
                // entry_layout guarantees width >= 1, so the division below is safe.
                let width = k + v;
                let bad_len = |count: String| {
                    FormatError::malformed(
                        off,
                        format!(
                            "the ENTRIES payload of map {} is {raw_len} bytes, which is not \
                             4 + {count} x {width}-byte entries",
                            map_index
                        ),
                    )
                };
                if self.mode == Mode::Verify {
                    // Count derived from the length alone, so verify never decompresses entries.
                    let body = raw_len
                        .checked_sub(4)
                        .ok_or_else(|| bad_len("count".into()))?;
                    if body % width != 0 {
                        return Err(bad_len("count".into()));
                    }
                    let count = (body / width) as u64;
                    m.entries += count;
                    return Ok(Step::Counted(count));
                }
                let (count_bytes, body) = payload
                    .split_first_chunk::<4>()
                    .ok_or_else(|| bad_len("count".into()))?;
                let count = u32::from_le_bytes(*count_bytes) as usize;
                if count.checked_mul(width) != Some(body.len()) {
                    return Err(bad_len(count.to_string()));
                }
                let (key_bytes, value_bytes) = body.split_at(count * k);
                let (mut keys, mut values) = self.spare.pop().unwrap_or_default();
                keys.clear();
                keys.extend_from_slice(key_bytes);
                values.clear();
                values.extend_from_slice(value_bytes);
                m.entries += count as u64;
                Ok(Step::Event(Event::Entries(EntryChunk::new(
                    k, v, count, keys, values,
                )?)))
            }
            kind::MAP_END => {
                let Some(m) = self.open.take() else {
                    return Err(malformed("a MAP_END section with no open map".into()));
                };
                let total = payload
                    .first_chunk::<8>()
                    .filter(|_| payload.len() == 8)
                    .map(|b| u64::from_le_bytes(*b))
                    .ok_or_else(|| {
                        malformed(format!(
                            "the MAP_END payload is {raw_len} bytes; it must be 8 (u64 entry \
                             count)"
                        ))
                    })?;
                if total != m.entries {
                    return Err(malformed(format!(
                        "MAP_END of map {} says {total} entries, but its ENTRIES sections hold \
                         {}",
                        m.index, m.entries
                    )));
                }
                Ok(Step::Event(Event::MapEnd {
                    index: m.index,
                    entries: total,
                }))
            }
            kind::CLOCKS => {
                if self.clocks.is_some() {
                    return Err(malformed(
                        "a second CLOCKS section (there may be at most one)".into(),
                    ));
                }
                if self.map_count > 0 {
                    return Err(malformed(
                        "a CLOCKS section after a MAP_BEGIN (it must precede every map)".into(),
                    ));
                }
                let sample: ClockSample =
                    serde_json::from_slice(payload).map_err(|source| FormatError::Json {
                        offset: off,
                        source,
                    })?;
                self.clocks = Some(sample);
                // Not an event: readers that predate it see nothing new ([`Self::clocks`]).
                Ok(Step::Skipped)
            }
            kind::TRAILER => self.trailer(off, compressed, hash_before),
            _ => Ok(Step::Skipped),
        }
    }

    fn trailer(
        &mut self,
        off: u64,
        compressed: bool,
        hash_before: sha2::Sha256,
    ) -> Result<Step, FormatError> {
        if compressed {
            return Err(FormatError::malformed(
                off,
                "the TRAILER section is compressed; it must be stored as-is",
            ));
        }
        if let Some(m) = &self.open {
            return Err(FormatError::malformed(
                off,
                format!(
                    "the snapshot ends while map {} is still open (its MAP_END is missing)",
                    m.index
                ),
            ));
        }
        let expected: [u8; 32] = self.stored.as_slice().try_into().map_err(|_| {
            FormatError::malformed(
                off,
                format!(
                    "the TRAILER payload is {} bytes; it must be 32 (SHA-256)",
                    self.stored.len()
                ),
            )
        })?;
        let actual: [u8; 32] = hash_before.finalize().into();
        if expected != actual {
            return Err(FormatError::Checksum { expected, actual });
        }
        let digest = StreamDigest {
            sha256: self.input.hasher().finalize().into(),
            bytes: self.input.count(),
        };
        // Anything after the trailer would be unauthenticated, so it is an error, not ignored.
        let mut probe = [0u8; 1];
        if self.input.read_full(&mut probe)? != 0 {
            return Err(FormatError::malformed(
                digest.bytes,
                "there is data after the TRAILER section, which must be the last thing in the \
                 file",
            ));
        }
        self.state = State::Done;
        Ok(Step::Event(Event::End(digest)))
    }

    /// Reads `len` payload bytes without keeping them, returning the CRC32C continued from
    /// `crc`.
    fn stream_payload(
        &mut self,
        len: u32,
        mut crc: u32,
        what: impl Fn() -> String,
    ) -> Result<u32, FormatError> {
        let mut buf = [0u8; 16 << 10];
        let mut left = len as usize;
        while left > 0 {
            let want = left.min(buf.len());
            let got = self.input.read_full(&mut buf[..want])?;
            crc = crc32c::crc32c_append(crc, &buf[..got]);
            if got < want {
                return Err(FormatError::truncated(self.input.count(), what()));
            }
            left -= got;
        }
        Ok(crc)
    }
}

/// The raw payload of a section: `stored` itself, or `stored` decompressed into `raw` (whose
/// allocation is reused). The output slice is exactly `raw_len` long, so a frame that
/// decompresses to more fails instead of growing memory.
fn decode<'a>(
    decompressor: &mut Decompressor<'static>,
    stored: &'a [u8],
    raw: &'a mut Vec<u8>,
    off: u64,
    compressed: bool,
    raw_len: usize,
) -> Result<&'a [u8], FormatError> {
    if !compressed {
        return Ok(stored);
    }
    if raw.len() < raw_len {
        raw.resize(raw_len, 0);
    }
    let out = &mut raw[..raw_len];
    let n = decompressor
        .decompress_to_buffer(stored, out)
        .map_err(|e| {
            FormatError::malformed(
                off,
                format!(
                    "the zstd payload does not decompress into its declared {raw_len} bytes ({e})"
                ),
            )
        })?;
    if n != raw_len {
        return Err(FormatError::malformed(
            off,
            format!(
                "the zstd payload decompresses to {n} bytes, but the header declares {raw_len}"
            ),
        ));
    }
    Ok(&raw[..raw_len])
}

/// What [`verify`] found in an intact snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// Digest of the whole file (equal to `sha256sum` of it).
    pub digest: StreamDigest,
    /// Every map in file order with its entry count.
    pub maps: Vec<(MapMeta, u64)>,
    pub btf_count: u32,
    pub info: SnapshotInfo,
    /// The dumping host's clocks (the CLOCKS section), if recorded.
    pub clocks: Option<ClockSample>,
    /// The BTF blobs, by index (bounded by the limits' `max_btf_total`): a restore that
    /// converts plans every map from them before its first write.
    pub btf: Vec<Vec<u8>>,
}

/// Checks a whole snapshot: every CRC, the trailer SHA-256, and all structural rules, without
/// decompressing ENTRIES (their counts follow from `raw_len`). BTF and metadata are decoded.
pub fn verify<R: Read>(r: R) -> Result<VerifySummary, FormatError> {
    verify_with_limits(r, &Limits::default())
}

/// [`verify`] with these limits.
pub fn verify_with_limits<R: Read>(r: R, limits: &Limits) -> Result<VerifySummary, FormatError> {
    let mut rd = SnapshotReader::with_mode(r, Mode::Verify, *limits)?;
    let mut info = None;
    let mut maps: Vec<(MapMeta, u64)> = Vec::new();
    let mut btf = Vec::new();
    loop {
        let step = rd.advance()?;
        match step {
            Some(Step::Event(Event::Info(i))) => info = Some(i),
            Some(Step::Event(Event::Btf { blob, .. })) => btf.push(blob),
            Some(Step::Event(Event::MapBegin { meta, .. })) => maps.push((meta, 0)),
            Some(Step::Counted(n)) => {
                if let Some(last) = maps.last_mut() {
                    last.1 += n;
                }
            }
            Some(Step::Event(Event::End(digest))) => {
                // The reader only reaches End after an INFO section.
                let info = info
                    .ok_or_else(|| FormatError::malformed(0, "the snapshot has no INFO section"))?;
                return Ok(VerifySummary {
                    digest,
                    maps,
                    btf_count: rd.btf_count,
                    info,
                    clocks: rd.clocks,
                    btf,
                });
            }
            Some(Step::Skipped | Step::Event(Event::MapEnd { .. } | Event::Entries(_))) => {}
            None => {
                return Err(FormatError::malformed(
                    rd.bytes_read(),
                    "the snapshot ended without a trailer",
                ));
            }
        }
    }
}
