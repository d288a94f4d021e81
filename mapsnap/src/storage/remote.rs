//! Object stores (S3, GCS, Azure) through `object_store`, bridged to synchronous `Read` and
//! `Write` with a tokio runtime owned by the handle.
//!
//! - Reads: a task on the runtime pulls the GET body (object_store retries broken bodies with
//!   ranged GETs pinned to the ETag) into a bounded channel; `read` takes chunks from it.
//!   Memory: the channel's few chunks.
//! - Writes: bytes collect into one part buffer; up to `part_size` the object is a single PUT
//!   (conditional when not overwriting); beyond, a multipart upload starts and every full part
//!   is sent by a task while the caller keeps producing, with at most `concurrency` parts in
//!   flight. Memory: `(concurrency + 1) * part_size`. Any failure aborts the multipart upload.
//! - GCS writes go through the JSON API ([`GcsJson`]): a media upload, or a resumable upload
//!   whose chunks go in order (one part more is held back: the last chunk carries the size).
//! - Every wait is bounded by the handle's overall deadline.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Read;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, GetOptions, MultipartUpload, ObjectStore, ObjectStoreExt, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RetryConfig,
};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::ObjectInfo;
use super::config::StorageConfig;
use super::error::{ErrorKind, Result, StorageError};
use super::location::Provider;

/// Chunks of a GET body buffered ahead of the reader.
const READ_AHEAD_CHUNKS: usize = 32;

/// How long aborting a failed multipart upload may take at most.
const ABORT_BUDGET: Duration = Duration::from_secs(20);

/// One object in a store, with the runtime that drives its requests.
#[derive(Clone)]
pub(crate) struct Remote {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    rt: Arc<Runtime>,
    location: String,
    timeout: Duration,
    deadline: Instant,
    part_size: usize,
    concurrency: usize,
    /// GCS only: writes go through the JSON API (see [`GcsJson`]).
    gcs: Option<Arc<GcsJson>>,
    provider: Provider,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("location", &self.location)
            .field("store", &self.store.to_string())
            .finish_non_exhaustive()
    }
}

/// Applies the config file's options, then the provider's environment variables on top.
macro_rules! configure {
    ($builder:expr, $key:ty, $opts:expr, $prefix:literal, $location:expr) => {{
        let mut b = $builder;
        for (k, v) in $opts {
            let key = <$key>::from_str(&k.to_ascii_lowercase()).map_err(|e| {
                StorageError::new(
                    ErrorKind::Config,
                    $location,
                    format!("config option {k}: {e}"),
                )
            })?;
            b = b.with_config(key, v.clone());
        }
        for (k, v) in std::env::vars() {
            if k.starts_with($prefix)
                && let Ok(key) = <$key>::from_str(&k.to_ascii_lowercase())
            {
                b = b.with_config(key, v);
            }
        }
        b
    }};
}

impl Remote {
    pub(crate) fn open(
        provider: Provider,
        bucket: &str,
        key: &str,
        location: &str,
        cfg: &StorageConfig,
    ) -> Result<Self> {
        let config_err =
            |e: object_store::Error| StorageError::new(ErrorKind::Config, location, e.to_string());
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: cfg.retries,
            retry_timeout: cfg.retry_timeout,
        };
        let mut gcs = None;
        let store: Arc<dyn ObjectStore> = match provider {
            Provider::S3 => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
                let b = configure!(
                    AmazonS3Builder::new(),
                    AmazonS3ConfigKey,
                    &cfg.s3,
                    "AWS_",
                    location
                );
                Arc::new(
                    b.with_bucket_name(bucket)
                        .with_retry(retry)
                        .build()
                        .map_err(config_err)?,
                )
            }
            Provider::Gcs => {
                use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
                let mut b = configure!(
                    GoogleCloudStorageBuilder::new(),
                    GoogleConfigKey,
                    &cfg.gcs,
                    "GOOGLE_",
                    location
                );
                if let Ok(sa) = std::env::var("SERVICE_ACCOUNT") {
                    b = b.with_service_account_path(sa);
                }
                let json = GcsJson::settings(&b, bucket, &retry);
                let built = b
                    .with_bucket_name(bucket)
                    .with_retry(retry.clone())
                    .build()
                    .map_err(config_err)?;
                gcs = Some(Arc::new(
                    json.connect(built.credentials().clone())
                        .map_err(config_err)?,
                ));
                Arc::new(built)
            }
            Provider::Azure => {
                use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
                let mut b = configure!(
                    MicrosoftAzureBuilder::new(),
                    AzureConfigKey,
                    &cfg.azure,
                    "AZURE_",
                    location
                );
                if let Ok(msi) = std::env::var("MSI_ENDPOINT") {
                    b = b.with_msi_endpoint(msi);
                }
                b = azure_emulator_endpoint(b);
                Arc::new(
                    b.with_container_name(bucket)
                        .with_retry(retry)
                        .build()
                        .map_err(config_err)?,
                )
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mapsnap-storage")
            .enable_all()
            .build()
            .map_err(|e| {
                StorageError::new(
                    ErrorKind::Other,
                    location,
                    format!("cannot start the I/O runtime: {e}"),
                )
            })?;
        let path = ObjPath::parse(key).map_err(|e| {
            StorageError::new(
                ErrorKind::BadLocation,
                location,
                format!("invalid key: {e}"),
            )
        })?;
        Ok(Self {
            store,
            path,
            rt: Arc::new(rt),
            location: location.to_string(),
            timeout: cfg.timeout,
            deadline: Instant::now() + cfg.timeout,
            part_size: cfg.part_size,
            concurrency: cfg.concurrency.max(1),
            gcs,
            provider,
        })
    }

