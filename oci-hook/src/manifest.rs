//! Files the hook reads and writes beside a container's lifecycle: the checkpoint manifest in
//! CRIU's image directory, the node agent's checkpoint requests, and restore markers.

use std::path::{Path, PathBuf};

use mapsnap::anchor::{Anchor, RelPath};
use serde::{Deserialize, Serialize};

use crate::error::{HookError, Result};

/// The manifest's file name in the CRIU image directory.
pub const MANIFEST_NAME: &str = "mapsnap-hook.json";
/// The snapshot's file name when it rides inside the image directory.
pub const IMAGE_SNAPSHOT: &str = "mapsnap-pins.mapsnap";
pub const MANIFEST_VERSION: u32 = 1;
/// The largest manifest or request file read.
pub const MAX_MANIFEST_SIZE: u64 = 1 << 20;

/// Written at post-dump: where the container's pinned maps went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    pub version: u32,
    pub container_id: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// `image:NAME` (a file in this directory) or a storage location.
    pub snapshot: String,
    /// SHA-256 (hex) and size of the snapshot, checked on restore.
    pub sha256: String,
    pub size: u64,
    pub maps: Vec<PinnedMap>,
    /// The node agent's request this answered (`namespace/name`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Which dump wrote it: the dumped init's pid and start time, and CRIU's `pstree.img`
    /// (inode, mtime) at post-dump. A manifest whose stamp is not the current dump's is stale
    /// (an image directory reused by a later checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump: Option<DumpStamp>,
    /// Key id (16 hex digits) of the signature written beside the snapshot, if signed.
    /// Informational: a restore checks the signature itself against the node's trust set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// The snapshot is stored as an age stream (sha256 and size are the stored ciphertext's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// Set when a detached process finishes the snapshot after CRIU released the tasks: the
    /// snapshot may not be there yet when this manifest is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_later: Option<FinishedLater>,
}

/// How a snapshot finished after the freeze is recognised (docs/ARCHITECTURE.md,
/// "Checkpoint freeze"). The detached process writes the storage manifest beside the snapshot
/// last, after the snapshot is complete; a restore waits for it and takes the snapshot only
/// when its SHA-256 and size match and its source names `nonce`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedLater {
    /// `frozen`: read inside the freeze (the manifest's `sha256` and `size` are the final
    /// snapshot's), only copied out later; `after`: read after the freeze (`sha256` empty,
    /// `size` 0: the storage manifest gives them).
    pub read: String,
    /// Random, per checkpoint: the snapshot's INFO `source` and its storage manifest's
    /// `selection` carry it.
    pub nonce: String,
}

/// A fresh random nonce (128 bits, hex).
pub fn new_nonce() -> Result<String> {
    let mut raw = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .map_err(|e| HookError::io("reading /dev/urandom for a checkpoint nonce", e))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// The marker of `nonce` in a snapshot's source text.
pub fn nonce_marker(nonce: &str) -> String {
    format!("checkpoint {nonce}")
}

/// Identifies one CRIU dump (see [`CheckpointManifest::dump`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpStamp {
    pub init_pid: u32,
    pub init_start: u64,
    #[serde(default)]
    pub pstree: Option<String>,
}

