//! Restoring a snapshot: create new maps and publish them atomically, or fill existing ones.
//!
//! New maps are created unpinned, filled, frozen if they were, and only after the whole stream
//! has been read and its SHA-256 matched are they pinned: first all under temporary names,
//! then each renamed over its target, so no reader ever sees a half-filled map and a bad
//! stream publishes nothing. Filling existing maps changes live state, so it requires a
//! verified snapshot up front and checks every target before the first write.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::anchor::{Anchor, EntryKind, RelPath};
use crate::clocks::ClockSample;
use crate::convert::{MapConversion, MapTypes, RebaseClocks, RestoreConversion};
use crate::limits::{KernelBudget, Limits};

use crate::error::{Error, Result};
use crate::format::{EntryChunk, Event, SnapshotReader, StreamDigest, VerifySummary};
use crate::model::{Access, MapMeta, access_of, map_flags, map_type, round_up8};
use crate::progress::Progress;
use crate::sys::{self, Btf, CreateAttrs, Map, MapInfo};

mod fill;
pub use fill::default_threads;

/// How to treat the existing contents of a map being filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FillMode {
    /// Remove every existing entry first, so the map ends up equal to the snapshot.
    #[default]
    Replace,
    /// Keep existing entries; snapshot entries overwrite those with the same key.
    Merge,
}

/// What to do when per-CPU values come from a machine with another possible-CPU count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuPolicy {
    /// Refuse the map.
    #[default]
    Error,
    /// Keep the first CPUs' values; CPUs the snapshot lacks get zeroes.
    Fit,
}

/// One existing map to fill, and which snapshot map goes into it.
#[derive(Debug)]
pub struct IntoTarget {
    /// Snapshot map name or pin path; None when the snapshot holds exactly one top-level map.
    pub select: Option<String>,
    pub map: Map,
}

/// Maps a snapshot's relative pin path to where it is pinned on this host.
pub type PinResolver = Box<dyn Fn(&str) -> Result<PathBuf> + Send + Sync>;

/// Where one new map is pinned: a directory already opened through an [`Anchor`], and the
/// leaf name in it.
#[derive(Debug)]
pub struct PinPlace {
    pub dir: Anchor,
    pub leaf: String,
    /// How reports and errors name it (a container path, say; not necessarily a host path).
    pub shown: String,
}

/// Maps a snapshot's relative pin path to the directory and leaf it is published at.
pub type PlaceResolver = Box<dyn Fn(&str) -> Result<PinPlace> + Send + Sync>;

/// Where restored maps go.
pub enum Destination {
    /// Create new maps pinned under this bpffs directory at their snapshot pin paths.
    PinRoot { dir: PathBuf, overwrite: bool },
    /// Create new maps and pin each where `resolve` maps its snapshot pin path (the OCI hook
    /// maps paths under a container's mount destinations to the host's bind-mount sources and
    /// refuses anything else). An error from `resolve` refuses the restore before any map is
    /// created for that path.
    PinMapped {
        resolve: PinResolver,
        overwrite: bool,
    },
    /// Create new maps and pin each in the directory `resolve` opened for its snapshot pin
    /// path (an anchored directory: nothing after the open follows a link). The pin is made
    /// under a temporary name there and renamed into place without replacing anything unless
    /// `overwrite`.
    PinAt {
        resolve: PlaceResolver,
        overwrite: bool,
    },
    /// Fill these existing maps.
    Into(Vec<IntoTarget>),
    /// Fill the existing maps pinned under this directory at the snapshot's pin paths.
    IntoRoot(PathBuf),
    /// Create new maps and hand them back unpinned in [`RestoreReport::detached`] (for callers
    /// that install fds themselves, like the CRIU plugin).
    Detached,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PinRoot { dir, overwrite } => f
                .debug_struct("PinRoot")
                .field("dir", dir)
                .field("overwrite", overwrite)
                .finish(),
            Self::PinMapped { overwrite, .. } => f
                .debug_struct("PinMapped")
                .field("overwrite", overwrite)
                .finish_non_exhaustive(),
            Self::PinAt { overwrite, .. } => f
                .debug_struct("PinAt")
                .field("overwrite", overwrite)
                .finish_non_exhaustive(),
            Self::Into(t) => f.debug_tuple("Into").field(t).finish(),
            Self::IntoRoot(d) => f.debug_tuple("IntoRoot").field(d).finish(),
            Self::Detached => f.write_str("Detached"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub mode: FillMode,
    pub cpu_policy: CpuPolicy,
    /// Give up (removing everything this restore created or pinned) once this passes;
    /// checked between maps and between entry chunks, and before publishing.
    pub deadline: Option<Instant>,
    /// Bounds on what the snapshot may make this restore allocate or create.
    pub limits: Limits,
    /// Convert entries into maps of another layout and rebase timestamps (see
    /// [`RestoreConversion`] for the settings and their use); `None` copies entries as
    /// they are.
    pub convert: Option<RestoreConversion>,
    /// Threads filling maps whose entries may go in in any order (0: [`default_threads`]).
    pub fill_threads: usize,
}

/// One restored map.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoredMap {
    pub name: String,
    pub map_type: &'static str,
    pub entries: u64,
    /// Where it was pinned (new maps) or the existing map filled.
    pub target: String,
    pub map_id: u32,
}

#[derive(Debug)]
pub struct RestoreReport {
    pub maps: Vec<RestoredMap>,
    pub digest: StreamDigest,
    /// With [`Destination::Detached`]: the top-level maps created, in snapshot order.
    pub detached: Vec<Map>,
}

/// Checks a relative pin path from a snapshot and joins it under `root`.
///
/// Absolute paths, `..`, empty or non-UTF-8 components are refused: a snapshot never
/// decides where outside `root` something is written.
pub fn safe_join(root: &Path, rel: &str) -> Result<PathBuf> {
    let refuse = |reason| Error::UnsafePinPath {
        path: rel.to_string(),
        reason,
    };
    if rel.is_empty() {
        return Err(refuse("it is empty"));
    }
    let p = Path::new(rel);
    let mut out = root.to_path_buf();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("it contains `..`")),
            Component::RootDir | Component::Prefix(_) => return Err(refuse("it is absolute")),
        }
    }
    if out == root {
        return Err(refuse("it names no file"));
    }
    Ok(out)
}

/// The relative pin path a top-level map gets: its own, else its name.
fn rel_pin(meta: &MapMeta, index: u32) -> String {
    match &meta.pin_path {
        Some(p) => p.clone(),
        None if !meta.name.is_empty() => meta.name.clone(),
        None => format!("map_{index}"),
    }
}

/// Whether a snapshot map answers to `select` (its name or pin path).
fn selects(meta: &MapMeta, select: &str) -> bool {
    meta.name == select || meta.pin_path.as_deref() == Some(select)
}

