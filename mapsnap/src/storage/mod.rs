//! Where snapshots live: local files (the default, no setup), or objects in S3, GCS or Azure
//! through the `object_store` crate, behind one synchronous API.
//!
//! ```no_run
//! use mapsnap::storage::{Location, Storage, StorageConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let loc = Location::parse("s3://snapshots/node-a/app.mapsnap")?;
//! let storage = Storage::open(loc, &StorageConfig::load(None)?)?;
//! let mut w = storage.writer(false)?; // refuses an existing object
//! // ... mapsnap::dump::dump(&maps, w, ...) returns `w` ...
//! let info = w.commit()?; // publishes the object; dropping `w` instead aborts the upload
//! # let _ = info; Ok(()) }
//! ```
//!
//! - Locations: a path, `-`, `file:///path`, `s3://bucket/key`, `gs://bucket/key`,
//!   `az://container/key` ([`Location::parse`]). Endpoints, regions, path style and
//!   credentials come from the environment, the providers' credential chains or the config
//!   file ([`StorageConfig`]), never from the location.
//! - Streaming: [`Storage::reader`] reads while downloading and [`Storage::writer`] uploads
//!   while the dump runs (multipart above `part_size`); memory is bounded by the part size and
//!   concurrency, not the snapshot size.
//! - A manifest (`<key>.manifest.json`, [`Manifest`]) sits beside each snapshot;
//!   [`DigestCheck`] checks a download against it before its last byte is handed on.
//! - Errors are one line naming the location ([`StorageError`]).

mod config;
mod error;
mod local;
mod location;
mod manifest;
#[cfg(feature = "remote")]
mod remote;

use std::io::{Read, Write};

use sha2::Digest;

pub use config::{
    DEFAULT_CONFIG_PATH, MIN_PART_SIZE, StorageConfig, format_duration, parse_duration, parse_size,
};
pub use error::{ErrorKind, Result, StorageError};
pub use location::{Location, MANIFEST_SUFFIX, Provider};
pub use manifest::{
    MANIFEST_VERSION, Manifest, ManifestMap, ManifestSource, container_of_cgroup, container_of_pid,
    rfc3339,
};

/// Size and version of a stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// The store's ETag (remote objects only); pins a second read to the same version.
    pub e_tag: Option<String>,
}

#[derive(Debug)]
enum Backend {
    Stdio,
    Local(std::path::PathBuf),
    #[cfg(feature = "remote")]
    Remote(remote::Remote),
}

/// A snapshot location, opened: reads, writes, and the manifest beside it.
#[derive(Debug)]
pub struct Storage {
    location: Location,
    display: String,
    backend: Backend,
}

impl Storage {
    /// Opens `location`. For remote locations this builds the client (from `config` and the
    /// environment) and its I/O runtime, and starts the overall timeout; it sends no request.
    pub fn open(location: Location, config: &StorageConfig) -> Result<Self> {
        let display = location.to_string();
        let backend = match &location {
            Location::Stdio => Backend::Stdio,
            Location::Local(p) => Backend::Local(p.clone()),
            #[cfg(feature = "remote")]
            Location::Remote {
                provider,
                bucket,
                key,
            } => Backend::Remote(remote::Remote::open(
                *provider, bucket, key, &display, config,
            )?),
            #[cfg(not(feature = "remote"))]
            Location::Remote { .. } => {
                let _ = config;
                return Err(StorageError::new(
                    ErrorKind::Other,
                    &display,
                    "object storage is not built into this binary (mapsnap's `remote` feature)",
                ));
            }
        };
        Ok(Self {
            location,
            display,
            backend,
        })
    }