impl DumpStamp {
    /// The stamp of the dump running now: `pid` is CRIU's `CRTOOLS_INIT_PID` (frozen, alive).
    pub fn current(pid: u32, image_dir: &Anchor) -> Option<Self> {
        let init_start = crate::container::start_time(pid)?;
        let pstree = RelPath::parse("pstree.img")
            .ok()
            .and_then(|r| image_dir.open_file(&r, u64::MAX).ok())
            .and_then(|f| f.metadata().ok())
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                format!("{}:{}.{}", m.ino(), m.mtime(), m.mtime_nsec())
            });
        Some(Self {
            init_pid: pid,
            init_start,
            pstree,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedMap {
    pub name: String,
    /// Relative to the container's root (`sys/fs/bpf/app/counters`).
    pub pin_path: Option<String>,
    #[serde(rename = "type")]
    pub map_type: String,
    pub entries: u64,
}

fn manifest_rel() -> Result<RelPath> {
    RelPath::parse(MANIFEST_NAME).map_err(|e| HookError::Other(e.to_string()))
}

impl CheckpointManifest {
    pub fn path(image_dir: &Path) -> PathBuf {
        image_dir.join(MANIFEST_NAME)
    }

    /// Parses a manifest's bytes (the fuzzing entry point too).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let m: Self = serde_json::from_slice(bytes).map_err(|e| {
            HookError::Other(format!(
                "{MANIFEST_NAME} is not a mapsnap-hook manifest: {e}"
            ))
        })?;
        if m.version != MANIFEST_VERSION {
            return Err(HookError::Other(format!(
                "{MANIFEST_NAME}: manifest version {} (this mapsnap-hook reads {MANIFEST_VERSION})",
                m.version
            )));
        }
        Ok(m)
    }

    /// The manifest in the image directory, None when there is none. Read through the
    /// directory's fd: a link, a FIFO or an oversized file is refused.
    pub fn read_at(image_dir: &Anchor) -> Result<Option<Self>> {
        let rel = manifest_rel()?;
        match image_dir.read_file(&rel, MAX_MANIFEST_SIZE) {
            Ok(b) => Self::parse(&b).map(Some),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// [`Self::read_at`] for a directory named by the caller (trusted: the runtime's image
    /// path).
    pub fn read(image_dir: &Path) -> Result<Option<Self>> {
        let a = Anchor::open_trusted(image_dir, "the CRIU image directory")?;
        Self::read_at(&a)
    }

    /// Writes it atomically (temporary file, then rename) through the directory's fd.
    pub fn write_at(&self, image_dir: &Anchor) -> Result<()> {
        let mut text = serde_json::to_vec_pretty(self)
            .map_err(|e| HookError::Other(format!("encoding the manifest: {e}")))?;
        text.push(b'\n');
        let (mut f, tmp) = image_dir.create_temp(".mapsnap-hook-tmp-", 0o600)?;
        let r = std::io::Write::write_all(&mut f, &text)
            .and_then(|()| f.sync_all())
            .map_err(|e| HookError::io("writing the manifest", e))
            .and_then(|()| Ok(image_dir.rename(&tmp, MANIFEST_NAME, true)?));
        if r.is_err() {
            let _ = image_dir.unlink(&tmp);
        }
        r
    }

    /// Removes a stale manifest (and the snapshot it names inside the image directory).
    pub fn remove_at(image_dir: &Anchor, m: Option<&Self>) -> Result<()> {
        if let Some(name) = m.and_then(|m| m.snapshot.strip_prefix(crate::location::IMAGE_PREFIX))
            && RelPath::parse(name).is_ok_and(|r| r.components().len() == 1)
        {
            image_dir.unlink(name)?;
        }
        image_dir.unlink(MANIFEST_NAME)?;
        Ok(())
    }

    /// [`Self::write_at`] for a directory named by the caller.
    pub fn write(&self, image_dir: &Path) -> Result<()> {
        let a = Anchor::open_trusted(image_dir, "the CRIU image directory")?;
        self.write_at(&a)
    }

    pub fn sha256_bytes(&self) -> Option<[u8; 32]> {
        let v = hex_decode(&self.sha256)?;
        v.try_into().ok()
    }
}

/// A SHA-256 given as 64 hex digits.
pub fn sha256_of_hex(s: &str) -> Option<[u8; 32]> {
    hex_decode(s)?.try_into().ok()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Writes `bytes` to `path` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .map_err(|e| HookError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        HookError::io(format!("renaming {} into place", tmp.display()), e)
    })
}

/// The node agent's request (`<request_dir>/<container-id>.json`, docs/API.md): where the
/// maps of a coming checkpoint of this container go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Request {
    /// `namespace/name` of the checkpoint object.
    #[serde(default)]
    pub checkpoint: String,
    /// Snapshot location.
    pub snapshot: String,
    /// Where poststop writes the pins when the container stops (a Migrate that takes the
    /// source out of service after the checkpoint): `maps-stop.mapsnap` beside `snapshot`.
    #[serde(default, rename = "stopSnapshot")]
    pub stop_snapshot: Option<String>,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub expires: Option<String>,
}