/// Checks that `target` can take the contents of the snapshot map `meta`.
pub fn check_compatible(
    meta: &MapMeta,
    target: &Map,
    info: &MapInfo,
    opts: &RestoreOptions,
) -> Result<()> {
    let bad = |reason: String| Error::Incompatible {
        map: target.label().to_string(),
        reason,
    };
    if info.map_type != meta.map_type {
        return Err(bad(format!(
            "it is a {} map, the snapshot map {:?} is a {}",
            crate::model::type_name(info.map_type),
            meta.name,
            meta.type_name()
        )));
    }
    let converting = opts.convert.as_ref().is_some_and(|c| c.convert);
    if !converting && (info.key_size != meta.key_size || info.value_size != meta.value_size) {
        return Err(bad(format!(
            "key/value sizes are {}/{}, the snapshot's are {}/{}",
            info.key_size, info.value_size, meta.key_size, meta.value_size
        )));
    }
    if info.max_entries < meta.max_entries {
        return Err(bad(format!(
            "it holds at most {} entries, the snapshot map was created for {}",
            info.max_entries, meta.max_entries
        )));
    }
    if info.flags & map_flags::RDONLY != 0 {
        return Err(bad("it is read-only for user space (BPF_F_RDONLY)".into()));
    }
    if target.frozen()? {
        return Err(bad("it is frozen: user space cannot write it".into()));
    }
    cpu_fit(meta, target.label(), opts.cpu_policy)?;
    Ok(())
}

/// For per-CPU maps from a machine with another CPU count: (snapshot CPUs, local CPUs).
fn cpu_fit(meta: &MapMeta, label: &str, policy: CpuPolicy) -> Result<Option<(u32, u32)>> {
    let Some(snap) = meta.possible_cpus else {
        return Ok(None);
    };
    let here = sys::possible_cpus()?;
    if snap == here {
        return Ok(None);
    }
    match policy {
        CpuPolicy::Error => Err(Error::CpuMismatch {
            map: label.to_string(),
            snapshot: snap,
            here,
        }),
        CpuPolicy::Fit => Ok(Some((snap, here))),
    }
}

/// Re-lays per-CPU values from `from` CPUs to `to` CPUs (first CPUs kept, new ones zero).
fn refit_cpus(values: &[u8], value_size: u32, from: u32, to: u32) -> Vec<u8> {
    let slot = round_up8(value_size) as usize;
    let (from, to) = (from as usize, to as usize);
    let mut out = Vec::with_capacity(values.len() / from.max(1) * to);
    for v in values.chunks_exact(slot * from) {
        for cpu in 0..to {
            if cpu < from {
                out.extend_from_slice(&v[cpu * slot..(cpu + 1) * slot]);
            } else {
                out.resize(out.len() + slot, 0);
            }
        }
    }
    out
}

/// Removes every entry of an existing map (arrays: zeroes the slots past `keep_from`).
fn clear(map: &Map, info: &MapInfo, keep_from: u32) -> Result<()> {
    match info.map_type {
        map_type::ARRAY | map_type::PERCPU_ARRAY => {
            let zero = vec![0u8; crate::dump::meta_of(info, false, None)?.value_len()];
            for i in keep_from..info.max_entries {
                map.update(Some(&i.to_ne_bytes()), &zero, 0)?;
            }
        }
        map_type::QUEUE | map_type::STACK => {
            let mut buf = vec![0u8; info.value_size as usize];
            while map.lookup_and_delete(None, &mut buf)? {}
        }
        _ => {
            let kl = info.key_size as usize;
            let mut keys = Vec::new();
            let (mut cur, mut next) = (vec![0u8; kl], vec![0u8; kl]);
            let mut have = false;
            while map.next_key(have.then_some(cur.as_slice()), &mut next)? {
                keys.extend_from_slice(&next);
                std::mem::swap(&mut cur, &mut next);
                have = true;
            }
            for k in keys.chunks_exact(kl.max(1)) {
                map.delete(k)?;
            }
        }
    }
    Ok(())
}

/// Where a new map is published once the whole stream checked out.
enum Publish {
    /// At this path below the restore root (journaled: see [`recover`]).
    Root(RelPath),
    /// In a directory the caller opened.
    At(PinPlace),
}

/// Where the map being filled came from.
enum Slot {
    /// Created by this restore; published at `final_path` once verified (None for inner maps).
    New { final_path: Option<Publish> },
    /// An existing map, filled in place.
    Existing { target: String },
    /// Created and handed back unpinned.
    Detached,
}

struct Current {
    index: u32,
    meta: MapMeta,
    map: Map,
    slot: Slot,
    fit: Option<(u32, u32)>,
    batch_ok: bool,
    written: u64,
    /// Set when the filler threads write this map (see [`fill::can_split`]).
    par: Option<Arc<fill::Target>>,
}

struct Restorer<'a> {
    dest: &'a Destination,
    opts: &'a RestoreOptions,
    progress: &'a dyn Progress,
    btf_blobs: Vec<Vec<u8>>,
    btf_loaded: HashMap<u32, Btf>,
    /// Created maps by snapshot index (inner maps are needed to fill their outer map).
    created: HashMap<u32, Map>,
    /// Existing targets resolved up front, by snapshot map index.
    targets: HashMap<u32, (Map, String)>,
    /// Entry counts by map index, from the verified snapshot (empty without one).
    counts: Vec<u64>,
    current: Option<Current>,
    to_publish: Vec<(Map, Publish)>,
    detached: Vec<Map>,
    report: Vec<RestoredMap>,
    /// The bpffs directory of [`Destination::PinRoot`], opened once.
    root: Option<(Anchor, PathBuf)>,
    budget: KernelBudget,
    /// Conversions by snapshot map index (only with [`RestoreOptions::convert`]).
    conversions: HashMap<u32, MapConversion>,
    /// This host's clocks for rebasing, and the snapshot's once the stream gave them.
    now: Option<ClockSample>,
    snap_clocks: Option<ClockSample>,
    /// Started at the first map they can fill.
    fillers: Option<fill::Fillers>,
}

/// Fails once the restore's deadline has passed.
fn check_deadline(opts: &RestoreOptions, what: impl FnOnce() -> String) -> Result<()> {
    match opts.deadline {
        Some(d) if Instant::now() >= d => Err(Error::Deadline { what: what() }),
        _ => Ok(()),
    }
}

/// A snapshot pin path as a checked relative path (no `..`, no absolute, not empty).
fn pin_rel_path(rel: &str) -> Result<RelPath> {
    let refuse = |reason| Error::UnsafePinPath {
        path: rel.to_string(),
        reason,
    };
    if rel.split('/').any(|c| c == "..") {
        return Err(refuse("it contains `..`"));
    }
    if rel.starts_with('/') {
        return Err(refuse("it is absolute"));
    }
    let p = RelPath::parse(rel.trim_start_matches("./")).map_err(|e| refuse(e.reason))?;
    if p.is_root() {
        return Err(refuse("it names no file"));
    }
    Ok(p)
}