    /// The same store and runtime, another key (the manifest beside the snapshot).
    pub(crate) fn sibling(&self, key: &str) -> Result<Self> {
        let location = self.location.as_str();
        let path = ObjPath::parse(key).map_err(|e| {
            StorageError::new(
                ErrorKind::BadLocation,
                location,
                format!("invalid key: {e}"),
            )
        })?;
        Ok(Self {
            path,
            ..self.clone()
        })
    }

    fn err(&self, what: &str, e: &object_store::Error) -> StorageError {
        StorageError::from_store(&self.location, what, e)
    }

    /// Runs `fut` to completion on the runtime, within the overall deadline.
    fn block<F: Future>(&self, what: &str, fut: F) -> Result<F::Output> {
        block_until(&self.rt, self.deadline, fut)
            .ok_or_else(|| StorageError::timeout(&self.location, what, self.timeout))
    }

    pub(crate) fn head(&self) -> Result<Option<ObjectInfo>> {
        let what = "cannot look up the object";
        match self.block(what, self.store.head(&self.path))? {
            Ok(meta) => Ok(Some(ObjectInfo {
                size: meta.size,
                e_tag: meta.e_tag,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(what, &e)),
        }
    }

    /// Deletes the object; deleting one that is not there is not an error.
    pub(crate) fn delete(&self) -> Result<()> {
        let what = "cannot delete the object";
        match self.block(what, self.store.delete(&self.path))? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(what, &e)),
        }
    }

