//! What the plugin writes into CRIU's image directory, beside CRIU's own `*.img` files, and
//! how it reads it back without trusting it.
//!
//! ```text
//! mapsnap-map-<map id>.snap   one mapsnap snapshot per distinct kernel map (its metadata,
//!                             BTF, entries, and for maps of maps its inner maps)
//! mapsnap-criu.json           the dump's index: a dump id, one record per CRIU file (an open
//!                             file description holding a map: which map, the fd's access
//!                             mode) and the size and sha256 of every snapshot
//! ```
//!
//! The index is written last, when CRIU ends a successful dump (`exit(DUMP, 0)`), and
//! removed when a dump starts: it is the commit point. A dump that failed, or an image
//! directory reused by a later dump, never leaves an index that names files of another dump,
//! and a snapshot is only used when its size and sha256 are the ones the index records.
//!
//! Every file is opened below the image directory's fd (`mapsnap::anchor`: openat2 with
//! RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
//! O_NOFOLLOW | O_NONBLOCK), must be a regular file, and its size is checked against a limit
//! before anything is allocated or read.
//!
//! CRIU gives every open file description an id (`fd`s made by `dup` or inherited through
//! `fork` share it, so they reach the plugin once). Two separate opens of one map (two
//! `BPF_MAP_GET_FD_BY_ID` calls, or fds of several processes) are two CRIU files with one
//! kernel map id: they get two records naming the same snapshot, and are restored as one map.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};

use mapsnap::anchor::{Anchor, EntryKind, RelPath};
use serde::{Deserialize, Serialize};

use crate::error::PluginError;

/// The `format` field of the index.
pub const INDEX_FORMAT: &str = "mapsnap-criu/2";
/// The index's file name.
pub const INDEX_NAME: &str = "mapsnap-criu.json";
/// The most CRIU files (and so snapshots) one index may list.
pub const MAX_FILES: usize = 65_536;

const SNAPSHOT_PREFIX: &str = "mapsnap-map-";
const SNAPSHOT_SUFFIX: &str = ".snap";
/// Files of the first format (one record per file, no sha256, no dump id): never read,
/// removed when a dump starts.
const OLD_RECORD_PREFIX: &str = "mapsnap-fd-";
/// Files being written (no dot: nothing else matches `*.snap` or `*.json` meanwhile).
pub const TMP_PREFIX: &str = "mapsnap-tmp-";

/// How an fd may use its map, from its open flags (`O_ACCMODE` of `f_flags`): what
/// `BPF_F_RDONLY` / `BPF_F_WRONLY` gave it when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    ReadWrite,
    ReadOnly,
    WriteOnly,
}

impl Access {
    /// From the `flags:` value of `/proc/PID/fdinfo/FD` (octal `f_flags`).
    pub fn from_open_flags(flags: u32) -> Self {
        match flags & libc::O_ACCMODE as u32 {
            f if f == libc::O_RDONLY as u32 => Self::ReadOnly,
            f if f == libc::O_WRONLY as u32 => Self::WriteOnly,
            _ => Self::ReadWrite,
        }
    }

    /// The `open_flags` of `BPF_MAP_GET_FD_BY_ID` that give an fd this access.
    pub fn bpf_open_flags(self) -> u32 {
        match self {
            Self::ReadWrite => 0,
            Self::ReadOnly => 1 << 3,  // BPF_F_RDONLY
            Self::WriteOnly => 1 << 4, // BPF_F_WRONLY
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ReadWrite => "read-write",
            Self::ReadOnly => "read-only",
            Self::WriteOnly => "write-only",
        })
    }
}

/// One CRIU file that is a BPF map fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecord {
    /// CRIU's file id (the argument of `DUMP_EXT_FILE` / `RESTORE_EXT_FILE`).
    pub file_id: u32,
    /// Kernel map id at dump time: the identity shared by every fd of the map.
    pub map_id: u32,
    pub access: Access,
    /// For messages: the map's name and type at dump time.
    pub map_name: String,
    pub map_type: String,
}

/// One snapshot file of the dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    /// Kernel map id at dump time; the file is `mapsnap-map-<map_id>.snap`.
    pub map_id: u32,
    /// File length in bytes.
    pub size: u64,
    /// sha256 of the whole file, 64 lowercase hex digits. Mandatory: a snapshot is never
    /// used unchecked.
    pub sha256: String,
}