/// The directory and leaf of a host path given by a [`PinResolver`] (its parent is opened
/// as given; the leaf is never followed).
fn place_of_path(path: &Path) -> Result<PinPlace> {
    let refuse = |reason| Error::UnsafePinPath {
        path: path.display().to_string(),
        reason,
    };
    let leaf = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| refuse("it has no valid UTF-8 file name"))?;
    let parent = path.parent().ok_or_else(|| refuse("it has no directory"))?;
    Ok(PinPlace {
        dir: Anchor::open_trusted(parent, parent.display().to_string())?,
        leaf: leaf.to_string(),
        shown: path.display().to_string(),
    })
}

impl Restorer<'_> {
    /// Plans rebasing for a map this restore creates (same types on both sides), and for
    /// an existing target returns the metadata in the target's layout (its plan was made up
    /// front by [`plan_targets`]).
    fn plan_created(&mut self, index: u32, meta: MapMeta) -> Result<MapMeta> {
        let Some(conv) = &self.opts.convert else {
            return Ok(meta);
        };
        if let Some(c) = self.conversions.get(&index) {
            return Ok(c.target_meta(&meta));
        }
        if !meta.inner && matches!(self.dest, Destination::Into(_) | Destination::IntoRoot(_)) {
            return Ok(meta);
        }
        let from = meta.btf.as_ref().and_then(|b| {
            Some(MapTypes {
                btf: self.btf_blobs.get(b.index as usize)?,
                key_type_id: b.key_type_id,
                value_type_id: b.value_type_id,
            })
        });
        let clocks = rebase_clocks(conv, self.snap_clocks, self.now);
        let planned = MapConversion::plan(&meta, from, None, conv, clocks, false).map_err(|e| {
            Error::Restore {
                map: format!("snapshot map {index} {:?}", meta.name),
                reason: e.to_string(),
            }
        })?;
        if let Some(p) = planned {
            self.conversions.insert(index, p);
        }
        Ok(meta)
    }

    fn btf(&mut self, index: u32) -> Result<&Btf> {
        if !self.btf_loaded.contains_key(&index) {
            let blob = self
                .btf_blobs
                .get(index as usize)
                .ok_or_else(|| Error::Restore {
                    map: format!("BTF {index}"),
                    reason: "the snapshot refers to BTF it does not contain".into(),
                })?;
            self.btf_loaded.insert(index, Btf::load(blob)?);
        }
        self.btf_loaded.get(&index).ok_or_else(|| Error::Restore {
            map: format!("BTF {index}"),
            reason: "BTF vanished after loading".into(),
        })
    }

    fn create(&mut self, index: u32, meta: &MapMeta) -> Result<Map> {
        // Syscall-side access flags would stop us filling it: RDONLY maps are frozen instead.
        let mut flags = meta.flags & !(map_flags::RDONLY | map_flags::WRONLY);
        if meta.numa_node.is_none() {
            flags &= !map_flags::NUMA_NODE;
        }
        // Redirect maps get BPF_F_RDONLY_PROG from the kernel itself, which refuses it as input.
        if matches!(
            meta.map_type,
            map_type::DEVMAP | map_type::DEVMAP_HASH | map_type::CPUMAP
        ) {
            flags &= !map_flags::RDONLY_PROG;
        }
        // Load the BTF into the cache first: that needs `&mut self`, the rest only reads.
        if let Some(b) = &meta.btf {
            self.btf(b.index)?;
        }
        let btf = meta
            .btf
            .as_ref()
            .and_then(|b| self.btf_loaded.get(&b.index));
        let inner = match access_of(meta.map_type) {
            Ok(Access::MapOfMaps) => {
                let t = meta.inner_template.ok_or_else(|| Error::Restore {
                    map: meta.name.clone(),
                    reason: "this map of maps was empty when dumped, so its inner-map template \
                             is unknown: create the map (load its program) and restore with --into"
                        .into(),
                })?;
                Some(self.created.get(&t).ok_or_else(|| Error::Restore {
                    map: meta.name.clone(),
                    reason: format!("its inner-map template (snapshot map {t}) was not restored"),
                })?)
            }
            _ => None,
        };
        let attrs = CreateAttrs {
            map_type: meta.map_type,
            name: &meta.name,
            key_size: meta.key_size,
            value_size: meta.value_size,
            max_entries: meta.max_entries,
            flags,
            map_extra: meta.map_extra,
            numa_node: meta.numa_node,
            btf_fd: btf.map(Btf::fd),
            btf_key_type_id: meta.btf.as_ref().map_or(0, |b| b.key_type_id),
            btf_value_type_id: meta.btf.as_ref().map_or(0, |b| b.value_type_id),
            inner_map_fd: inner.map(Map::fd),
        };
        let map = Map::create(&attrs).map_err(|e| Error::Restore {
            map: format!("snapshot map {index} {:?}", meta.name),
            reason: format!("creating it failed: {e}"),
        })?;
        Ok(map)
    }

    fn begin(&mut self, index: u32, meta: MapMeta) -> Result<()> {
        access_of(meta.map_type).map_err(|reason| Error::Unsupported {
            map: format!("snapshot map {index} {:?}", meta.name),
            map_type: meta.type_name(),
            reason: reason.into(),
        })?;
        let label = format!("snapshot map {index} {:?}", meta.name);
        check_deadline(self.opts, || label.clone())?;
        let fit = cpu_fit(&meta, &label, self.opts.cpu_policy)?;
        let creates =
            meta.inner || !matches!(self.dest, Destination::Into(_) | Destination::IntoRoot(_));
        if creates {
            // Before the map is created: what creating it (and, when the verified snapshot
            // says, filling it) would cost the kernel.
            let known = self.counts.get(index as usize).copied().unwrap_or(0);
            self.budget.map(|| label.clone(), &meta, known)?;
        }
        self.progress.map_started(&meta.name, None);
        let meta = self.plan_created(index, meta)?;
        let (map, slot) = if meta.inner {
            (self.create(index, &meta)?, Slot::New { final_path: None })
        } else {
            match self.dest {
                Destination::PinRoot { dir, overwrite } => {
                    let rel = pin_rel_path(&rel_pin(&meta, index))?;
                    let (root, _) = self.root.as_ref().ok_or_else(|| Error::Restore {
                        map: label.clone(),
                        reason: "the restore root is not open (internal error)".into(),
                    })?;
                    if !overwrite && root.exists(&rel)? {
                        return Err(Error::PinExists {
                            path: dir.join(rel.as_string()),
                        });
                    }
                    (
                        self.create(index, &meta)?,
                        Slot::New {
                            final_path: Some(Publish::Root(rel)),
                        },
                    )
                }
                Destination::PinMapped { resolve, overwrite } => {
                    let path = resolve(&rel_pin(&meta, index))?;
                    let place = place_of_path(&path)?;
                    if !overwrite
                        && place.dir.exists(&RelPath::parse(&place.leaf).map_err(|e| {
                            Error::UnsafePinPath {
                                path: place.shown.clone(),
                                reason: e.reason,
                            }
                        })?)?
                    {
                        return Err(Error::PinExists { path });
                    }
                    (
                        self.create(index, &meta)?,
                        Slot::New {
                            final_path: Some(Publish::At(place)),
                        },
                    )
                }
                Destination::PinAt { resolve, overwrite } => {
                    let place = resolve(&rel_pin(&meta, index))?;
                    let leaf = RelPath::parse(&place.leaf).map_err(|e| Error::UnsafePinPath {
                        path: place.shown.clone(),
                        reason: e.reason,
                    })?;
                    if !overwrite && place.dir.exists(&leaf)? {
                        return Err(Error::PinExists {
                            path: PathBuf::from(&place.shown),
                        });
                    }
                    (
                        self.create(index, &meta)?,
                        Slot::New {
                            final_path: Some(Publish::At(place)),
                        },
                    )
                }
                Destination::Detached => (self.create(index, &meta)?, Slot::Detached),
                Destination::Into(_) | Destination::IntoRoot(_) => {
                    match self.targets.remove(&index) {
                        Some((map, target)) => {
                            if self.opts.mode == FillMode::Replace {
                                clear(&map, &map.info()?, meta.max_entries)?;
                            }
                            (map, Slot::Existing { target })
                        }
                        None => {
                            // Not selected: read past it.
                            self.current = None;
                            return Ok(());
                        }
                    }
                }
            }
        };
        let known = self.counts.get(index as usize).copied();
        let merge = matches!(slot, Slot::Existing { .. }) && self.opts.mode == FillMode::Merge;
        let par = if fill::can_split(&meta, known, merge) {
            if self.fillers.is_none() {
                let n = match self.opts.fill_threads {
                    0 => default_threads(),
                    n => n,
                };
                self.fillers = Some(fill::Fillers::start(n, self.opts.deadline)?);
            }
            Some(fill::Target::new(&map)?)
        } else {
            None
        };
        self.current = Some(Current {
            index,
            meta,
            map,
            slot,
            fit,
            batch_ok: true,
            written: 0,
            par,
        });
        Ok(())
    }

    fn entries(&mut self, chunk: EntryChunk) -> Result<()> {
        let Some(cur) = self.current.as_mut() else {
            return Ok(());
        };
        // Conversion is a per-chunk step: what follows sees the target's layout.
        let chunk = match self.conversions.get_mut(&cur.index) {
            Some(conv) => conv.convert_chunk(&chunk).map_err(|e| Error::Restore {
                map: cur.map.label().to_string(),
                reason: format!("converting an entry failed: {e}"),
            })?,
            None => chunk,
        };
        check_deadline(self.opts, || cur.map.label().to_string())?;
        if let Some(f) = &self.fillers {
            f.check()?;
        }
        if !matches!(cur.slot, Slot::Existing { .. })
            && self.counts.get(cur.index as usize).is_none()
        {
            // Entry counts were not known up front (one-pass restore): account as they come.
            let label = format!("snapshot map {} {:?}", cur.index, cur.meta.name);
            self.budget
                .entries(|| label, &cur.meta, chunk.count as u64)?;
        }
        let meta = &cur.meta;
        let access = access_of(meta.map_type).unwrap_or(Access::Keyed);
        let mut values = std::borrow::Cow::Borrowed(chunk.values.as_slice());
        if let Some((from, to)) = cur.fit {
            values = refit_cpus(&values, meta.value_size, from, to).into();
        }
        if access == Access::MapOfMaps {
            // Snapshot indexes of inner maps become fds of the maps created for them.
            let mut fds = Vec::with_capacity(values.len());
            for v in values.chunks_exact(4) {
                let i = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                let inner = self.created.get(&i).ok_or_else(|| Error::Restore {
                    map: cur.map.label().to_string(),
                    reason: format!(
                        "an entry refers to inner map {i}, which is not in the snapshot"
                    ),
                })?;
                fds.extend_from_slice(
                    &(std::os::fd::AsRawFd::as_raw_fd(&inner.fd()) as u32).to_ne_bytes(),
                );
            }
            values = fds.into();
        }
        if matches!(
            meta.map_type,
            map_type::DEVMAP | map_type::DEVMAP_HASH | map_type::CPUMAP
        ) && meta.value_size >= 8
        {
            let vs = meta.value_size as usize;
            if let Some(i) = values.chunks_exact(vs).position(|v| v[4..8] != [0; 4]) {
                return Err(Error::Restore {
                    map: cur.map.label().to_string(),
                    reason: format!(
                        "entry {i} of this chunk has a BPF program attached; programs cannot be \
                         carried in a snapshot: detach it before dumping"
                    ),
                });
            }
        }
        let (kl, vl) = (meta.key_len(), meta.value_len());
        if access == Access::Queue {
            for v in values.chunks_exact(vl.max(1)) {
                cur.map.update(None, v, 0)?;
            }
        } else if let (Some(target), Some(fillers)) = (&cur.par, &self.fillers) {
            // Moved, not copied, unless re-laid above.
            let values = match values {
                std::borrow::Cow::Owned(v) => v,
                std::borrow::Cow::Borrowed(_) => chunk.values,
            };
            let job = fill::Job::new(chunk.keys, values, (kl, vl), chunk.count, cur.written);
            fillers.submit(target, job)?;
        } else {
            fill::fill_chunk(
                &cur.map,
                &mut cur.batch_ok,
                cur.written == 0,
                cur.written,
                &chunk.keys,
                &values,
                (kl, vl),
                chunk.count,
            )?;
        }
        cur.written += chunk.count as u64;
        self.progress.entries(chunk.count as u64);
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        self.progress.map_done();
        let info = cur.map.info()?;
        // Maps this restore created get the frozen state back (RDONLY ones are frozen
        // instead, since we had to write them); existing maps are left as they were.
        let created = !matches!(cur.slot, Slot::Existing { .. });
        if created && (cur.meta.frozen || cur.meta.flags & map_flags::RDONLY != 0) {
            // Frozen maps take no more writes: their chunks must all be in first.
            if let (Some(target), Some(fillers)) = (&cur.par, &self.fillers) {
                fillers.wait(target)?;
            }
            cur.map.freeze()?;
        }
        let target = match &cur.slot {
            Slot::New { final_path: None } => {
                // An inner map: kept for its outer map, not reported on its own.
                self.created.insert(cur.index, cur.map);
                return Ok(());
            }
            Slot::New {
                final_path: Some(Publish::Root(rel)),
            } => match &self.root {
                Some((_, shown)) => shown.join(rel.as_string()).display().to_string(),
                None => rel.as_string(),
            },
            Slot::New {
                final_path: Some(Publish::At(place)),
            } => place.shown.clone(),
            Slot::Detached => "(unpinned)".into(),
            Slot::Existing { target } => target.clone(),
        };
        self.report.push(RestoredMap {
            name: cur.meta.name.clone(),
            map_type: cur.meta.type_name(),
            entries: cur.written,
            target,
            map_id: info.id,
        });
        match cur.slot {
            Slot::New {
                final_path: Some(path),
            } => self.to_publish.push((cur.map, path)),
            Slot::Detached => self.detached.push(cur.map),
            _ => {}
        }
        Ok(())
    }

    /// Publishes every new map: all or nothing (see [`publish_root`] and [`publish_at`]).
    fn publish(&mut self) -> Result<()> {
        check_deadline(self.opts, || "publishing the restored maps".into())?;
        let items = std::mem::take(&mut self.to_publish);
        let (mut under_root, mut at) = (Vec::new(), Vec::new());
        for (map, p) in items {
            match p {
                Publish::Root(rel) => under_root.push((map, rel)),
                Publish::At(place) => at.push((map, place)),
            }
        }
        let overwrite = matches!(
            self.dest,
            Destination::PinRoot {
                overwrite: true,
                ..
            } | Destination::PinMapped {
                overwrite: true,
                ..
            } | Destination::PinAt {
                overwrite: true,
                ..
            }
        );
        if !under_root.is_empty() {
            let (root, _) = self.root.as_ref().ok_or_else(|| Error::Restore {
                map: "publish".into(),
                reason: "the restore root is not open (internal error)".into(),
            })?;
            publish_root(root, &under_root, overwrite, self.opts)?;
        }
        if !at.is_empty() {
            publish_at(&at, overwrite, self.opts)?;
        }
        Ok(())
    }
}

