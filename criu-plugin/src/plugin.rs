//! The plugin's work, in safe Rust; [`crate::ffi`] calls in here from CRIU's hooks.
//!
//! **Dump** (`init(DUMP)`, then `DUMP_EXT_FILE` for each file CRIU cannot dump itself, in the
//! `criu` process while the tasks are frozen): `init` starts the deadline and removes what an
//! earlier dump left in the image directory (its index first). An fd whose anon inode is
//! `bpf-map` is looked up in `/proc/self/fdinfo` (kernel map id, open flags). The first fd of
//! a map id dumps the map with `mapsnap::dump` into `mapsnap-map-<id>.snap`; every fd adds a
//! record to the index `mapsnap-criu.json`, rewritten (atomically) after each file together
//! with each snapshot's size and sha256. A failed dump removes the index in `exit`. Anything
//! that is not a map is answered `-ENOTSUP`, so CRIU asks its other plugins.
//!
//! **Restore** (`init(RESTORE)`, in the `criu` process before any task is forked): the index
//! is read, each distinct map's snapshot is checked (regular file, size, sha256, dump id) and
//! recreated once with `mapsnap::restore` (BTF, flags, inner maps, contents, frozen state)
//! and kept open by this process. `RESTORE_EXT_FILE(id)` then runs in the restored task that
//! owns the file and opens the new map by id with the recorded access mode
//! (`BPF_MAP_GET_FD_BY_ID` with `BPF_F_RDONLY` / `BPF_F_WRONLY`); CRIU moves that fd to the
//! original fd number. So all fds, in all processes, of one map before the dump share one
//! map after the restore. Any failure, or the deadline, drops every map made so far.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::c_int;
use std::io::BufReader;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use mapsnap::anchor::Anchor;
use mapsnap::discover::Found;
use mapsnap::dump::{DumpOptions, dump, unsupported_reason};
use mapsnap::format::{Event, SnapshotReader, VerifySummary, verify};
use mapsnap::model::{Access as MapAccess, SnapshotInfo, access_of, type_name};
use mapsnap::progress::NoProgress;
use mapsnap::restore::{Destination, restore};
use mapsnap::storage::DigestCheck;
use mapsnap::sys::{self, Map, ObjKind};
use mapsnap::trust::{SIGNATURE_SUFFIX, SecretKey, SigningWriter, TrustError, TrustSet};

use crate::config::PluginConfig;
use crate::deadline::{Deadline, DeadlineIo};
use crate::error::PluginError;
use crate::ffi::{self, LogLevel, stage};
use crate::images::{self, Access, DumpIndex, FileRecord, INDEX_FORMAT, SnapshotRecord};

/// `map 42 "counters" (hash)`.
fn label(id: u32, name: &str, map_type: &str) -> String {
    format!("map {id} {name:?} ({map_type})")
}

/// What every snapshot of dump `dump_id` has as its `source` (before the file and map).
fn source_prefix(dump_id: &str) -> String {
    format!("criu dump {dump_id}:")
}

/// What [`Dumper::dump_file`] did with one CRIU file.
#[derive(Debug)]
pub enum DumpOutcome {
    /// Not a BPF map: some other plugin's business (or nobody's).
    NotAMap { kind: ObjKind },
    /// A map of a type mapsnap cannot carry.
    Unsupported { map: String, reason: String },
    Saved {
        record: FileRecord,
        /// What was written; None when an earlier fd of the same map saved it.
        stats: Option<SaveStats>,
    },
}

/// Dump-side state: the image directory, this dump's id, and what it has saved.
#[derive(Debug)]
pub struct Dumper {
    dir: Anchor,
    index: DumpIndex,
    saved: HashMap<u32, SavedMap>,
    /// Set by `exit` of a failed dump: a worker still running then removes the index it
    /// writes, so a late worker cannot publish one after the dump failed.
    abandoned: Arc<AtomicBool>,
    /// Signs every snapshot (`<snapshot>.minisig` beside it), when configured.
    signer: Option<SecretKey>,
}

impl Dumper {
    /// A dump into `dir` with a fresh dump id. Call [`images::remove_stale`] first when the
    /// directory may hold an earlier dump's files.
    pub fn new(dir: Anchor) -> Result<Self, PluginError> {
        Ok(Self {
            dir,
            index: DumpIndex {
                format: INDEX_FORMAT.into(),
                dump_id: images::new_dump_id()?,
                created_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                files: Vec::new(),
                snapshots: Vec::new(),
            },
            saved: HashMap::new(),
            abandoned: Arc::new(AtomicBool::new(false)),
            signer: None,
        })
    }

    /// Signs every snapshot this dump writes with `key` (None: unsigned).
    pub fn signing_with(mut self, key: Option<SecretKey>) -> Self {
        self.signer = key;
        self
    }