    /// Starts a streaming GET; with `if_match`, of that version of the object only.
    pub(crate) fn reader(&self, if_match: Option<&str>) -> Result<RemoteReader> {
        let what = "cannot read the object";
        let opts = GetOptions {
            if_match: if_match.map(str::to_string),
            ..GetOptions::default()
        };
        let result = self
            .block(what, self.store.get_opts(&self.path, opts))?
            .map_err(|e| self.err(what, &e))?;
        let size = result.meta.size;
        let (tx, rx) = mpsc::channel(READ_AHEAD_CHUNKS);
        let task = self.rt.spawn(async move {
            let mut stream = result.into_stream();
            while let Some(item) = stream.next().await {
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(RemoteReader {
            remote: self.clone(),
            rx,
            task,
            current: Bytes::new(),
            read: 0,
            size,
            done: false,
        })
    }

    /// Reads a small object whole (a manifest); `None` when it does not exist.
    pub(crate) fn get_small(&self, what: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let fut = async {
            let r = self
                .store
                .get_opts(&self.path, GetOptions::default())
                .await?;
            // Refused before the body is read: a small object that is not small is not
            // what it claims to be.
            if r.meta.size > max {
                return Ok(Err(r.meta.size));
            }
            r.bytes().await.map(Ok)
        };
        match self.block(what, fut)? {
            Ok(Ok(b)) => Ok(Some(b.to_vec())),
            Ok(Err(size)) => Err(StorageError::new(
                ErrorKind::Corrupt,
                self.location.as_str(),
                format!("{what}: it has {size} bytes, more than the {max} allowed"),
            )),
            Err(e) => {
                let se = self.err(what, &e);
                // No object is "none"; no bucket is an error worth reporting now.
                if matches!(e, object_store::Error::NotFound { .. })
                    && !se.message.contains("bucket does not exist")
                {
                    Ok(None)
                } else {
                    Err(se)
                }
            }
        }
    }

    /// Writes a small object in one PUT, replacing what is there.
    pub(crate) fn put_small(&self, bytes: Vec<u8>, what: &str) -> Result<()> {
        self.block(what, self.put_once(Bytes::from(bytes), PutMode::Overwrite))?
            .map_err(|e| self.err(what, &e))?;
        Ok(())
    }

    /// One single-request write (a JSON media upload on GCS).
    async fn put_once(&self, data: Bytes, mode: PutMode) -> object_store::Result<PutResult> {
        match &self.gcs {
            Some(g) => {
                g.media_upload(&self.path, data, matches!(mode, PutMode::Create))
                    .await
            }
            None => {
                self.store
                    .put_opts(&self.path, PutPayload::from(data), PutOptions::from(mode))
                    .await
            }
        }
    }

    pub(crate) fn writer(&self, overwrite: bool) -> Result<RemoteWriter> {
        if !overwrite && self.head()?.is_some() {
            return Err(exists(&self.location));
        }
        Ok(RemoteWriter {
            remote: self.clone(),
            overwrite,
            buf: Vec::with_capacity(self.part_size.min(1 << 20)),
            upload: None,
            written: 0,
            failed: None,
        })
    }
}

fn exists(location: &str) -> StorageError {
    StorageError::new(
        ErrorKind::AlreadyExists,
        location,
        "already exists: pass --overwrite to replace it",
    )
}

/// Runs `fut` on `rt` until it completes or `deadline` passes (then `None`).
fn block_until<F: Future>(rt: &Runtime, deadline: Instant, fut: F) -> Option<F::Output> {
    let left = deadline.saturating_duration_since(Instant::now());
    rt.block_on(async { tokio::time::timeout(left, fut).await.ok() })
}

/// A streaming GET as `std::io::Read`.
pub(crate) struct RemoteReader {
    remote: Remote,
    rx: mpsc::Receiver<object_store::Result<Bytes>>,
    task: JoinHandle<()>,
    current: Bytes,
    read: u64,
    size: u64,
    done: bool,
}

impl std::fmt::Debug for RemoteReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteReader")
            .field("location", &self.remote.location)
            .field("read", &self.read)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Read for RemoteReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            let what = "reading the object";
            let next = self
                .remote
                .block(what, self.rx.recv())
                .map_err(StorageError::into_io)?;
            match next {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => {
                    self.done = true;
                    return Err(self
                        .remote
                        .err(
                            &format!("reading the object failed at byte {}", self.read),
                            &e,
                        )
                        .into_io());
                }
                None => {
                    self.done = true;
                    if self.read != self.size {
                        return Err(StorageError::new(
                            ErrorKind::Other,
                            &self.remote.location,
                            format!(
                                "the download stopped at byte {} of {}",
                                self.read, self.size
                            ),
                        )
                        .into_io());
                    }
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        self.read += n as u64;
        Ok(n)
    }
}

impl Drop for RemoteReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A multipart upload: object_store's (S3 multipart, Azure blocks) or a GCS resumable upload.
enum Upload {
    Store(Box<dyn MultipartUpload>),
    Gcs(GcsResumable),
}

impl Upload {
    fn put_part(&mut self, data: Bytes) -> object_store::UploadPart {
        match self {
            Upload::Store(u) => u.put_part(PutPayload::from(data)),
            Upload::Gcs(u) => u.put_part(data),
        }
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        match self {
            Upload::Store(u) => u.complete().await,
            Upload::Gcs(u) => u.complete().await,
        }
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        match self {
            Upload::Store(u) => u.abort().await,
            Upload::Gcs(u) => u.abort().await,
        }
    }
}

struct Multipart {
    upload: Upload,
    in_flight: VecDeque<JoinHandle<object_store::Result<()>>>,
    parts: usize,
}

/// An upload in progress, as `std::io::Write`. Call [`RemoteWriter::commit`] to publish the
/// object; dropping it (or any error) aborts the upload and publishes nothing.
pub(crate) struct RemoteWriter {
    remote: Remote,
    overwrite: bool,
    buf: Vec<u8>,
    upload: Option<Multipart>,
    written: u64,
    /// The first error, repeated by every later call.
    failed: Option<StorageError>,
}

impl std::fmt::Debug for RemoteWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteWriter")
            .field("location", &self.remote.location)
            .field("written", &self.written)
            .field("multipart", &self.upload.as_ref().map(|m| m.parts))
            .finish_non_exhaustive()
    }
}

impl RemoteWriter {
    /// Sends the full part buffer: starts the multipart upload on the first part, then waits
    /// while `concurrency` parts are already in flight (back pressure on the dump).
    fn send_part(&mut self) -> Result<()> {
        let part_size = self.remote.part_size;
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(part_size));
        if self.upload.is_none() {
            let what = "cannot start the multipart upload";
            let remote = &self.remote;
            let start = async {
                match &remote.gcs {
                    Some(g) => g
                        .start_resumable(&remote.path, !self.overwrite)
                        .await
                        .map(Upload::Gcs),
                    None => remote
                        .store
                        .put_multipart_opts(&remote.path, PutMultipartOptions::default())
                        .await
                        .map(Upload::Store),
                }
            };
            let upload = self
                .remote
                .block(what, start)?
                .map_err(|e| self.remote.err(what, &e))?;
            self.upload = Some(Multipart {
                upload,
                in_flight: VecDeque::new(),
                parts: 0,
            });
        }
        let concurrency = self.remote.concurrency;
        let Some(mp) = self.upload.as_mut() else {
            return Ok(());
        };
        let fut = mp.upload.put_part(Bytes::from(data));
        mp.parts += 1;
        mp.in_flight.push_back(self.remote.rt.spawn(fut));
        while mp.in_flight.len() >= concurrency {
            let Some(h) = mp.in_flight.pop_front() else {
                break;
            };
            wait_part(&self.remote, h, mp.parts)?;
        }
        Ok(())
    }

