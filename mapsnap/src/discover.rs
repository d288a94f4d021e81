//! Finding maps: by id, by pin (file or bpffs directory), by process, by container.
//!
//! Every source resolves to open maps de-duplicated by kernel map id, each remembering the pin
//! path it was found under (relative to the directory that was searched) and its frozen state.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::anchor::{Anchor, AnchorError, EntryKind, RelPath};
use crate::sys::{self, Map, MapInfo, ObjKind, SysError};

/// Where to look for maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Every map loaded in the kernel.
    All,
    Id(u32),
    /// A pinned map, or a bpffs directory searched recursively.
    Pin(PathBuf),
    /// The maps a process holds by fd.
    Pid(u32),
    /// The maps held by every process of the container whose init process this is.
    ContainerPid(u32),
}

/// One map found, open.
#[derive(Debug)]
pub struct Found {
    pub map: Map,
    pub info: MapInfo,
    pub frozen: bool,
    /// Pin path relative to the searched directory (the file name for a single pin).
    pub pin_rel: Option<String>,
    /// Absolute pin path, when found through a pin.
    pub pin_abs: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("cannot read {path}: {source}")]
    Proc { path: String, source: io::Error },
    #[error("{path} does not exist: give a pinned map or a directory in a mounted bpffs")]
    NoSuchPin { path: PathBuf },
    #[error("process {pid} does not exist (or /proc is not mounted)")]
    NoSuchProcess { pid: u32 },
}

type Result<T> = std::result::Result<T, DiscoverError>;

