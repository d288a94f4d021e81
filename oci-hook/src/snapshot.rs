//! Taking and restoring a container's pinned maps with the mapsnap library.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mapsnap::discover::{Found, find_pinned};
use mapsnap::dump::{DumpOptions, DumpReport, dump};
use mapsnap::format::{VerifySummary, verify};
use mapsnap::model::SnapshotInfo;
use mapsnap::progress::NoProgress;
use mapsnap::restore::{Destination, FillMode, IntoTarget, RestoreOptions, RestoredMap, restore};
use mapsnap::storage::{
    DigestCheck, Location, Manifest, ManifestSource, ObjectInfo, Storage, StorageConfig,
};
use mapsnap::sys::Map;

use crate::annotations::{Existing, MapFilter};
use crate::error::{HookError, Result};
use crate::location::Resolved;
use crate::mounts::ContainerMounts;

/// A symbolic link found in a container's bpffs mount: never followed, never dumped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLink {
    pub container_path: String,
    pub target: String,
}

/// The maps pinned in the container's bpffs mounts that `filter` takes, with `pin_rel`
/// rewritten to the path relative to the container's root. Links are reported, not followed.
pub fn collect_pins(
    mounts: &ContainerMounts,
    filter: &MapFilter,
) -> Result<(Vec<Found>, Vec<SkippedLink>)> {
    for (pattern, literal) in filter.literal_prefixes() {
        mounts.check_filter_dir(pattern, literal)?;
    }
    let mut out = Vec::new();
    let mut links = Vec::new();
    let mut seen = HashSet::new();
    for m in mounts.bpf() {
        find_links(&m.source, &m.destination(), &mut links);
        for mut f in find_pinned(&m.source).map_err(mapsnap::Error::from)? {
            let Some(rel) = f.pin_rel.take() else {
                continue;
            };
            let container_path = format!("{}/{rel}", m.destination());
            if !filter.matches(&container_path) {
                tracing::debug!(pin = container_path, "not selected by mapsnap.io/maps");
                continue;
            }
            if !seen.insert(f.info.id) {
                continue; // the same map under two mounts
            }
            f.pin_rel = Some(format!("{}/{rel}", m.dest_rel()));
            out.push(f);
        }
    }
    for l in &links {
        tracing::warn!(
            link = l.container_path,
            target = l.target,
            "refused: symbolic link in the container's bpffs mount (it may point at maps \
             outside the container's mounts); not followed, not saved"
        );
    }
    Ok((out, links))
}

fn find_links(dir: &std::path::Path, container_dir: &str, out: &mut Vec<SkippedLink>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        let cpath = format!("{container_dir}/{name}");
        if ft.is_symlink() {
            let target = std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            out.push(SkippedLink {
                container_path: cpath,
                target,
            });
        } else if ft.is_dir() {
            find_links(&e.path(), &cpath, out);
        }
    }
}