    /// Parses and opens in one step; remote locations load the config file first.
    pub fn open_str(location: &str, config_file: Option<&std::path::Path>) -> Result<Self> {
        let loc = Location::parse(location)?;
        let cfg = if loc.is_remote() {
            StorageConfig::load(config_file)?
        } else {
            StorageConfig::default()
        };
        Self::open(loc, &cfg)
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The location as text, as errors name it.
    pub fn name(&self) -> &str {
        &self.display
    }

    pub fn is_remote(&self) -> bool {
        #[cfg(feature = "remote")]
        return matches!(self.backend, Backend::Remote(_));
        #[cfg(not(feature = "remote"))]
        false
    }

    /// Size and version of the snapshot, `None` when there is none (always `None` for `-`).
    pub fn head(&self) -> Result<Option<ObjectInfo>> {
        match &self.backend {
            Backend::Stdio => Ok(None),
            Backend::Local(p) => local::head(p),
            #[cfg(feature = "remote")]
            Backend::Remote(r) => r.head(),
        }
    }

    /// A streaming reader of the snapshot. With `version` (from [`Self::head`] or a first
    /// read), a remote read fails instead of returning another version of the object.
    #[cfg_attr(not(feature = "remote"), allow(unused_variables))]
    pub fn reader(&self, version: Option<&ObjectInfo>) -> Result<Box<dyn Read + Send>> {
        match &self.backend {
            Backend::Stdio => Ok(Box::new(std::io::stdin())),
            Backend::Local(p) => Ok(Box::new(local::reader(p)?)),
            #[cfg(feature = "remote")]
            Backend::Remote(r) => {
                let etag = version.and_then(|v| v.e_tag.as_deref());
                Ok(Box::new(r.reader(etag)?))
            }
        }
    }

    /// A writer for a new snapshot. Without `overwrite` an existing snapshot is refused now
    /// (before any work) and again when committing. Nothing is visible under the location
    /// until [`ObjectWriter::commit`]; dropping the writer discards everything written.
    pub fn writer(&self, overwrite: bool) -> Result<ObjectWriter> {
        let inner = match &self.backend {
            Backend::Stdio => WriterInner::Stdout(std::io::BufWriter::with_capacity(
                1 << 20,
                std::io::stdout(),
            )),
            Backend::Local(p) => WriterInner::Local(local::LocalWriter::create(p, overwrite)?),
            #[cfg(feature = "remote")]
            Backend::Remote(r) => WriterInner::Remote(Box::new(r.writer(overwrite)?)),
        };
        Ok(ObjectWriter {
            inner,
            location: self.display.clone(),
        })
    }

    /// Deletes the snapshot and the manifest and signature beside it. Returns whether a
    /// snapshot was there; a missing one (or manifest) is not an error, so cleanups can be
    /// retried.
    pub fn delete(&self) -> Result<bool> {
        let existed = self.head()?.is_some();
        let siblings = [self.location.manifest(), self.location.signature()];
        match &self.backend {
            Backend::Stdio => {}
            Backend::Local(p) => {
                local::remove(p)?;
                for s in siblings {
                    if let Some(Location::Local(m)) = s {
                        local::remove(&m)?;
                    }
                }
            }
            #[cfg(feature = "remote")]
            Backend::Remote(r) => {
                r.delete()?;
                for s in siblings {
                    if let Some(Location::Remote { key, .. }) = s {
                        r.sibling(&key)?.delete()?;
                    }
                }
            }
        }
        Ok(existed)
    }

    /// Removes the signature beside the snapshot, if any (a new unsigned snapshot written
    /// over a signed one must not keep the old, now mismatching, signature).
    pub fn delete_signature(&self) -> Result<()> {
        match (&self.backend, self.location.signature()) {
            (Backend::Local(_), Some(Location::Local(p))) => local::remove(&p),
            #[cfg(feature = "remote")]
            (Backend::Remote(r), Some(Location::Remote { key, .. })) => r.sibling(&key)?.delete(),
            _ => Ok(()),
        }
    }

    /// Where the manifest lives, as text (`None` for `-`).
    pub fn manifest_name(&self) -> Option<String> {
        self.location.manifest().map(|l| l.to_string())
    }

    /// Where the detached signature lives, as text (`None` for `-`).
    pub fn signature_name(&self) -> Option<String> {
        self.location.signature().map(|l| l.to_string())
    }

    /// Reads a small object beside the snapshot, at most `max` bytes; `None` when absent.
    fn read_sibling(&self, sibling: Option<Location>, max: u64) -> Result<Option<Vec<u8>>> {
        let Some(loc) = sibling else { return Ok(None) };
        #[cfg(feature = "remote")]
        let name = loc.to_string();
        match (&self.backend, loc) {
            (Backend::Local(_), Location::Local(p)) => local::read_limited(&p, max),
            #[cfg(feature = "remote")]
            (Backend::Remote(r), Location::Remote { key, .. }) => r
                .sibling(&key)?
                .get_small(&format!("cannot read {name}"), max),
            _ => Ok(None),
        }
    }

    /// Stores a small object beside the snapshot, replacing an older one.
    #[cfg_attr(not(feature = "remote"), allow(unused_variables))]
    fn write_sibling(&self, sibling: Option<Location>, bytes: &[u8]) -> Result<()> {
        let Some(loc) = sibling else { return Ok(()) };
        #[cfg(feature = "remote")]
        let name = loc.to_string();
        match (&self.backend, loc) {
            (Backend::Local(_), Location::Local(p)) => local::put_small(&p, bytes),
            #[cfg(feature = "remote")]
            (Backend::Remote(r), Location::Remote { key, .. }) => r
                .sibling(&key)?
                .put_small(bytes.to_vec(), &format!("cannot write {name}")),
            _ => Ok(()),
        }
    }

    /// The manifest's exact bytes (a signature names their digest), `None` when there is
    /// none. At most the default manifest size limit is read.
    pub fn read_manifest_bytes(&self) -> Result<Option<Vec<u8>>> {
        self.read_sibling(
            self.location.manifest(),
            crate::limits::Limits::default().max_manifest,
        )
    }

    /// The manifest beside the snapshot, `None` when there is none.
    pub fn read_manifest(&self) -> Result<Option<Manifest>> {
        match self.read_manifest_bytes()? {
            None => Ok(None),
            Some(b) => self.parse_manifest(&b).map(Some),
        }
    }

    /// Parses manifest bytes read with [`Self::read_manifest_bytes`].
    pub fn parse_manifest(&self, bytes: &[u8]) -> Result<Manifest> {
        Manifest::from_json(bytes).map_err(|e| {
            StorageError::new(
                ErrorKind::Corrupt,
                self.manifest_name().as_deref().unwrap_or(&self.display),
                format!("the manifest is not valid JSON for this mapsnap: {e}"),
            )
        })
    }

    /// Stores `manifest` beside the snapshot, replacing an older one (call it after the
    /// snapshot itself was committed).
    pub fn write_manifest(&self, manifest: &Manifest) -> Result<()> {
        self.write_manifest_bytes(&manifest.to_json())
    }

    /// Stores these exact manifest bytes (those a signature names) beside the snapshot.
    pub fn write_manifest_bytes(&self, bytes: &[u8]) -> Result<()> {
        self.write_sibling(self.location.manifest(), bytes)
    }

    /// The detached signature beside the snapshot (`<location>.minisig`), `None` when there
    /// is none. Signatures are a few hundred bytes; more than 64 KiB is refused unread.
    pub fn read_signature(&self) -> Result<Option<Vec<u8>>> {
        self.read_sibling(self.location.signature(), MAX_SIGNATURE)
    }

    /// Stores the detached signature beside the snapshot, replacing an older one. Write it
    /// after the snapshot and before the manifest: readers take a manifest as the sign that
    /// the snapshot is complete.
    pub fn write_signature(&self, signature: &[u8]) -> Result<()> {
        self.write_sibling(self.location.signature(), signature)
    }
}

/// The largest signature file read (minisign signatures are about 300 bytes).
pub const MAX_SIGNATURE: u64 = 64 * 1024;

enum WriterInner {
    Stdout(std::io::BufWriter<std::io::Stdout>),
    Local(local::LocalWriter),
    #[cfg(feature = "remote")]
    Remote(Box<remote::RemoteWriter>),
}

/// A snapshot being written. Implements `Write`; [`Self::commit`] publishes it.
pub struct ObjectWriter {
    inner: WriterInner,
    location: String,
}

impl std::fmt::Debug for ObjectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectWriter")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl ObjectWriter {
    /// Publishes what was written under the location (atomically: all or nothing).
    pub fn commit(self) -> Result<ObjectInfo> {
        match self.inner {
            WriterInner::Stdout(mut w) => {
                w.flush().map_err(|e| {
                    StorageError::new(
                        ErrorKind::Other,
                        &self.location,
                        format!("cannot write: {e}"),
                    )
                })?;
                Ok(ObjectInfo {
                    size: 0,
                    e_tag: None,
                })
            }
            WriterInner::Local(w) => w.commit(),
            #[cfg(feature = "remote")]
            WriterInner::Remote(w) => w.commit(),
        }
    }

