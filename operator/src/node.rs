//! The agent's node-side work, against the node's file system and the snapshot storage:
//! hook request files for mapsnap-hook, uploading the kubelet's checkpoint archive, fetching
//! it for a restore, and cleanup. Synchronous (the storage API is); the agent runs it on a
//! blocking thread.
//!
//! Files (the interface with mapsnap-hook, see docs/API.md):
//! - `<requests>/<container-id>.json`: [`HookRequest`], read by the hook at CRIU's post-dump.
//! - `<restores>/<namespace>_<pod>.json`: [`RestoreRequest`], for the hook to check a restored
//!   pod's `mapsnap.io/restore-from` annotation against.
//! - `<checkpoints>/mapsnap-restore-<uid>.tar`: an archive fetched for a restore.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mapsnap::anchor::{Anchor, AnchorError, RelPath};
use mapsnap::storage::{ErrorKind, Location, Manifest, Storage, StorageConfig, StorageError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crd::{AgentOperation, AgentResult, AgentTask, ManifestSummary, MapSummary};
use crate::layout;

/// The hook request file (`/run/mapsnap/requests/<container-id>.json`): tells mapsnap-hook,
/// run by CRIU at post-dump, where this container's maps go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookRequest {
    /// `<namespace>/<name>` of the `BpfMapCheckpoint`.
    pub checkpoint: String,
    /// Where to write the snapshot (and its manifest beside it).
    pub snapshot: String,
    /// Where the hook writes the pins when the container stops (`maps-stop.mapsnap` beside
    /// `snapshot`): asked by a Migrate with `switchover: StopAfterCheckpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_snapshot: Option<String>,
    /// RFC 3339.
    pub created: String,
    /// RFC 3339; the hook ignores the request after this.
    pub expires: String,
}

/// The restore request file (`/run/mapsnap/restores/<namespace>_<pod>.json`): the restore
/// the agent prepared for a pod, which mapsnap-hook checks a restored container against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub checkpoint: String,
    /// `<namespace>/<name>` of the restored pod.
    pub pod: String,
    /// The snapshot to restore the maps from (= the pod's `mapsnap.io/restore-from`).
    pub snapshot: String,
    /// The archive's path on this node (= the restored container's image).
    pub archive: String,
    pub created: String,
    pub expires: String,
}

/// Where the node's files are (as mounted in the agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    pub requests: PathBuf,
    pub restores: PathBuf,
    pub checkpoints: PathBuf,
}

impl Default for NodePaths {
    fn default() -> Self {
        Self {
            requests: "/run/mapsnap/requests".into(),
            restores: "/run/mapsnap/restores".into(),
            checkpoints: "/var/lib/kubelet/checkpoints".into(),
        }
    }
}

/// A node-side failure, with whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A node file named by a task, reached through a directory fd (a symlink or a mount
    /// crossing anywhere fails here).
    #[error(transparent)]
    Anchor(#[from] AnchorError),
    /// The task asks for something refused (bad path, bad container id).
    #[error("{0}")]
    Refused(String),
    /// The stored data is not what it should be (missing snapshot, digest mismatch).
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Unsupported(String),
    /// The registry failed (may pass).
    #[error("checkpoint image: {0}")]
    Image(String),
    /// Some cleanup actions failed.
    #[error("{message}")]
    Cleanup { message: String, permanent: bool },
}

impl NodeError {
    pub fn io(what: &'static str, path: &Path, source: io::Error) -> Self {
        NodeError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether retrying cannot help.
    pub fn permanent(&self) -> bool {
        match self {
            NodeError::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            NodeError::Storage(e) => matches!(
                e.kind,
                ErrorKind::BadLocation | ErrorKind::Config | ErrorKind::Denied | ErrorKind::Corrupt
            ),
            NodeError::Refused(_) | NodeError::Mismatch(_) | NodeError::Unsupported(_) => true,
            NodeError::Cleanup { permanent, .. } => *permanent,
            NodeError::Image(_) => false,
            // A link or a swapped directory stays so; an I/O hiccup may pass.
            NodeError::Anchor(e) => !matches!(
                e.errno(),
                Some(libc_errno::EIO | libc_errno::ENOSPC | libc_errno::EAGAIN | libc_errno::EINTR)
            ),
        }
    }

    /// A CamelCase reason for the status.
    pub fn reason(&self) -> &'static str {
        match self {
            NodeError::Io { .. } => "NodeIOFailed",
            NodeError::Storage(_) => "StorageFailed",
            NodeError::Refused(_) => "TaskRefused",
            NodeError::Mismatch(_) => "DataMismatch",
            NodeError::Unsupported(_) => "Unsupported",
            NodeError::Cleanup { .. } => "CleanupFailed",
            NodeError::Image(_) => "ImagePushFailed",
            NodeError::Anchor(_) => "NodePathRefused",
        }
    }
}

