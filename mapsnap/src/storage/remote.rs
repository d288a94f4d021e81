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
    PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
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
                Arc::new(
                    b.with_bucket_name(bucket)
                        .with_retry(retry)
                        .build()
                        .map_err(config_err)?,
                )
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
    pub(crate) fn get_small(&self, what: &str) -> Result<Option<Vec<u8>>> {
        let fut = async {
            let r = self
                .store
                .get_opts(&self.path, GetOptions::default())
                .await?;
            r.bytes().await
        };
        match self.block(what, fut)? {
            Ok(b) => Ok(Some(b.to_vec())),
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
        self.block(
            what,
            self.store
                .put_opts(&self.path, PutPayload::from(bytes), PutOptions::default()),
        )?
        .map_err(|e| self.err(what, &e))?;
        Ok(())
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

struct Multipart {
    upload: Box<dyn MultipartUpload>,
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
            let upload = self
                .remote
                .block(
                    what,
                    self.remote
                        .store
                        .put_multipart_opts(&self.remote.path, PutMultipartOptions::default()),
                )?
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
        let fut = mp.upload.put_part(PutPayload::from(Bytes::from(data)));
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
        match block_until(&self.remote.rt, deadline, async {
            for h in mp.in_flight.drain(..) {
                let _ = h.await;
            }
            mp.upload.abort().await
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
    /// still replace each other.
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
            let r = self.remote.block(
                what,
                self.remote.store.put_opts(
                    &self.remote.path,
                    PutPayload::from(Bytes::from(data)),
                    PutOptions::from(mode),
                ),
            )?;
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
