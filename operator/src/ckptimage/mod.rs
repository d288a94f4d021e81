//! Checkpoint OCI images: a container checkpoint archive (the kubelet's, or `podman container
//! checkpoint --export`'s) as a one-layer OCI image that CRI-O, containerd and Podman restore
//! from, pushed to a registry with a maintained distribution client (`oci-client`).
//!
//! The image is what `checkpointctl build` and `podman container checkpoint --create-image`
//! make: one layer whose files are the archive's files (`config.dump`, `spec.dump`,
//! `checkpoint/`, ...), an image config with that layer's diff ID, and, on the manifest, the
//! annotations each engine looks for:
//! - CRI-O (>= 1.26): `io.kubernetes.cri-o.annotations.checkpoint.name` (read from the
//!   image's annotations, which containers/image takes from the manifest);
//! - containerd (>= 2.1): `org.criu.checkpoint.container.name` (read from the `annotations`
//!   of the image's target blob, here the manifest);
//! - Podman: `io.podman.annotations.checkpoint.*` (`podman run IMAGE` restores when
//!   `...checkpoint.runtime.name` is present; `podman container restore IMAGE` mounts the
//!   image and reads the dump files).
//!
//! The layer blob is the archive's own bytes: a tar is already a layer, and a gzip or zstd
//! archive is a `tar+gzip` / `tar+zstd` layer. One pass over the file computes the blob
//! digest, the diff ID and checks the contents while the bytes stream to the registry in
//! chunks (see [`layer`]), so archives of any size are pushed in constant memory: the reader
//! keeps at most a few 1 MiB blocks queued, and oci-client's `push_blob_stream_chunked` sends
//! them as 4 MiB `PATCH`es, hashing as it goes, without needing the digest up front (checked
//! against ours at the end). Only the config and the manifest (a few hundred bytes) are pushed
//! from memory.

mod auth;
mod layer;

use std::collections::BTreeMap;
use std::path::PathBuf;

use futures::StreamExt as _;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::{Digest as _, Sha256};

pub use auth::MAX_DOCKER_CONFIG;
pub use layer::{Compression, MAX_METADATA_FILE};

/// Annotation keys put on the manifest.
pub mod annotations {
    /// CRI-O's marker for a checkpoint image (value: the container's name).
    pub const CRIO_NAME: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";
    pub const CRIO_ROOTFS_IMAGE_NAME: &str =
        "io.kubernetes.cri-o.annotations.checkpoint.rootfsImageName";
    pub const CRIO_ROOTFS_IMAGE_ID: &str =
        "io.kubernetes.cri-o.annotations.checkpoint.rootfsImageID";
    /// containerd's (and checkpointctl's) marker.
    pub const CRIU_NAME: &str = "org.criu.checkpoint.container.name";
    pub const CRIU_ENGINE: &str = "org.criu.checkpoint.engine";
    pub const CRIU_ROOTFS_IMAGE_NAME: &str = "org.criu.checkpoint.rootfsImageName";
    pub const CRIU_ROOTFS_IMAGE_ID: &str = "org.criu.checkpoint.rootfsImageID";
    pub const CRIU_RUNTIME_NAME: &str = "org.criu.checkpoint.runtime.name";
    /// Podman's, as `podman container checkpoint --create-image` writes them.
    pub const PODMAN_NAME: &str = "io.podman.annotations.checkpoint.name";
    pub const PODMAN_RAW_IMAGE_NAME: &str = "io.podman.annotations.checkpoint.rawImageName";
    pub const PODMAN_ROOTFS_IMAGE_ID: &str = "io.podman.annotations.checkpoint.rootfsImageID";
    pub const PODMAN_ROOTFS_IMAGE_NAME: &str = "io.podman.annotations.checkpoint.rootfsImageName";
    pub const PODMAN_RUNTIME_NAME: &str = "io.podman.annotations.checkpoint.runtime.name";
    pub const PODMAN_HOST_ARCH: &str = "io.podman.annotations.checkpoint.host.arch";
    /// Who built the image.
    pub const CREATED_BY: &str = "io.mapsnap.checkpoint-image.created-by";
}

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// A password file or CA file larger than this is refused before it is read.
pub const MAX_SMALL_FILE: u64 = 1 << 20;