/// The errno values the agent tells apart (from the kernel ABI; no libc dependency here).
mod libc_errno {
    pub const EINTR: i32 = 4;
    pub const EIO: i32 = 5;
    pub const EAGAIN: i32 = 11;
    pub const ENOSPC: i32 = 28;
}

/// Digest of a transferred object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digested {
    pub sha256: String,
    pub size: u64,
}

/// Object storage as the agent uses it (a trait so that tests and later backends can stand
/// in).
pub trait Blobs: Send + Sync + std::fmt::Debug {
    /// Uploads an open local file (`label` names it in errors), replacing an existing object,
    /// and returns its digest.
    fn upload(&self, from: File, label: &str, to: &str) -> Result<Digested, NodeError>;
    /// Streams an object into `to`, returning its digest.
    fn download(&self, from: &str, to: &mut dyn Write) -> Result<Digested, NodeError>;
    /// The manifest beside a snapshot, if there is one.
    fn manifest(&self, snapshot: &str) -> Result<Option<Manifest>, NodeError>;
    /// The minisign signature beside a snapshot (`<snapshot>.minisig`), if there is one.
    fn signature(&self, _snapshot: &str) -> Result<Option<Vec<u8>>, NodeError> {
        Ok(None)
    }
    /// Deletes an object and its manifest; a missing object is not an error. Returns whether
    /// something was there.
    fn delete(&self, location: &str) -> Result<bool, NodeError>;
}

/// [`Blobs`] over `mapsnap::storage` (local files, S3, GCS, Azure).
#[derive(Debug, Clone)]
pub struct StorageBlobs {
    config: StorageConfig,
}

impl StorageBlobs {
    pub fn new(config: StorageConfig) -> Self {
        Self { config }
    }

    fn open(&self, location: &str) -> Result<Storage, NodeError> {
        let loc = Location::parse(location)?;
        if matches!(loc, Location::Stdio) {
            return Err(NodeError::Refused(format!(
                "{location}: standard input/output is not a storage location"
            )));
        }
        Ok(Storage::open(loc, &self.config)?)
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    fn digest(self) -> Digested {
        Digested {
            sha256: hex::encode(self.hasher.finalize()),
            size: self.size,
        }
    }
}

impl Blobs for StorageBlobs {
    fn upload(&self, from: File, label: &str, to: &str) -> Result<Digested, NodeError> {
        let storage = self.open(to)?;
        if let Location::Local(p) = storage.location()
            && let Some(dir) = p.parent()
        {
            fs::create_dir_all(dir).map_err(|e| NodeError::io("cannot create", dir, e))?;
        }
        let mut reader = Hashing::new(BufReader::with_capacity(1 << 20, from));
        let from = Path::new(label);
        let mut w = storage.writer(true)?;
        io::copy(&mut reader, &mut w).map_err(|e| match StorageError::from_io(&e) {
            Some(s) => NodeError::Storage(s.clone()),
            None => NodeError::io("cannot upload", from, e),
        })?;
        w.commit()?;
        Ok(reader.digest())
    }

    fn download(&self, from: &str, to: &mut dyn Write) -> Result<Digested, NodeError> {
        let storage = self.open(from)?;
        let mut reader = Hashing::new(storage.reader(None)?);
        io::copy(&mut reader, to).map_err(|e| match StorageError::from_io(&e) {
            Some(s) => NodeError::Storage(s.clone()),
            None => NodeError::io("cannot write the download of", Path::new(from), e),
        })?;
        Ok(reader.digest())
    }

    fn manifest(&self, snapshot: &str) -> Result<Option<Manifest>, NodeError> {
        Ok(self.open(snapshot)?.read_manifest()?)
    }