    /// The flag [`Self::dump_file`] checks after writing the index.
    pub fn abandoned_flag(&self) -> Arc<AtomicBool> {
        self.abandoned.clone()
    }

    pub fn dump_id(&self) -> &str {
        &self.index.dump_id
    }

    /// Saves the map behind `fd` (CRIU file `file_id`) and records the file in the index.
    pub fn dump_file(
        &mut self,
        fd: BorrowedFd<'_>,
        file_id: u32,
        deadline: &Deadline,
    ) -> Result<DumpOutcome, PluginError> {
        let kind = sys::fd_kind(fd);
        if kind != ObjKind::Map {
            return Ok(DumpOutcome::NotAMap { kind });
        }
        let fdinfo = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
        let text = std::fs::read_to_string(&fdinfo)
            .map_err(|e| PluginError::io(format!("reading {fdinfo}"), e))?;
        let bad = |reason: &str| PluginError::Image {
            file: fdinfo.clone(),
            reason: reason.into(),
        };
        let map_id: u32 = images::fdinfo_field(&text, "map_id")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("no map_id line"))?;
        let flags = images::fdinfo_field(&text, "flags")
            .and_then(|v| u32::from_str_radix(v, 8).ok())
            .ok_or_else(|| bad("no flags line"))?;
        let access = Access::from_open_flags(flags);

        let (saved, stats) = match self.saved.entry(map_id) {
            Entry::Occupied(o) => (o.get().clone(), None),
            Entry::Vacant(v) => {
                let signer = self.signer.as_ref();
                match save_map(
                    &self.dir,
                    &self.index.dump_id,
                    map_id,
                    file_id,
                    signer,
                    deadline,
                )? {
                    Ok((saved, stats)) => {
                        self.index.snapshots.push(saved.record.clone());
                        (v.insert(saved).clone(), Some(stats))
                    }
                    Err(unsupported) => return Ok(unsupported),
                }
            }
        };
        let record = FileRecord {
            file_id,
            map_id,
            access,
            map_name: saved.name,
            map_type: saved.map_type,
        };
        self.index.files.retain(|f| f.file_id != file_id);
        self.index.files.push(record.clone());
        deadline.set(format!("writing {}", images::INDEX_NAME));
        images::write_index(&self.dir, &self.index)?;
        if self.abandoned.load(Ordering::SeqCst) {
            self.abandon()?;
            return Err(deadline.expired());
        }
        Ok(DumpOutcome::Saved { record, stats })
    }

    /// The index as written so far.
    pub fn index(&self) -> &DumpIndex {
        &self.index
    }

    /// After a failed dump: removes the index, so nothing of it can be restored.
    pub fn abandon(&self) -> Result<bool, PluginError> {
        Ok(self.dir.unlink(images::INDEX_NAME)?)
    }
}

/// A map saved by this dump: its snapshot record, and its name and type for the records.
#[derive(Debug, Clone)]
struct SavedMap {
    record: SnapshotRecord,
    name: String,
    map_type: String,
}

/// What the dump of one map wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveStats {
    /// Entries of the map itself.
    pub entries: u64,
    /// Inner maps saved with it (maps of maps).
    pub inner_maps: usize,
    /// Size of the snapshot file.
    pub bytes: u64,
}