/// Prefix of the per-map temporary pins of [`publish_at`].
pub const TMP_PREFIX: &str = "mapsnap_tmp_";
/// Prefix of the staging directory of [`publish_root`] (removed by [`recover`]).
pub const STAGE_PREFIX: &str = "mapsnap_stage_";
/// Prefix of a committed staging directory (rolled forward by [`recover`]).
pub const COMMIT_PREFIX: &str = "mapsnap_commit_";

/// `<pid>_<random>`: names this process's temporaries (bpffs refuses dots in names).
fn token() -> String {
    format!(
        "{}_{:016x}",
        std::process::id(),
        crate::anchor::random_u64()
    )
}

/// Whether a temporary named `<prefix><pid>_...` belongs to a process that is gone (a
/// killed earlier run): only those are cleaned up, never a concurrent restore's.
fn stale(name: &str, prefix: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    let rest = rest
        .strip_prefix("r_")
        .or_else(|| rest.strip_prefix("n_"))
        .unwrap_or(rest);
    let Some(pid) = rest.split('_').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the directory `name` of `parent` with every pin and directory below it, through
/// the anchor (nothing is followed).
fn remove_tree(parent: &Anchor, name: &str, depth: usize) -> Result<()> {
    let leaf = RelPath::parse(name).map_err(|e| Error::UnsafePinPath {
        path: name.to_string(),
        reason: e.reason,
    })?;
    let dir = match parent.open_dir(&leaf) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for e in dir.entries()? {
        if e.kind == EntryKind::Dir && depth < crate::anchor::MAX_DEPTH {
            remove_tree(&dir, &e.name, depth + 1)?;
        } else {
            dir.unlink(&e.name)?;
        }
    }
    parent.remove_dir(name)?;
    Ok(())
}

/// Every pin below `dir`, as paths relative to it (depth-first, sorted).
fn pins_below(dir: &Anchor, rel: &RelPath, out: &mut Vec<RelPath>) -> Result<()> {
    let here = if rel.is_root() {
        dir.try_clone()?
    } else {
        dir.open_dir(rel)?
    };
    for e in here.entries()? {
        let child = rel.join(&e.name).map_err(|err| Error::UnsafePinPath {
            path: e.name.clone(),
            reason: err.reason,
        })?;
        match e.kind {
            EntryKind::Dir => pins_below(dir, &child, out)?,
            EntryKind::Symlink => {}
            _ => out.push(child),
        }
    }
    Ok(())
}

/// Moves every pin of the committed directory `commit` to the same path below `root`.
/// Returns the paths moved so far with the error, if one fails.
fn roll_forward(
    root: &Anchor,
    commit: &str,
    replace: bool,
) -> std::result::Result<(), (Vec<RelPath>, Error)> {
    let mut moved = Vec::new();
    let r = (|| -> Result<()> {
        let cdir = root.open_dir(&RelPath::parse(commit).map_err(|e| Error::UnsafePinPath {
            path: commit.to_string(),
            reason: e.reason,
        })?)?;
        let mut pins = Vec::new();
        pins_below(&cdir, &RelPath::root(), &mut pins)?;
        for rel in pins {
            let Some((parent, leaf)) = rel.split_leaf() else {
                continue;
            };
            let from = if parent.is_root() {
                cdir.try_clone()?
            } else {
                cdir.open_dir(&parent)?
            };
            let to = root.create_dir_all(&parent, 0o755)?;
            from.rename_into(leaf, &to, leaf, replace)?;
            moved.push(rel.clone());
        }
        Ok(())
    })();
    r.map_err(|e| (moved.clone(), e))
}

/// Removes pins this restore published at `paths` below `root`, each only if it still is the
/// map with the id we published (a name someone else re-used is left alone).
fn unpublish(root: &Anchor, paths: &[RelPath], ids: &HashMap<String, u32>) {
    for rel in paths {
        let Some((parent, leaf)) = rel.split_leaf() else {
            continue;
        };
        let Ok(dir) = root.open_dir(&parent) else {
            continue;
        };
        let ours = RelPath::parse(leaf)
            .ok()
            .and_then(|l| dir.open_map(&l).ok())
            .and_then(|m| m.info().ok())
            .is_some_and(|i| ids.get(&rel.as_string()) == Some(&i.id));
        if ours {
            let _ = dir.unlink(leaf);
        }
    }
}

/// Finishes or undoes what killed earlier restores left in `root`: a staging directory
/// (not committed) is removed with its pins, so the old state stays; a committed one is
/// rolled forward, so the new state is completed; temporary pins of [`publish_at`] are
/// removed. Only temporaries of processes that no longer exist are touched.
///
/// [`restore`] calls this first for [`Destination::PinRoot`]; returns what it did.
pub fn recover(root: &Anchor) -> Result<Recovered> {
    let mut done = Recovered::default();
    for e in root.entries()? {
        if stale(&e.name, STAGE_PREFIX) && e.kind == EntryKind::Dir {
            remove_tree(root, &e.name, 0)?;
            done.rolled_back += 1;
        } else if stale(&e.name, COMMIT_PREFIX) && e.kind == EntryKind::Dir {
            let replace = e.name[COMMIT_PREFIX.len()..].starts_with("r_");
            if let Err((_, err)) = roll_forward(root, &e.name, replace) {
                // A name taken meanwhile (no replace): that pin cannot be completed.
                tracing::warn!("completing an interrupted restore: {err}");
            }
            remove_tree(root, &e.name, 0)?;
            done.rolled_forward += 1;
        } else if stale(&e.name, TMP_PREFIX) && e.kind != EntryKind::Dir {
            root.unlink(&e.name)?;
            done.temporaries += 1;
        }
    }
    Ok(done)
}

/// What [`recover`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Uncommitted restores undone.
    pub rolled_back: u32,
    /// Committed restores completed.
    pub rolled_forward: u32,
    /// Temporary pins removed.
    pub temporaries: u32,
}