/// Reads the file `name` of the directory `dir` (node config, trusted), bounded, refusing
/// links, FIFOs and devices; None when either does not exist.
fn read_small(dir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let a = match Anchor::open_trusted(dir, "a request directory") {
        Ok(a) => a,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let rel = RelPath::parse(name)
        .map_err(|e| HookError::refused(format!("request {name:?}"), e.reason))?;
    match a.read_file(&rel, MAX_MANIFEST_SIZE) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Checks a container id before it becomes part of a file name.
pub fn check_id(id: &str) -> Result<()> {
    let ok =
        !id.is_empty() && id.len() <= 1024 && id != "." && id != ".." && !id.contains(['/', '\0']);
    if ok {
        Ok(())
    } else {
        Err(HookError::refused(
            format!("container id {id:?}"),
            "it cannot name a file",
        ))
    }
}

impl Request {
    /// The request for container `id`, None when there is none or it expired.
    pub fn read(dir: &Path, id: &str, now: jiff::Timestamp) -> Result<Option<Self>> {
        check_id(id)?;
        let path = dir.join(format!("{id}.json"));
        let Some(bytes) = read_small(dir, &format!("{id}.json"))? else {
            return Ok(None);
        };
        let r: Self = serde_json::from_slice(&bytes).map_err(|e| {
            HookError::Other(format!("{} is not a valid request: {e}", path.display()))
        })?;
        if let Some(exp) = r.expires.as_deref().filter(|e| !e.is_empty()) {
            let t: jiff::Timestamp = exp.parse().map_err(|e| {
                HookError::Other(format!("{}: expires {exp:?}: {e}", path.display()))
            })?;
            if t < now {
                tracing::warn!(request = %path.display(), expires = exp, "ignoring an expired request");
                return Ok(None);
            }
        }
        if r.snapshot.is_empty() {
            return Err(HookError::Other(format!(
                "{}: the request names no snapshot location",
                path.display()
            )));
        }
        Ok(Some(r))
    }
}

/// The node agent's restore request (`<restore_dir>/<namespace>_<pod>.json`, docs/API.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RestoreRequest {
    #[serde(default)]
    pub checkpoint: String,
    #[serde(default)]
    pub pod: String,
    pub snapshot: String,
    #[serde(default)]
    pub expires: Option<String>,
}

impl RestoreRequest {
    pub fn read(dir: &Path, ns: &str, pod: &str, now: jiff::Timestamp) -> Result<Option<Self>> {
        let name = format!("{ns}_{pod}");
        check_id(&name)?;
        let path = dir.join(format!("{name}.json"));
        let Some(bytes) = read_small(dir, &format!("{name}.json"))? else {
            return Ok(None);
        };
        let r: Self = serde_json::from_slice(&bytes).map_err(|e| {
            HookError::Other(format!(
                "{} is not a valid restore request: {e}",
                path.display()
            ))
        })?;
        if let Some(exp) = r.expires.as_deref().filter(|e| !e.is_empty()) {
            let t: jiff::Timestamp = exp.parse().map_err(|e| {
                HookError::Other(format!("{}: expires {exp:?}: {e}", path.display()))
            })?;
            if t < now {
                return Ok(None);
            }
        }
        Ok(Some(r))
    }
}

/// Restore markers: prestart and createRuntime both run during `runc restore` (and both may
/// be installed), so a restore done for this container and init pid is not done twice.
pub fn marker_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join(format!("{id}.restored"))
}

pub fn marker_matches(state_dir: &Path, id: &str, pid: Option<u32>, sha: &str) -> bool {
    let want = format!("{} {sha}", pid.unwrap_or(0));
    std::fs::read_to_string(marker_path(state_dir, id)).is_ok_and(|t| t.trim() == want)
}

