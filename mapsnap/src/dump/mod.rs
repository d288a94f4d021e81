//! Reading maps into a snapshot stream.
//!
//! Entries are read with `BPF_MAP_LOOKUP_BATCH` where the map type has it and with
//! `get_next_key` + `lookup` otherwise, and handed to the writer in the column layout the
//! kernel produced, so nothing is copied per entry.

mod parallel;

pub use parallel::{can_split, read_entries_parallel};

use std::collections::HashMap;
use std::io::Write;

use crate::clocks::ClockSample;
use crate::discover::Found;
use crate::error::{Error, Result};
use crate::format::{SnapshotWriter, StreamDigest, WriterOptions};
use crate::model::{Access, BtfRef, MapMeta, SnapshotInfo, access_of, type_name};
use crate::progress::Progress;
use crate::sys::{self, ENOTSUPP, Map, MapInfo};

/// Options for [`dump`].
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// Skip maps of unsupported types with a warning instead of failing.
    pub skip_unsupported: bool,
    pub writer: WriterOptions,
    /// Reader threads for one big hash or array map; even with 1 the kernel reads run on a
    /// thread of their own, overlapped with compression and writing.
    pub threads: usize,
}

impl Default for DumpOptions {
    fn default() -> Self {
        Self {
            skip_unsupported: false,
            writer: WriterOptions::default(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// What one dumped map came to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DumpedMap {
    pub name: String,
    pub map_type: &'static str,
    pub source_id: u32,
    pub pin_path: Option<String>,
    pub entries: u64,
    /// Key and value bytes of its entries (before compression).
    pub bytes: u64,
    /// True for inner maps of a map of maps.
    pub inner: bool,
}

/// The result of a dump.
#[derive(Debug, Clone)]
pub struct DumpReport {
    pub maps: Vec<DumpedMap>,
    /// Maps skipped under `skip_unsupported`, each with the reason.
    pub skipped: Vec<String>,
    pub digest: StreamDigest,
}

/// Why a map cannot be snapshot, if it cannot.
pub fn unsupported_reason(info: &MapInfo) -> Option<String> {
    if info.ifindex != 0 {
        return Some(format!(
            "it is offloaded to network device {}; its data lives on the device",
            info.ifindex
        ));
    }
    if let Err(reason) = access_of(info.map_type) {
        return Some(reason.to_string());
    }
    if info.flags & crate::model::map_flags::WRONLY != 0 {
        return Some("it was created write-only for user space (BPF_F_WRONLY)".into());
    }
    None
}

/// Metadata of an open map as the snapshot records it (BTF index filled in by the caller).
pub fn meta_of(info: &MapInfo, frozen: bool, pin_rel: Option<String>) -> Result<MapMeta> {
    let per_cpu = matches!(access_of(info.map_type), Ok(Access::PerCpu));
    Ok(MapMeta {
        map_type: info.map_type,
        name: info.name.clone(),
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        flags: info.flags,
        map_extra: info.map_extra,
        numa_node: None,
        frozen,
        possible_cpus: if per_cpu {
            Some(sys::possible_cpus()?)
        } else {
            None
        },
        btf: None,
        pin_path: pin_rel,
        source_id: info.id,
        inner_template: None,
        inner: false,
    })
}

/// Receives `(count, keys, values)` batches in the kernel's column layout.
pub type EntrySink<'a> = dyn FnMut(usize, &[u8], &[u8]) -> Result<()> + 'a;

/// Entries per batch call so that one batch is about one chunk.
pub fn batch_entries(chunk_bytes: usize, entry_len: usize) -> usize {
    (chunk_bytes / entry_len.max(1)).clamp(16, 1 << 16)
}

/// Reads every entry of a keyed map, calling `sink(count, keys, values)` per batch.
///
/// Values are as the kernel returns them (per-CPU slots; inner map *ids* for maps of maps).
pub fn read_entries(
    map: &Map,
    key_len: usize,
    value_len: usize,
    batch: usize,
    sink: &mut EntrySink<'_>,
) -> Result<u64> {
    let mut max = batch.max(1);
    let mut keys = vec![0u8; max * key_len];
    let mut values = vec![0u8; max * value_len];
    // Hash maps use a u32 bucket cursor, the others a whole key: room for both.
    let mut cursor_in = vec![0u8; key_len.max(4)];
    let mut cursor_out = vec![0u8; key_len.max(4)];
    let mut first = true;
    let mut total = 0u64;
    loop {
        let cursor = (!first).then_some(cursor_in.as_slice());
        match map.lookup_batch(cursor, &mut cursor_out, &mut keys, &mut values, max as u32) {
            Ok(r) => {
                let n = r.count as usize;
                if n > 0 {
                    sink(n, &keys[..n * key_len], &values[..n * value_len])?;
                    total += n as u64;
                }
                if r.done {
                    return Ok(total);
                }
                std::mem::swap(&mut cursor_in, &mut cursor_out);
                first = false;
            }
            // One hash bucket holds more entries than fit: grow and ask again.
            Err(e) if e.errno() == Some(libc::ENOSPC) && max < (1 << 24) => {
                max *= 2;
                keys.resize(max * key_len, 0);
                values.resize(max * value_len, 0);
            }
            Err(e)
                if first
                    && matches!(
                        e.errno(),
                        Some(libc::EINVAL) | Some(ENOTSUPP) | Some(libc::EOPNOTSUPP)
                    ) =>
            {
                return read_by_next_key(map, key_len, value_len, batch, sink);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The fallback walk for map types without batch lookup: `get_next_key` from a NULL key.
fn read_by_next_key(
    map: &Map,
    key_len: usize,
    value_len: usize,
    batch: usize,
    sink: &mut EntrySink<'_>,
) -> Result<u64> {
    let mut keys = vec![0u8; batch * key_len];
    let mut values = vec![0u8; batch * value_len];
    let mut cur = vec![0u8; key_len];
    let mut next = vec![0u8; key_len];
    let mut have_cur = false;
    let (mut n, mut total) = (0usize, 0u64);
    while map.next_key(have_cur.then_some(cur.as_slice()), &mut next)? {
        let slot = &mut values[n * value_len..(n + 1) * value_len];
        // Empty array-like slots (devmap, cpumap) and entries deleted meanwhile: skip.
        if map.lookup(Some(&next), slot, 0)? {
            keys[n * key_len..(n + 1) * key_len].copy_from_slice(&next);
            n += 1;
            if n == batch {
                sink(n, &keys, &values)?;
                total += n as u64;
                n = 0;
            }
        }
        std::mem::swap(&mut cur, &mut next);
        have_cur = true;
    }
    if n > 0 {
        sink(n, &keys[..n * key_len], &values[..n * value_len])?;
        total += n as u64;
    }
    Ok(total)
}

/// Drains a queue or stack and pushes the values back, returning them oldest first.
///
/// The map is briefly empty: whoever writes to it must be quiescent (a frozen container).
pub fn drain_queue(map: &Map, meta: &MapMeta) -> Result<Vec<u8>> {
    let vl = meta.value_len();
    if meta.frozen {
        return Err(Error::Restore {
            map: map.label().to_string(),
            reason: "a frozen queue or stack cannot be read: reading pops its values".into(),
        });
    }
    let mut popped = Vec::new();
    let mut buf = vec![0u8; vl];
    while map.lookup_and_delete(None, &mut buf)? {
        popped.extend_from_slice(&buf);
    }
    let mut ordered: Vec<u8> = Vec::with_capacity(popped.len());
    if meta.map_type == crate::model::map_type::STACK {
        // A stack pops newest first; push order is the reverse.
        for v in popped.chunks_exact(vl.max(1)).rev() {
            ordered.extend_from_slice(v);
        }
    } else {
        ordered = popped;
    }
    for (i, v) in ordered.chunks_exact(vl.max(1)).enumerate() {
        map.update(None, v, 0).map_err(|e| Error::Restore {
            map: map.label().to_string(),
            reason: format!(
                "pushing value {i} of {} back after reading failed: {e}",
                ordered.len() / vl.max(1)
            ),
        })?;
    }
    Ok(ordered)
}

struct Dumper<'a, W: Write> {
    w: SnapshotWriter<W>,
    btf_index: HashMap<u32, u32>,
    report: Vec<DumpedMap>,
    chunk_bytes: usize,
    threads: usize,
    progress: &'a dyn Progress,
}

impl<W: Write> Dumper<'_, W> {
    fn btf_ref(&mut self, info: &MapInfo) -> Result<Option<BtfRef>> {
        if info.btf_id == 0 || info.btf_value_type_id == 0 && info.btf_key_type_id == 0 {
            return Ok(None);
        }
        let index = match self.btf_index.get(&info.btf_id) {
            Some(i) => *i,
            None => {
                let blob = sys::btf_raw_by_id(info.btf_id)?;
                let i = self.w.add_btf(&blob)?;
                self.btf_index.insert(info.btf_id, i);
                i
            }
        };
        Ok(Some(BtfRef {
            index,
            key_type_id: info.btf_key_type_id,
            value_type_id: info.btf_value_type_id,
        }))
    }

    /// Writes one map (and, for maps of maps, its inner maps first); returns its index.
    fn map(
        &mut self,
        map: &Map,
        info: &MapInfo,
        frozen: bool,
        pin: Option<String>,
        inner: bool,
    ) -> Result<u32> {
        if let Some(reason) = unsupported_reason(info) {
            return Err(Error::Unsupported {
                map: map.label().to_string(),
                map_type: type_name(info.map_type),
                reason,
            });
        }
        let mut meta = meta_of(info, frozen, pin)?;
        meta.inner = inner;
        meta.btf = self.btf_ref(info)?;
        let (kl, vl) = (meta.key_len(), meta.value_len());
        self.progress
            .map_started(&meta.name, expected_entries(&meta));
        let access = access_of(meta.map_type).unwrap_or(Access::Keyed);
        let index = match access {
            Access::Queue => {
                let values = drain_queue(map, &meta)?;
                let map_index = self.w.begin_map(&meta)?;
                let per_chunk = batch_entries(self.chunk_bytes, vl);
                for chunk in values.chunks(per_chunk * vl.max(1)) {
                    let n = chunk.len() / vl.max(1);
                    self.w.write_entries(n, &[], chunk)?;
                    self.progress.entries(n as u64);
                }
                self.finish_map(map_index, &meta)?
            }
            Access::MapOfMaps => self.map_of_maps(map, meta)?,
            Access::Keyed | Access::PerCpu => {
                let map_index = self.w.begin_map(&meta)?;
                let batch = batch_entries(self.chunk_bytes, kl + vl);
                let (w, progress) = (&mut self.w, self.progress);
                read_entries_parallel(map, &meta, batch, self.threads, &mut |n, k, v| {
                    w.write_entries(n, k, v)?;
                    progress.entries(n as u64);
                    Ok(())
                })?;
                self.finish_map(map_index, &meta)?
            }
        };
        Ok(index)
    }

    fn finish_map(&mut self, index: u32, meta: &MapMeta) -> Result<u32> {
        let entries = self.w.end_map()?;
        self.progress.map_done();
        self.report.push(DumpedMap {
            name: meta.name.clone(),
            map_type: meta.type_name(),
            source_id: meta.source_id,
            pin_path: meta.pin_path.clone(),
            entries,
            bytes: entries * (meta.key_len() + meta.value_len()) as u64,
            inner: meta.inner,
        });
        Ok(index)
    }

    /// Outer entries are read first (keys and inner ids), each inner map is written as a map
    /// of its own, then the outer map with values that are the inner maps' snapshot indexes.
    fn map_of_maps(&mut self, map: &Map, mut meta: MapMeta) -> Result<u32> {
        let kl = meta.key_len();
        let (mut keys, mut ids) = (Vec::new(), Vec::new());
        read_entries(map, kl, 4, 1024, &mut |_, k, v| {
            keys.extend_from_slice(k);
            ids.extend_from_slice(v);
            Ok(())
        })?;
        let mut index_of: HashMap<u32, u32> = HashMap::new();
        let mut values = Vec::with_capacity(ids.len());
        for id in ids.chunks_exact(4) {
            let id = u32::from_ne_bytes([id[0], id[1], id[2], id[3]]);
            let index = match index_of.get(&id) {
                Some(i) => *i,
                None => {
                    let inner = Map::from_id(id)?;
                    let info = inner.info()?;
                    let frozen = inner.frozen()?;
                    let i = self.map(&inner, &info, frozen, None, true)?;
                    index_of.insert(id, i);
                    i
                }
            };
            meta.inner_template.get_or_insert(index);
            values.extend_from_slice(&index.to_le_bytes());
        }
        let index = self.w.begin_map(&meta)?;
        let n = keys.len() / kl.max(1);
        let per_chunk = batch_entries(self.chunk_bytes, kl + 4);
        for start in (0..n).step_by(per_chunk.max(1)) {
            let end = (start + per_chunk).min(n);
            self.w.write_entries(
                end - start,
                &keys[start * kl..end * kl],
                &values[start * 4..end * 4],
            )?;
            self.progress.entries((end - start) as u64);
        }
        self.finish_map(index, &meta)
    }
}

/// How many entries a map will yield, when that is known without reading it.
fn expected_entries(meta: &MapMeta) -> Option<u64> {
    use crate::model::map_type::{ARRAY, PERCPU_ARRAY};
    matches!(meta.map_type, ARRAY | PERCPU_ARRAY).then_some(meta.max_entries as u64)
}

/// Dumps `maps` into `out` as one snapshot.
pub fn dump<W: Write>(
    maps: &[Found],
    out: W,
    info: &SnapshotInfo,
    opts: &DumpOptions,
    progress: &dyn Progress,
) -> Result<(W, DumpReport)> {
    let mut w = SnapshotWriter::new(out, info, opts.writer)?;
    // The clocks are read as the dump starts, before the first entry: timestamps in the
    // entries are then rebased against the instant the state was read (a frozen container
    // does not move them meanwhile). Every caller of dump records them this way.
    match ClockSample::now() {
        Ok(sample) => w.add_clocks(&sample)?,
        Err(e) => tracing::warn!("not recording clocks (timestamps cannot be rebased): {e}"),
    }
    let mut d = Dumper {
        w,
        btf_index: HashMap::new(),
        report: Vec::new(),
        chunk_bytes: opts.writer.chunk_bytes,
        threads: opts.threads,
        progress,
    };
    let mut skipped = Vec::new();
    for f in maps {
        if let Some(reason) = unsupported_reason(&f.info) {
            let err = Error::Unsupported {
                map: f.map.label().to_string(),
                map_type: type_name(f.info.map_type),
                reason,
            };
            if opts.skip_unsupported {
                tracing::warn!("skipping: {err}");
                skipped.push(err.to_string());
                continue;
            }
            return Err(err);
        }
        d.map(&f.map, &f.info, f.frozen, f.pin_rel.clone(), false)?;
    }
    let (out, digest) = d.w.finish()?;
    Ok((
        out,
        DumpReport {
            maps: d.report,
            skipped,
            digest,
        },
    ))
}