/// Dumps kernel map `map_id` into its snapshot file; Err(outcome) for a type mapsnap
/// cannot carry.
fn save_map(
    dir: &Anchor,
    dump_id: &str,
    map_id: u32,
    file_id: u32,
    signer: Option<&SecretKey>,
    deadline: &Deadline,
) -> Result<Result<(SavedMap, SaveStats), DumpOutcome>, PluginError> {
    // Our own read-write fd: the process's fd may be read-only or write-only.
    let found = Found::from_map(Map::from_id(map_id)?, None)?;
    let info = &found.info;
    let map_type = type_name(info.map_type);
    let what = label(map_id, &info.name, map_type);
    if let Some(reason) = unsupported_reason(info) {
        return Ok(Err(DumpOutcome::Unsupported { map: what, reason }));
    }
    let name = images::snapshot_name(map_id);
    deadline.set(format!("dumping {what} into {name}"));
    let meta = snapshot_info(dump_id, map_id, file_id)?;
    let (report, signed) = images::write_atomically(dir, &name, |w| {
        let out = DeadlineIo::new(w, deadline);
        let opts = DumpOptions::default();
        let maps = std::slice::from_ref(&found);
        let Some(key) = signer else {
            let (_, report) = dump(maps, out, &meta, &opts, &NoProgress)?;
            return Ok((report, None));
        };
        // Signed as it is written: no second pass over the snapshot.
        let (out, report) = dump(
            maps,
            SigningWriter::new(out, key),
            &meta,
            &opts,
            &NoProgress,
        )?;
        let (_, signed) = out.finish(None).map_err(|source| PluginError::Trust {
            what: format!("signing {name}"),
            source,
        })?;
        Ok((report, Some(signed)))
    })?;
    // Before the index names the snapshot: a restore that finds it finds its signature.
    if let Some(s) = &signed {
        let sig_name = format!("{name}{SIGNATURE_SUFFIX}");
        deadline.set(format!("writing {sig_name}"));
        images::write_atomically(dir, &sig_name, |w| {
            std::io::Write::write_all(w, &s.signature)
                .map_err(|e| PluginError::io(format!("writing {sig_name}"), e))
        })?;
    }
    let stats = SaveStats {
        entries: report
            .maps
            .iter()
            .find(|m| !m.inner)
            .map_or(0, |m| m.entries),
        inner_maps: report.maps.iter().filter(|m| m.inner).count(),
        bytes: report.digest.bytes,
    };
    let saved = SavedMap {
        record: SnapshotRecord {
            map_id,
            size: report.digest.bytes,
            sha256: hex::encode(report.digest.sha256),
        },
        name: info.name.clone(),
        map_type: map_type.to_string(),
    };
    Ok(Ok((saved, stats)))
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn snapshot_info(dump_id: &str, map_id: u32, file_id: u32) -> Result<SnapshotInfo, PluginError> {
    Ok(SnapshotInfo {
        tool: format!("mapsnap-criu {}", env!("CARGO_PKG_VERSION")),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        possible_cpus: sys::possible_cpus()?,
        source: format!("{} file {file_id:#x} map {map_id}", source_prefix(dump_id)),
    })
}

/// One map recreated by [`Restorer::prepare`], as the CRIU files that held it will see it.
#[derive(Debug, Clone)]
struct RestoredFile {
    /// Kernel id of the new map.
    map_id: u32,
    access: Access,
    /// The map as it was at dump time, for messages.
    label: String,
}

/// Restore-side state: the maps recreated for this restore, by CRIU file id.
#[derive(Debug)]
pub struct Restorer {
    files: HashMap<u32, RestoredFile>,
    /// Keeps the new maps alive until every restored task holds its own fds.
    keep: Vec<Map>,
    /// The process that opened `keep` (restored tasks are forks of it).
    owner: u32,
}

/// A snapshot to restore, verified.
struct Pending {
    old_id: u32,
    record: SnapshotRecord,
    snapshot: String,
    label: String,
    summary: VerifySummary,
}

impl Pending {
    fn is_map_of_maps(&self) -> bool {
        self.summary
            .maps
            .iter()
            .any(|(m, _)| !m.inner && access_of(m.map_type) == Ok(MapAccess::MapOfMaps))
    }

    fn fail(&self, e: impl Into<PluginError>) -> PluginError {
        restore_error(&self.label, &self.snapshot, e.into())
    }
}

fn restore_error(map: &str, snapshot: &str, e: PluginError) -> PluginError {
    PluginError::Restore {
        map: map.to_string(),
        snapshot: snapshot.to_string(),
        source: Box::new(e),
    }
}

/// A snapshot opened for one pass: a regular file of the recorded size below the image
/// directory, read through the sha256 check (which fails before the last byte of a file that
/// is not the one the index records) and the deadline.
type SnapshotStream = DigestCheck<BufReader<DeadlineIo<std::fs::File>>>;

fn open_snapshot(
    dir: &Anchor,
    rec: &SnapshotRecord,
    cfg: &PluginConfig,
    deadline: &Deadline,
) -> Result<SnapshotStream, PluginError> {
    let file = images::open_snapshot(dir, rec, cfg.max_snapshot_bytes)?;
    let sha = rec.sha256_bytes().map_err(|reason| PluginError::Image {
        file: images::INDEX_NAME.into(),
        reason,
    })?;
    Ok(DigestCheck::new(
        BufReader::new(DeadlineIo::new(file, deadline)),
        &rec.name(),
        sha,
        rec.size,
    ))
}

impl Restorer {
    /// No maps (an image directory without mapsnap files).
    pub fn empty() -> Self {
        Self {
            files: HashMap::new(),
            keep: Vec::new(),
            owner: std::process::id(),
        }
    }

    /// How many CRIU files and distinct maps this restore holds.
    pub fn counts(&self) -> (usize, usize) {
        (self.files.len(), self.keep.len())
    }

    /// Recreates every map the index of the image directory `dir` lists. On any error every
    /// map made so far is closed again (nothing is pinned).
    pub fn prepare(
        dir: &Anchor,
        cfg: &PluginConfig,
        deadline: &Deadline,
    ) -> Result<Self, PluginError> {
        deadline.set(format!("reading {}", images::INDEX_NAME));
        let Some(index) = images::read_index(dir, cfg.max_index_bytes)? else {
            return Ok(Self::empty());
        };
        let opts = cfg.restore_options();
        let trust = cfg.trust_set()?;
        let prefix = source_prefix(&index.dump_id);
        let mut pending = Vec::new();
        for (&map_id, first) in &index.maps() {
            let record = index
                .snapshot(map_id)
                .cloned()
                .ok_or_else(|| PluginError::Image {
                    file: images::INDEX_NAME.into(),
                    reason: format!("map {map_id} has no snapshot"),
                })?;
            let snapshot = record.name();
            let label = label(map_id, &first.map_name, &first.map_type);
            let fail = |e: PluginError| restore_error(&label, &snapshot, e);
            deadline.set(format!("verifying {label} in {snapshot}"));
            let stream = open_snapshot(dir, &record, cfg, deadline).map_err(fail)?;
            let summary = match &trust {
                None => verify(stream).map_err(|e| fail(mapsnap::Error::from(e).into()))?,
                Some(set) => verify_signed(dir, &snapshot, stream, set).map_err(fail)?,
            };
            let image = |reason: String| {
                fail(PluginError::Image {
                    file: snapshot.clone(),
                    reason,
                })
            };
            if !summary.info.source.starts_with(&prefix) {
                return Err(image(format!(
                    "it was written by another dump ({:?}), not dump {}",
                    summary.info.source, index.dump_id
                )));
            }
            let top = summary.maps.iter().filter(|(m, _)| !m.inner).count();
            if top != 1 {
                return Err(image(format!(
                    "holds {top} top-level maps, a plugin snapshot holds one"
                )));
            }
            pending.push(Pending {
                old_id: map_id,
                record,
                snapshot,
                label,
                summary,
            });
        }

        let mut out = Self::empty();
        let mut new_ids: HashMap<u32, u32> = HashMap::new();
        // Maps of maps first: a map that some process held by fd *and* that was an inner map
        // of a map of maps is then the very inner map restored with its outer map.
        let mut inner_new: HashMap<u32, u32> = HashMap::new();
        let (outer, plain): (Vec<&Pending>, Vec<&Pending>) =
            pending.iter().partition(|p| p.is_map_of_maps());
        for p in outer {
            deadline.set(format!("restoring {} from {}", p.label, p.snapshot));
            let map = restore_one(dir, p, cfg, &opts, deadline).map_err(|e| p.fail(e))?;
            let inner = inner_map_ids(dir, p, &map, cfg, deadline).map_err(|e| p.fail(e))?;
            let id = map.info().map_err(|e| p.fail(e))?.id;
            log_restored(p, id, inner.len());
            inner_new.extend(inner);
            new_ids.insert(p.old_id, id);
            out.keep.push(map);
        }
        let mut todo = Vec::new();
        for p in plain {
            if let Some(&id) = inner_new.get(&p.old_id) {
                ffi::log(
                    LogLevel::Info,
                    &format!(
                        "{} was also an inner map of a map of maps: its fds get the inner \
                         map restored with it (map {id})",
                        p.label
                    ),
                );
                new_ids.insert(p.old_id, id);
                continue;
            }
            todo.push(p);
        }
        if let [p] = todo.as_slice() {
            deadline.set(format!("restoring {} from {}", p.label, p.snapshot));
        } else {
            deadline.set(format!("restoring {} maps", todo.len()));
        }
        let restored = restore_concurrently(dir, &todo, cfg, &opts, deadline);
        // In index order: the first map that failed names the error; every map made is
        // closed again with `out`.
        for (p, r) in todo.iter().zip(restored) {
            let map = r.map_err(|e| p.fail(e))?;
            let id = map.info().map_err(|e| p.fail(e))?.id;
            log_restored(p, id, 0);
            new_ids.insert(p.old_id, id);
            out.keep.push(map);
        }
        for r in &index.files {
            let map_id = new_ids[&r.map_id];
            out.files.insert(
                r.file_id,
                RestoredFile {
                    map_id,
                    access: r.access,
                    label: label(r.map_id, &r.map_name, &r.map_type),
                },
            );
        }
        deadline.check()?;
        Ok(out)
    }

    /// A new fd for CRIU file `file_id` with its recorded access mode; None when the file is
    /// not one of ours.
    pub fn open(&self, file_id: u32) -> Result<Option<(OwnedFd, String)>, PluginError> {
        let Some(f) = self.files.get(&file_id) else {
            return Ok(None);
        };
        let what = || format!("{} (now map {})", f.label, f.map_id);
        let fail = |e: PluginError| PluginError::Restore {
            map: what(),
            snapshot: "the maps restored at init".into(),
            source: Box::new(e),
        };
        let map = Map::from_id_with_flags(f.map_id, f.access.bpf_open_flags())
            .map_err(|e| fail(e.into()))?;
        let fd = map
            .fd()
            .try_clone_to_owned()
            .map_err(|e| fail(PluginError::io("dup", e)))?;
        Ok(Some((
            fd,
            format!("{}: now map {}, {}", f.label, f.map_id, f.access),
        )))
    }
}

/// Verifies a per-map snapshot and its signature (`<snapshot>.minisig`) in one pass: an
/// unsigned snapshot, another key's or altered bytes are refused before any map is created.
fn verify_signed(
    dir: &Anchor,
    snapshot: &str,
    stream: SnapshotStream,
    set: &TrustSet,
) -> Result<VerifySummary, PluginError> {
    let trust = |source| PluginError::Trust {
        what: snapshot.to_string(),
        source,
    };
    let sig_name = format!("{snapshot}{SIGNATURE_SUFFIX}");
    let sig_path = mapsnap::anchor::RelPath::parse(&sig_name).map_err(|e| PluginError::Image {
        file: sig_name.clone(),
        reason: e.to_string(),
    })?;
    let sig = match dir.read_file(&sig_path, MAX_SIGNATURE_BYTES) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => {
            return Err(trust(TrustError::Unsigned {
                what: format!("{snapshot} (no {sig_name})"),
            }));
        }
        Err(e) => return Err(e.into()),
    };
    let mut reader = set.verifying_reader(stream, &sig).map_err(trust)?;
    let summary = verify(&mut reader);
    // The signature's verdict first: altered bytes are reported as such, not as the damage
    // (a CRC error) they caused.
    let verdict = reader.finish().map(|(_, v)| v);
    match (summary, verdict) {
        (Ok(s), Ok(v)) => {
            ffi::log(
                LogLevel::Info,
                &format!("{snapshot}: signature by key {} verified", v.key_id),
            );
            Ok(s)
        }
        (_, Err(e @ (TrustError::DataMismatch { .. } | TrustError::FactsMismatch { .. }))) => {
            Err(trust(e))
        }
        (Err(e), _) => Err(mapsnap::Error::from(e).into()),
        (Ok(_), Err(e)) => Err(trust(e)),
    }
}

