//! Taking and restoring a container's pinned maps with the mapsnap library.
//!
//! Every pin, directory and file below a container's mounts is reached through the mount's
//! directory fd ([`mapsnap::anchor`]): the bpffs walk, the open of each pin (`BPF_OBJ_GET` on
//! the inode found without following links), the publish of restored maps (pinned by fd under
//! a temporary name, then renamed without replacing unless asked), and snapshot files in
//! volumes (temporary file, then rename, all relative to the volume's fd).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mapsnap::anchor::{Anchor, AnchorError, EntryKind, RelPath};
use mapsnap::convert::RestoreConversion;
use mapsnap::discover::Found;
use mapsnap::dump::{DumpOptions, DumpReport, dump};
use mapsnap::format::{VerifySummary, verify};
use mapsnap::model::SnapshotInfo;
use mapsnap::progress::NoProgress;
use mapsnap::restore::{Destination, FillMode, IntoTarget, RestoreOptions, RestoredMap, restore};
use mapsnap::storage::{
    DigestCheck, Location, Manifest, ManifestSource, ObjectInfo, Storage, StorageConfig,
};
use mapsnap::sys::{Map, ObjKind};

use crate::annotations::{Existing, MapFilter};
use crate::error::{HookError, Result};
use crate::location::{Resolved, truncate};
use crate::mounts::{ContainerMounts, Mount, Target};
use crate::seal::{Check, MAX_SIGNATURE_BYTES, NodeTrust, SIGNATURE_SUFFIX};
use mapsnap::trust::Sealed;

/// The most entries (pins, directories, links) one walk of a container's bpffs mounts visits.
pub const MAX_WALK_ENTRIES: usize = 65_536;

/// The largest snapshot file read from a volume, the storage base or an image directory.
pub const MAX_LOCAL_SNAPSHOT: u64 = 64 << 30;

/// Prefix of the temporary pin names a restore stages its maps under (bpffs refuses dots).
pub const TMP_PIN_PREFIX: &str = "mapsnap_tmp_";

/// Set when the run's deadline passed: a publish in progress rolls back instead of going on.
static CANCELLED: AtomicBool = AtomicBool::new(false);

/// Asks a running publish to stop and remove what it staged or published.
pub fn cancel() {
    CANCELLED.store(true, Ordering::SeqCst);
}

fn cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// A symbolic link found in a container's bpffs mount: never followed, never dumped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLink {
    pub container_path: String,
}

fn anchor_err(e: AnchorError) -> HookError {
    HookError::from(e)
}

/// The maps pinned in the container's bpffs mounts that `filter` takes, with `pin_rel`
/// relative to the container's root. Links are reported, not followed; other filesystems
/// mounted below are not entered.
pub fn collect_pins(
    mounts: &ContainerMounts,
    filter: &MapFilter,
) -> Result<(Vec<Found>, Vec<SkippedLink>)> {
    for (pattern, literal) in filter.literal_prefixes() {
        mounts.check_filter_dir(pattern, literal)?;
    }
    let mut w = Walk {
        filter,
        out: Vec::new(),
        links: Vec::new(),
        seen: HashSet::new(),
        visited: 0,
    };
    for m in mounts.bpf() {
        let root = m.anchor.open_dir(&RelPath::root()).map_err(anchor_err)?;
        w.dir(m, &root, &RelPath::root())?;
    }
    for l in w.links.iter().take(16) {
        tracing::warn!(
            link = l.container_path,
            "refused: symbolic link in the container's bpffs mount (it may point at maps \
             outside the container's mounts); not followed, not saved"
        );
    }
    if w.links.len() > 16 {
        tracing::warn!(count = w.links.len(), "more symbolic links refused");
    }
    Ok((w.out, w.links))
}

struct Walk<'a> {
    filter: &'a MapFilter,
    out: Vec<Found>,
    links: Vec<SkippedLink>,
    seen: HashSet<u32>,
    visited: usize,
}