/// Where checkpoint images go.
#[derive(Debug, Clone)]
pub struct Registry {
    /// `host[:port]/path`, no tag.
    pub repository: String,
    pub auth: RegistryAuth,
    /// Plain HTTP (a registry on the node's loopback or a test registry).
    pub insecure_http: bool,
    /// A PEM CA bundle to trust besides the system roots.
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    Anonymous,
    Basic { username: String, password: String },
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryAuth::Anonymous => write!(f, "Anonymous"),
            RegistryAuth::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
        }
    }
}

/// The image as pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// `repository@sha256:hex`: what a pod spec names.
    pub reference: String,
    /// `sha256:hex` of the manifest.
    pub digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint archive {0}")]
    Archive(String),
    #[error("registry credentials: {0}")]
    Auth(String),
    #[error("image reference: {0}")]
    Reference(String),
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("internal: {0}")]
    Internal(String),
}

/// `host[:port]` of a repository.
fn registry_host(repository: &str) -> &str {
    repository.split('/').next().unwrap_or(repository)
}

fn parse_reference(repository: &str, suffix: &str) -> Result<Reference, ImageError> {
    let repo = repository.trim().trim_end_matches('/');
    let (host, path) = repo.split_once('/').ok_or_else(|| {
        ImageError::Reference(format!(
            "{repo:?} has no registry host: write host[:port]/path (e.g. registry.example:5000/checkpoints/web)"
        ))
    })?;
    if path.is_empty() || !(host.contains('.') || host.contains(':') || host == "localhost") {
        return Err(ImageError::Reference(format!(
            "{repo:?} does not start with a registry host: write host[:port]/path (e.g. \
             registry.example:5000/checkpoints/web); Docker Hub is docker.io/USER/NAME"
        )));
    }
    if path.contains(['@', ':']) {
        return Err(ImageError::Reference(format!(
            "{repo:?}: the repository takes no tag or digest (they are given separately)"
        )));
    }
    format!("{repo}{suffix}")
        .parse::<Reference>()
        .map_err(|e| ImageError::Reference(format!("{repo}{suffix}: {e}")))
}

fn oci_auth(auth: &RegistryAuth) -> oci_client::secrets::RegistryAuth {
    match auth {
        RegistryAuth::Anonymous => oci_client::secrets::RegistryAuth::Anonymous,
        RegistryAuth::Basic { username, password } => {
            oci_client::secrets::RegistryAuth::Basic(username.clone(), password.clone())
        }
    }
}

fn read_small(path: &std::path::Path, what: &str) -> Result<Vec<u8>, ImageError> {
    let io = |e| ImageError::Io {
        context: format!("reading {what} {}", path.display()),
        source: e,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_SMALL_FILE {
        return Err(ImageError::Io {
            context: format!("{what} {}", path.display()),
            source: std::io::Error::other(format!(
                "{len} bytes, more than the {MAX_SMALL_FILE} allowed"
            )),
        });
    }
    std::fs::read(path).map_err(io)
}

fn client_config(registry: &Registry) -> Result<ClientConfig, ImageError> {
    let mut cfg = ClientConfig {
        protocol: if registry.insecure_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        ..ClientConfig::default()
    };
    if let Some(ca) = &registry.ca_file {
        cfg.extra_root_certificates.push(Certificate {
            encoding: CertificateEncoding::Pem,
            data: read_small(ca, "CA file")?,
        });
    }
    Ok(cfg)
}

fn client(registry: &Registry) -> Result<Client, ImageError> {
    Client::try_from(client_config(registry)?).map_err(|e| ImageError::Registry {
        registry: registry_host(&registry.repository).to_string(),
        message: format!("cannot set up the HTTP client ({e}); check --ca-file"),
    })
}

/// What to tell the user about a registry error.
fn registry_error(registry: &Registry, what: &str, e: OciDistributionError) -> ImageError {
    let hint = match &e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => {
            " (check the credentials: username/password or the dockerconfigjson Secret, and \
             that they may push to this repository)"
        }
        OciDistributionError::RequestError(re) if re.is_connect() => {
            if registry.insecure_http {
                " (is the registry running and reachable from here?)"
            } else {
                " (is the registry running and reachable? a registry without TLS needs \
                 --insecure-http / insecureHTTP; a private CA needs --ca-file)"
            }
        }
        _ => "",
    };
    ImageError::Registry {
        registry: registry_host(&registry.repository).to_string(),
        message: format!("{what} {}: {}{hint}", registry.repository, chain(&e)),
    }
}