    fn signature(&self, snapshot: &str) -> Result<Option<Vec<u8>>, NodeError> {
        let sig = self.open(&format!("{snapshot}{}", mapsnap::trust::SIGNATURE_SUFFIX))?;
        if sig.head()?.is_none() {
            return Ok(None);
        }
        let mut buf = Vec::new();
        sig.reader(None)?
            .take(MAX_SIGNATURE_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(|e| NodeError::io("cannot read", Path::new(sig.name()), e))?;
        if buf.len() as u64 > MAX_SIGNATURE_BYTES {
            return Err(NodeError::Refused(format!(
                "{}: larger than {MAX_SIGNATURE_BYTES} bytes, not a signature",
                sig.name()
            )));
        }
        Ok(Some(buf))
    }

    fn delete(&self, location: &str) -> Result<bool, NodeError> {
        // The snapshot and its manifest, local or remote; a missing one is not an error.
        Ok(self.open(location)?.delete()?)
    }
}

/// The largest signature file read (a minisign signature is a few hundred bytes).
const MAX_SIGNATURE_BYTES: u64 = 64 << 10;

/// The key id a minisign signature file names (its second line: algorithm, key id,
/// signature), as minisign prints it; None when it is not a prehashed minisign signature.
/// Not a verification: the restoring hook verifies against its trust set.
pub fn signature_key_id(sig: &[u8]) -> Option<String> {
    use base64::Engine as _;
    let line = std::str::from_utf8(sig).ok()?.lines().nth(1)?.trim();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(line)
        .ok()?;
    if raw.len() != 74 || &raw[..2] != b"ED" {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&raw[2..10]);
    Some(mapsnap::trust::KeyId(id).to_string())
}

/// The manifest and the signature's key id as the status records them.
pub fn summarize_signed(m: &Manifest, signature: Option<&[u8]>) -> ManifestSummary {
    ManifestSummary {
        signer_key_id: signature.and_then(signature_key_id),
        ..summarize(m)
    }
}

/// The manifest as the status records it.
pub fn summarize(m: &Manifest) -> ManifestSummary {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    ManifestSummary {
        format_version: i64::from(m.format_version),
        sha256: m.sha256.clone(),
        size: clamp(m.size),
        created: m.created.clone(),
        maps: m
            .maps
            .iter()
            .map(|x| MapSummary {
                name: x.name.clone(),
                map_type: x.map_type.clone(),
                entries: clamp(x.entries),
                bytes: clamp(x.bytes),
            })
            .collect(),
        signer_key_id: None,
    }
}

/// A field the task must name, or a refusal saying which.
fn required<'a>(field: Option<&'a str>, what: &str) -> Result<&'a str, NodeError> {
    field.ok_or_else(|| NodeError::Refused(format!("the task names no {what}")))
}

/// Checks a container ID before it becomes a file name.
pub fn check_container_id(id: &str) -> Result<(), NodeError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && id.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(NodeError::Refused(format!("invalid container id {id:?}")))
    }
}

fn check_name(what: &str, s: &str) -> Result<(), NodeError> {
    if layout::is_object_name(s) {
        Ok(())
    } else {
        Err(NodeError::Refused(format!("invalid {what} {s:?}")))
    }
}

/// Writes `bytes` to the leaf `leaf` of `dir` atomically (temporary file, fsync, rename),
/// mode 0600, never following a link.
fn write_atomic(dir: &Anchor, leaf: &str, bytes: &[u8]) -> Result<(), NodeError> {
    let (mut f, tmp) = dir.create_temp(&format!(".{leaf}."), 0o600)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| NodeError::io("cannot write", Path::new(&tmp), e));
    let renamed = written.and_then(|()| Ok(dir.rename(&tmp, leaf, true)?));
    if renamed.is_err() {
        let _ = dir.unlink(&tmp);
    }
    renamed
}

/// A snapshot's manifest must be of the task's container (ids compare by prefix: the CRI id
/// may be shortened on one side).
fn check_manifest_container(
    manifest: Option<&Manifest>,
    task: &AgentTask,
    location: &str,
) -> Result<(), NodeError> {
    if let Some(m) = manifest
        && let (Some(want), Some(got)) = (
            task.container_id.as_deref(),
            m.source.container_id.as_deref(),
        )
        && !got.starts_with(want)
        && !want.starts_with(got)
    {
        return Err(NodeError::Mismatch(format!(
            "the snapshot at {location} is of container {got}, not {want}"
        )));
    }
    Ok(())
}