impl SnapshotRecord {
    pub fn name(&self) -> String {
        snapshot_name(self.map_id)
    }

    pub fn sha256_bytes(&self) -> Result<[u8; 32], String> {
        let raw = hex::decode(&self.sha256).map_err(|e| format!("sha256: {e}"))?;
        raw.try_into()
            .map_err(|_| "sha256: not 32 bytes".to_string())
    }
}

/// The index of one dump (`mapsnap-criu.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpIndex {
    /// Always [`INDEX_FORMAT`].
    pub format: String,
    /// Random, 32 hex digits: also in every snapshot's `source`, binding it to this dump.
    pub dump_id: String,
    pub created_unix: u64,
    pub files: Vec<FileRecord>,
    pub snapshots: Vec<SnapshotRecord>,
}

impl DumpIndex {
    /// Parses and checks an index read from an image directory (at most [`MAX_FILES`] files,
    /// every field well formed, every file's map in exactly one snapshot, no duplicates).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let index: DumpIndex =
            serde_json::from_slice(bytes).map_err(|e| format!("not a valid index: {e}"))?;
        index.check()?;
        Ok(index)
    }

    pub fn check(&self) -> Result<(), String> {
        if self.format != INDEX_FORMAT {
            return Err(format!(
                "format {:?}, this plugin reads {INDEX_FORMAT:?}",
                self.format
            ));
        }
        check_dump_id(&self.dump_id)?;
        if self.files.len() > MAX_FILES || self.snapshots.len() > self.files.len() {
            return Err(format!(
                "{} files and {} snapshots: at most {MAX_FILES} files, and no more snapshots \
                 than files",
                self.files.len(),
                self.snapshots.len()
            ));
        }
        let mut snaps = BTreeSet::new();
        for s in &self.snapshots {
            if !snaps.insert(s.map_id) {
                return Err(format!("map {} has two snapshots", s.map_id));
            }
            s.sha256_bytes()?;
            if s.sha256.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err("sha256: lowercase hex expected".into());
            }
        }
        let mut files = BTreeSet::new();
        let mut used = BTreeSet::new();
        for f in &self.files {
            if !files.insert(f.file_id) {
                return Err(format!("file {:#x} is listed twice", f.file_id));
            }
            if !snaps.contains(&f.map_id) {
                return Err(format!(
                    "file {:#x} names map {}, which has no snapshot",
                    f.file_id, f.map_id
                ));
            }
            if f.map_name.len() > 64 || f.map_type.len() > 64 {
                return Err(format!("file {:#x}: map name or type too long", f.file_id));
            }
            used.insert(f.map_id);
        }
        if used.len() != snaps.len() {
            return Err("a snapshot is named by no file".into());
        }
        Ok(())
    }

    /// The snapshot record of map `map_id`.
    pub fn snapshot(&self, map_id: u32) -> Option<&SnapshotRecord> {
        self.snapshots.iter().find(|s| s.map_id == map_id)
    }

    /// The distinct maps, each with its first file (for names in messages).
    pub fn maps(&self) -> BTreeMap<u32, &FileRecord> {
        let mut out = BTreeMap::new();
        for f in &self.files {
            out.entry(f.map_id).or_insert(f);
        }
        out
    }
}

/// A dump id: 32 lowercase hex digits.
pub fn check_dump_id(id: &str) -> Result<(), String> {
    if id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(format!("dump id {id:?} is not 32 lowercase hex digits"))
    }
}

/// A fresh random dump id.
pub fn new_dump_id() -> Result<String, PluginError> {
    let mut raw = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(|e| PluginError::io("reading /dev/urandom for a dump id", e))?;
    Ok(hex::encode(raw))
}

/// File name of the snapshot of kernel map `map_id`.
pub fn snapshot_name(map_id: u32) -> String {
    format!("{SNAPSHOT_PREFIX}{map_id}{SNAPSHOT_SUFFIX}")
}

fn leaf(name: &str) -> Result<RelPath, PluginError> {
    RelPath::parse(name).map_err(|e| PluginError::Image {
        file: name.to_string(),
        reason: e.to_string(),
    })
}