/// The largest signature file read (a minisign signature is a few hundred bytes).
const MAX_SIGNATURE_BYTES: u64 = 64 << 10;

fn restore_one(
    dir: &Anchor,
    p: &Pending,
    cfg: &PluginConfig,
    opts: &mapsnap::restore::RestoreOptions,
    deadline: &Deadline,
) -> Result<Map, PluginError> {
    let report = restore(
        open_snapshot(dir, &p.record, cfg, deadline)?,
        Some(&p.summary),
        &Destination::Detached,
        opts,
        &NoProgress,
    )?;
    report
        .detached
        .into_iter()
        .next()
        .ok_or_else(|| PluginError::Image {
            file: p.snapshot.clone(),
            reason: "the restore created no top-level map".into(),
        })
}

/// Restores independent maps a few at once (one per CPU at most), so one map is created
/// while another is filled; each restore also fills its map from threads of its own, with
/// bounded queues, so memory stays bounded by the number running at once. Results come back in
/// the order of `todo`; after a failure no further map is started.
fn restore_concurrently(
    dir: &Anchor,
    todo: &[&Pending],
    cfg: &PluginConfig,
    opts: &mapsnap::restore::RestoreOptions,
    deadline: &Deadline,
) -> Vec<Result<Map, PluginError>> {
    let workers = mapsnap::restore::default_threads().min(todo.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<Map, PluginError>>>> =
        todo.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(p) = todo.get(i) else { break };
                    let r = restore_one(dir, p, cfg, opts, deadline);
                    if r.is_err() {
                        next.store(todo.len(), std::sync::atomic::Ordering::SeqCst);
                    }
                    *lock(&slots[i]) = Some(r);
                }
            });
        }
    });
    slots
        .into_iter()
        .zip(todo)
        .map(|(s, p)| {
            s.into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .unwrap_or_else(|| {
                    Err(mapsnap::Error::Restore {
                        map: p.label.clone(),
                        reason: "not restored: another map of this restore failed first".into(),
                    }
                    .into())
                })
        })
        .collect()
}