    /// Discards what was written (aborting a multipart upload). Same as dropping the writer.
    pub fn abort(self) {
        drop(self);
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            WriterInner::Stdout(w) => w.write(buf),
            WriterInner::Local(w) => w.write(buf),
            #[cfg(feature = "remote")]
            WriterInner::Remote(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.inner {
            WriterInner::Stdout(w) => w.flush(),
            WriterInner::Local(w) => w.flush(),
            #[cfg(feature = "remote")]
            WriterInner::Remote(w) => w.flush(),
        }
    }
}

/// Checks a stream against the SHA-256 and size its manifest recorded, *before* handing on
/// its last byte: a reader that applies data as it streams (restore) thus fails before it
/// sees the end of a snapshot that is not the one the manifest describes.
#[derive(Debug)]
pub struct DigestCheck<R> {
    inner: R,
    location: String,
    expect_sha: [u8; 32],
    expect_size: u64,
    hasher: sha2::Sha256,
    seen: u64,
}

impl<R: Read> DigestCheck<R> {
    pub fn new(inner: R, location: &str, sha256: [u8; 32], size: u64) -> Self {
        Self {
            inner,
            location: location.to_string(),
            expect_sha: sha256,
            expect_size: size,
            hasher: sha2::Sha256::new(),
            seen: 0,
        }
    }