/// An error with its causes: the HTTP client's own message hides the TLS or connection
/// detail a user needs ("invalid peer certificate: UnknownIssuer").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The go-style architecture name image configs use.
fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// A string field of `config.dump`, under any of the names the engines use.
fn dump_field<'a>(dump: &'a serde_json::Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| dump.get(k).and_then(|v| v.as_str()))
        .filter(|s| !s.is_empty())
}

/// The manifest annotations for a checkpoint of `container` with this `config.dump`.
pub fn checkpoint_annotations(
    container: &str,
    config_dump: &serde_json::Value,
) -> BTreeMap<String, String> {
    use annotations::*;
    let mut a = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        a.insert(k.to_string(), v.to_string());
    };
    for k in [CRIO_NAME, CRIU_NAME, PODMAN_NAME] {
        put(k, container);
    }
    // Podman (4.3) writes rootfsImageName/rootfsImageID/RawImageName/runtime; CRI-O (and the
    // checkpointctl library) rootfsImageName/rootfsImageRef/rootfsImage/runtime.
    if let Some(v) = dump_field(config_dump, &["rootfsImageName"]) {
        for k in [
            CRIO_ROOTFS_IMAGE_NAME,
            CRIU_ROOTFS_IMAGE_NAME,
            PODMAN_ROOTFS_IMAGE_NAME,
        ] {
            put(k, v);
        }
    }
    if let Some(v) = dump_field(config_dump, &["rootfsImageID", "rootfsImageRef"]) {
        for k in [
            CRIO_ROOTFS_IMAGE_ID,
            CRIU_ROOTFS_IMAGE_ID,
            PODMAN_ROOTFS_IMAGE_ID,
        ] {
            put(k, v);
        }
    }
    if let Some(v) = dump_field(
        config_dump,
        &["rawImageName", "RawImageName", "rootfsImage"],
    ) {
        put(PODMAN_RAW_IMAGE_NAME, v);
    }
    // Podman's `run IMAGE` takes the runtime name as the checkpoint marker: always set it.
    let runtime =
        dump_field(config_dump, &["runtime", "ociRuntime", "OCIRuntime"]).unwrap_or("runc");
    put(PODMAN_RUNTIME_NAME, runtime);
    put(CRIU_RUNTIME_NAME, runtime);
    put(PODMAN_HOST_ARCH, goarch());
    put(
        CREATED_BY,
        concat!("mapsnap-operator ", env!("CARGO_PKG_VERSION")),
    );
    a
}

/// The image config: the one layer's diff ID, this host's platform.
fn image_config(diff_id: &str, created: &str) -> serde_json::Value {
    serde_json::json!({
        "created": created,
        "architecture": goarch(),
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": created, "created_by": "mapsnap-operator checkpoint-image" }],
    })
}