    fn fail(&mut self, e: StorageError) -> StorageError {
        let e = match self.abort_upload() {
            Ok(()) => e,
            Err(abort) => StorageError::new(
                e.kind,
                &e.location,
                format!(
                    "{}; aborting the multipart upload failed too ({}): incomplete parts may \
                     remain until the bucket's lifecycle rule removes them",
                    e.message, abort.message
                ),
            ),
        };
        self.failed = Some(e.clone());
        e
    }

    /// Aborts the multipart upload, if one was started: no parts are left behind.
    fn abort_upload(&mut self) -> Result<()> {
        let Some(mut mp) = self.upload.take() else {
            return Ok(());
        };
        for h in &mp.in_flight {
            h.abort();
        }
        let deadline = Instant::now() + ABORT_BUDGET;
        let what = "cannot abort the multipart upload";
        let remote = &self.remote;
        match block_until(&self.remote.rt, deadline, async {
            for h in mp.in_flight.drain(..) {
                let _ = h.await;
            }
            mp.upload.abort().await?;
            if remote.provider == Provider::Azure {
                discard_azure_blocks(remote.store.as_ref(), &remote.path).await?;
            }
            Ok(())
        }) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(self.remote.err(what, &e)),
            None => Err(StorageError::timeout(
                &self.remote.location,
                what,
                ABORT_BUDGET,
            )),
        }
    }

    /// Finishes the upload and publishes the object under its key.
    ///
    /// Without `overwrite`, a small object is one conditional PUT (`If-None-Match: *` on S3
    /// and Azure, `ifGenerationMatch=0` on GCS): atomic. A multipart upload is checked for an
    /// existing object just before it is completed (object_store 0.14 cannot send a
    /// conditional CompleteMultipartUpload), so two writers racing in that instant can
    /// still replace each other; on GCS the resumable upload carries `ifGenerationMatch=0`,
    /// so the service refuses that commit too.
    pub(crate) fn commit(mut self) -> Result<ObjectInfo> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let written = self.written;
        if self.upload.is_none() {
            let what = "cannot write the object";
            let mode = if self.overwrite {
                PutMode::Overwrite
            } else {
                PutMode::Create
            };
            let data = std::mem::take(&mut self.buf);
            let r = self
                .remote
                .block(what, self.remote.put_once(Bytes::from(data), mode))?;
            return match r {
                Ok(put) => Ok(ObjectInfo {
                    size: written,
                    e_tag: put.e_tag,
                }),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => {
                    Err(exists(&self.remote.location))
                }
                Err(e) => Err(self.remote.err(what, &e)),
            };
        }
        if !self.buf.is_empty()
            && let Err(e) = self.send_part()
        {
            return Err(self.fail(e));
        }
        let result = (|| -> Result<ObjectInfo> {
            let Some(mp) = self.upload.as_mut() else {
                return Err(exists(&self.remote.location));
            };
            let parts = mp.parts;
            while let Some(h) = mp.in_flight.pop_front() {
                wait_part(&self.remote, h, parts)?;
            }
            if !self.overwrite && self.remote.head()?.is_some() {
                return Err(exists(&self.remote.location));
            }
            let what = "cannot complete the multipart upload";
            let put = self
                .remote
                .block(what, mp.upload.complete())?
                .map_err(|e| self.remote.err(what, &e))?;
            Ok(ObjectInfo {
                size: written,
                e_tag: put.e_tag,
            })
        })();
        match result {
            Ok(info) => {
                self.upload = None;
                Ok(info)
            }
            Err(e) => Err(self.fail(e)),
        }
    }
}

fn wait_part(remote: &Remote, h: JoinHandle<object_store::Result<()>>, parts: usize) -> Result<()> {
    let what = format!("uploading a part (of {parts} so far) failed");
    match remote.block(&what, h)? {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(remote.err(&what, &e)),
        Err(join) => Err(StorageError::new(
            ErrorKind::Other,
            &remote.location,
            format!("{what}: {join}"),
        )),
    }
}