/// Publishes maps below the restore root as one transaction:
///
/// 1. every map is pinned in a staging directory `mapsnap_stage_<pid>_<rand>` of the root,
///    at its own relative path, and checked to be the map restored;
/// 2. the staging directory is renamed to `mapsnap_commit_<r|n>_<pid>_<rand>` (one atomic
///    rename: the point where the new state is decided);
/// 3. every pin is renamed to its place (replacing only with `--overwrite`), then the
///    empty directory is removed.
///
/// A failure before 2 removes the staging directory (the old state is untouched); a failure
/// in 3 removes the pins already published (without overwrite). A process killed at any
/// point leaves a staging or commit directory that the next restore into the same root
/// removes or completes ([`recover`]), so a retry never trips over it.
fn publish_root(
    root: &Anchor,
    items: &[(Map, RelPath)],
    replace: bool,
    opts: &RestoreOptions,
) -> Result<()> {
    let tok = token();
    let stage = format!("{STAGE_PREFIX}{tok}");
    let mut ids = HashMap::new();
    let staged = (|| -> Result<()> {
        let sdir = root.create_dir_all(
            &RelPath::parse(&stage).map_err(|e| Error::UnsafePinPath {
                path: stage.clone(),
                reason: e.reason,
            })?,
            0o700,
        )?;
        for (map, rel) in items {
            check_deadline(opts, || format!("publishing {rel}"))?;
            let Some((parent, leaf)) = rel.split_leaf() else {
                continue;
            };
            // The target's directories exist before the commit, so step 3 only renames.
            root.create_dir_all(&parent, 0o755)?;
            let d = sdir.create_dir_all(&parent, 0o755)?;
            d.pin_map(map, leaf)?;
            let id = map.info()?.id;
            let pinned =
                d.open_map(&RelPath::parse(leaf).map_err(|e| Error::UnsafePinPath {
                    path: rel.as_string(),
                    reason: e.reason,
                })?)?;
            if pinned.info()?.id != id {
                return Err(Error::Restore {
                    map: rel.as_string(),
                    reason: "the map pinned in the staging directory is not the one restored"
                        .into(),
                });
            }
            ids.insert(rel.as_string(), id);
        }
        check_deadline(opts, || "publishing the restored maps".into())
    })();
    if let Err(e) = staged {
        if let Err(c) = remove_tree(root, &stage, 0) {
            tracing::warn!("removing the staging directory: {c}");
        }
        return Err(e);
    }
    let commit = format!("{COMMIT_PREFIX}{}_{tok}", if replace { "r" } else { "n" });
    if let Err(e) = root.rename(&stage, &commit, false) {
        let _ = remove_tree(root, &stage, 0);
        return Err(e.into());
    }
    let result = roll_forward(root, &commit, replace);
    if let Err((moved, _)) = &result
        && !replace
    {
        unpublish(root, moved, &ids);
    }
    if let Err(c) = remove_tree(root, &commit, 0) {
        tracing::warn!("removing the commit directory: {c}");
    }
    result.map_err(|(_, e)| e)
}