fn manifest(
    config: (&str, usize),
    layer: (&str, u64, &str),
    annotations: &BTreeMap<String, String>,
) -> serde_json::Value {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config.0, "size": config.1 },
        "layers": [{ "mediaType": layer.2, "digest": layer.0, "size": layer.1 }],
        "annotations": annotations,
    })
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Builds the checkpoint image of `archive` (a checkpoint of the container named `container`)
/// and pushes it as `registry.repository:tag`. Returns it by digest.
pub async fn build_and_push(
    archive: std::fs::File,
    container: &str,
    tag: &str,
    registry: &Registry,
) -> Result<PushedImage, ImageError> {
    if container.is_empty() {
        return Err(ImageError::Reference(
            "the container name is empty: give the name of the checkpointed container".into(),
        ));
    }
    let tagged = parse_reference(&registry.repository, &format!(":{tag}"))?;
    let client = client(registry)?;
    let auth = oci_auth(&registry.auth);
    client
        .auth(&tagged, &auth, RegistryOperation::Push)
        .await
        .map_err(|e| registry_error(registry, "cannot authenticate to push to", e))?;

    // The pass over the archive runs on a blocking thread and feeds the chunked upload.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, String>>(4);
    let name = format!("{container} (for {})", registry.repository);
    let scan = tokio::task::spawn_blocking(move || layer::scan(archive, &name, tx));
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(|item| item.map_err(|msg| OciDistributionError::GenericError(Some(msg))));
    let pushed = client.push_blob_stream_chunked(&tagged, stream).await;
    let scanned = scan
        .await
        .map_err(|e| ImageError::Internal(format!("archive reader: {e}")))??;
    let pushed = pushed.map_err(|e| registry_error(registry, "uploading the layer to", e))?;
    if pushed.blob_digest != scanned.digest || pushed.size != scanned.size {
        return Err(ImageError::Internal(format!(
            "uploaded {} ({} bytes) but read {} ({} bytes)",
            pushed.blob_digest, pushed.size, scanned.digest, scanned.size
        )));
    }

    tracing::info!(
        repository = %registry.repository,
        layer = %scanned.digest,
        bytes = scanned.size,
        files = scanned.entries,
        media_type = scanned.compression.media_type(),
        "checkpoint layer uploaded"
    );

    let created = jiff::Timestamp::now().to_string();
    let config = serde_json::to_vec(&image_config(&scanned.diff_id, &created))
        .map_err(|e| ImageError::Internal(e.to_string()))?;
    let config_digest = sha256(&config);
    client
        .push_blob(&tagged, config.clone(), &config_digest)
        .await
        .map_err(|e| registry_error(registry, "uploading the image config to", e))?;

    let annotations = checkpoint_annotations(container, &scanned.config_dump);
    let body = serde_json::to_vec(&manifest(
        (&config_digest, config.len()),
        (
            &scanned.digest,
            scanned.size,
            scanned.compression.media_type(),
        ),
        &annotations,
    ))
    .map_err(|e| ImageError::Internal(e.to_string()))?;
    let digest = sha256(&body);
    client
        .push_manifest_raw(
            &tagged,
            body,
            http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
        )
        .await
        .map_err(|e| registry_error(registry, "pushing the manifest to", e))?;
    let repository = registry.repository.trim().trim_end_matches('/');
    Ok(PushedImage {
        reference: format!("{repository}@{digest}"),
        digest,
    })
}

/// Deletes the manifest `reference` (`repository@sha256:...`) names. The layer and config
/// blobs are left to the registry's garbage collection. The registry must allow deletes
/// (CNCF distribution: `storage.delete.enabled: true`).
pub async fn delete(reference: &str, registry: &Registry) -> Result<(), ImageError> {
    let (repo, digest) = reference.rsplit_once('@').ok_or_else(|| {
        ImageError::Reference(format!(
            "{reference:?} names no digest: only images pushed by digest (repository@sha256:...) are deleted"
        ))
    })?;
    if !digest.starts_with("sha256:") || digest.len() != 71 {
        return Err(ImageError::Reference(format!(
            "{reference:?}: {digest:?} is not a sha256 digest"
        )));
    }
    let target = parse_reference(repo, &format!("@{digest}"))?;
    let client = client(registry)?;
    let token = client
        .auth(&target, &oci_auth(&registry.auth), RegistryOperation::Push)
        .await
        .map_err(|e| registry_error(registry, "cannot authenticate to delete from", e))?;

    let cfg = client_config(registry)?;
    let mut builder = reqwest::Client::builder();
    for c in &cfg.extra_root_certificates {
        let cert = reqwest::Certificate::from_pem(&c.data).map_err(|e| ImageError::Registry {
            registry: registry_host(repo).to_string(),
            message: format!("the CA file is not PEM ({e})"),
        })?;
        builder = builder.add_root_certificate(cert);
    }
    let http = builder.build().map_err(|e| ImageError::Registry {
        registry: registry_host(repo).to_string(),
        message: format!("cannot set up the HTTP client ({e})"),
    })?;
    let scheme = if registry.insecure_http {
        "http"
    } else {
        "https"
    };
    let url = format!(
        "{scheme}://{}/v2/{}/manifests/{digest}",
        target.resolve_registry(),
        target.repository()
    );
    let mut req = http.delete(&url);
    req = match (&token, &registry.auth) {
        (Some(t), _) => req.bearer_auth(t),
        (None, RegistryAuth::Basic { username, password }) => {
            req.basic_auth(username, Some(password))
        }
        (None, RegistryAuth::Anonymous) => req,
    };
    let resp = req.send().await.map_err(|e| ImageError::Registry {
        registry: registry_host(repo).to_string(),
        message: format!("DELETE {url}: {}", chain(&e)),
    })?;
    let status = resp.status();
    if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
        // 404: already gone (deleted earlier, or garbage-collected).
        return Ok(());
    }
    let body = resp.text().await.unwrap_or_default();
    let hint = match status.as_u16() {
        405 => {
            " (the registry does not allow deletes: enable them, e.g. `storage.delete.enabled: true` for the CNCF registry)"
        }
        401 | 403 => " (the credentials may not delete from this repository)",
        _ => "",
    };
    Err(ImageError::Registry {
        registry: registry_host(repo).to_string(),
        message: format!(
            "deleting {reference}: HTTP {status}: {}{hint}",
            body.chars().take(300).collect::<String>().trim()
        ),
    })
}