/// For a restored map of maps: dump-time id of each inner map -> id of the inner map now in
/// the restored outer map (found by looking up the same keys).
fn inner_map_ids(
    dir: &Anchor,
    p: &Pending,
    outer: &Map,
    cfg: &PluginConfig,
    deadline: &Deadline,
) -> Result<HashMap<u32, u32>, PluginError> {
    let mut reader = SnapshotReader::new(open_snapshot(dir, &p.record, cfg, deadline)?)
        .map_err(mapsnap::Error::from)?;
    let mut out = HashMap::new();
    let mut in_outer = false;
    while let Some(event) = reader.next_event().map_err(mapsnap::Error::from)? {
        match event {
            Event::MapBegin { meta, .. } => in_outer = !meta.inner,
            Event::Entries(chunk) if in_outer => {
                for (key, value) in chunk.iter() {
                    let Ok(index) = <[u8; 4]>::try_from(value) else {
                        continue;
                    };
                    let Some((meta, _)) = p.summary.maps.get(u32::from_le_bytes(index) as usize)
                    else {
                        continue;
                    };
                    let mut id = [0u8; 4];
                    if outer.lookup(Some(key), &mut id, 0)? {
                        out.insert(meta.source_id, u32::from_ne_bytes(id));
                    }
                }
            }
            Event::End(_) => break,
            _ => {}
        }
    }
    Ok(out)
}