/// Publishes maps into directories the caller opened: each is pinned as
/// `mapsnap_tmp_<pid>_<rand>_<i>` beside its target and checked, then all are renamed into
/// place. Any failure removes every temporary and every pin already published (without
/// overwrite), so nothing of this restore stays behind. Stale temporaries of killed earlier
/// runs in those directories are removed first.
fn publish_at(items: &[(Map, PinPlace)], replace: bool, opts: &RestoreOptions) -> Result<()> {
    let tok = token();
    let mut staged: Vec<(usize, String, u32)> = Vec::new();
    let cleanup = |staged: &[(usize, String, u32)]| {
        for (i, tmp, _) in staged {
            let _ = items[*i].1.dir.unlink(tmp);
        }
    };
    let r = (|| -> Result<()> {
        for (i, (map, place)) in items.iter().enumerate() {
            check_deadline(opts, || format!("publishing {}", place.shown))?;
            for e in place.dir.entries()? {
                if stale(&e.name, TMP_PREFIX) && e.kind != EntryKind::Dir {
                    place.dir.unlink(&e.name)?;
                }
            }
            let tmp = format!("{TMP_PREFIX}{tok}_{i}");
            place.dir.pin_map(map, &tmp)?;
            let id = map.info()?.id;
            staged.push((i, tmp.clone(), id));
            let pinned =
                place
                    .dir
                    .open_map(&RelPath::parse(&tmp).map_err(|e| Error::UnsafePinPath {
                        path: tmp.clone(),
                        reason: e.reason,
                    })?)?;
            if pinned.info()?.id != id {
                return Err(Error::Restore {
                    map: place.shown.clone(),
                    reason: "the map pinned under the temporary name is not the one restored"
                        .into(),
                });
            }
        }
        check_deadline(opts, || "publishing the restored maps".into())
    })();
    if let Err(e) = r {
        cleanup(&staged);
        return Err(e);
    }
    for (n, (i, tmp, _)) in staged.iter().enumerate() {
        let place = &items[*i].1;
        if let Err(e) = place.dir.rename(tmp, &place.leaf, replace) {
            cleanup(&staged[n..]);
            if !replace {
                for (j, _, id) in &staged[..n] {
                    let p = &items[*j].1;
                    let ours = RelPath::parse(&p.leaf)
                        .ok()
                        .and_then(|l| p.dir.open_map(&l).ok())
                        .and_then(|m| m.info().ok())
                        .is_some_and(|info| info.id == *id);
                    if ours {
                        let _ = p.dir.unlink(&p.leaf);
                    }
                }
            }
            return Err(e.into());
        }
    }
    Ok(())
}

