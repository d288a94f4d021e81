//! The plugin's work, in safe Rust; [`crate::ffi`] calls in here from CRIU's hooks.
//!
//! **Dump** (`DUMP_EXT_FILE`, in the `criu` process while the tasks are frozen): an fd whose
//! anon inode is `bpf-map` is looked up in `/proc/self/fdinfo` (kernel map id, open flags).
//! The first fd of a map id dumps the map with `mapsnap::dump` into
//! `mapsnap-map-<id>.snap`; every fd gets a `mapsnap-fd-<file id>.json` record (map id,
//! access mode). Anything else is answered `-ENOTSUP`, so CRIU asks its other plugins.
//!
//! **Restore** (`init(RESTORE)`, in the `criu` process before any task is forked): every
//! record is read, each distinct map is verified and recreated once with
//! `mapsnap::restore` (BTF, flags, inner maps, contents, frozen state) and kept open by this
//! process. `RESTORE_EXT_FILE(id)` then runs in the restored task that owns the file and
//! opens the new map by id with the recorded access mode (`BPF_MAP_GET_FD_BY_ID` with
//! `BPF_F_RDONLY` / `BPF_F_WRONLY`); CRIU moves that fd to the original fd number. So all fds,
//! in all processes, of one map before the dump share one map after the restore.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_int;
use std::fs::File;
use std::io::BufReader;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use mapsnap::discover::Found;
use mapsnap::dump::{DumpOptions, dump, unsupported_reason};
use mapsnap::format::{Event, SnapshotReader, VerifySummary, verify};
use mapsnap::model::{Access as MapAccess, SnapshotInfo, access_of, type_name};
use mapsnap::progress::NoProgress;
use mapsnap::restore::{CpuPolicy, Destination, RestoreOptions, restore};
use mapsnap::sys::{self, Map, ObjKind};

use crate::error::PluginError;
use crate::ffi::{self, LogLevel, stage};
use crate::images::{self, Access, FileRecord, RECORD_FORMAT};

/// Environment variable: `fit` restores per-CPU maps dumped on a machine with another number
/// of possible CPUs (first CPUs' values kept, the others zero); by default they are refused.
pub const CPU_MISMATCH_ENV: &str = "MAPSNAP_CPU_MISMATCH";

/// `map 42 "counters" (hash)`.
fn label(id: u32, name: &str, map_type: &str) -> String {
    format!("map {id} {name:?} ({map_type})")
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

/// Dump-side state: which kernel maps this dump has saved already.
#[derive(Debug, Default)]
pub struct Dumper {
    saved: HashMap<u32, SavedMap>,
}

impl Dumper {
    /// Saves the map behind `fd` (CRIU file `file_id`) into the image directory `dir`.
    pub fn dump_file(
        &mut self,
        dir: &Path,
        fd: BorrowedFd<'_>,
        file_id: u32,
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
            Entry::Vacant(v) => match save_map(dir, map_id, file_id)? {
                Ok((saved, stats)) => (v.insert(saved).clone(), Some(stats)),
                Err(unsupported) => return Ok(unsupported),
            },
        };
        let record = FileRecord {
            format: RECORD_FORMAT.into(),
            file_id,
            map_id,
            access,
            snapshot: saved.snapshot,
            map_name: saved.name,
            map_type: saved.map_type,
        };
        images::write_record(dir, &record)?;
        Ok(DumpOutcome::Saved { record, stats })
    }
}