/// Writes `name` in `dir` through a temporary file renamed into place, so a half-written
/// file never carries the final name. Not fsynced: this runs inside CRIU's freeze, CRIU does
/// not sync its own images either, and the runtime archives the directory once CRIU is done.
pub fn write_atomically<T>(
    dir: &Anchor,
    name: &str,
    write: impl FnOnce(&mut io::BufWriter<std::fs::File>) -> Result<T, PluginError>,
) -> Result<T, PluginError> {
    let (file, tmp) = dir.create_temp(TMP_PREFIX, 0o600)?;
    let mut w = io::BufWriter::new(file);
    let result = write(&mut w).and_then(|value| {
        w.into_inner()
            .map_err(|e| PluginError::io(format!("writing {name}"), e.into_error()))?;
        Ok(value)
    });
    match result.and_then(|v| dir.rename(&tmp, name, true).map(|()| v).map_err(Into::into)) {
        Ok(value) => Ok(value),
        Err(e) => {
            let _ = dir.unlink(&tmp);
            Err(e)
        }
    }
}

/// Writes the index: the last step of a successful dump.
pub fn write_index(dir: &Anchor, index: &DumpIndex) -> Result<(), PluginError> {
    write_atomically(dir, INDEX_NAME, |w| {
        serde_json::to_writer_pretty(&mut *w, index)
            .map_err(|e| PluginError::io(format!("writing {INDEX_NAME}"), e.into()))?;
        w.write_all(b"\n")
            .map_err(|e| PluginError::io(format!("writing {INDEX_NAME}"), e))
    })
}

/// Reads and checks the index; None when the directory has none (a dump without maps).
pub fn read_index(dir: &Anchor, max_bytes: u64) -> Result<Option<DumpIndex>, PluginError> {
    let path = leaf(INDEX_NAME)?;
    let bytes = match dir.read_file(&path, max_bytes) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    DumpIndex::parse(&bytes)
        .map(Some)
        .map_err(|reason| PluginError::Image {
            file: INDEX_NAME.into(),
            reason,
        })
}

/// Opens snapshot `rec` for reading: a regular file below `dir`, of exactly the recorded
/// size, at most `max_bytes`.
pub fn open_snapshot(
    dir: &Anchor,
    rec: &SnapshotRecord,
    max_bytes: u64,
) -> Result<std::fs::File, PluginError> {
    let name = rec.name();
    if rec.size > max_bytes {
        return Err(PluginError::Image {
            file: name,
            reason: format!(
                "the index records {} bytes, more than the limit of {max_bytes} \
                 (max_snapshot_bytes)",
                rec.size
            ),
        });
    }
    let file = dir.open_file(&leaf(&name)?, max_bytes)?;
    let size = file
        .metadata()
        .map_err(|e| PluginError::io(format!("stat {name}"), e))?
        .len();
    if size != rec.size {
        return Err(PluginError::Image {
            file: name,
            reason: format!(
                "it is {size} bytes, the index records {}: not the file this dump wrote",
                rec.size
            ),
        });
    }
    Ok(file)
}

/// Whether a directory entry is a file this plugin writes (any version).
fn is_ours(name: &str) -> bool {
    name == INDEX_NAME
        || name.starts_with(TMP_PREFIX)
        || name.starts_with(OLD_RECORD_PREFIX)
        || (name.starts_with(SNAPSHOT_PREFIX)
            && (name.ends_with(SNAPSHOT_SUFFIX)
                || name
                    .strip_suffix(mapsnap::trust::SIGNATURE_SUFFIX)
                    .is_some_and(|s| s.ends_with(SNAPSHOT_SUFFIX))))
}

/// Removes what an earlier dump into this directory left: first the index (so nothing of
/// that dump can be restored any more), then its other files (best effort). Returns how many
/// files were removed.
pub fn remove_stale(dir: &Anchor) -> Result<usize, PluginError> {
    let mut n = usize::from(dir.unlink(INDEX_NAME)?);
    for e in dir.entries()? {
        if e.name != INDEX_NAME && e.kind != EntryKind::Dir && is_ours(&e.name) {
            n += usize::from(dir.unlink(&e.name)?);
        }
    }
    Ok(n)
}