/// Resolves and checks every existing target before anything is written.
fn resolve_targets(
    dest: &Destination,
    summary: &VerifySummary,
    opts: &RestoreOptions,
) -> Result<HashMap<u32, (Map, String)>> {
    let top: Vec<(u32, &MapMeta)> = summary
        .maps
        .iter()
        .enumerate()
        .filter(|(_, (m, _))| !m.inner)
        .map(|(i, (m, _))| (i as u32, m))
        .collect();
    let mut out = HashMap::new();
    match dest {
        Destination::PinRoot { .. }
        | Destination::PinMapped { .. }
        | Destination::PinAt { .. }
        | Destination::Detached => {}
        Destination::Into(targets) => {
            for t in targets {
                let (index, meta) = match &t.select {
                    None if top.len() == 1 => top[0],
                    None => {
                        return Err(Error::Restore {
                            map: t.map.label().to_string(),
                            reason: format!(
                                "the snapshot holds {} maps: say which one goes here (NAME=TARGET)",
                                top.len()
                            ),
                        });
                    }
                    Some(sel) => *top.iter().find(|(_, m)| selects(m, sel)).ok_or_else(|| {
                        Error::Restore {
                            map: sel.clone(),
                            reason: "no map of that name or pin path in the snapshot".into(),
                        }
                    })?,
                };
                let info = t.map.info()?;
                check_compatible(meta, &t.map, &info, opts)?;
                out.insert(index, (t.map.try_clone()?, t.map.label().to_string()));
            }
        }
        Destination::IntoRoot(dir) => {
            let root = Anchor::open_trusted(dir, dir.display().to_string())?;
            for (index, meta) in top {
                let rel = pin_rel_path(&rel_pin(meta, index))?;
                let path = dir.join(rel.as_string());
                // Through the anchor: a pin swapped for a link to another map is refused.
                let map = root.open_map(&rel)?;
                let info = map.info()?;
                check_compatible(meta, &map, &info, opts)?;
                out.insert(index, (map, path.display().to_string()));
            }
        }
    }
    Ok(out)
}

/// The clocks a plan rebases with: the snapshot's (if recorded) and this host's.
fn rebase_clocks(
    conv: &RestoreConversion,
    from: Option<ClockSample>,
    to: Option<ClockSample>,
) -> Option<RebaseClocks> {
    Some(RebaseClocks {
        from: from?,
        to: to?,
        mode: conv.mode,
    })
}