impl std::io::Write for RemoteWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Some(e) = &self.failed {
            return Err(e.clone().into_io());
        }
        let room = self.remote.part_size - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() == self.remote.part_size
            && let Err(e) = self.send_part()
        {
            return Err(self.fail(e).into_io());
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RemoteWriter {
    fn drop(&mut self) {
        if self.upload.is_some() {
            if let Err(e) = self.abort_upload() {
                tracing::warn!("{e}");
            } else {
                tracing::info!(
                    "{}: upload abandoned; the multipart upload was aborted",
                    self.remote.location
                );
            }
        }
    }
}

/// Azure Blob emulators (Azurite) on an endpoint from the config file or the environment.
///
/// object_store's emulator mode (`use_emulator`) takes its endpoint only from
/// `AZURITE_BLOB_STORAGE_URL` and ignores `endpoint`; with an `endpoint` set as well, the
/// emulator is reached as an ordinary account on that endpoint (path style,
/// `http://host:port/devstoreaccount1`, the dev account and key unless others are set), which
/// is what emulator mode does on its fixed URL.
fn azure_emulator_endpoint(
    b: object_store::azure::MicrosoftAzureBuilder,
) -> object_store::azure::MicrosoftAzureBuilder {
    use object_store::ClientConfigKey;
    use object_store::azure::AzureConfigKey as K;
    let on = b
        .get_config_value(&K::UseEmulator)
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"));
    let Some(endpoint) = b.get_config_value(&K::Endpoint).filter(|_| on) else {
        return b;
    };
    let mut b = b
        .with_config(K::UseEmulator, "false")
        .with_endpoint(endpoint)
        .with_config(K::Client(ClientConfigKey::AllowHttp), "true");
    if b.get_config_value(&K::AccountName).is_none() {
        b = b.with_account(AZURITE_ACCOUNT);
    }
    let has_credential = [K::AccessKey, K::SasKey, K::Token, K::ClientSecret]
        .iter()
        .any(|k| b.get_config_value(k).is_some());
    if !has_credential {
        b = b.with_access_key(AZURITE_KEY);
    }
    b
}

/// Azurite's well-known development account (public, documented by Microsoft).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// After an abandoned Azure upload: Azure has no call that drops uncommitted blocks (they
/// linger 7 days), but any commit to the blob discards them. When no blob exists, an empty
/// conditional Put Blob (`If-None-Match: *`) followed by deleting that same version leaves
/// nothing behind. When a blob exists, its blocks go with its next commit or deletion.
///
/// Azurite counts a blob holding only uncommitted blocks as existing (the conditional put
/// answers 409) while a lookup says 404; there Delete Blob drops the blocks. A writer that
/// commits the key between that lookup and the delete would lose its object: keys are
/// written by one writer at a time in mapsnap's flows.
async fn discard_azure_blocks(store: &dyn ObjectStore, path: &ObjPath) -> object_store::Result<()> {
    let placeholder = match store
        .put_opts(path, PutPayload::new(), PutOptions::from(PutMode::Create))
        .await
    {
        Ok(put) => put,
        Err(object_store::Error::AlreadyExists { .. })
        | Err(object_store::Error::Precondition { .. }) => {
            return match store.head(path).await {
                Err(object_store::Error::NotFound { .. }) => match store.delete(path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e),
                },
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
        }
        Err(e) => return Err(e),
    };
    // Delete only our empty placeholder: an overwriting writer may have replaced it since.
    let current = store.head(path).await?;
    if current.size == 0 && current.e_tag.is_some() && current.e_tag == placeholder.e_tag {
        match store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// GCS writes through the JSON API; reads, lookups and deletes stay with object_store's
/// XML API client.
///
/// object_store 0.14 writes to GCS with the XML API (single PUT, XML multipart upload). The
/// JSON API's resumable upload does the same job on the real service and is what Google's
/// own clients use, and it takes `ifGenerationMatch=0` at the start of the upload, so a
/// multipart write without `--overwrite` is refused atomically by the service at the end
/// (the XML multipart completion has no such condition). It is also what GCS test servers
/// implement (fake-gcs-server has no XML write path). Credentials, endpoint (`base_url`)
/// and `allow_http` are the same object_store settings.
struct GcsJson {
    http: object_store::client::HttpClient,
    credentials: object_store::gcp::GcpCredentialProvider,
    skip_signature: bool,
    /// `scheme://host[:port]` of the configured endpoint; session URLs are sent here too.
    base: String,
    bucket: String,
    retries: usize,
    retry_timeout: Duration,
}

/// What [`GcsJson::connect`] needs, read from the builder before it is consumed.
struct GcsSettings {
    base: String,
    bucket: String,
    allow_http: bool,
    skip_signature: bool,
    retries: usize,
    retry_timeout: Duration,
}

impl GcsSettings {
    fn connect(
        self,
        credentials: object_store::gcp::GcpCredentialProvider,
    ) -> object_store::Result<GcsJson> {
        use object_store::client::HttpConnector;
        let options = object_store::ClientOptions::new().with_allow_http(self.allow_http);
        Ok(GcsJson {
            http: object_store::client::ReqwestConnector::default().connect(&options)?,
            credentials,
            skip_signature: self.skip_signature,
            base: self.base,
            bucket: self.bucket,
            retries: self.retries,
            retry_timeout: self.retry_timeout,
        })
    }
}

/// GCS's resumable chunks must be multiples of 256 KiB (all but the last).
const GCS_CHUNK_QUANTUM: usize = 256 << 10;

impl GcsJson {
    fn settings(
        b: &object_store::gcp::GoogleCloudStorageBuilder,
        bucket: &str,
        retry: &RetryConfig,
    ) -> GcsSettings {
        use object_store::ClientConfigKey;
        use object_store::gcp::GoogleConfigKey as K;
        let truthy = |v: Option<String>| {
            v.is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
        };
        GcsSettings {
            base: b
                .get_config_value(&K::BaseUrl)
                .unwrap_or_else(|| "https://storage.googleapis.com".to_string())
                .trim_end_matches('/')
                .to_string(),
            bucket: bucket.to_string(),
            allow_http: truthy(b.get_config_value(&K::Client(ClientConfigKey::AllowHttp))),
            skip_signature: truthy(b.get_config_value(&K::SkipSignature)),
            retries: retry.max_retries,
            retry_timeout: retry.retry_timeout,
        }
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> String {
        let mut u = format!("{}{path}", self.base);
        for (i, (k, v)) in query.iter().enumerate() {
            u.push(if i == 0 { '?' } else { '&' });
            u.push_str(k);
            u.push('=');
            u.push_str(&encode(v));
        }
        u
    }

    /// Sends one request (retrying transient failures) and returns status, headers and body.
    async fn send(
        &self,
        method: &'static str,
        url: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
        key: &ObjPath,
    ) -> object_store::Result<(u16, Option<String>, Bytes)> {
        let started = Instant::now();
        let mut attempt = 0usize;
        loop {
            let r = self
                .send_once(method, url, headers, body.clone(), key)
                .await;
            let transient = match &r {
                Ok((status, _, _)) => matches!(status, 408 | 429 | 500..=599),
                Err(GcsFailure::Http(_)) => true,
                Err(GcsFailure::Fatal(_)) => false,
            };
            attempt += 1;
            if !transient || attempt > self.retries || started.elapsed() >= self.retry_timeout {
                return match r {
                    Ok(ok) => Ok(ok),
                    Err(GcsFailure::Fatal(e)) => Err(e),
                    Err(GcsFailure::Http(e)) => Err(object_store::Error::Generic {
                        store: "GCS",
                        source: Box::new(GcsHttpError {
                            request: format!("{method} {url}"),
                            retries: attempt - 1,
                            source: e,
                        }),
                    }),
                };
            }
            let backoff =
                Duration::from_millis(100u64 << attempt.min(6)).min(Duration::from_secs(5));
            tokio::time::sleep(backoff).await;
        }
    }

    async fn send_once(
        &self,
        method: &'static str,
        url: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
        key: &ObjPath,
    ) -> std::result::Result<(u16, Option<String>, Bytes), GcsFailure> {
        let fatal = |msg: String| {
            GcsFailure::Fatal(object_store::Error::Generic {
                store: "GCS",
                source: msg.into(),
            })
        };
        let mut req = object_store::client::HttpRequest::new(body.into());
        *req.method_mut() = method
            .parse()
            .map_err(|e| fatal(format!("method {method}: {e}")))?;
        *req.uri_mut() = url.parse().map_err(|e| fatal(format!("URL {url}: {e}")))?;
        if !self.skip_signature {
            let cred = self
                .credentials
                .get_credential()
                .await
                .map_err(GcsFailure::Fatal)?;
            let v = format!("Bearer {}", cred.bearer)
                .parse()
                .map_err(|e| fatal(format!("bearer token: {e}")))?;
            req.headers_mut().insert("authorization", v);
        }
        for (k, v) in headers {
            let v = v.parse().map_err(|e| fatal(format!("header {k}: {e}")))?;
            req.headers_mut().insert(*k, v);
        }
        let resp = self.http.execute(req).await.map_err(GcsFailure::Http)?;
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp.into_body().bytes().await.map_err(GcsFailure::Http)?;
        if matches!(status, 200..=299 | 308 | 499) || matches!(status, 408 | 429 | 500..=599) {
            return Ok((status, location, body));
        }
        let source: Box<dyn std::error::Error + Send + Sync> = format!(
            "Error performing {method} {url}: Server returned non-2xx status code: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )
        .into();
        let path = key.to_string();
        Err(GcsFailure::Fatal(match status {
            404 => object_store::Error::NotFound { path, source },
            412 => object_store::Error::Precondition { path, source },
            409 => object_store::Error::AlreadyExists { path, source },
            401 => object_store::Error::Unauthenticated { path, source },
            403 => object_store::Error::PermissionDenied { path, source },
            _ => object_store::Error::Generic {
                store: "GCS",
                source,
            },
        }))
    }

    fn status_error(method: &str, url: &str, status: u16, body: &[u8]) -> object_store::Error {
        object_store::Error::Generic {
            store: "GCS",
            source: format!(
                "Error performing {method} {url}: Server returned non-2xx status code: \
                 {status}: {}",
                String::from_utf8_lossy(body).trim()
            )
            .into(),
        }
    }

    /// The upload URL for `key`; `create` adds `ifGenerationMatch=0` (no object may exist).
    fn upload_url(&self, upload_type: &str, key: &ObjPath, create: bool) -> String {
        let name = key.to_string();
        let mut query = vec![("uploadType", upload_type), ("name", name.as_str())];
        if create {
            query.push(("ifGenerationMatch", "0"));
        }
        self.url(
            &format!("/upload/storage/v1/b/{}/o", encode(&self.bucket)),
            &query,
        )
    }

    /// One-request upload (`uploadType=media`); `create` adds `ifGenerationMatch=0`.
    async fn media_upload(
        &self,
        key: &ObjPath,
        data: Bytes,
        create: bool,
    ) -> object_store::Result<PutResult> {
        let url = self.upload_url("media", key, create);
        let headers = [("content-type", "application/octet-stream".to_string())];
        let (status, _, body) = self.send("POST", &url, &headers, data, key).await?;
        if !(200..=299).contains(&status) {
            return Err(Self::status_error("POST", &url, status, &body));
        }
        Ok(put_result(&body))
    }

    /// Starts a resumable upload; `create` makes its completion conditional on no object
    /// existing (`ifGenerationMatch=0`).
    async fn start_resumable(
        self: &Arc<Self>,
        key: &ObjPath,
        create: bool,
    ) -> object_store::Result<GcsResumable> {
        let url = self.upload_url("resumable", key, create);
        let headers = [
            (
                "content-type",
                "application/json; charset=UTF-8".to_string(),
            ),
            (
                "x-upload-content-type",
                "application/octet-stream".to_string(),
            ),
        ];
        let (status, location, body) = self
            .send("POST", &url, &headers, Bytes::from_static(b"{}"), key)
            .await?;
        let session = match (status, location) {
            (200..=299, Some(loc)) => self
                .session_url(&loc)
                .ok_or_else(|| Self::status_error("POST", &url, status, b"unusable session URL"))?,
            _ => return Err(Self::status_error("POST", &url, status, &body)),
        };
        Ok(GcsResumable {
            gcs: Arc::clone(self),
            key: key.clone(),
            session,
            offset: 0,
            held: None,
            prev: None,
        })
    }

    /// The session URL's path and query on the configured endpoint: requests (and the bearer
    /// token) only ever go to the endpoint from the config, not to a host a response names.
    fn session_url(&self, location: &str) -> Option<String> {
        let u = url::Url::parse(location).ok()?;
        let mut out = format!("{}{}", self.base, u.path());
        if let Some(q) = u.query() {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }
}

/// A failure of one GCS request: transport-level (retried) or final.
enum GcsFailure {
    Http(object_store::client::HttpError),
    Fatal(object_store::Error),
}

/// A transport failure after the retries, naming the request (the endpoint is read from it).
#[derive(Debug)]
struct GcsHttpError {
    request: String,
    retries: usize,
    source: object_store::client::HttpError,
}

impl std::fmt::Display for GcsHttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Error performing {}, after {} retries: {}",
            self.request, self.retries, self.source
        )
    }
}

impl std::error::Error for GcsHttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// ETag and generation from a GCS object resource (JSON).
fn put_result(body: &[u8]) -> PutResult {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    PutResult {
        e_tag: field("etag"),
        version: field("generation"),
        extensions: Default::default(),
    }
}

/// Percent-encodes a query value or path segment (everything but unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A GCS resumable upload fed part by part. Chunks must go in order, so each part's request
/// waits for the one before; the latest part is held back so that the last chunk can carry
/// the total size, which is what completes the upload.
struct GcsResumable {
    gcs: Arc<GcsJson>,
    key: ObjPath,
    session: String,
    /// Bytes handed over so far (sent or held).
    offset: u64,
    held: Option<(u64, Bytes)>,
    /// Signals that the previous chunk was accepted (dropped unsent when it failed).
    prev: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl GcsResumable {
    fn put_part(&mut self, data: Bytes) -> object_store::UploadPart {
        let start = self.offset;
        self.offset += data.len() as u64;
        let Some((held_at, held)) = self.held.replace((start, data)) else {
            return Box::pin(async { Ok(()) });
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let prev = self.prev.replace(rx);
        let gcs = Arc::clone(&self.gcs);
        let key = self.key.clone();
        let session = self.session.clone();
        Box::pin(async move {
            if let Some(p) = prev {
                p.await.map_err(|_| earlier_chunk_failed())?;
            }
            send_chunk(&gcs, &key, &session, held_at, held, None).await?;
            let _ = tx.send(());
            Ok(())
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        if let Some(p) = self.prev.take() {
            p.await.map_err(|_| earlier_chunk_failed())?;
        }
        let (at, data) = self.held.take().unwrap_or((self.offset, Bytes::new()));
        send_chunk(
            &self.gcs,
            &self.key,
            &self.session,
            at,
            data,
            Some(self.offset),
        )
        .await
    }

    /// Cancels the session (`DELETE` on it; GCS answers 499): nothing is published and the
    /// uploaded chunks are dropped.
    async fn abort(&mut self) -> object_store::Result<()> {
        self.held = None;
        let (status, _, body) = self
            .gcs
            .send("DELETE", &self.session, &[], Bytes::new(), &self.key)
            .await
            .or_else(|e| match e {
                object_store::Error::NotFound { .. } => Ok((404, None, Bytes::new())),
                e => Err(e),
            })?;
        match status {
            200..=299 | 404 | 499 => Ok(()),
            _ => Err(GcsJson::status_error(
                "DELETE",
                &self.session,
                status,
                &body,
            )),
        }
    }
}

fn earlier_chunk_failed() -> object_store::Error {
    object_store::Error::Generic {
        store: "GCS",
        source: "an earlier chunk of the resumable upload failed".into(),
    }
}

/// Sends one chunk at `at`; `total` on the last one completes the upload. A retried chunk is
/// sent whole again from its start: GCS ignores bytes it already persisted.
async fn send_chunk(
    gcs: &GcsJson,
    key: &ObjPath,
    session: &str,
    at: u64,
    data: Bytes,
    total: Option<u64>,
) -> object_store::Result<PutResult> {
    let len = data.len() as u64;
    if total.is_none() && (len == 0 || !len.is_multiple_of(GCS_CHUNK_QUANTUM as u64)) {
        return Err(object_store::Error::Generic {
            store: "GCS",
            source: format!(
                "a resumable upload chunk must be a multiple of {GCS_CHUNK_QUANTUM} bytes                  (part_size), not {len}"
            )
            .into(),
        });
    }
    let range = match (len, total) {
        (0, Some(t)) => format!("bytes */{t}"),
        (_, Some(t)) => format!("bytes {at}-{}/{t}", at + len - 1),
        (_, None) => format!("bytes {at}-{}/*", at + len - 1),
    };
    let headers = [("content-range", range)];
    let (status, _, body) = gcs.send("PUT", session, &headers, data, key).await?;
    match (status, total) {
        (308, None) => Ok(PutResult {
            e_tag: None,
            version: None,
            extensions: Default::default(),
        }),
        (200 | 201, Some(_)) => Ok(put_result(&body)),
        _ => Err(GcsJson::status_error("PUT", session, status, &body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gcs(base: &str) -> GcsJson {
        let settings = GcsSettings {
            base: base.to_string(),
            bucket: "b".into(),
            allow_http: true,
            skip_signature: false,
            retries: 0,
            retry_timeout: Duration::from_secs(1),
        };
        let creds = Arc::new(object_store::StaticCredentialProvider::new(
            object_store::gcp::GcpCredential { bearer: "t".into() },
        ));
        settings.connect(creds).expect("client")
    }

    #[test]
    fn gcs_session_urls_stay_on_the_configured_endpoint() {
        // The bearer token goes only where the config points, whatever host a response names.
        let g = gcs("http://127.0.0.1:4443");
        assert_eq!(
            g.session_url(
                "https://evil.example/upload/storage/v1/b/b/o?uploadType=resumable&upload_id=x"
            )
            .as_deref(),
            Some("http://127.0.0.1:4443/upload/storage/v1/b/b/o?uploadType=resumable&upload_id=x")
        );
        assert_eq!(g.session_url("not a url"), None);
    }

    #[test]
    fn gcs_upload_urls_encode_the_key_and_carry_the_condition() {
        let g = gcs("https://storage.googleapis.com");
        let key = ObjPath::parse("dir/a b+c.mapsnap").expect("path");
        assert_eq!(
            g.upload_url("media", &key, true),
            "https://storage.googleapis.com/upload/storage/v1/b/b/o?uploadType=media\
             &name=dir%2Fa%20b%2Bc.mapsnap&ifGenerationMatch=0"
        );
        assert!(
            !g.upload_url("resumable", &key, false)
                .contains("ifGenerationMatch")
        );
    }
}