pub use mapsnap::sys::fdinfo_field;

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> DumpIndex {
        DumpIndex {
            format: INDEX_FORMAT.into(),
            dump_id: "0123456789abcdef0123456789abcdef".into(),
            created_unix: 1,
            files: vec![
                FileRecord {
                    file_id: 0x1a,
                    map_id: 7,
                    access: Access::ReadOnly,
                    map_name: "counters".into(),
                    map_type: "hash".into(),
                },
                FileRecord {
                    file_id: 0x1b,
                    map_id: 7,
                    access: Access::ReadWrite,
                    map_name: "counters".into(),
                    map_type: "hash".into(),
                },
            ],
            snapshots: vec![SnapshotRecord {
                map_id: 7,
                size: 10,
                sha256: "ab".repeat(32),
            }],
        }
    }

    #[test]
    fn access_from_fdinfo_flags() {
        // O_CLOEXEC | O_RDWR, O_CLOEXEC | O_RDONLY, O_CLOEXEC | O_WRONLY as fdinfo prints them.
        for (octal, want) in [
            ("02000002", Access::ReadWrite),
            ("02000000", Access::ReadOnly),
            ("02000001", Access::WriteOnly),
        ] {
            let flags = u32::from_str_radix(octal, 8).expect("octal");
            assert_eq!(Access::from_open_flags(flags), want, "{octal}");
        }
        assert_eq!(Access::ReadOnly.bpf_open_flags(), 8);
        assert_eq!(Access::WriteOnly.bpf_open_flags(), 16);
    }

    #[test]
    fn index_round_trips() {
        let i = index();
        let text = serde_json::to_vec(&i).expect("json");
        assert_eq!(DumpIndex::parse(&text).expect("parse"), i);
        assert_eq!(i.maps().len(), 1);
    }

    #[test]
    fn bad_indexes_are_refused() {
        type Change = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "format",
                Box::new(|v| v["format"] = "mapsnap-criu/1".into()),
            ),
            ("dump id", Box::new(|v| v["dump_id"] = "../x".into())),
            (
                "missing sha256",
                Box::new(|v| {
                    v["snapshots"][0]
                        .as_object_mut()
                        .expect("object")
                        .remove("sha256");
                }),
            ),
            (
                "short sha256",
                Box::new(|v| v["snapshots"][0]["sha256"] = "abcd".into()),
            ),
            (
                "no snapshot",
                Box::new(|v| v["files"][0]["map_id"] = 8.into()),
            ),
            (
                "duplicate file",
                Box::new(|v| v["files"][1]["file_id"] = 0x1a.into()),
            ),
            (
                "unknown field",
                Box::new(|v| v["snapshot"] = "../../etc/passwd".into()),
            ),
            (
                "bad access",
                Box::new(|v| v["files"][0]["access"] = "root".into()),
            ),
            (
                "unused snapshot",
                Box::new(|v| {
                    v["snapshots"].as_array_mut().expect("array").push(
                        serde_json::json!({"map_id": 9, "size": 1, "sha256": "00".repeat(32)}),
                    )
                }),
            ),
        ];
        for (what, change) in cases {
            let mut v = serde_json::to_value(index()).expect("json");
            change(&mut v);
            let bytes = serde_json::to_vec(&v).expect("json");
            assert!(DumpIndex::parse(&bytes).is_err(), "{what} accepted");
        }
    }

    #[test]
    fn index_files_are_read_through_the_anchor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Anchor::open_trusted(dir.path(), "test dir").expect("anchor");
        assert!(read_index(&a, 1 << 20).expect("read").is_none());
        write_index(&a, &index()).expect("write");
        assert_eq!(read_index(&a, 1 << 20).expect("read"), Some(index()));
        assert!(read_index(&a, 16).is_err(), "over the size limit");

        // A symlinked index is refused, not followed.
        std::fs::rename(dir.path().join(INDEX_NAME), dir.path().join("real.json")).expect("rename");
        std::os::unix::fs::symlink("real.json", dir.path().join(INDEX_NAME)).expect("symlink");
        let e = read_index(&a, 1 << 20).expect_err("symlink").to_string();
        assert!(e.contains("symbolic link"), "{e}");

        std::fs::write(dir.path().join(snapshot_name(3)), b"x").expect("write");
        std::fs::write(dir.path().join("mapsnap-fd-00000001.json"), b"{}").expect("write");
        std::fs::write(dir.path().join("core-1.img"), b"x").expect("write");
        assert_eq!(remove_stale(&a).expect("remove"), 3);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["core-1.img", "real.json"]);
    }
}
