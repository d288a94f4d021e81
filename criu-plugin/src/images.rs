//! What the plugin writes into CRIU's image directory, beside CRIU's own `*.img` files.
//!
//! ```text
//! mapsnap-map-<map id>.snap      one mapsnap snapshot per distinct kernel map (its metadata,
//!                                BTF, entries, and for maps of maps its inner maps)
//! mapsnap-fd-<file id>.json      one record per CRIU file (an open file description holding
//!                                a map): which map, and the fd's access mode
//! ```
//!
//! CRIU gives every open file description an id (`fd`s made by `dup` or inherited through
//! `fork` share it, so they reach the plugin once). Two separate opens of one map (two
//! `BPF_MAP_GET_FD_BY_ID` calls, or fds of several processes) are two CRIU files with one
//! kernel map id: they get two records naming the same snapshot, and are restored as one map.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::PluginError;

/// The `format` field of every record.
pub const RECORD_FORMAT: &str = "mapsnap-criu/1";

const RECORD_PREFIX: &str = "mapsnap-fd-";
const RECORD_SUFFIX: &str = ".json";
const SNAPSHOT_PREFIX: &str = "mapsnap-map-";
const SNAPSHOT_SUFFIX: &str = ".snap";

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
pub struct FileRecord {
    /// Always [`RECORD_FORMAT`].
    pub format: String,
    /// CRIU's file id (the argument of `DUMP_EXT_FILE` / `RESTORE_EXT_FILE`).
    pub file_id: u32,
    /// Kernel map id at dump time: the identity shared by every fd of the map.
    pub map_id: u32,
    pub access: Access,
    /// The snapshot file in the image directory that holds the map.
    pub snapshot: String,
    /// For messages: the map's name and type at dump time.
    pub map_name: String,
    pub map_type: String,
}

/// File name of the snapshot of kernel map `map_id`.
pub fn snapshot_name(map_id: u32) -> String {
    format!("{SNAPSHOT_PREFIX}{map_id}{SNAPSHOT_SUFFIX}")
}

/// File name of the record of CRIU file `file_id`.
pub fn record_name(file_id: u32) -> String {
    format!("{RECORD_PREFIX}{file_id:08x}{RECORD_SUFFIX}")
}

/// Checks that a snapshot name from a record is one of ours and stays in the directory.
pub fn check_snapshot_name(name: &str) -> Result<(), PluginError> {
    let ok = name
        .strip_prefix(SNAPSHOT_PREFIX)
        .and_then(|s| s.strip_suffix(SNAPSHOT_SUFFIX))
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(PluginError::Image {
            file: name.to_string(),
            reason: format!("not a snapshot name ({SNAPSHOT_PREFIX}<map id>{SNAPSHOT_SUFFIX})"),
        })
    }
}

/// Writes `dir/name` through a temporary file renamed into place, so a half-written file
/// never carries the final name.
pub fn write_atomically<T>(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut io::BufWriter<fs::File>) -> Result<T, PluginError>,
) -> Result<T, PluginError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let io_err = |what: &str, p: &Path, e| PluginError::io(format!("{what} {}", p.display()), e);
    let file = fs::File::create(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
    let mut w = io::BufWriter::new(file);
    let result = write(&mut w).and_then(|value| {
        let file = w
            .into_inner()
            .map_err(|e| io_err("writing", &tmp, e.into_error()))?;
        file.sync_all().map_err(|e| io_err("syncing", &tmp, e))?;
        Ok(value)
    });
    match result {
        Ok(value) => {
            fs::rename(&tmp, &path).map_err(|e| io_err("renaming into place", &path, e))?;
            Ok(value)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Writes the record of one CRIU file.
pub fn write_record(dir: &Path, record: &FileRecord) -> Result<(), PluginError> {
    let name = record_name(record.file_id);
    write_atomically(dir, &name, |w| {
        serde_json::to_writer_pretty(&mut *w, record)
            .map_err(|e| PluginError::io(format!("writing {name}"), e.into()))?;
        w.write_all(b"\n")
            .map_err(|e| PluginError::io(format!("writing {name}"), e))
    })
}

/// Every record in `dir`, sorted by file id.
pub fn read_records(dir: &Path) -> Result<Vec<FileRecord>, PluginError> {
    let entries = fs::read_dir(dir).map_err(|e| {
        PluginError::io(format!("listing the image directory {}", dir.display()), e)
    })?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| PluginError::io("listing the image directory", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(RECORD_PREFIX) && name.ends_with(RECORD_SUFFIX)) {
            continue;
        }
        let text = fs::read_to_string(entry.path())
            .map_err(|e| PluginError::io(format!("reading {name}"), e))?;
        let bad = |reason: String| PluginError::Image {
            file: name.clone(),
            reason,
        };
        let record: FileRecord =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a valid record: {e}")))?;
        if record.format != RECORD_FORMAT {
            return Err(bad(format!(
                "record format {:?}, this plugin reads {RECORD_FORMAT:?}",
                record.format
            )));
        }
        if record_name(record.file_id) != name {
            return Err(bad(format!(
                "it holds the record of file {:#x}",
                record.file_id
            )));
        }
        check_snapshot_name(&record.snapshot)?;
        out.push(record);
    }
    out.sort_by_key(|r| r.file_id);
    Ok(out)
}

pub use mapsnap::sys::fdinfo_field;

#[cfg(test)]
mod tests {
    use super::*;

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
    fn snapshot_names_stay_in_the_directory() {
        assert!(check_snapshot_name(&snapshot_name(42)).is_ok());
        for bad in [
            "../mapsnap-map-1.snap",
            "mapsnap-map-.snap",
            "mapsnap-map-1/../x.snap",
            "core-1.img",
        ] {
            assert!(check_snapshot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn records_round_trip_and_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rec = FileRecord {
            format: RECORD_FORMAT.into(),
            file_id: 0x1a,
            map_id: 7,
            access: Access::ReadOnly,
            snapshot: snapshot_name(7),
            map_name: "counters".into(),
            map_type: "hash".into(),
        };
        write_record(dir.path(), &rec).expect("write");
        assert_eq!(read_records(dir.path()).expect("read"), vec![rec.clone()]);
        assert!(
            fs::read_to_string(dir.path().join("mapsnap-fd-0000001a.json"))
                .expect("file")
                .contains("\"read-only\"")
        );

        let mut evil = rec;
        evil.file_id = 0x1b;
        evil.snapshot = "../../etc/passwd".into();
        write_record(dir.path(), &evil).expect("write");
        assert!(read_records(dir.path()).is_err());
    }
}