/// A finished snapshot.
#[derive(Debug, Clone)]
pub struct Written {
    pub location: String,
    pub sha256: String,
    pub size: u64,
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

/// Dumps `maps` to `dest` (with the storage layer's manifest beside it).
pub fn write_snapshot(
    maps: &[Found],
    dest: &Resolved,
    overwrite: bool,
    source: &str,
    container_id: &str,
    storage: &StorageConfig,
) -> Result<Written> {
    let location = match dest {
        Resolved::Local(p) => Location::Local(p.clone()),
        Resolved::Remote(u) => Location::parse(u)?,
    };
    let target = Storage::open(location, storage)?;
    let info = SnapshotInfo {
        tool: format!("mapsnap-hook {}", env!("CARGO_PKG_VERSION")),
        created_unix: now_unix(),
        hostname: hostname(),
        kernel: kernel(),
        possible_cpus: mapsnap::sys::possible_cpus().map_err(mapsnap::Error::from)?,
        source: source.to_string(),
    };
    let writer = target.writer(overwrite)?;
    let opts = DumpOptions {
        skip_unsupported: false,
        threads: 1,
        ..DumpOptions::default()
    };
    let (writer, report) = dump(maps, writer, &info, &opts, &NoProgress)?;
    writer.commit()?;
    let manifest = Manifest::new(
        target.name(),
        &info,
        &report,
        ManifestSource {
            container_id: Some(container_id.to_string()),
            ..ManifestSource::default()
        },
    );
    target.write_manifest(&manifest)?;
    Ok(Written {
        location: target.name().to_string(),
        sha256: report.digest.sha256_hex(),
        size: report.digest.bytes,
        report,
    })
}

/// A snapshot to read, possibly several times (verify, then apply), always the same version.
pub struct Source {
    storage: Storage,
    version: Option<ObjectInfo>,
    expect: Option<([u8; 32], u64)>,
    name: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Source {
    /// Opens `res`; `expect` is the SHA-256 and size a manifest recorded.
    pub fn open(
        res: &Resolved,
        storage: &StorageConfig,
        expect: Option<([u8; 32], u64)>,
    ) -> Result<Self> {
        let location = match res {
            Resolved::Local(p) => Location::Local(p.clone()),
            Resolved::Remote(u) => Location::parse(u)?,
        };
        let st = Storage::open(location, storage)?;
        let version = st.head()?;
        if version.is_none() {
            return Err(HookError::Other(format!(
                "snapshot {} does not exist",
                st.name()
            )));
        }
        Ok(Self {
            name: st.name().to_string(),
            storage: st,
            version,
            expect,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn reader(&self) -> Result<Box<dyn Read + Send>> {
        let r = self.storage.reader(self.version.as_ref())?;
        Ok(match self.expect {
            Some((sha, size)) => Box::new(DigestCheck::new(r, &self.name, sha, size)),
            None => r,
        })
    }

    /// Checks every CRC, the trailer and the structure (and the manifest's digest).
    pub fn verify(&self) -> Result<VerifySummary> {
        verify(self.reader()?).map_err(|e| HookError::Snapshot {
            location: self.name.clone(),
            source: e,
        })
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

/// Maps every top-level pin path to its host path; any refusal refuses all.
pub fn resolve_pins(
    summary: &VerifySummary,
    mounts: &ContainerMounts,
) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for pin in top_level_pins(summary) {
        let host = mounts.pin_to_host(&pin)?;
        out.insert(pin, host);
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
/// after the whole snapshot verified.
pub fn restore_pins(
    src: &Source,
    mounts: &ContainerMounts,
    existing: Existing,
) -> Result<PinOutcome> {
    let summary = src.verify()?;
    let targets = resolve_pins(&summary, mounts)?;
    let present: Vec<&PathBuf> = targets.values().filter(|p| p.exists()).collect();
    if !present.is_empty() {
        match existing {
            Existing::Fail => {
                return Err(HookError::refused(
                    format!("restore from {}", src.name()),
                    format!(
                        "{} already exists (set mapsnap.io/existing to keep or overwrite)",
                        present[0].display()
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
                        present[0].display()
                    ),
                ));
            }
            Existing::Overwrite => {}
        }
    }
    for host in targets.values() {
        mounts.make_parent_dirs(host)?;
    }
    let table = targets.clone();
    let resolve: mapsnap::restore::PinResolver = Box::new(move |pin: &str| {
        table
            .get(pin)
            .cloned()
            .ok_or_else(|| mapsnap::Error::UnsafePinPath {
                path: pin.to_string(),
                reason: "it was not checked by mapsnap-hook",
            })
    });
    let dest = Destination::PinMapped {
        resolve,
        overwrite: existing == Existing::Overwrite,
    };
    let report = restore(
        src.reader()?,
        Some(&summary),
        &dest,
        &RestoreOptions::default(),
        &NoProgress,
    )?;
    Ok(PinOutcome::Restored(report.maps))
}

/// Waits (until `deadline`) for the app to pin every map the snapshot has, then fills them.
pub fn fill_pins(
    src: &Source,
    mounts: &ContainerMounts,
    mode: FillMode,
    deadline: Instant,
) -> Result<Vec<RestoredMap>> {
    let summary = src.verify()?;
    let targets = resolve_pins(&summary, mounts)?;
    let mut into = Vec::new();
    for (pin, host) in &targets {
        let map = loop {
            match Map::from_pin(host) {
                Ok(m) => break m,
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(HookError::Other(format!(
                            "the app did not pin {} in time (waited for {pin}): {e}",
                            host.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        // Re-check after the wait: the pin must still be where the checks said.
        mounts.pin_to_host(pin)?;
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
            ..RestoreOptions::default()
        },
        &NoProgress,
    )?;
    Ok(report.maps)
}