pub fn write_marker(state_dir: &Path, id: &str, pid: Option<u32>, sha: &str) -> Result<()> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| HookError::io(format!("creating {}", state_dir.display()), e))?;
    write_atomic(
        &marker_path(state_dir, id),
        format!("{} {sha}\n", pid.unwrap_or(0)).as_bytes(),
    )
}

pub fn remove_marker(state_dir: &Path, id: &str) {
    let _ = std::fs::remove_file(marker_path(state_dir, id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trip() {
        let t = tempfile::tempdir().expect("tempdir");
        assert_eq!(CheckpointManifest::read(t.path()).expect("none"), None);
        let m = CheckpointManifest {
            finished_later: None,
            version: MANIFEST_VERSION,
            container_id: "c".into(),
            created: "2026-01-01T00:00:00Z".into(),
            snapshot: format!("image:{IMAGE_SNAPSHOT}"),
            sha256: "ab".repeat(32),
            size: 10,
            maps: vec![PinnedMap {
                name: "pkt_count".into(),
                pin_path: Some("sys/fs/bpf/pkt_count".into()),
                map_type: "array".into(),
                entries: 4,
            }],
            checkpoint: None,
            dump: None,
            signer: None,
            encrypted: false,
        };
        m.write(t.path()).expect("write");
        assert_eq!(
            CheckpointManifest::read(t.path()).expect("read"),
            Some(m.clone())
        );
        assert_eq!(m.sha256_bytes(), Some([0xab; 32]));
    }

    #[test]
    fn requests() {
        let t = tempfile::tempdir().expect("tempdir");
        let now: jiff::Timestamp = "2026-06-01T00:00:00Z".parse().expect("ts");
        assert_eq!(Request::read(t.path(), "c1", now).expect("none"), None);
        std::fs::write(
            t.path().join("c1.json"),
            r#"{"checkpoint":"ns/ck","snapshot":"s3://b/k","created":"2026-05-31T23:00:00Z","expires":"2026-06-01T01:00:00Z"}"#,
        )
        .expect("write");
        let r = Request::read(t.path(), "c1", now)
            .expect("read")
            .expect("some");
        assert_eq!(
            (r.checkpoint.as_str(), r.snapshot.as_str()),
            ("ns/ck", "s3://b/k")
        );
        let later: jiff::Timestamp = "2026-06-02T00:00:00Z".parse().expect("ts");
        assert_eq!(Request::read(t.path(), "c1", later).expect("expired"), None);
        assert!(Request::read(t.path(), "../c1", now).is_err());
    }

    #[test]
    fn restore_requests() {
        let t = tempfile::tempdir().expect("tempdir");
        let now: jiff::Timestamp = "2026-06-01T00:00:00Z".parse().expect("ts");
        assert_eq!(
            RestoreRequest::read(t.path(), "edge", "lb-0", now).expect("none"),
            None
        );
        std::fs::write(
            t.path().join("edge_lb-0.json"),
            r#"{"checkpoint":"edge/ck","pod":"edge/lb-0","snapshot":"s3://b/k","archive":"/x.tar","created":"2026-05-31T23:00:00Z","expires":"2026-06-01T01:00:00Z"}"#,
        )
        .expect("write");
        let r = RestoreRequest::read(t.path(), "edge", "lb-0", now)
            .expect("read")
            .expect("some");
        assert_eq!(r.snapshot, "s3://b/k");
        let later: jiff::Timestamp = "2026-06-02T00:00:00Z".parse().expect("ts");
        assert_eq!(
            RestoreRequest::read(t.path(), "edge", "lb-0", later).expect("expired"),
            None
        );
        assert!(RestoreRequest::read(t.path(), "..", "x/y", now).is_err());
    }

    #[test]
    fn markers() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("state");
        assert!(!marker_matches(&d, "c", Some(5), "aa"));
        write_marker(&d, "c", Some(5), "aa").expect("write");
        assert!(marker_matches(&d, "c", Some(5), "aa"));
        assert!(!marker_matches(&d, "c", Some(6), "aa"));
        remove_marker(&d, "c");
        assert!(!marker_matches(&d, "c", Some(5), "aa"));
    }
}