/// A map saved by this dump: its snapshot file, and its name and type for the records.
#[derive(Debug, Clone)]
struct SavedMap {
    snapshot: String,
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
    dir: &Path,
    map_id: u32,
    file_id: u32,
) -> Result<Result<(SavedMap, SaveStats), DumpOutcome>, PluginError> {
    // Our own read-write fd: the process's fd may be read-only or write-only.
    let found = Found::from_map(Map::from_id(map_id)?, None)?;
    let info = &found.info;
    let map_type = type_name(info.map_type);
    if let Some(reason) = unsupported_reason(info) {
        let map = label(map_id, &info.name, map_type);
        return Ok(Err(DumpOutcome::Unsupported { map, reason }));
    }
    let name = images::snapshot_name(map_id);
    let meta = snapshot_info(map_id, file_id)?;
    let report = images::write_atomically(dir, &name, |w| {
        let opts = DumpOptions::default();
        let (_, report) = dump(std::slice::from_ref(&found), w, &meta, &opts, &NoProgress)?;
        Ok(report)
    })?;
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
        snapshot: name,
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

fn snapshot_info(map_id: u32, file_id: u32) -> Result<SnapshotInfo, PluginError> {
    Ok(SnapshotInfo {
        tool: format!("mapsnap-criu {}", env!("CARGO_PKG_VERSION")),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        possible_cpus: sys::possible_cpus()?,
        source: format!("criu:file {file_id:#x} map {map_id}"),
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

    /// Recreates every map recorded in the image directory `dir`.
    pub fn prepare(dir: &Path, opts: &RestoreOptions) -> Result<Self, PluginError> {
        let records = images::read_records(dir)?;
        let mut by_map: BTreeMap<u32, &FileRecord> = BTreeMap::new();
        for r in &records {
            let first = by_map.entry(r.map_id).or_insert(r);
            if first.snapshot != r.snapshot {
                return Err(PluginError::Image {
                    file: images::record_name(r.file_id),
                    reason: format!(
                        "map {} is in {}, but file {:#x} says {}",
                        r.map_id, first.snapshot, first.file_id, r.snapshot
                    ),
                });
            }
        }
        let mut pending = Vec::new();
        for r in by_map.values() {
            let snapshot = r.snapshot.clone();
            let label = label(r.map_id, &r.map_name, &r.map_type);
            let fail = |e: PluginError| restore_error(&label, &snapshot, e);
            let file = open(dir, &snapshot).map_err(fail)?;
            let summary =
                verify(BufReader::new(file)).map_err(|e| fail(mapsnap::Error::from(e).into()))?;
            let top = summary.maps.iter().filter(|(m, _)| !m.inner).count();
            if top != 1 {
                return Err(fail(PluginError::Image {
                    file: snapshot.clone(),
                    reason: format!("holds {top} top-level maps, a plugin snapshot holds one"),
                }));
            }
            pending.push(Pending {
                old_id: r.map_id,
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
            let map = restore_one(dir, p, opts).map_err(|e| p.fail(e))?;
            let inner = inner_map_ids(dir, p, &map).map_err(|e| p.fail(e))?;
            let id = map.info().map_err(|e| p.fail(e))?.id;
            log_restored(p, id, inner.len());
            inner_new.extend(inner);
            new_ids.insert(p.old_id, id);
            out.keep.push(map);
        }
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
            let map = restore_one(dir, p, opts).map_err(|e| p.fail(e))?;
            let id = map.info().map_err(|e| p.fail(e))?.id;
            log_restored(p, id, 0);
            new_ids.insert(p.old_id, id);
            out.keep.push(map);
        }
        for r in &records {
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

fn open(dir: &Path, name: &str) -> Result<File, PluginError> {
    images::check_snapshot_name(name)?;
    File::open(dir.join(name)).map_err(|e| PluginError::io(format!("opening {name}"), e))
}

fn restore_one(dir: &Path, p: &Pending, opts: &RestoreOptions) -> Result<Map, PluginError> {
    let file = open(dir, &p.snapshot)?;
    let report = restore(
        BufReader::new(file),
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

/// For a restored map of maps: dump-time id of each inner map -> id of the inner map now in
/// the restored outer map (found by looking up the same keys).
fn inner_map_ids(dir: &Path, p: &Pending, outer: &Map) -> Result<HashMap<u32, u32>, PluginError> {
    let mut reader = SnapshotReader::new(BufReader::new(open(dir, &p.snapshot)?))
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

/// Restore options: defaults, with the CPU policy from [`CPU_MISMATCH_ENV`].
pub fn restore_options() -> RestoreOptions {
    let mut o = RestoreOptions::default();
    if std::env::var(CPU_MISMATCH_ENV).is_ok_and(|v| v == "fit") {
        o.cpu_policy = CpuPolicy::Fit;
    }
    o
}

// ---- the state behind CRIU's hooks ------------------------------------------------------

#[derive(Debug)]
enum Phase {
    Idle,
    Dump(Dumper),
    Restore(Restorer),
}

static PHASE: Mutex<Phase> = Mutex::new(Phase::Idle);

fn phase() -> std::sync::MutexGuard<'static, Phase> {
    PHASE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `init(stage)`: a fresh dump, or every map of the image directory recreated for a restore.
pub(crate) fn init(stage: c_int) -> c_int {
    let next = match stage {
        stage::DUMP => Phase::Dump(Dumper::default()),
        stage::RESTORE => {
            let restorer = ffi::criu_image_dir()
                .map_err(|e| PluginError::io("finding CRIU's image directory", e))
                .and_then(|dir| Restorer::prepare(&dir, &restore_options()));
            match restorer {
                Ok(r) => {
                    let (files, maps) = r.counts();
                    if files > 0 {
                        ffi::log(
                            LogLevel::Info,
                            &format!("{maps} BPF maps restored for {files} CRIU files"),
                        );
                    }
                    Phase::Restore(r)
                }
                Err(e) => {
                    ffi::log(LogLevel::Error, &format!("restore failed: {e}"));
                    return -1;
                }
            }
        }
        _ => Phase::Idle,
    };
    replace_phase(next);
    0
}

/// `exit(stage, ret)`: drops the state (closing this process's fds of restored maps).
pub(crate) fn exit(_stage: c_int, _ret: c_int) {
    replace_phase(Phase::Idle);
}

fn replace_phase(next: Phase) {
    let old = std::mem::replace(&mut *phase(), next);
    if let Phase::Restore(r) = old
        && r.owner != std::process::id()
    {
        // A fork of the process that opened these fds: its fd numbers mean other files now.
        std::mem::forget(r);
    }
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

/// `DUMP_EXT_FILE(fd, id)`.
pub(crate) fn dump_ext_file(fd: BorrowedFd<'_>, file_id: u32) -> c_int {
    let raw = fd.as_raw_fd();
    let kind = sys::fd_kind(fd);
    if kind != ObjKind::Map {
        return not_a_map(kind, file_id, raw);
    }
    let dir = match ffi::criu_image_dir() {
        Ok(d) => d,
        Err(e) => {
            ffi::log(LogLevel::Error, &format!("no image directory: {e}"));
            return -libc::EIO;
        }
    };
    let mut guard = phase();
    if !matches!(*guard, Phase::Dump(_)) {
        *guard = Phase::Dump(Dumper::default());
    }
    let Phase::Dump(dumper) = &mut *guard else {
        return -libc::EIO;
    };
    match dumper.dump_file(&dir, fd, file_id) {
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
            let how = match stats {
                Some(s) if s.inner_maps > 0 => format!(
                    "saved {} entries with {} inner maps ({} bytes)",
                    s.entries, s.inner_maps, s.bytes
                ),
                Some(s) => format!("saved {} entries ({} bytes)", s.entries, s.bytes),
                None => "same map as an earlier file".into(),
            };
            ffi::log(
                LogLevel::Info,
                &format!(
                    "CRIU file {file_id:#x} (fd {raw}): {what}, {}: {how} in {}",
                    record.access, record.snapshot
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
        Ok(None) => Ok(None),
        Err(e) => {
            ffi::log(LogLevel::Error, &format!("CRIU file {file_id:#x}: {e}"));
            Err(e.errno())
        }
    }
}