    fn fail(&self, what: String) -> std::io::Error {
        StorageError::new(ErrorKind::Corrupt, &self.location, what).into_io()
    }
}

impl<R: Read> Read for DigestCheck<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            if self.seen < self.expect_size && !buf.is_empty() {
                return Err(self.fail(format!(
                    "the snapshot is truncated: it ended at byte {} but its manifest says {} \
                     bytes",
                    self.seen, self.expect_size
                )));
            }
            return Ok(0);
        }
        let total = self.seen + n as u64;
        if total > self.expect_size {
            return Err(self.fail(format!(
                "the snapshot is longer than the {} bytes its manifest records: it was \
                 replaced or damaged after it was written",
                self.expect_size
            )));
        }
        self.hasher.update(&buf[..n]);
        self.seen = total;
        if total == self.expect_size {
            let got: [u8; 32] = self.hasher.clone().finalize().into();
            if got != self.expect_sha {
                return Err(self.fail(format!(
                    "the snapshot's sha256 is {} but its manifest records {}: it was replaced \
                     or damaged after it was written",
                    hex::encode(got),
                    hex::encode(self.expect_sha)
                )));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_provider_builds_from_config_alone() {
        // No request is sent: this checks the wiring of locations and config sections.
        let cfg = StorageConfig {
            s3: vec![
                ("endpoint".into(), "http://127.0.0.1:1".into()),
                ("allow_http".into(), "true".into()),
            ],
            gcs: vec![("skip_signature".into(), "true".into())],
            azure: vec![
                ("account_name".into(), "acct".into()),
                ("skip_signature".into(), "true".into()),
            ],
            ..StorageConfig::default()
        };
        for loc in ["s3://b/k", "gs://b/k", "az://container/k", "/tmp/x", "-"] {
            let st = Storage::open(Location::parse(loc).expect("parse"), &cfg).expect(loc);
            assert_eq!(st.name(), loc);
            assert_eq!(st.is_remote(), loc.contains("://"));
        }
        let bad = StorageConfig {
            s3: vec![("no_such_option".into(), "1".into())],
            ..StorageConfig::default()
        };
        let e = Storage::open(Location::parse("s3://b/k").expect("parse"), &bad)
            .expect_err("unknown option");
        assert_eq!(e.kind, ErrorKind::Config);
    }

    #[test]
    fn digest_check_fails_before_the_last_byte() {
        let data = b"0123456789".to_vec();
        let sha: [u8; 32] = sha2::Sha256::digest(&data).into();
        let mut ok = DigestCheck::new(&data[..], "x", sha, 10);
        let mut out = Vec::new();
        ok.read_to_end(&mut out).expect("matches");
        assert_eq!(out, data);

        let mut bad = data.clone();
        bad[3] ^= 1;
        let mut r = DigestCheck::new(&bad[..], "x", sha, 10);
        let mut buf = [0u8; 4];
        assert_eq!(r.read(&mut buf).expect("first bytes"), 4);
        assert_eq!(r.read(&mut buf).expect("middle bytes"), 4);
        let e = r.read(&mut buf).expect_err("last bytes refused");
        assert_eq!(
            StorageError::from_io(&e).map(|s| s.kind),
            Some(ErrorKind::Corrupt)
        );

        let mut short = DigestCheck::new(&data[..5], "x", sha, 10);
        let e = short.read_to_end(&mut Vec::new()).expect_err("truncated");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