fn log_restored(p: &Pending, new_id: u32, inner: usize) {
    let entries: u64 = p
        .summary
        .maps
        .iter()
        .filter(|(m, _)| !m.inner)
        .map(|(_, n)| n)
        .sum();
    let inner = if inner > 0 {
        format!(" and {inner} inner maps")
    } else {
        String::new()
    };
    ffi::log(
        LogLevel::Info,
        &format!(
            "restored {} from {} as map {new_id}: {entries} entries{inner}",
            p.label, p.snapshot
        ),
    );
}

// ---- the state behind CRIU's hooks ------------------------------------------------------

/// One dump, from `init(DUMP)` to `exit`.
#[derive(Debug)]
struct DumpState {
    deadline: Deadline,
    /// The config, or why it could not be read (an error only for dumps that hold maps).
    config: Result<PluginConfig, String>,
    /// Created at the first map fd (shared with the worker thread doing the work).
    dumper: Option<Arc<Mutex<Dumper>>>,
    /// The dumper's abandoned flag (readable while a worker holds the dumper).
    abandoned: Arc<AtomicBool>,
    /// Set when the deadline passed or a worker failed badly: later files fail at once.
    failed: Option<String>,
    /// The earlier dump's files could not be removed at `init`: tried again at `exit`.
    stale_left: bool,
}

#[derive(Debug)]
enum Phase {
    Idle,
    Dump(DumpState),
    Restore(Restorer),
}

static PHASE: Mutex<Phase> = Mutex::new(Phase::Idle);

fn phase() -> std::sync::MutexGuard<'static, Phase> {
    PHASE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts a dump: the deadline first, then (bounded by it) the removal of an earlier dump's
/// files. Never fails the dump: every `criu dump` on the node runs this, maps or not.
fn start_dump() -> DumpState {
    let config = PluginConfig::load().map_err(|e| e.to_string());
    let limit = config
        .as_ref()
        .map_or(PluginConfig::default().deadline, |c| c.deadline);
    let deadline = Deadline::start(limit);
    deadline.set("removing an earlier dump's files from the image directory");
    let cleanup =
        ffi::criu_image_dir().and_then(|dir| deadline.run(move || images::remove_stale(&dir)));
    let stale_left = cleanup.is_err();
    match cleanup {
        Ok(0) => {}
        Ok(n) => ffi::log(
            LogLevel::Info,
            &format!("removed {n} files of an earlier dump from the image directory"),
        ),
        Err(e) => ffi::log(
            LogLevel::Warn,
            &format!("cannot remove an earlier dump's files from the image directory: {e}"),
        ),
    }
    DumpState {
        deadline,
        config,
        dumper: None,
        abandoned: Arc::new(AtomicBool::new(false)),
        failed: None,
        stale_left,
    }
}

/// `init(stage)`: a fresh dump, or every map of the image directory recreated for a restore.
pub(crate) fn init(stage: c_int) -> c_int {
    let next = match stage {
        stage::DUMP => Phase::Dump(start_dump()),
        stage::RESTORE => match start_restore() {
            Ok(r) => Phase::Restore(r),
            Err(e) => {
                ffi::log(LogLevel::Error, &format!("restore failed: {e}"));
                return -1;
            }
        },
        _ => Phase::Idle,
    };
    replace_phase(next);
    0
}