/// `mapsnap-operator checkpoint-image`: builds and pushes one checkpoint image.
#[derive(Debug, clap::Args)]
pub struct CheckpointImageArgs {
    /// The checkpoint archive (kubelet checkpoint API or `podman container checkpoint --export`;
    /// tar, tar.gz or tar.zst).
    #[arg(long)]
    pub archive: PathBuf,
    /// The name of the checkpointed container (the restore side matches on it).
    #[arg(long)]
    pub container: String,
    /// Where to push: host[:port]/path[:tag] (tag `latest` when omitted). The image is printed
    /// by digest.
    #[arg(long, value_name = "REF")]
    pub push: String,
    /// Registry user name (with --password-file).
    #[arg(long, requires = "password_file", conflicts_with = "authfile")]
    pub username: Option<String>,
    /// A file holding the password or token (trailing newline ignored).
    #[arg(long, requires = "username")]
    pub password_file: Option<PathBuf>,
    /// A docker config JSON (`~/.docker/config.json`, Podman's auth.json, or a
    /// kubernetes.io/dockerconfigjson Secret's value) to take the registry's credentials from.
    #[arg(long)]
    pub authfile: Option<PathBuf>,
    /// Talk plain HTTP to the registry.
    #[arg(long)]
    pub insecure_http: bool,
    /// A PEM CA bundle to trust for the registry's certificate.
    #[arg(long, conflicts_with = "insecure_http")]
    pub ca_file: Option<PathBuf>,
}

/// Splits `host[:port]/path[:tag]` into repository and tag.
pub fn split_tag(reference: &str) -> Result<(String, String), ImageError> {
    if reference.contains('@') {
        return Err(ImageError::Reference(format!(
            "{reference:?}: give a repository and optional tag to push to; the digest is the result"
        )));
    }
    let last_slash = reference.rfind('/').unwrap_or(0);
    match reference[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            Ok((reference[..at].to_string(), reference[at + 1..].to_string()))
        }
        None => Ok((reference.to_string(), "latest".to_string())),
    }
}

/// Runs the `checkpoint-image` command.
pub async fn run_cli(args: &CheckpointImageArgs) -> Result<PushedImage, ImageError> {
    let (repository, tag) = split_tag(&args.push)?;
    let auth = match (&args.username, &args.password_file, &args.authfile) {
        (Some(u), Some(p), _) => {
            let raw = read_small(p, "password file")?;
            let pw = String::from_utf8(raw)
                .map_err(|_| ImageError::Auth(format!("{} is not UTF-8 text", p.display())))?;
            RegistryAuth::Basic {
                username: u.clone(),
                password: pw.trim_end_matches(['\n', '\r']).to_string(),
            }
        }
        (_, _, Some(f)) => RegistryAuth::from_docker_config_json(
            &read_small(f, "auth file")?,
            registry_host(&repository),
        )?,
        _ => RegistryAuth::Anonymous,
    };
    let registry = Registry {
        repository,
        auth,
        insecure_http: args.insecure_http,
        ca_file: args.ca_file.clone(),
    };
    let file = std::fs::File::open(&args.archive).map_err(|e| ImageError::Io {
        context: format!("opening the checkpoint archive {}", args.archive.display()),
        source: e,
    })?;
    build_and_push(file, &args.container, &tag, &registry).await
}

#[cfg(test)]
mod tests;