/// Resolves every source and de-duplicates by map id (the first pin path found is kept).
pub fn find(sources: &[Source]) -> Result<Vec<Found>> {
    let mut by_id: BTreeMap<u32, Found> = BTreeMap::new();
    let mut add = |f: Found| match by_id.get_mut(&f.info.id) {
        // Found again through a pin: keep the pin path it was missing.
        Some(seen) if seen.pin_rel.is_none() && f.pin_rel.is_some() => {
            seen.pin_rel = f.pin_rel;
            seen.pin_abs = f.pin_abs;
        }
        Some(_) => {}
        None => {
            by_id.insert(f.info.id, f);
        }
    };
    for source in sources {
        match source {
            Source::All => {
                for id in sys::loaded_map_ids()? {
                    // A map can vanish between listing and opening: skip it.
                    match Map::from_id(id) {
                        Ok(map) => add(open_found(map, None)?),
                        Err(e) if e.errno() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Source::Id(id) => add(open_found(Map::from_id(*id)?, None)?),
            Source::Pin(path) => {
                for f in find_pinned(path)? {
                    add(f);
                }
            }
            Source::Pid(pid) => {
                for id in map_ids_of_process(*pid)? {
                    add(open_found(Map::from_id(id)?, None)?);
                }
            }
            Source::ContainerPid(pid) => {
                for p in container_processes(*pid)? {
                    for id in map_ids_of_process(p)? {
                        add(open_found(Map::from_id(id)?, None)?);
                    }
                }
            }
        }
    }
    Ok(by_id.into_values().collect())
}

impl Found {
    /// Wraps a map opened elsewhere (e.g. an fd handed over by CRIU).
    pub fn from_map(map: Map, pin_rel: Option<String>) -> Result<Self> {
        let mut f = open_found(map, None)?;
        f.pin_rel = pin_rel;
        Ok(f)
    }
}

fn open_found(map: Map, pin: Option<(String, PathBuf)>) -> Result<Found> {
    let info = map.info()?;
    let frozen = map.frozen()?;
    let (pin_rel, pin_abs) = match pin {
        Some((rel, abs)) => (Some(rel), Some(abs)),
        None => (None, None),
    };
    Ok(Found {
        map,
        info,
        frozen,
        pin_rel,
        pin_abs,
    })
}

/// The most levels below the searched directory a walk descends.
pub const MAX_WALK_DEPTH: usize = 16;

/// The most directory entries one walk looks at (maps, directories, anything else).
pub const MAX_WALK_ENTRIES: usize = 100_000;

/// Maps pinned at `path` (a pin) or below it (a directory, recursively; programs and links
/// pinned there are skipped). Relative paths use `/` and never contain `..`.
///
/// `path` itself is trusted (given by the administrator or the node's configuration); below
/// it everything goes through [`Anchor`]: each directory is opened from its parent's fd
/// without following links, and each map with `BPF_OBJ_GET` on the inode that was opened, so
/// a writer on a shared bpffs who swaps a name for a link cannot bring a foreign map in.
pub fn find_pinned(path: &Path) -> Result<Vec<Found>> {
    match Anchor::open_trusted(path, path.display().to_string()) {
        Ok(dir) => {
            let mut out = Vec::new();
            walk_anchor(&dir, path, &RelPath::root(), &mut out, &mut 0)?;
            Ok(out)
        }
        Err(e) if e.is_not_found() => Err(DiscoverError::NoSuchPin {
            path: path.to_path_buf(),
        }),
        Err(e) if e.errno() == Some(libc::ENOTDIR) => {
            // A single pin: its directory is trusted like the path, the leaf is not followed.
            let (parent, name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
                (Some(p), Some(n)) => (
                    if p.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        p
                    },
                    n,
                ),
                _ => {
                    return Err(DiscoverError::Proc {
                        path: path.display().to_string(),
                        source: io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "the pin name is not valid UTF-8",
                        ),
                    });
                }
            };
            let dir =
                Anchor::open_trusted(parent, parent.display().to_string()).map_err(anchor_err)?;
            let rel = RelPath::parse(name).map_err(|e| DiscoverError::Proc {
                path: path.display().to_string(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
            let map = dir.open_map(&rel)?;
            Ok(vec![open_found(
                map,
                Some((name.to_string(), path.to_path_buf())),
            )?])
        }
        Err(e) => Err(anchor_err(e)),
    }
}

/// Maps pinned below an already open directory (the OCI hook's anchored bpffs mounts).
/// `shown` is how absolute pin paths are reported (`pin_abs`).
pub fn find_pinned_at(dir: &Anchor, shown: &Path) -> Result<Vec<Found>> {
    let mut out = Vec::new();
    walk_anchor(dir, shown, &RelPath::root(), &mut out, &mut 0)?;
    Ok(out)
}

fn anchor_err(e: AnchorError) -> DiscoverError {
    DiscoverError::Proc {
        path: if e.path.is_empty() {
            e.anchor.clone()
        } else {
            format!("{}/{}", e.anchor, e.path)
        },
        source: io::Error::new(e.source.kind(), e.to_string()),
    }
}

/// Whether an error means the name changed under us (became a link, or vanished): such an
/// entry is skipped, never followed.
fn swapped(errno: Option<i32>) -> bool {
    matches!(
        errno,
        Some(libc::ELOOP) | Some(libc::ENOENT) | Some(libc::EXDEV)
    )
}

fn walk_anchor(
    dir: &Anchor,
    shown: &Path,
    rel: &RelPath,
    out: &mut Vec<Found>,
    seen: &mut usize,
) -> Result<()> {
    if rel.components().len() > MAX_WALK_DEPTH {
        return Err(DiscoverError::Proc {
            path: shown.join(rel.as_string()).display().to_string(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the bpffs tree is nested more than {MAX_WALK_DEPTH} levels deep"),
            ),
        });
    }
    for entry in dir.entries().map_err(anchor_err)? {
        *seen += 1;
        if *seen > MAX_WALK_ENTRIES {
            return Err(DiscoverError::Proc {
                path: shown.display().to_string(),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("more than {MAX_WALK_ENTRIES} entries below it"),
                ),
            });
        }
        let child = rel.join(&entry.name).map_err(|e| DiscoverError::Proc {
            path: shown.join(rel.as_string()).display().to_string(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        let leaf = RelPath::parse(&entry.name).map_err(|e| DiscoverError::Proc {
            path: shown.join(rel.as_string()).display().to_string(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        match entry.kind {
            // Never followed: a link may point anywhere on the host.
            EntryKind::Symlink => continue,
            EntryKind::Dir => match dir.open_dir(&leaf) {
                Ok(sub) => walk_anchor(&sub, shown, &child, out, seen)?,
                Err(e) if swapped(e.errno()) => {
                    tracing::warn!(path = %child, "skipped: it changed while being read");
                }
                Err(e) => return Err(anchor_err(e)),
            },
            EntryKind::File | EntryKind::Other => match dir.open_map(&leaf) {
                Ok(map) => {
                    let abs = shown.join(child.as_string());
                    out.push(open_found(map, Some((child.as_string(), abs)))?);
                }
                // A pinned program or link: not ours to dump.
                Err(e) if e.source.kind() == io::ErrorKind::InvalidInput => {}
                Err(e) if swapped(e.errno()) => {
                    tracing::warn!(path = %child, "skipped: it changed while being read");
                }
                Err(e) => return Err(e.into()),
            },
        }
    }
    Ok(())
}

/// Ids of the maps process `pid` holds by fd, from `/proc/PID/fd` and `fdinfo`.
pub fn map_ids_of_process(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => DiscoverError::NoSuchProcess { pid },
        _ => DiscoverError::Proc {
            path: dir.clone(),
            source: e,
        },
    })?;
    let mut ids = Vec::new();
    for entry in entries.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // closed meanwhile
        };
        if sys::kind_from_link(&target.to_string_lossy()) != ObjKind::Map {
            continue;
        }
        let fdinfo = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(text) = std::fs::read_to_string(&fdinfo) else {
            continue;
        };
        if let Some(id) = sys::fdinfo_field(&text, "map_id").and_then(|v| v.parse().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Every process of the container whose init process is `init`: those sharing its pid
/// namespace, or, when it runs in the host's pid namespace, its cgroup.
pub fn container_processes(init: u32) -> Result<Vec<u32>> {
    let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let init_ns = ns(init).ok_or(DiscoverError::NoSuchProcess { pid: init })?;
    let host_ns = ns(1);
    let cgroup = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok();
    let init_cgroup = cgroup(init);
    let by_ns = host_ns.as_ref() != Some(&init_ns);
    let mut pids = Vec::new();
    let proc = std::fs::read_dir("/proc").map_err(|e| DiscoverError::Proc {
        path: "/proc".into(),
        source: e,
    })?;
    for entry in proc.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let same = if by_ns {
            ns(pid).as_ref() == Some(&init_ns)
        } else {
            init_cgroup.is_some() && cgroup(pid) == init_cgroup
        };
        if same {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}