/// The restore's work, on a worker bounded by the deadline (started before anything else).
fn start_restore() -> Result<Restorer, PluginError> {
    let started = std::time::Instant::now();
    let config = PluginConfig::load();
    let limit = config
        .as_ref()
        .map_or(PluginConfig::default().deadline, |c| c.deadline);
    let deadline = Deadline::start(limit);
    deadline.set("opening the image directory");
    let dl = deadline.clone();
    let restorer = deadline.run(move || {
        let dir = ffi::criu_image_dir()?;
        dl.set(format!("reading {}", images::INDEX_NAME));
        let path = mapsnap::anchor::RelPath::parse(images::INDEX_NAME)
            .map_err(|e| PluginError::Config(e.to_string()))?;
        if !dir.exists(&path)? {
            return Ok(Restorer::empty());
        }
        // Only now is the configuration needed: a bad one fails restores that hold maps.
        let cfg = config?;
        Restorer::prepare(&dir, &cfg, &dl)
    })?;
    let (files, maps) = restorer.counts();
    if files > 0 {
        ffi::log(
            LogLevel::Info,
            // The time and peak RSS are what the downtime benchmark reads.
            &format!(
                "{maps} BPF maps restored for {files} CRIU files, {:.1} ms, criu peak RSS {} KiB",
                started.elapsed().as_secs_f64() * 1e3,
                peak_rss_kib().unwrap_or(0)
            ),
        );
    }
    Ok(restorer)
}

/// `exit(stage, ret)`: drops the state (closing this process's fds of restored maps); after a
/// failed dump, removes its index so that nothing of it is ever restored.
pub(crate) fn exit(_stage: c_int, ret: c_int) {
    let old = replace_phase(Phase::Idle);
    if let Some(Phase::Dump(state)) = &old
        && state.dumper.is_none()
        && state.stale_left
    {
        // A dump without maps must not leave an earlier dump's index behind either.
        let removed = Deadline::start(Duration::from_secs(1))
            .run(|| ffi::criu_image_dir().and_then(|dir| images::remove_stale(&dir)));
        if let Err(e) = removed {
            ffi::log(
                LogLevel::Error,
                &format!("an earlier dump's files are still in the image directory: {e}"),
            );
        }
    }
    if let Some(Phase::Dump(state)) = old
        && let Some(dumper) = state.dumper
        && (ret != 0 || state.failed.is_some())
    {
        // A worker still running (past the deadline) removes the index it writes itself.
        state.abandoned.store(true, Ordering::SeqCst);
        // Bounded, even past the dump's deadline: the image directory may be what hangs.
        let removed = Deadline::start(Duration::from_secs(1)).run(move || lock(&dumper).abandon());
        match removed {
            Ok(true) => ffi::log(
                LogLevel::Info,
                "the dump failed: removed mapsnap-criu.json, nothing of it can be restored",
            ),
            Ok(false) => {}
            Err(e) => ffi::log(
                LogLevel::Error,
                &format!("the dump failed and its mapsnap-criu.json could not be removed: {e}"),
            ),
        }
    }
}

/// Installs the next phase; returns the previous one unless it was a restore in a forked
/// task (whose fd numbers mean other files now: forgotten, not closed).
fn replace_phase(next: Phase) -> Option<Phase> {
    let old = std::mem::replace(&mut *phase(), next);
    if let Phase::Restore(r) = old {
        if r.owner != std::process::id() {
            std::mem::forget(r);
        }
        return None;
    }
    Some(old)
}

/// Says why an fd that is not a map is left to CRIU (which then fails the dump).
fn not_a_map(kind: ObjKind, file_id: u32, raw: i32) -> c_int {
    let what = match kind {
        ObjKind::Program => "a BPF program",
        ObjKind::Link => "a BPF link",
        ObjKind::Btf => "a BTF object",
        _ => return -libc::ENOTSUP,
    };
    ffi::log(
        LogLevel::Warn,
        &format!(
            "CRIU file {file_id:#x} (fd {raw}) is {what}: mapsnap checkpoints BPF maps only; \
             programs, links and BTF objects held by fd cannot be checkpointed"
        ),
    );
    -libc::ENOTSUP
}

/// `map 42 "counters" (hash)` for a map fd, from its fdinfo and the kernel (both answer at
/// once), so that even a deadline that passes before the worker starts names the map.
fn describe_map_fd(fd: BorrowedFd<'_>) -> String {
    let map_id = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .ok()
        .and_then(|t| images::fdinfo_field(&t, "map_id").and_then(|v| v.parse::<u32>().ok()));
    let Some(id) = map_id else {
        return "a BPF map".into();
    };
    match Map::from_id(id).and_then(|m| m.info()) {
        Ok(info) => label(id, &info.name, type_name(info.map_type)),
        Err(_) => format!("map {id}"),
    }
}