impl Walk<'_> {
    fn dir(&mut self, m: &Mount, dir: &Anchor, rel: &RelPath) -> Result<()> {
        for e in dir.entries().map_err(anchor_err)? {
            self.visited += 1;
            if self.visited > MAX_WALK_ENTRIES {
                return Err(HookError::refused(
                    format!("the bpffs mount {}", m.destination()),
                    format!("it holds more than {MAX_WALK_ENTRIES} entries"),
                ));
            }
            let leaf = RelPath::parse(&e.name).map_err(|x| {
                HookError::refused(format!("pin {:?}", truncate(&e.name, 64)), x.reason)
            })?;
            let child = rel
                .join(&e.name)
                .map_err(|x| HookError::refused(m.container_path(rel), x.reason))?;
            let container_path = m.container_path(&child);
            match e.kind {
                EntryKind::Symlink => self.links.push(SkippedLink { container_path }),
                EntryKind::Dir => match dir.open_dir(&leaf) {
                    Ok(sub) => self.dir(m, &sub, &child)?,
                    Err(x) if x.errno() == Some(libc::EXDEV) => {
                        tracing::warn!(
                            dir = container_path,
                            "another filesystem is mounted here: not entered"
                        );
                    }
                    Err(x) if x.is_not_found() => {}
                    Err(x) => return Err(x.into()),
                },
                EntryKind::File | EntryKind::Other => {
                    if !self.filter.matches(&container_path) {
                        tracing::debug!(pin = container_path, "not selected by mapsnap.io/maps");
                        continue;
                    }
                    let opath = match dir.open_path(&leaf) {
                        Ok(fd) => fd,
                        Err(x) if x.is_not_found() => continue,
                        Err(x) => return Err(x.into()),
                    };
                    // BPF_OBJ_GET on the inode just opened (no link followed, no name looked
                    // up again): the object is the one in this directory.
                    let fd =
                        mapsnap::sys::obj_get_opath(opath.as_fd()).map_err(mapsnap::Error::from)?;
                    if mapsnap::sys::fd_kind(fd.as_fd()) != ObjKind::Map {
                        tracing::debug!(pin = container_path, "not a map: skipped");
                        continue;
                    }
                    let map = Map::from_fd(fd).map_err(mapsnap::Error::from)?;
                    let f = Found::from_map(map, Some(format!("{}/{child}", m.dest_rel())))
                        .map_err(mapsnap::Error::from)?;
                    if self.seen.insert(f.info.id) {
                        self.out.push(f);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A finished snapshot.
#[derive(Debug, Clone)]
pub struct Written {
    pub location: String,
    /// SHA-256 and size of the stored snapshot (the ciphertext when it is encrypted).
    pub sha256: String,
    pub size: u64,
    /// Key id of the signature written beside it.
    pub signer: Option<String>,
    /// Stored as an age stream.
    pub encrypted: bool,
    pub report: DumpReport,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How [`write_snapshot`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteMode {
    /// Reader threads for one big map.
    pub threads: usize,
    /// fsync a local file before renaming it into place. Off inside CRIU's freeze: CRIU does
    /// not sync its own images either, and a crash before the runtime archived the image
    /// directory loses the whole checkpoint anyway.
    pub sync: bool,
}

impl Default for WriteMode {
    fn default() -> Self {
        Self {
            threads: 1,
            sync: true,
        }
    }
}

/// Writes the leaf `name` of `dir`: a new temporary file, synced (when asked), renamed over.
fn write_file_at(
    dir: &Anchor,
    name: &str,
    replace: bool,
    sync: bool,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let (f, tmp) = dir
        .create_temp(".mapsnap-tmp-", 0o640)
        .map_err(anchor_err)?;
    let result = (|| {
        let mut w = BufWriter::new(f);
        write(&mut w)?;
        let f = w
            .into_inner()
            .map_err(|e| HookError::io("writing the snapshot", e.into_error()))?;
        if sync {
            f.sync_all()
                .map_err(|e| HookError::io("syncing the snapshot", e))?;
        }
        dir.rename(&tmp, name, replace).map_err(anchor_err)
    })();
    if result.is_err() {
        let _ = dir.unlink(&tmp);
    }
    result
}

/// Dumps `maps` to `dest` (with the storage layer's manifest beside it), encrypted and signed
/// as `trust` says (the signature beside the snapshot, before the manifest).
// Each argument is a separate decision of the caller (what, where, how, with which keys).
#[allow(clippy::too_many_arguments)]
pub fn write_snapshot(
    maps: &[Found],
    dest: &Resolved,
    overwrite: bool,
    source: &str,
    container_id: &str,
    storage: &StorageConfig,
    mode: WriteMode,
    trust: &NodeTrust,
) -> Result<Written> {
    let info = SnapshotInfo {
        tool: format!("mapsnap-hook {}", env!("CARGO_PKG_VERSION")),
        created_unix: now_unix(),
        hostname: hostname(),
        kernel: kernel(),
        possible_cpus: mapsnap::sys::possible_cpus().map_err(mapsnap::Error::from)?,
        source: source.to_string(),
    };
    let opts = DumpOptions {
        skip_unsupported: false,
        threads: mode.threads.max(1),
        ..DumpOptions::default()
    };
    write_dest(
        dest,
        overwrite,
        container_id,
        storage,
        mode.sync,
        trust,
        |w| {
            let (_, report) = dump(maps, w, &info, &opts, &NoProgress)?;
            Ok((info.clone(), report))
        },
    )
}

/// Copies a finished snapshot file (written inside CRIU's freeze) to `dest`, with the storage
/// manifest beside it written last. The file is verified first and copied through a check of
/// that digest, so only the bytes verified reach `dest`.
pub fn copy_snapshot(
    spool: File,
    dest: &Resolved,
    overwrite: bool,
    container_id: &str,
    storage: &StorageConfig,
    trust: &NodeTrust,
) -> Result<Written> {
    let file = Arc::new(spool);
    let reader = || PosReader {
        file: file.clone(),
        pos: 0,
    };
    let summary = verify(reader()).map_err(|e| HookError::Snapshot {
        location: "the spooled snapshot".into(),
        source: e,
    })?;
    let report = DumpReport {
        maps: summary
            .maps
            .iter()
            .map(|(m, entries)| mapsnap::dump::DumpedMap {
                name: m.name.clone(),
                map_type: m.type_name(),
                source_id: m.source_id,
                pin_path: m.pin_path.clone(),
                entries: *entries,
                bytes: entries * (m.key_len() + m.value_len()) as u64,
                inner: m.inner,
            })
            .collect(),
        skipped: Vec::new(),
        digest: summary.digest,
    };
    write_dest(dest, overwrite, container_id, storage, true, trust, |w| {
        let mut checked = DigestCheck::new(
            reader(),
            "the spooled snapshot",
            summary.digest.sha256,
            summary.digest.bytes,
        );
        std::io::copy(&mut checked, w).map_err(|e| HookError::io("copying the snapshot", e))?;
        Ok((summary.info.clone(), report))
    })
}

/// Writes a snapshot that `produce` streams into `dest`, encrypted and signed as `trust`
/// says, then the signature and the storage manifest beside it (the manifest last: its
/// presence means "complete"). The manifest and [`Written`] describe the stored bytes (the
/// ciphertext when encrypted), as every reader of the location expects.
fn write_dest(
    dest: &Resolved,
    overwrite: bool,
    container_id: &str,
    storage: &StorageConfig,
    sync: bool,
    trust: &NodeTrust,
    produce: impl FnOnce(&mut dyn Write) -> Result<(SnapshotInfo, DumpReport)>,
) -> Result<Written> {
    let msource = ManifestSource {
        container_id: Some(container_id.to_string()),
        ..ManifestSource::default()
    };
    let sealed_run = |w: &mut dyn Write| -> Result<(SnapshotInfo, DumpReport, Sealed)> {
        let mut sealed = trust.seal(w)?;
        let (info, report) = produce(&mut sealed)?;
        let (_, s) = sealed.finish(&report.digest).map_err(seal_err)?;
        Ok((info, report, s))
    };
    match dest {
        Resolved::Remote(u) => {
            let target = Storage::open(Location::parse(u)?, storage)?;
            let mut writer = target.writer(overwrite)?;
            let (info, report, sealed) = sealed_run(&mut writer)?;
            writer.commit()?;
            let mut manifest = Manifest::new(target.name(), &info, &report, msource);
            sealed.apply(&mut manifest);
            let json = manifest.to_json();
            let signed = sealed.sign(Some(&json)).map_err(seal_err)?;
            if let Some(s) = &signed {
                target.write_signature(&s.signature)?;
            }
            target.write_manifest_bytes(&json)?;
            Ok(Written {
                location: target.name().to_string(),
                sha256: hex::encode(sealed.stored().sha256),
                size: sealed.stored().bytes,
                signer: signed.map(|s| s.key_id.to_string()),
                encrypted: sealed.encrypted(),
                report,
            })
        }
        Resolved::File { dir, rel, shown } => {
            let (parent, leaf) = rel.split_leaf().ok_or_else(|| {
                HookError::refused(format!("snapshot {shown}"), "it names no file")
            })?;
            let d = dir.create_dir_all(&parent, 0o750).map_err(anchor_err)?;
            let mut done = None;
            write_file_at(&d, leaf, overwrite, sync, |w| {
                done = Some(sealed_run(w)?);
                Ok(())
            })?;
            let (info, report, sealed) =
                done.ok_or_else(|| HookError::Other("the dump wrote no report".into()))?;
            let mut manifest = Manifest::new(shown, &info, &report, msource);
            sealed.apply(&mut manifest);
            let text = manifest.to_json();
            let signed = sealed.sign(Some(&text)).map_err(seal_err)?;
            if let Some(s) = &signed {
                write_file_at(&d, &format!("{leaf}{SIGNATURE_SUFFIX}"), true, sync, |w| {
                    w.write_all(&s.signature)
                        .map_err(|e| HookError::io("writing the snapshot's signature", e))
                })?;
            }
            let mname = format!("{leaf}{}", mapsnap::storage::MANIFEST_SUFFIX);
            write_file_at(&d, &mname, true, sync, |w| {
                w.write_all(&text)
                    .map_err(|e| HookError::io("writing the manifest", e))
            })?;
            Ok(Written {
                location: shown.clone(),
                sha256: hex::encode(sealed.stored().sha256),
                size: sealed.stored().bytes,
                signer: signed.map(|s| s.key_id.to_string()),
                encrypted: sealed.encrypted(),
                report,
            })
        }
    }
}

fn seal_err(source: mapsnap::trust::TrustError) -> HookError {
    HookError::Trust {
        what: "sealing the snapshot".into(),
        source,
    }
}

/// Reads a file by offset (pread), so several readers of one open file never disturb each
/// other and all read the same inode.
struct PosReader {
    file: Arc<File>,
    pos: u64,
}

impl Read for PosReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

enum Src {
    Remote {
        storage: Box<Storage>,
        version: Option<ObjectInfo>,
    },
    File(Arc<File>),
}

/// A snapshot to read, possibly several times (verify, then apply), always the same version
/// (object version, or the one open file). With a trust set, every pass is checked against
/// the signature read at open: the verify pass checks the signature itself, later passes the
/// SHA-256 and size of the bytes it verified.
pub struct Source {
    src: Src,
    expect: Option<([u8; 32], u64)>,
    name: String,
    trust: Arc<NodeTrust>,
    /// The `.minisig` beside the snapshot, when the node checks signatures.
    signature: Option<Vec<u8>>,
    /// What the last signature check established.
    verified: std::sync::Mutex<Option<mapsnap::trust::Verified>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Source {
    /// Opens `res`; `expect` is the SHA-256 and size a manifest recorded (of the stored bytes).
    /// With a trust set in `trust`, the signature beside the snapshot is read now.
    pub fn open(
        res: &Resolved,
        storage: &StorageConfig,
        expect: Option<([u8; 32], u64)>,
        trust: &Arc<NodeTrust>,
    ) -> Result<Self> {
        let mut me = match res {
            Resolved::Remote(u) => {
                let st = Storage::open(Location::parse(u)?, storage)?;
                let version = st.head()?;
                if version.is_none() {
                    return Err(HookError::Other(format!(
                        "snapshot {} does not exist",
                        st.name()
                    )));
                }
                Self {
                    name: st.name().to_string(),
                    src: Src::Remote {
                        storage: Box::new(st),
                        version,
                    },
                    expect,
                    trust: trust.clone(),
                    signature: None,
                    verified: Default::default(),
                }
            }
            Resolved::File { dir, rel, shown } => {
                let f = dir.open_file(rel, MAX_LOCAL_SNAPSHOT).map_err(|e| {
                    if e.is_not_found() {
                        HookError::Other(format!("snapshot {shown} does not exist"))
                    } else {
                        e.into()
                    }
                })?;
                Self {
                    name: shown.clone(),
                    src: Src::File(Arc::new(f)),
                    expect,
                    trust: trust.clone(),
                    signature: None,
                    verified: Default::default(),
                }
            }
        };
        if trust.verifies() {
            me.signature = read_signature(res, storage)?;
        }
        Ok(me)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn raw_reader(&self) -> Result<Box<dyn Read + Send>> {
        Ok(match &self.src {
            Src::Remote { storage, version } => storage.reader(version.as_ref())?,
            Src::File(f) => Box::new(PosReader {
                file: f.clone(),
                pos: 0,
            }),
        })
    }

    /// One pass over the snapshot's plaintext, checked as [`Source`] says.
    /// `expect` (from a manifest) describes the stored bytes, as the storage manifest does.
    fn opened(&self, check: Check) -> Result<crate::seal::Opened> {
        let raw = self.raw_reader()?;
        let raw: Box<dyn Read + Send> = match self.expect {
            Some((sha, size)) => Box::new(DigestCheck::new(raw, &self.name, sha, size)),
            None => raw,
        };
        self.trust.open(raw, check, &self.name)
    }

    /// The plaintext for an applying pass: bound to the bytes the last [`Self::verify`]
    /// checked the signature of (so call that first when the node checks signatures).
    pub fn reader(&self) -> Result<Box<dyn Read + Send>> {
        let check = if self.trust.verifies() {
            let v = self
                .verified
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .ok_or_else(|| {
                    HookError::Other(format!(
                        "snapshot {}: read before its signature was verified",
                        self.name
                    ))
                })?;
            Check::Bound {
                sha256: v.sha256,
                size: v.size,
            }
        } else {
            Check::None
        };
        Ok(Box::new(OpenedReader(self.opened(check)?)))
    }

    /// Checks the signature (with a trust set), then every CRC, the trailer and the
    /// structure (and the manifest's digest), in one pass; the signature's verdict comes
    /// after the whole stored stream was read, before anything is created or changed.
    pub fn verify(&self) -> Result<VerifySummary> {
        let check = self
            .trust
            .verifier(self.signature.as_deref(), &self.name)?
            .map_or(Check::None, |v| Check::Verify(Box::new(v)));
        let mut opened = self.opened(check)?;
        let summary = match verify(opened.reader()) {
            Ok(s) => s,
            Err(e) => {
                let failed = HookError::Snapshot {
                    location: self.name.clone(),
                    source: e,
                };
                return Err(opened.refuted().unwrap_or(failed));
            }
        };
        if let Some(v) = opened.finish()? {
            tracing::info!(
                snapshot = crate::location::truncate(&self.name, 256),
                key_id = %v.key_id,
                "signature verified"
            );
            if let Ok(mut g) = self.verified.lock() {
                *g = Some(v);
            }
        }
        Ok(summary)
    }

    /// The key id that signed the snapshot, once [`Self::verify`] checked it.
    pub fn signer(&self) -> Option<mapsnap::trust::KeyId> {
        self.verified
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|v| v.key_id))
    }
}

/// An applying pass: its end is checked when the consumer reaches it (the consumer reads to
/// the trailer; the digest checks fail before handing on the last byte of other bytes).
struct OpenedReader(crate::seal::Opened);

impl Read for OpenedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.reader().read(buf)
    }
}

/// The `.minisig` beside a snapshot, None when there is none.
fn read_signature(res: &Resolved, storage: &StorageConfig) -> Result<Option<Vec<u8>>> {
    match res {
        Resolved::Remote(u) => {
            let st = Storage::open(Location::parse(&format!("{u}{SIGNATURE_SUFFIX}"))?, storage)?;
            if st.head()?.is_none() {
                return Ok(None);
            }
            let mut buf = Vec::new();
            st.reader(None)?
                .take(MAX_SIGNATURE_BYTES + 1)
                .read_to_end(&mut buf)
                .map_err(|e| HookError::io(format!("reading {}", st.name()), e))?;
            if buf.len() as u64 > MAX_SIGNATURE_BYTES {
                return Err(HookError::refused(
                    st.name().to_string(),
                    format!("larger than {MAX_SIGNATURE_BYTES} bytes: not a signature"),
                ));
            }
            Ok(Some(buf))
        }
        Resolved::File { dir, rel, shown } => {
            let sig = RelPath::parse(&format!("{rel}{SIGNATURE_SUFFIX}"))
                .map_err(|e| HookError::refused(format!("snapshot {shown}"), e.reason))?;
            match dir.read_file(&sig, MAX_SIGNATURE_BYTES) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// The snapshot pin path of each top-level map (as restore computes it).
fn top_level_pins(summary: &VerifySummary) -> Vec<String> {
    summary
        .maps
        .iter()
        .enumerate()
        .filter(|(_, (m, _))| !m.inner)
        .map(|(i, (m, _))| match &m.pin_path {
            Some(p) => p.clone(),
            None if !m.name.is_empty() => m.name.clone(),
            None => format!("map_{i}"),
        })
        .collect()
}

/// Maps every top-level pin path to its mount and path below it, in snapshot order; any
/// refusal (or two maps for one pin) refuses all.
pub fn resolve_pins(
    summary: &VerifySummary,
    mounts: &ContainerMounts,
) -> Result<Vec<(String, Target)>> {
    let mut out: Vec<(String, Target)> = Vec::new();
    let mut seen = HashSet::new();
    for pin in top_level_pins(summary) {
        let t = mounts.pin_target(&pin)?;
        if !seen.insert(t.container_path()) {
            return Err(HookError::refused(
                format!("pin path {:?}", truncate(&pin, 256)),
                "the snapshot holds two maps for it",
            ));
        }
        out.push((pin, t));
    }
    Ok(out)
}

/// What a pin restore did.
#[derive(Debug, Clone)]
pub enum PinOutcome {
    Restored(Vec<RestoredMap>),
    /// Every pin existed and `existing = keep`.
    Kept(usize),
}

/// Restores the snapshot as new maps pinned in the container's bpffs mounts, published only
/// after the whole snapshot verified; a failure removes whatever this run staged or
/// published, so a retry starts from the same state.
/// `conv`: timestamps to rebase to this host's clocks (`mapsnap.io/rebase`).
pub fn restore_pins(
    src: &Source,
    mounts: &ContainerMounts,
    existing: Existing,
    state_dir: &Path,
    conv: Option<RestoreConversion>,
) -> Result<PinOutcome> {
    let summary = src.verify()?;
    let targets = resolve_pins(&summary, mounts)?;
    let journal = Journal::new(state_dir, &summary.digest.sha256_hex(), &targets);
    // A run killed between its renames left some pins published: take them back (only those
    // still holding the maps it created), so this run starts from the state before it.
    journal.undo(mounts);
    // Temporary pins a run killed mid-publish left behind would only confuse retries.
    for (_, t) in &targets {
        if let Some((parent, _)) = t.rel.split_leaf()
            && let Ok(dir) = t.mount.anchor.open_dir(&parent)
        {
            clear_stale_temps(&dir, std::process::id());
        }
    }
    let mut present = Vec::new();
    for (_, t) in &targets {
        if t.mount.anchor.exists(&t.rel).map_err(anchor_err)? {
            present.push(t.container_path());
        }
    }
    if !present.is_empty() {
        match existing {
            Existing::Fail => {
                return Err(HookError::refused(
                    format!("restore from {}", src.name()),
                    format!(
                        "{} already exists (set mapsnap.io/existing to keep or overwrite)",
                        present[0]
                    ),
                ));
            }
            Existing::Keep if present.len() == targets.len() => {
                return Ok(PinOutcome::Kept(present.len()));
            }
            Existing::Keep => {
                return Err(HookError::refused(
                    format!("restore from {}", src.name()),
                    format!(
                        "{} of {} pins exist ({} among them): keep needs all or none",
                        present.len(),
                        targets.len(),
                        present[0]
                    ),
                ));
            }
            Existing::Overwrite => {}
        }
    }
    let report = restore(
        src.reader()?,
        Some(&summary),
        &Destination::Detached,
        &RestoreOptions {
            convert: conv,
            ..RestoreOptions::default()
        },
        &NoProgress,
    )?;
    if report.detached.len() != targets.len() {
        return Err(HookError::Other(format!(
            "the restore created {} maps for {} pins",
            report.detached.len(),
            targets.len()
        )));
    }
    publish(
        &targets,
        &report.detached,
        existing == Existing::Overwrite,
        &journal,
    )?;
    let maps = report
        .maps
        .into_iter()
        .zip(&targets)
        .map(|(mut m, (_, t))| {
            m.target = t.container_path();
            m
        })
        .collect();
    Ok(PinOutcome::Restored(maps))
}

struct Staged {
    dir: Anchor,
    tmp: String,
    leaf: String,
    id: u32,
}

fn cancelled_err() -> HookError {
    HookError::Other("the deadline passed while publishing: rolled back".into())
}

/// Whether `name` in `dir` is (still) the map `id`.
fn is_our_pin(dir: &Anchor, name: &str, id: u32) -> bool {
    RelPath::parse(name)
        .ok()
        .and_then(|r| dir.open_map(&r).ok())
        .and_then(|m| m.info().ok())
        .is_some_and(|i| i.id == id)
}

/// Pins each map under a temporary name in its directory (by fd), checks it, then renames
/// them into place; any failure removes the temporary pins and, when nothing was replaced,
/// the pins this run already published.
fn publish(
    targets: &[(String, Target)],
    maps: &[Map],
    overwrite: bool,
    journal: &Journal,
) -> Result<()> {
    let pid = std::process::id();
    let mut staged: Vec<Staged> = Vec::new();
    let stage = (|| {
        for (i, ((_, t), map)) in targets.iter().zip(maps).enumerate() {
            let (parent, leaf) = t.rel.split_leaf().ok_or_else(|| {
                HookError::refused(t.container_path(), "it names the mount point")
            })?;
            let dir = t
                .mount
                .anchor
                .create_dir_all(&parent, 0o755)
                .map_err(anchor_err)?;
            if !dir.is_bpffs() {
                return Err(HookError::refused(
                    t.container_path(),
                    "it is not in a bpffs",
                ));
            }
            let tmp = format!("{TMP_PIN_PREFIX}{pid}_{i}");
            let id = map.info().map_err(mapsnap::Error::from)?.id;
            dir.pin_map(map, &tmp).map_err(mapsnap::Error::from)?;
            staged.push(Staged {
                dir,
                tmp: tmp.clone(),
                leaf: leaf.to_string(),
                id,
            });
            let s = staged.last().ok_or_else(cancelled_err)?;
            if !is_our_pin(&s.dir, &tmp, id) {
                return Err(HookError::refused(
                    t.container_path(),
                    "the map pinned under the temporary name is not the one restored",
                ));
            }
            if cancelled() {
                return Err(cancelled_err());
            }
        }
        Ok(())
    })();
    if let Err(e) = stage {
        for s in &staged {
            let _ = s.dir.unlink(&s.tmp);
        }
        return Err(e);
    }
    // Before the first rename: what a retry must take back if this run dies half-way
    // (nothing was replaced only without overwrite; with it there is no old state to return to).
    if !overwrite && let Err(e) = journal.write(targets, &staged) {
        for s in &staged {
            let _ = s.dir.unlink(&s.tmp);
        }
        return Err(e);
    }
    for (n, s) in staged.iter().enumerate() {
        let r = if cancelled() {
            Err(cancelled_err())
        } else {
            s.dir.rename(&s.tmp, &s.leaf, overwrite).map_err(anchor_err)
        };
        if let Err(e) = r {
            for later in &staged[n..] {
                let _ = later.dir.unlink(&later.tmp);
            }
            if !overwrite {
                for done in &staged[..n] {
                    if is_our_pin(&done.dir, &done.leaf, done.id) {
                        let _ = done.dir.unlink(&done.leaf);
                    }
                }
            }
            journal.remove();
            return Err(e);
        }
    }
    journal.remove();
    Ok(())
}

/// The pins one publish is about to rename into place, in the hook's state directory (node
/// config): `publish-<key>.json`, keyed by the snapshot's digest and the mounts' sources.
struct Journal {
    path: std::path::PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct JournalEntry {
    /// The pin's container path (`/sys/fs/bpf/app/x`).
    pin: String,
    map_id: u32,
}

/// FNV-1a: a stable short key for file names (not a security boundary: the journal is
/// only ever acted on for pins still holding the map ids it lists).
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0u8]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

impl Journal {
    fn new(state_dir: &Path, sha: &str, targets: &[(String, Target)]) -> Self {
        let mut parts: Vec<&[u8]> = vec![sha.as_bytes()];
        for (_, t) in targets {
            parts.push(t.mount.source.as_os_str().as_encoded_bytes());
        }
        Self {
            path: state_dir.join(format!("publish-{:016x}.json", fnv64(&parts))),
        }
    }

    fn write(&self, targets: &[(String, Target)], staged: &[Staged]) -> Result<()> {
        let entries: Vec<JournalEntry> = targets
            .iter()
            .zip(staged)
            .map(|((_, t), s)| JournalEntry {
                pin: t.container_path(),
                map_id: s.id,
            })
            .collect();
        let text = serde_json::to_vec(&entries)
            .map_err(|e| HookError::Other(format!("encoding the publish journal: {e}")))?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| HookError::io("creating the hook's state directory", e))?;
        }
        crate::manifest::write_atomic(&self.path, &text)
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Removes the pins a killed run published (those still holding its map ids), and the
    /// temporary file of a journal it was killed while writing.
    fn undo(&self, mounts: &ContainerMounts) {
        if let (Some(dir), Some(stem)) = (
            self.path.parent(),
            self.path.file_stem().and_then(|s| s.to_str()),
        ) && let Ok(entries) = std::fs::read_dir(dir)
        {
            let tmp = format!("{stem}.tmp");
            for e in entries.flatten() {
                if e.file_name().to_str().is_some_and(|n| n.starts_with(&tmp)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let Ok(bytes) = std::fs::read(&self.path) else {
            return;
        };
        let entries: Vec<JournalEntry> = serde_json::from_slice(&bytes).unwrap_or_default();
        for e in entries {
            let Some(rel) = e.pin.strip_prefix('/') else {
                continue;
            };
            let Ok(t) = mounts.pin_target(rel) else {
                continue;
            };
            let Some((parent, leaf)) = t.rel.split_leaf() else {
                continue;
            };
            if let Ok(dir) = t.mount.anchor.open_dir(&parent)
                && is_our_pin(&dir, leaf, e.map_id)
            {
                tracing::warn!(
                    pin = e.pin,
                    "removing a pin an interrupted restore published"
                );
                let _ = dir.unlink(leaf);
            }
        }
        self.remove();
    }
}

/// Removes temporary pins an earlier, interrupted restore left in `dir` (other pids' names).
fn clear_stale_temps(dir: &Anchor, pid: u32) {
    let own = format!("{TMP_PIN_PREFIX}{pid}_");
    let Ok(entries) = dir.entries() else { return };
    for e in entries {
        if e.name.starts_with(TMP_PIN_PREFIX)
            && !e.name.starts_with(&own)
            && e.kind != EntryKind::Dir
        {
            let _ = dir.unlink(&e.name);
        }
    }
}

/// Opens the map pinned at `t` through the mount's fd, twice, and keeps it only when both
/// opens found the same map: the pin is the app's own, stable one.
fn open_confirmed(t: &Target) -> std::result::Result<Map, String> {
    let a = t.mount.anchor.open_map(&t.rel).map_err(|e| short(&e))?;
    let b = t.mount.anchor.open_map(&t.rel).map_err(|e| short(&e))?;
    let ia = a.info().map_err(|e| short(&e))?.id;
    let ib = b.info().map_err(|e| short(&e))?.id;
    if ia != ib {
        return Err("the pin changed while it was opened".into());
    }
    Ok(a)
}

/// The reason of a failed open, without sizes or host paths.
fn short(e: &mapsnap::sys::SysError) -> String {
    match e.errno() {
        Some(libc::ELOOP) => "it is a symbolic link".into(),
        Some(libc::EXDEV) => "it leaves the mount".into(),
        Some(libc::ENOENT) => "it does not exist yet".into(),
        Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
        None => "it is not a BPF map".into(),
    }
}

/// Waits (until `deadline`) for the app to pin every map the snapshot has, then fills them.
/// Each pin is opened through the mount's fd (a link swapped in is refused, never followed).
/// `conv`: timestamps to rebase to this host's clocks (`mapsnap.io/rebase`).
pub fn fill_pins(
    src: &Source,
    mounts: &ContainerMounts,
    mode: FillMode,
    deadline: Instant,
    conv: Option<RestoreConversion>,
) -> Result<Vec<RestoredMap>> {
    let summary = src.verify()?;
    let targets = resolve_pins(&summary, mounts)?;
    let mut into = Vec::new();
    for (pin, t) in &targets {
        let map = loop {
            match open_confirmed(t) {
                Ok(m) => break m,
                Err(reason) => {
                    if Instant::now() >= deadline {
                        return Err(HookError::Other(format!(
                            "the app did not pin {} in time ({reason})",
                            t.container_path()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        into.push(IntoTarget {
            select: Some(pin.clone()),
            map,
        });
    }
    let report = restore(
        src.reader()?,
        Some(&summary),
        &Destination::Into(into),
        &RestoreOptions {
            mode,
            convert: conv,
            ..RestoreOptions::default()
        },
        &NoProgress,
    )?;
    Ok(report.maps)
}