/// The restore request file's name for a pod (`<namespace>/<name>`).
fn restore_request_leaf(pod: &str) -> Result<String, NodeError> {
    let (ns, name) = pod
        .split_once('/')
        .ok_or_else(|| NodeError::Refused(format!("invalid pod {pod:?}")))?;
    check_name("namespace", ns)?;
    check_name("pod name", name)?;
    Ok(layout::restore_request_name(ns, name))
}

/// Removes the archive `name` of the checkpoint directory if it is a regular file there (a
/// link or anything else a task names is refused, not removed; unlinkat never follows).
fn unlink_archive(dir: &Anchor, name: &str) -> Result<bool, NodeError> {
    match dir.open_file(&leaf(name)?, u64::MAX) {
        Ok(_) => Ok(dir.unlink(name)?),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn leaf(name: &str) -> Result<RelPath, NodeError> {
    RelPath::parse(name).map_err(|e| NodeError::Refused(format!("{name:?}: {e}")))
}

fn rfc3339(t: &Time) -> String {
    t.0.to_string()
}

/// Checkpoint OCI images as the agent makes them (a trait so the controller's reconcile tests
/// can record the calls; the agent uses [`crate::images`] over a real registry).
pub trait CheckpointImages: Send + Sync + std::fmt::Debug {
    /// The repository (`host[:port]/path`) every image goes to: a task may only name images
    /// there.
    fn repository(&self) -> &str;
    /// Builds the checkpoint image of `container` from a kubelet archive, pushes it as `tag`,
    /// and returns its reference by digest (`repository@sha256:...`).
    fn build_and_push(
        &self,
        archive: File,
        container: &str,
        tag: &str,
    ) -> Result<String, NodeError>;
    /// Deletes a pushed image (by digest); a missing one is not an error.
    fn delete(&self, reference: &str) -> Result<(), NodeError>;
}

/// The agent's node-side executor.
#[derive(Debug, Clone)]
pub struct NodeAgent {
    pub paths: NodePaths,
    pub blobs: Arc<dyn Blobs>,
    /// The registry restores push to (none: this node cannot prepare restores).
    pub images: Option<Arc<dyn CheckpointImages>>,
    /// Storage prefixes tasks may name (the chart's `storage.location` and
    /// `storage.allowedLocations`, as the controller has them). A task location must be
    /// `<prefix>/<namespace>/<name>/<uid>/<maps.mapsnap|checkpoint.tar>` for its object's
    /// namespace; what it writes or deletes, for its object's own name and UID too.
    pub allowed_locations: Vec<String>,
    /// AwaitStopSnapshot: how often storage is asked for the stop snapshot's manifest.
    pub stop_poll: std::time::Duration,
}

impl NodeAgent {
    pub fn new(paths: NodePaths, blobs: Arc<dyn Blobs>) -> Self {
        Self {
            paths,
            blobs,
            images: None,
            allowed_locations: Vec::new(),
            stop_poll: std::time::Duration::from_secs(2),
        }
    }

    pub fn with_images(mut self, images: Arc<dyn CheckpointImages>) -> Self {
        self.images = Some(images);
        self
    }

    pub fn with_allowed_locations(mut self, allowed: Vec<String>) -> Self {
        self.allowed_locations = allowed;
        self
    }

    /// Checks a storage location named by a task against this node's configuration, as
    /// strictly as the hook checks annotations: an allowed prefix, then exactly
    /// `<namespace>/<name>/<uid>/<file>` of the task's object (`own`) or of an object in its
    /// namespace (a Restore reads its referenced checkpoint). No `..`, no percent-encoding.
    pub fn check_task_location(
        &self,
        location: &str,
        object: &str,
        uid: &str,
        own: bool,
    ) -> Result<(), NodeError> {
        let refused =
            |why: &str| NodeError::Refused(format!("storage location {location:?} refused: {why}"));
        if self.allowed_locations.is_empty() {
            return Err(refused(
                "this agent has no allowed storage locations configured",
            ));
        }
        if location.contains('%') {
            return Err(refused("percent-encoding is not allowed"));
        }
        layout::check_location(location, &self.allowed_locations).map_err(|e| refused(&e.why))?;
        let (ns, name) = object
            .split_once('/')
            .ok_or_else(|| refused("the task's object has no namespace"))?;
        let ok = self.allowed_locations.iter().any(|a| {
            let a = a.trim_end_matches('/');
            let Some(rest) = location.strip_prefix(a).and_then(|r| r.strip_prefix('/')) else {
                return false;
            };
            let parts: Vec<&str> = rest.split('/').collect();
            parts.len() == 4
                && parts[0] == ns
                && (!own || (parts[1] == name && parts[2] == uid))
                && !parts[1].is_empty()
                && !parts[2].is_empty()
                && (parts[3] == layout::SNAPSHOT_NAME
                    || parts[3] == layout::STOP_SNAPSHOT_NAME
                    || parts[3] == layout::ARCHIVE_NAME)
        });
        if ok {
            Ok(())
        } else {
            Err(refused(&format!(
                "not <allowed prefix>/{ns}/{}/<file> of this object",
                if own {
                    format!("{name}/{uid}")
                } else {
                    "<name>/<uid>".to_string()
                }
            )))
        }
    }

    fn request_leaf(&self, container_id: &str) -> Result<String, NodeError> {
        check_container_id(container_id)?;
        Ok(format!("{container_id}.json"))
    }

    /// One of this node's directories (configured, so trusted), created if missing; every
    /// file a task names is a leaf below it, reached through its fd.
    fn node_dir(&self, path: &Path, label: &str) -> Result<Anchor, NodeError> {
        fs::create_dir_all(path).map_err(|e| NodeError::io("cannot create", path, e))?;
        Ok(Anchor::open_trusted(path, label)?)
    }

    fn requests_dir(&self) -> Result<Anchor, NodeError> {
        self.node_dir(&self.paths.requests, "hook requests directory")
    }

    fn restores_dir(&self) -> Result<Anchor, NodeError> {
        self.node_dir(&self.paths.restores, "restore requests directory")
    }

    fn checkpoints_dir(&self) -> Result<Anchor, NodeError> {
        self.node_dir(&self.paths.checkpoints, "kubelet checkpoint directory")
    }

    /// Checks that `path` names an archive directly inside the kubelet checkpoint directory
    /// and returns its leaf name; the file is then only reached through that directory's fd
    /// with links refused, so a task cannot make the agent read or delete any other file.
    pub fn archive_leaf(&self, path: &str) -> Result<String, NodeError> {
        let p = Path::new(path);
        let refused = |why: &str| {
            NodeError::Refused(format!(
                "archive path {path:?} refused: {why} (must be a .tar file directly in {})",
                self.paths.checkpoints.display()
            ))
        };
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| refused("no file name"))?;
        if !name.ends_with(".tar") || name.starts_with('.') {
            return Err(refused("not a .tar file"));
        }
        if p.parent() != Some(self.paths.checkpoints.as_path()) {
            return Err(refused("not in the checkpoint directory"));
        }
        Ok(name.to_string())
    }

    /// Runs a task and answers it. `checkpoint` is `<namespace>/<name>` of the object, `uid`
    /// its UID.
    pub fn execute(
        &self,
        checkpoint: &str,
        uid: &str,
        task: &AgentTask,
        node: &str,
        now: Timestamp,
    ) -> AgentResult {
        let mut result = AgentResult {
            id: task.id.clone(),
            node: node.to_string(),
            ..AgentResult::default()
        };
        let outcome = match task.operation {
            Some(AgentOperation::PrepareCheckpoint) => self.prepare(checkpoint, uid, task, now),
            Some(AgentOperation::UploadArchive) => self.upload(checkpoint, uid, task, &mut result),
            // Async (an HTTPS call): run by the agent's API layer, never here.
            Some(AgentOperation::KubeletCheckpoint) => Err(NodeError::Unsupported(
                "KubeletCheckpoint is not node file work".into(),
            )),
            Some(AgentOperation::DownloadArchive) => {
                self.download(checkpoint, uid, task, now, &mut result)
            }
            Some(AgentOperation::Cleanup) => self.cleanup(checkpoint, uid, task),
            Some(AgentOperation::AwaitStopSnapshot) => {
                self.await_stop(checkpoint, uid, task, now, &mut result)
            }
            None => Err(NodeError::Unsupported(
                "the task names no operation this agent knows (is the agent older than the \
                 controller?)"
                    .into(),
            )),
        };
        match outcome {
            Ok(message) => {
                result.succeeded = true;
                result.message = Some(message);
            }
            Err(e) => {
                result.succeeded = false;
                result.permanent = e.permanent();
                result.reason = Some(e.reason().into());
                result.message = Some(e.to_string());
            }
        }
        result.finish_time = Some(Time(now));
        result
    }

    fn prepare(
        &self,
        checkpoint: &str,
        uid: &str,
        task: &AgentTask,
        now: Timestamp,
    ) -> Result<String, NodeError> {
        let id = required(task.container_id.as_deref(), "container")?;
        let snapshot = required(task.snapshot.as_deref(), "snapshot location")?.to_owned();
        Location::parse(&snapshot)?;
        self.check_task_location(&snapshot, checkpoint, uid, true)?;
        let stop_snapshot = task.stop_snapshot.clone();
        if let Some(stop) = stop_snapshot.as_deref() {
            self.check_stop_location(stop, &snapshot, checkpoint, uid)?;
        }
        let name = self.request_leaf(id)?;
        let path = self.paths.requests.join(&name);
        let req = HookRequest {
            checkpoint: checkpoint.to_string(),
            snapshot,
            stop_snapshot,
            created: now.to_string(),
            expires: rfc3339(&task.expires),
        };
        let json = serde_json::to_vec_pretty(&req)
            .map_err(|e| NodeError::Refused(format!("cannot encode the request: {e}")))?;
        write_atomic(&self.requests_dir()?, &name, &json)?;
        Ok(format!("wrote {}", path.display()))
    }

    fn upload(
        &self,
        checkpoint: &str,
        uid: &str,
        task: &AgentTask,
        result: &mut AgentResult,
    ) -> Result<String, NodeError> {
        let local = required(task.node_archive.as_deref(), "archive on the node")?;
        let local_name = self.archive_leaf(local)?;
        let local = self.paths.checkpoints.join(&local_name);
        let archive = required(task.archive.as_deref(), "archive location")?;
        let snapshot = required(task.snapshot.as_deref(), "snapshot")?;
        self.check_task_location(archive, checkpoint, uid, true)?;
        self.check_task_location(snapshot, checkpoint, uid, true)?;
        // Opened through the directory's fd: a link planted there is refused, not followed.
        let file = self
            .checkpoints_dir()?
            .open_file(&leaf(&local_name)?, u64::MAX)?;
        let digest = self
            .blobs
            .upload(file, &local.display().to_string(), archive)?;
        // No manifest: the hook wrote no snapshot (no bpffs mount, opted out, or not
        // installed). The controller warns and goes on without maps.
        let manifest = self.blobs.manifest(snapshot)?;
        check_manifest_container(manifest.as_ref(), task, snapshot)?;
        // A stop snapshot is asked of the hook when the container stops, after this: the
        // request stays until AwaitStopSnapshot (or cleanup) removes it. Without maps at the
        // checkpoint there are none at the stop either.
        let keep_request = task.stop_snapshot.is_some() && manifest.is_some();
        if let Some(id) = task.container_id.as_deref().filter(|_| !keep_request) {
            self.requests_dir()?.unlink(&self.request_leaf(id)?)?;
        }
        result.archive_sha256 = Some(digest.sha256.clone());
        result.archive_size = Some(i64::try_from(digest.size).unwrap_or(i64::MAX));
        let signature = match &manifest {
            Some(_) => self.blobs.signature(snapshot)?,
            None => None,
        };
        result.manifest = manifest
            .as_ref()
            .map(|m| summarize_signed(m, signature.as_deref()));
        let maps = match manifest.as_ref() {
            Some(m) => format!("snapshot has {} maps", m.maps.len()),
            None => format!(
                "no map snapshot at {snapshot} (no manifest {snapshot}{})",
                mapsnap::storage::MANIFEST_SUFFIX
            ),
        };
        Ok(format!(
            "uploaded {} ({} bytes) to {archive}; {maps}",
            local.display(),
            digest.size
        ))
    }

    /// A stop snapshot location: the object's own, exactly beside its snapshot.
    fn check_stop_location(
        &self,
        stop: &str,
        snapshot: &str,
        checkpoint: &str,
        uid: &str,
    ) -> Result<(), NodeError> {
        self.check_task_location(stop, checkpoint, uid, true)?;
        let beside = snapshot
            .strip_suffix(layout::SNAPSHOT_NAME)
            .map(|dir| format!("{dir}{}", layout::STOP_SNAPSHOT_NAME));
        if beside.as_deref() == Some(stop) {
            Ok(())
        } else {
            Err(NodeError::Refused(format!(
                "stop snapshot {stop:?} refused: not {} beside {snapshot}",
                layout::STOP_SNAPSHOT_NAME
            )))
        }
    }

    /// Waits until the task expires for the stop snapshot's manifest (the hook writes it after
    /// the snapshot, at the source container's poststop), then removes the hook request so a
    /// later stop writes nothing. The answer carries the manifest, or none if it did not
    /// appear in time; a storage error that lasts until the deadline is the answer's error.
    fn await_stop(
        &self,
        checkpoint: &str,
        uid: &str,
        task: &AgentTask,
        now: Timestamp,
        result: &mut AgentResult,
    ) -> Result<String, NodeError> {
        let stop = required(task.stop_snapshot.as_deref(), "stop snapshot")?;
        let snapshot = required(task.snapshot.as_deref(), "snapshot")?;
        self.check_stop_location(stop, snapshot, checkpoint, uid)?;
        let wait =
            std::time::Duration::try_from(now.duration_until(task.expires.0)).unwrap_or_default();
        let deadline = std::time::Instant::now() + wait;
        let manifest = loop {
            let last = match self.blobs.manifest(stop) {
                Ok(Some(m)) => break Some(m),
                Ok(None) => None,
                Err(e) => Some(e),
            };
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                match last {
                    Some(e) => return Err(e),
                    None => break None,
                }
            }
            std::thread::sleep(self.stop_poll.min(left));
        };
        check_manifest_container(manifest.as_ref(), task, stop)?;
        let signature = match &manifest {
            Some(_) => self.blobs.signature(stop)?,
            None => None,
        };
        if let Some(id) = task.container_id.as_deref() {
            self.requests_dir()?.unlink(&self.request_leaf(id)?)?;
        }
        result.manifest = manifest
            .as_ref()
            .map(|m| summarize_signed(m, signature.as_deref()));
        Ok(match manifest {
            Some(m) => format!(
                "the stop snapshot {stop} exists ({} maps, {} bytes)",
                m.maps.len(),
                m.size
            ),
            None => format!(
                "no stop snapshot at {stop} within {}s (no manifest {stop}{})",
                wait.as_secs(),
                mapsnap::storage::MANIFEST_SUFFIX
            ),
        })
    }

    /// After the upload's result is recorded: removes the node-local archive (it holds the
    /// container's memory).
    pub fn after_upload(&self, task: &AgentTask) -> Result<(), NodeError> {
        if let Some(p) = task.node_archive.as_deref() {
            unlink_archive(&self.checkpoints_dir()?, &self.archive_leaf(p)?)?;
        }
        Ok(())
    }

    fn download(
        &self,
        checkpoint: &str,
        uid: &str,
        task: &AgentTask,
        now: Timestamp,
        result: &mut AgentResult,
    ) -> Result<String, NodeError> {
        let archive = required(task.archive.as_deref(), "archive location")?;
        let want_sha = required(task.archive_sha256.as_deref(), "archive digest")?;
        let pod = required(task.restore_pod.as_deref(), "restored pod")?;
        let request_name = restore_request_leaf(pod)?;
        check_name("uid", uid)?;
        self.check_task_location(archive, checkpoint, uid, false)?;
        if let Some(s) = task.snapshot.as_deref() {
            self.check_task_location(s, checkpoint, uid, false)?;
        }
        let container = required(task.container.as_deref(), "container")?;
        check_name("container name", container)?;
        let images = self.images.clone().ok_or_else(|| {
            NodeError::Unsupported(
                "this agent has no registry for checkpoint images (chart value \
                 restore.registry.repository)"
                    .into(),
            )
        })?;
        let dir = self.checkpoints_dir()?;
        let dest_name = layout::restore_archive_name(uid);
        let dest = self.paths.checkpoints.join(&dest_name);
        let already = match dir.open_file(&leaf(&dest_name)?, u64::MAX) {
            Ok(f) => {
                let mut h = Hashing::new(BufReader::with_capacity(1 << 20, f));
                io::copy(&mut h, &mut io::sink())
                    .map_err(|e| NodeError::io("cannot read", &dest, e))?;
                h.digest().sha256 == want_sha
            }
            Err(e) if e.is_not_found() => false,
            Err(e) => return Err(e.into()),
        };
        if !already {
            let (file, tmp) = dir.create_temp(&format!(".{dest_name}.partial."), 0o600)?;
            let tmp_path = self.paths.checkpoints.join(&tmp);
            let mut w = io::BufWriter::with_capacity(1 << 20, file);
            let got = self.blobs.download(archive, &mut w).and_then(|d| {
                let f = w
                    .into_inner()
                    .map_err(|e| NodeError::io("cannot write", &tmp_path, e.into_error()))?;
                f.sync_all()
                    .map_err(|e| NodeError::io("cannot sync", &tmp_path, e))?;
                Ok(d)
            });
            let got = match got {
                Ok(d) => d,
                Err(e) => {
                    let _ = dir.unlink(&tmp);
                    return Err(e);
                }
            };
            let size_ok = task
                .archive_size
                .is_none_or(|s| u64::try_from(s).ok() == Some(got.size));
            if got.sha256 != want_sha || !size_ok {
                let _ = dir.unlink(&tmp);
                return Err(NodeError::Mismatch(format!(
                    "the archive at {archive} ({} bytes, sha256 {}) is not the one checkpointed \
                     ({} bytes, sha256 {want_sha}): it was replaced or damaged",
                    got.size,
                    got.sha256,
                    task.archive_size.unwrap_or(-1)
                )));
            }
            dir.rename(&tmp, &dest_name, true)?;
        }
        let tag = layout::image_tag(uid);
        let image = images.build_and_push(
            dir.open_file(&leaf(&dest_name)?, u64::MAX)?,
            container,
            &tag,
        )?;
        let req = RestoreRequest {
            checkpoint: checkpoint.to_string(),
            pod: pod.to_string(),
            snapshot: task.snapshot.clone().unwrap_or_default(),
            archive: image.clone(),
            created: now.to_string(),
            expires: rfc3339(&task.expires),
        };
        let json = serde_json::to_vec_pretty(&req)
            .map_err(|e| NodeError::Refused(format!("cannot encode the request: {e}")))?;
        write_atomic(&self.restores_dir()?, &request_name, &json)?;
        // The archive holds the container's memory: once the registry has it, the node copy
        // goes.
        dir.unlink(&dest_name)?;
        result.image = Some(image.clone());
        Ok(format!("fetched {archive}, pushed {image}"))
    }

    fn cleanup(&self, checkpoint: &str, uid: &str, task: &AgentTask) -> Result<String, NodeError> {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut permanent = false;
        let mut record = |what: String, r: Result<bool, NodeError>| match r {
            Ok(true) => done.push(what),
            Ok(false) => {}
            Err(e) => {
                permanent |= e.permanent();
                failed.push(e.to_string());
            }
        };
        if let Some(id) = task.container_id.as_deref() {
            let r = self
                .request_leaf(id)
                .and_then(|n| Ok(self.requests_dir()?.unlink(&n)?));
            record(format!("the hook request of {id}"), r);
        }
        if let Some(p) = task.node_archive.as_deref() {
            let r = self
                .archive_leaf(p)
                .and_then(|n| unlink_archive(&self.checkpoints_dir()?, &n));
            record(p.to_string(), r);
        }
        if let Some(pod) = task.restore_pod.as_deref() {
            let r = restore_request_leaf(pod).and_then(|n| Ok(self.restores_dir()?.unlink(&n)?));
            record(format!("the restore request of {pod}"), r);
        }
        for loc in &task.delete_objects {
            let r = self
                .check_task_location(loc, checkpoint, uid, true)
                .and_then(|()| self.blobs.delete(loc));
            record(loc.clone(), r);
        }
        for image in &task.delete_images {
            let r = match self.images.as_ref() {
                None => Err(NodeError::Unsupported(
                    "this agent has no registry configured".into(),
                )),
                Some(images) => {
                    let tag_ok = image
                        .strip_prefix(images.repository())
                        .and_then(|r| r.strip_prefix("@sha256:"))
                        .is_some_and(|d| d.len() == 64);
                    if tag_ok {
                        images.delete(image).map(|()| true)
                    } else {
                        Err(NodeError::Refused(format!(
                            "image {image:?} refused: not an image of {} by digest",
                            images.repository()
                        )))
                    }
                }
            };
            record(image.clone(), r);
        }
        if failed.is_empty() {
            Ok(if done.is_empty() {
                "nothing (already clean)".to_string()
            } else {
                done.join(", ")
            })
        } else {
            Err(NodeError::Cleanup {
                message: failed.join("; "),
                permanent,
            })
        }
    }
}