/// Plans the conversion of every existing target from the snapshot's BTF to the target's
/// own (read from the kernel), before anything is written: a conversion that cannot be
/// done, a map without BTF or an option that matches nothing refuses here.
fn plan_targets(
    targets: &HashMap<u32, (Map, String)>,
    summary: &VerifySummary,
    conv: &RestoreConversion,
    now: Option<ClockSample>,
) -> Result<HashMap<u32, MapConversion>> {
    let clocks = rebase_clocks(conv, summary.clocks, now);
    let mut out = HashMap::new();
    let mut order: Vec<&u32> = targets.keys().collect();
    order.sort();
    for index in order {
        let (map, shown) = &targets[index];
        let Some((meta, _)) = summary.maps.get(*index as usize) else {
            continue;
        };
        let fail = |reason: String| Error::Restore {
            map: shown.clone(),
            reason,
        };
        let from = meta.btf.as_ref().and_then(|b| {
            Some(MapTypes {
                btf: summary.btf.get(b.index as usize)?,
                key_type_id: b.key_type_id,
                value_type_id: b.value_type_id,
            })
        });
        let info = map.info()?;
        let target_btf = if info.btf_id != 0 {
            Some(sys::btf_raw_by_id(info.btf_id)?)
        } else if conv.convert {
            return Err(fail(
                "the map has no BTF, so its entries cannot be converted: create it from a                  program compiled with clang -g (BTF-defined maps)"
                    .into(),
            ));
        } else {
            None
        };
        // Without `convert` the target must have the snapshot's layout: plan against the
        // snapshot's own types, which only rebases.
        let to = target_btf
            .as_deref()
            .filter(|_| conv.convert)
            .map(|btf| MapTypes {
                btf,
                key_type_id: info.btf_key_type_id,
                value_type_id: info.btf_value_type_id,
            });
        let planned = MapConversion::plan(meta, from, to, conv, clocks, false)
            .map_err(|e| fail(e.to_string()))?;
        let target_meta = planned
            .as_ref()
            .map_or(meta.clone(), |p| p.target_meta(meta));
        if info.key_size != target_meta.key_size || info.value_size != target_meta.value_size {
            return Err(fail(format!(
                "key/value sizes are {}/{}, the converted snapshot's are {}/{}",
                info.key_size, info.value_size, target_meta.key_size, target_meta.value_size
            )));
        }
        if let Some(p) = planned {
            out.insert(*index, p);
        }
    }
    conv.check_used(out.values()).map_err(|e| Error::Restore {
        map: "restore".into(),
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// One map of a conversion checked by [`check_conversion`].
#[derive(Debug)]
pub struct CheckedMap {
    /// Snapshot map index and name.
    pub index: u32,
    pub name: String,
    /// Where it goes (an existing target, or the snapshot's pin path for new maps).
    pub target: String,
    /// The key and value plans; `None` when entries are copied as they are.
    pub conversion: Option<MapConversion>,
    /// Entries converted without error.
    pub entries: u64,
}

/// Plans the conversion of every map `restore` would fill with these options and runs it
/// over every entry of `source` (the same bytes as `summary`), writing nothing: plans that
/// cannot be made, values that do not fit, enum values without counterpart and colliding
/// keys are all found here. Call it before [`restore`] when the target maps are live (as
/// `mapsnap restore --convert` does), and show the plans (`--dry-run` stops here).
pub fn check_conversion<R: Read>(
    source: R,
    summary: &VerifySummary,
    dest: &Destination,
    opts: &RestoreOptions,
) -> Result<Vec<CheckedMap>> {
    let conv = opts.convert.as_ref().ok_or_else(|| Error::Restore {
        map: "restore".into(),
        reason: "check_conversion needs RestoreOptions::convert".into(),
    })?;
    let now = match conv.now {
        Some(n) => n,
        None => ClockSample::now().map_err(|e| Error::Restore {
            map: "restore".into(),
            reason: format!("reading this host's clocks failed: {e}"),
        })?,
    };
    let into = matches!(dest, Destination::Into(_) | Destination::IntoRoot(_));
    let (mut plans, shown): (HashMap<u32, MapConversion>, HashMap<u32, String>) = if into {
        let targets = resolve_targets(dest, summary, opts)?;
        let shown = targets.iter().map(|(i, (_, s))| (*i, s.clone())).collect();
        (plan_targets(&targets, summary, conv, Some(now))?, shown)
    } else {
        let clocks = rebase_clocks(conv, summary.clocks, Some(now));
        let mut plans = HashMap::new();
        let mut shown = HashMap::new();
        for (i, (meta, _)) in summary.maps.iter().enumerate() {
            let from = meta.btf.as_ref().and_then(|b| {
                Some(MapTypes {
                    btf: summary.btf.get(b.index as usize)?,
                    key_type_id: b.key_type_id,
                    value_type_id: b.value_type_id,
                })
            });
            let planned =
                MapConversion::plan(meta, from, None, conv, clocks, false).map_err(|e| {
                    Error::Restore {
                        map: format!("snapshot map {i} {:?}", meta.name),
                        reason: e.to_string(),
                    }
                })?;
            if let Some(p) = planned {
                plans.insert(i as u32, p);
            }
            if !meta.inner {
                shown.insert(i as u32, rel_pin(meta, i as u32));
            }
        }
        conv.check_used(plans.values())
            .map_err(|e| Error::Restore {
                map: "restore".into(),
                reason: e.to_string(),
            })?;
        (plans, shown)
    };
    let mut entries: HashMap<u32, u64> = HashMap::new();
    let mut reader = SnapshotReader::with_limits(source, &opts.limits)?;
    let mut current = None;
    while let Some(event) = reader.next_event()? {
        match event {
            Event::MapBegin { index, .. } => current = Some(index),
            Event::Entries(chunk) => {
                let Some(index) = current else { continue };
                if let Some(p) = plans.get_mut(&index) {
                    p.convert_chunk(&chunk).map_err(|e| Error::Restore {
                        map: shown.get(&index).cloned().unwrap_or_default(),
                        reason: format!("converting an entry failed: {e}"),
                    })?;
                }
                *entries.entry(index).or_default() += chunk.count as u64;
                reader.recycle(chunk);
            }
            Event::End(digest) if digest.sha256 != summary.digest.sha256 => {
                return Err(Error::Restore {
                    map: "snapshot".into(),
                    reason: "the snapshot changed between verification and the conversion check"
                        .into(),
                });
            }
            _ => {}
        }
    }
    let mut out: Vec<CheckedMap> = shown
        .into_iter()
        .map(|(index, target)| CheckedMap {
            index,
            name: summary
                .maps
                .get(index as usize)
                .map(|(m, _)| m.name.clone())
                .unwrap_or_default(),
            target,
            conversion: plans.remove(&index),
            entries: entries.get(&index).copied().unwrap_or(0),
        })
        .collect();
    out.sort_by_key(|m| m.index);
    Ok(out)
}

/// Restores the snapshot read from `source` into `dest`.
///
/// `verified` is the result of [`crate::format::verify`] over the same bytes. It is required
/// to fill existing maps (so a bad snapshot changes nothing); new maps are published only
/// after the stream's own checksum matched, with or without it.
pub fn restore<R: Read>(
    source: R,
    verified: Option<&VerifySummary>,
    dest: &Destination,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let targets = match (dest, verified) {
        (
            Destination::PinRoot { .. }
            | Destination::PinMapped { .. }
            | Destination::PinAt { .. }
            | Destination::Detached,
            _,
        ) => HashMap::new(),
        (_, Some(summary)) => resolve_targets(dest, summary, opts)?,
        (_, None) => {
            return Err(Error::Restore {
                map: "restore".into(),
                reason: "filling existing maps needs a verified snapshot (internal error)".into(),
            });
        }
    };
    let now = match &opts.convert {
        Some(c) => Some(match c.now {
            Some(n) => n,
            None => ClockSample::now().map_err(|e| Error::Restore {
                map: "restore".into(),
                reason: format!("reading this host's clocks for rebasing failed: {e}"),
            })?,
        }),
        None => None,
    };
    let conversions = match (&opts.convert, verified) {
        (Some(conv), Some(summary)) if !targets.is_empty() => {
            plan_targets(&targets, summary, conv, now)?
        }
        _ => HashMap::new(),
    };
    // Everything the verified snapshot says is checked before the first map is created.
    let cpus = sys::possible_cpus()?;
    let mut counts = Vec::new();
    if let Some(v) = verified {
        let creates = !matches!(dest, Destination::Into(_) | Destination::IntoRoot(_));
        let mut budget = KernelBudget::new(&opts.limits, cpus);
        for (i, (meta, n)) in v.maps.iter().enumerate() {
            if creates || meta.inner {
                budget.map(|| format!("snapshot map {i} {:?}", meta.name), meta, *n)?;
            }
            counts.push(*n);
        }
    }
    let root = match dest {
        Destination::PinRoot { dir, .. } => {
            let a = Anchor::open_trusted(dir, dir.display().to_string())?;
            let rec = recover(&a)?;
            if rec != Recovered::default() {
                tracing::warn!(
                    "{}: cleaned up after an interrupted restore: {} undone, {} completed, {} \
                     temporary pins removed",
                    dir.display(),
                    rec.rolled_back,
                    rec.rolled_forward,
                    rec.temporaries
                );
            }
            Some((a, dir.clone()))
        }
        _ => None,
    };
    let mut r = Restorer {
        root,
        budget: KernelBudget::new(&opts.limits, cpus),
        counts,
        dest,
        opts,
        progress,
        btf_blobs: Vec::new(),
        btf_loaded: HashMap::new(),
        created: HashMap::new(),
        targets,
        current: None,
        to_publish: Vec::new(),
        detached: Vec::new(),
        report: Vec::new(),
        conversions,
        now,
        snap_clocks: verified.and_then(|v| v.clocks),
        fillers: None,
    };
    let mut reader = SnapshotReader::with_limits(source, &opts.limits)?;
    let digest = loop {
        match reader.next_event()? {
            Some(Event::Info(_)) => {}
            Some(Event::Btf { blob, .. }) => r.btf_blobs.push(blob),
            Some(Event::MapBegin { index, meta }) => {
                r.snap_clocks = r.snap_clocks.or(reader.clocks().copied());
                r.begin(index, meta)?
            }
            Some(Event::Entries(chunk)) => r.entries(chunk)?,
            Some(Event::MapEnd { .. }) => r.end()?,
            Some(Event::End(digest)) => break digest,
            None => {
                return Err(Error::Restore {
                    map: "snapshot".into(),
                    reason: "the stream ended without its trailer".into(),
                });
            }
        }
    };
    // Every queued chunk is written before anything is checked or published.
    if let Some(f) = r.fillers.take() {
        f.finish()?;
    }
    if let Some(v) = verified
        && v.digest.sha256 != digest.sha256
    {
        return Err(Error::Restore {
            map: "snapshot".into(),
            reason: "the snapshot changed between verification and restore".into(),
        });
    }
    if let Some(conv) = &opts.convert {
        conv.check_used(r.conversions.values())
            .map_err(|e| Error::Restore {
                map: "restore".into(),
                reason: e.to_string(),
            })?;
    }
    r.publish()?;
    Ok(RestoreReport {
        maps: r.report,
        digest,
        detached: r.detached,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_paths_stay_under_root() {
        let root = Path::new("/sys/fs/bpf/app");
        assert_eq!(safe_join(root, "a/b").ok(), Some(root.join("a/b")));
        assert_eq!(safe_join(root, "./x").ok(), Some(root.join("x")));
        assert!(safe_join(root, "../etc").is_err());
        assert!(safe_join(root, "a/../../b").is_err());
        assert!(safe_join(root, "/etc/passwd").is_err());
        assert!(safe_join(root, "").is_err());
        assert!(safe_join(root, ".").is_err());
    }

    #[test]
    fn cpu_refit_keeps_first_cpus() {
        // value_size 4 -> slot 8; 2 CPUs -> 3 CPUs and 3 -> 2.
        let two = [1u8, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        let three = refit_cpus(&two, 4, 2, 3);
        assert_eq!(three.len(), 24);
        assert_eq!(&three[..16], &two);
        assert_eq!(&three[16..], &[0u8; 8]);
        assert_eq!(refit_cpus(&three, 4, 3, 2), two.to_vec());
    }
}