/// Dumps one map fd on a worker bounded by the dump's deadline.
fn dump_bounded(
    state: &mut DumpState,
    fd: OwnedFd,
    file_id: u32,
) -> Result<DumpOutcome, PluginError> {
    if let Some(why) = &state.failed {
        return Err(PluginError::Config(format!(
            "an earlier step of this dump failed: {why}"
        )));
    }
    state.config.clone().map_err(PluginError::Config)?;
    state.deadline.set(format!(
        "dumping {} (CRIU file {file_id:#x})",
        describe_map_fd(fd.as_fd())
    ));
    let dumper = match &state.dumper {
        Some(d) => d.clone(),
        None => {
            let dir = ffi::criu_image_dir()?;
            let signer = state
                .config
                .as_ref()
                .map_err(|e| PluginError::Config(e.clone()))?
                .signer()?;
            let dumper = Dumper::new(dir)?.signing_with(signer);
            state.abandoned = dumper.abandoned_flag();
            let d = Arc::new(Mutex::new(dumper));
            state.dumper = Some(d.clone());
            d
        }
    };
    let dl = state.deadline.clone();
    let result = state
        .deadline
        .run(move || lock(&dumper).dump_file(fd.as_fd(), file_id, &dl));
    if let Err(e @ PluginError::Deadline { .. }) = &result {
        state.failed = Some(e.to_string());
    }
    result
}

/// `DUMP_EXT_FILE(fd, id)`.
pub(crate) fn dump_ext_file(fd: BorrowedFd<'_>, file_id: u32) -> c_int {
    let raw = fd.as_raw_fd();
    let kind = sys::fd_kind(fd);
    if kind != ObjKind::Map {
        return not_a_map(kind, file_id, raw);
    }
    // Our own fd: a worker the deadline gives up on must not use CRIU's fd number later.
    let own = match ffi::dup_raw(raw) {
        Ok(f) => f,
        Err(e) => {
            ffi::log(
                LogLevel::Error,
                &format!("CRIU file {file_id:#x}: dup: {e}"),
            );
            return -libc::EIO;
        }
    };
    let mut guard = phase();
    if !matches!(*guard, Phase::Dump(_)) {
        *guard = Phase::Dump(start_dump());
    }
    let Phase::Dump(state) = &mut *guard else {
        return -libc::EIO;
    };
    let started = std::time::Instant::now();
    match dump_bounded(state, own, file_id) {
        Ok(DumpOutcome::NotAMap { kind }) => not_a_map(kind, file_id, raw),
        Ok(DumpOutcome::Unsupported { map, reason }) => {
            ffi::log(
                LogLevel::Error,
                &format!(
                    "CRIU file {file_id:#x} (fd {raw}): {map} cannot be checkpointed: {reason}"
                ),
            );
            -libc::ENOTSUP
        }
        Ok(DumpOutcome::Saved { record, stats }) => {
            let what = label(record.map_id, &record.map_name, &record.map_type);
            let snapshot = images::snapshot_name(record.map_id);
            let how = match stats {
                Some(s) if s.inner_maps > 0 => format!(
                    "saved {} entries with {} inner maps ({} bytes)",
                    s.entries, s.inner_maps, s.bytes
                ),
                Some(s) => format!("saved {} entries ({} bytes)", s.entries, s.bytes),
                None => "same map as an earlier file".into(),
            };
            // What the benchmark reads back from CRIU's log: time inside the freeze, memory.
            let how = format!(
                "{how}, {:.1} ms, criu peak RSS {} KiB",
                started.elapsed().as_secs_f64() * 1e3,
                peak_rss_kib().unwrap_or(0)
            );
            ffi::log(
                LogLevel::Info,
                &format!(
                    "CRIU file {file_id:#x} (fd {raw}): {what}, {}: {how} in {snapshot}",
                    record.access
                ),
            );
            0
        }
        Err(e) => {
            ffi::log(
                LogLevel::Error,
                &format!("CRIU file {file_id:#x} (fd {raw}): dumping the BPF map failed: {e}"),
            );
            -e.errno()
        }
    }
}

/// VmHWM of this process (the criu process the plugin runs in), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `RESTORE_EXT_FILE(id)`: Ok(None) when the id is not ours; Err(errno) after logging.
pub(crate) fn restore_ext_file(file_id: u32) -> Result<Option<OwnedFd>, i32> {
    let guard = phase();
    let Phase::Restore(r) = &*guard else {
        return Ok(None);
    };
    match r.open(file_id) {
        Ok(Some((fd, what))) => {
            ffi::log(
                LogLevel::Info,
                &format!("CRIU file {file_id:#x}: {what}, fd {}", fd.as_raw_fd()),
            );
            Ok(Some(fd))
        }
        Ok(None) => {
            if r.counts().0 == 0 {
                // Not necessarily ours (other plugins' files come here too), but if it is a
                // BPF map this says why CRIU cannot restore it.
                ffi::log(
                    LogLevel::Info,
                    &format!(
                        "CRIU file {file_id:#x}: the image directory has no {} (if this file \
                         is a BPF map, its dump did not finish)",
                        images::INDEX_NAME
                    ),
                );
            }
            Ok(None)
        }
        Err(e) => {
            ffi::log(LogLevel::Error, &format!("CRIU file {file_id:#x}: {e}"));
            Err(e.errno())
        }
    }
}
