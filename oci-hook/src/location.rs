//! Where a snapshot named by an annotation, a request or a checkpoint manifest is, on this
//! host. Nobody but the node's own config decides where on the host a file is read or
//! written:
//!
//! - `s3://`, `gs://`, `az://` URLs: normalised first (scheme and bucket lower-cased, path
//!   split into components; `.`, `..`, empty components and percent-encoding refused), then
//!   compared component by component with the prefixes of `allowed_locations` (or the
//!   `storage_base` when it is remote), and with the pod's tenant prefix below them;
//! - an absolute path (or `file:///path`) in an annotation is a path *inside the container*,
//!   resolved below the directory fd of its volume, never a host path;
//! - a bare relative name (`app/v3.mapsnap`) goes under the node's `storage_base`, below the
//!   pod's tenant prefix;
//! - in a checkpoint manifest, `image:NAME` is a file in the CRIU image directory.

use std::path::Path;
use std::sync::Arc;

use mapsnap::anchor::{Anchor, RelPath};

use crate::config::HookSettings;
use crate::error::{HookError, Result};
use crate::mounts::{ContainerMounts, components};

/// A snapshot location resolved for this host.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// A file below an opened directory: a container volume, the node's local storage base,
    /// the CRIU image directory. `shown` names it in messages and manifests.
    File {
        dir: Arc<Anchor>,
        rel: RelPath,
        shown: String,
    },
    /// An object store URL (normalised).
    Remote(String),
}

impl PartialEq for Resolved {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Remote(a), Self::Remote(b)) => a == b,
            (
                Self::File {
                    rel: a, shown: sa, ..
                },
                Self::File {
                    rel: b, shown: sb, ..
                },
            ) => a == b && sa == sb,
            _ => false,
        }
    }
}

impl Resolved {
    /// How it is named in messages and manifests.
    pub fn as_location(&self) -> String {
        match self {
            Resolved::File { shown, .. } => shown.clone(),
            Resolved::Remote(u) => u.clone(),
        }
    }
}

impl std::fmt::Display for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_location())
    }
}

const SCHEMES: &[&str] = &["s3", "gs", "az"];

fn is_remote(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    SCHEMES
        .iter()
        .any(|p| lower.starts_with(&format!("{p}://")))
}

/// An object store URL split into its parts, after normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    /// Lower-cased scheme (`s3`, `gs`, `az`).
    pub scheme: String,
    /// Lower-cased bucket / container.
    pub bucket: String,
    /// Path components (never empty, `.`, `..` or percent-encoded).
    pub path: Vec<String>,
}

impl RemoteUrl {
    /// Parses and normalises `text`. With `prefix`, a trailing `/` and an empty path are
    /// allowed (a prefix of locations); a location must name an object.
    pub fn parse(text: &str, prefix: bool) -> std::result::Result<Self, String> {
        if text.len() > mapsnap::anchor::MAX_PATH_LEN {
            return Err("it is longer than 4096 bytes".into());
        }
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| "it is not a URL like s3://bucket/key".to_string())?;
        let scheme = scheme.to_ascii_lowercase();
        if !SCHEMES.contains(&scheme.as_str()) {
            return Err(format!("unknown scheme {scheme:?} (s3, gs, az)"));
        }
        if let Some(c) = rest
            .chars()
            .find(|c| matches!(c, '%' | '?' | '#' | '\\' | '@') || c.is_control())
        {
            return Err(format!(
                "it contains {c:?}: percent-encoding, queries, fragments, backslashes and \
                 user names are not accepted in snapshot locations"
            ));
        }
        let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket = bucket.to_ascii_lowercase();
        if bucket.is_empty()
            || !bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
            || bucket == "."
            || bucket == ".."
        {
            return Err(format!("{bucket:?} is not a bucket name"));
        }
        let path = if prefix {
            path.strip_suffix('/').unwrap_or(path)
        } else {
            path
        };
        let mut comps = Vec::new();
        if !path.is_empty() {
            for c in path.split('/') {
                match c {
                    "" => {
                        return Err(
                            "it has an empty path component (`//` or a trailing `/`)".into()
                        );
                    }
                    "." | ".." => return Err("it contains `.` or `..`".into()),
                    c => comps.push(c.to_string()),
                }
            }
        }
        if !prefix && comps.is_empty() {
            return Err("it names no object".into());
        }
        Ok(Self {
            scheme,
            bucket,
            path: comps,
        })
    }

    /// `scheme://bucket/a/b`.
    pub fn to_url(&self) -> String {
        if self.path.is_empty() {
            format!("{}://{}", self.scheme, self.bucket)
        } else {
            format!("{}://{}/{}", self.scheme, self.bucket, self.path.join("/"))
        }
    }

    /// Whether `self` lies below `prefix`, component by component.
    pub fn starts_with(&self, prefix: &RemoteUrl) -> bool {
        self.scheme == prefix.scheme
            && self.bucket == prefix.bucket
            && self.path.starts_with(&prefix.path)
    }
}

/// Who a container belongs to, for the tenant prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenant {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
}

/// Whether `v` can stand as one path component of a tenant prefix (Kubernetes names are
/// DNS labels or subdomains).
fn tenant_value_ok(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v != "."
        && v != ".."
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl Tenant {
    /// The tenant prefix (components) for this container; None when the node does not scope
    /// names (empty template).
    pub fn prefix(&self, settings: &HookSettings) -> Result<Option<Vec<String>>> {
        let t = settings.tenant_prefix.as_str();
        if t.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::new();
        for c in t.split('/') {
            let (value, key) = match c {
                "{namespace}" => (self.namespace.as_deref(), "io.kubernetes.pod.namespace"),
                "{pod}" => (self.pod.as_deref(), "io.kubernetes.pod.name"),
                "{container}" => (self.container.as_deref(), "io.kubernetes.container.name"),
                literal => (Some(literal), ""),
            };
            let v = value.ok_or_else(|| {
                HookError::refused(
                    "a snapshot name chosen by the container".to_string(),
                    format!(
                        "this node scopes snapshot names per tenant ([hook] tenant_prefix = \
                         {t:?}) and the container has no {key} annotation"
                    ),
                )
            })?;
            if !tenant_value_ok(v) {
                return Err(HookError::refused(
                    "a snapshot name chosen by the container".to_string(),
                    format!("{key} {:?} cannot be a path component", truncate(v, 64)),
                ));
            }
            out.push(v.to_string());
        }
        Ok(Some(out))
    }
}

/// At most `n` characters of `s`, for messages built from outside input.
pub fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n).collect();
        t.push('…');
        t
    }
}

/// Checks a remote URL against the node's allowed prefixes (and, with `scope`, the tenant
/// prefix right below the allowed prefix). Returns the normalised URL.
pub fn check_remote(
    url: &str,
    settings: &HookSettings,
    what: &str,
    scope: Option<&[String]>,
) -> Result<String> {
    let shown = truncate(url, 256);
    let parsed = RemoteUrl::parse(url, false)
        .map_err(|r| HookError::refused(format!("{what} {shown}"), r))?;
    mapsnap::storage::Location::parse(&parsed.to_url())?;
    let mut allowed: Vec<&str> = settings
        .allowed_locations
        .iter()
        .map(String::as_str)
        .collect();
    if let Some(base) = settings.storage_base.as_deref().filter(|b| is_remote(b)) {
        allowed.push(base);
    }
    let mut under_allowed = false;
    for prefix in &allowed {
        let Ok(p) = RemoteUrl::parse(prefix, true) else {
            continue;
        };
        if !parsed.starts_with(&p) {
            continue;
        }
        under_allowed = true;
        let rest = &parsed.path[p.path.len()..];
        match scope {
            None if !rest.is_empty() => return Ok(parsed.to_url()),
            Some(s) if rest.len() > s.len() && rest.starts_with(s) => {
                return Ok(parsed.to_url());
            }
            _ => {}
        }
    }
    let reason = if allowed.is_empty() {
        "this node allows no object storage locations (set [hook] storage_base or \
         allowed_locations in the node config)"
            .to_string()
    } else if under_allowed && let Some(s) = scope {
        format!(
            "it is not below this pod's tenant prefix {:?} under an allowed prefix \
             ([hook] tenant_prefix)",
            s.join("/")
        )
    } else {
        format!("it is not under an allowed prefix ({})", allowed.join(", "))
    };
    Err(HookError::refused(format!("{what} {shown}"), reason))
}

/// The node's local storage base, opened (created when `create`).
fn open_local_base(base: &str, create: bool) -> Result<Anchor> {
    let path = Path::new(base.strip_prefix("file://").unwrap_or(base));
    if create {
        // The base itself is the node's own config (trusted); below it, anchors only.
        std::fs::create_dir_all(path)
            .map_err(|e| HookError::io("creating the node's storage base", e))?;
    }
    Anchor::open_trusted(path, "the node's storage base").map_err(|e| {
        HookError::Other(format!(
            "the node's storage base cannot be opened: {}",
            e.source
        ))
    })
}

/// A bare relative name under the node's storage base, below `scope`.
fn under_base(
    name: &str,
    settings: &HookSettings,
    what: &str,
    scope: Option<&[String]>,
    create: bool,
) -> Result<Resolved> {
    let refuse =
        |reason: String| HookError::refused(format!("{what} {:?}", truncate(name, 256)), reason);
    let comps = components(name, false).map_err(|r| refuse(r.into()))?;
    if comps.is_empty() {
        return Err(refuse("it names no file".into()));
    }
    let Some(base) = settings.storage_base.as_deref() else {
        return Err(refuse(
            "a relative name needs [hook] storage_base in the node config".into(),
        ));
    };
    let mut all: Vec<String> = scope.map(<[String]>::to_vec).unwrap_or_default();
    all.extend(comps);
    let joined = all.join("/");
    if is_remote(base) {
        let url = format!("{}/{joined}", base.trim_end_matches('/'));
        let parsed = RemoteUrl::parse(&url, false).map_err(refuse)?;
        Ok(Resolved::Remote(parsed.to_url()))
    } else {
        let rel = RelPath::parse(&joined).map_err(|e| refuse(e.reason.into()))?;
        let dir = open_local_base(base, create)?;
        Ok(Resolved::File {
            dir: Arc::new(dir),
            shown: format!("{}/{joined}", base.trim_end_matches('/')),
            rel,
        })
    }
}

/// Resolves a location given by a container annotation (`restore-from`, `snapshot-to`,
/// `checkpoint-to`). `scope` is the tenant prefix (None: the node does not scope names, or
/// the operator's request named this very location). `create`: the location is written.
pub fn from_annotation(
    text: &str,
    mounts: &ContainerMounts,
    settings: &HookSettings,
    key: &str,
    scope: Option<&[String]>,
    create: bool,
) -> Result<Resolved> {
    if is_remote(text) {
        return check_remote(text, settings, key, scope).map(Resolved::Remote);
    }
    let file = |path: &str| {
        let t = mounts.file_target(path)?;
        Ok(Resolved::File {
            shown: t.container_path(),
            dir: t.mount.anchor.clone(),
            rel: t.rel,
        })
    };
    if let Some(rest) = text.strip_prefix("file://") {
        return file(rest);
    }
    if text.contains("://") {
        return Err(HookError::refused(
            format!("{key} {:?}", truncate(text, 256)),
            "unknown scheme (s3://, gs://, az://, file:// or a path)",
        ));
    }
    if text.starts_with('/') {
        return file(text);
    }
    under_base(text, settings, key, scope, create)
}

/// Resolves the location in a node agent request (trusted: written by root on this node).
pub fn from_request(text: &str, settings: &HookSettings, create: bool) -> Result<Resolved> {
    if text.contains("://") && !text.starts_with("file://") {
        let parsed = RemoteUrl::parse(text, false)
            .map_err(|r| HookError::refused(format!("request snapshot {text}"), r))?;
        mapsnap::storage::Location::parse(&parsed.to_url())?;
        return Ok(Resolved::Remote(parsed.to_url()));
    }
    let path = text.strip_prefix("file://").unwrap_or(text);
    if path.starts_with('/') {
        let p = Path::new(path);
        let (Some(parent), Some(leaf)) = (p.parent(), p.file_name().and_then(|n| n.to_str()))
        else {
            return Err(HookError::refused(
                format!("request snapshot {text:?}"),
                "it names no file",
            ));
        };
        if create {
            std::fs::create_dir_all(parent)
                .map_err(|e| HookError::io("creating the requested snapshot's directory", e))?;
        }
        let dir =
            Anchor::open_trusted(parent, "the requested snapshot's directory").map_err(|e| {
                HookError::Other(format!("the requested snapshot's directory: {}", e.source))
            })?;
        let rel = RelPath::parse(leaf)
            .map_err(|e| HookError::refused(format!("request snapshot {text:?}"), e.reason))?;
        Ok(Resolved::File {
            dir: Arc::new(dir),
            rel,
            shown: path.to_string(),
        })
    } else {
        under_base(path, settings, "request snapshot", None, create)
    }
}

/// Prefix of locations inside the CRIU image directory, in checkpoint manifests.
pub const IMAGE_PREFIX: &str = "image:";

/// Resolves the snapshot location of a checkpoint manifest found in the image directory
/// (which came with a checkpoint archive, so it is checked like an annotation but cannot name
/// container paths). `scope`: the restoring pod's tenant prefix.
pub fn from_manifest(
    text: &str,
    image_dir: &Arc<Anchor>,
    settings: &HookSettings,
    scope: Option<&[String]>,
) -> Result<Resolved> {
    let refuse =
        |r: String| HookError::refused(format!("manifest snapshot {:?}", truncate(text, 256)), r);
    if let Some(name) = text.strip_prefix(IMAGE_PREFIX) {
        let comps = components(name, false).map_err(|r| refuse(r.into()))?;
        if comps.len() != 1 {
            return Err(refuse(
                "an image-directory snapshot must be a plain file name".into(),
            ));
        }
        let rel = RelPath::parse(&comps[0]).map_err(|e| refuse(e.reason.into()))?;
        return Ok(Resolved::File {
            dir: image_dir.clone(),
            rel,
            shown: text.to_string(),
        });
    }
    if is_remote(text) {
        return check_remote(text, settings, "manifest snapshot", scope).map(Resolved::Remote);
    }
    // A local snapshot written on the checkpointing node: only under a local storage base.
    let base = settings.storage_base.as_deref().filter(|b| !is_remote(b));
    if let (Some(base), true) = (base, text.starts_with('/')) {
        let base_comps = components(base.strip_prefix("file://").unwrap_or(base), true)
            .map_err(|r| refuse(r.into()))?;
        let comps = components(text, true).map_err(|r| refuse(r.into()))?;
        let rest = comps
            .strip_prefix(base_comps.as_slice())
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                refuse("a local snapshot must be under the node's storage base".into())
            })?;
        if let Some(s) = scope
            && !(rest.len() > s.len() && rest.starts_with(s))
        {
            return Err(refuse(format!(
                "it is not below this pod's tenant prefix {:?}",
                s.join("/")
            )));
        }
        return under_base(&rest.join("/"), settings, "manifest snapshot", None, false);
    }
    Err(refuse(
        "not an image-directory file, an allowed remote location or a file under the local \
         storage base"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(base: Option<&str>, allowed: &[&str]) -> HookSettings {
        HookSettings {
            storage_base: base.map(str::to_string),
            allowed_locations: allowed.iter().map(|s| s.to_string()).collect(),
            ..HookSettings::default()
        }
    }

    fn ns(n: &str) -> Vec<String> {
        vec![n.to_string()]
    }

    #[test]
    fn urls_are_normalised_before_the_prefix_check() {
        let u = RemoteUrl::parse("S3://Snap/a/b", false).expect("ok");
        assert_eq!(u.to_url(), "s3://snap/a/b");
        for bad in [
            "s3://snap/a/%2e%2e/b",
            "s3://snap/a/..%2fb",
            "s3://snap/a/../b",
            "s3://snap/a//b",
            "s3://snap/a/./b",
            "s3://snap/a/b/",
            "s3://snap/a\\..\\b",
            "s3://user@snap/a",
            "s3://snap/a?x=1",
            "http://snap/a",
            "s3://snap",
        ] {
            assert!(RemoteUrl::parse(bad, false).is_err(), "{bad}");
        }
        assert_eq!(
            RemoteUrl::parse("s3://snap/pre/", true)
                .expect("prefix")
                .path,
            vec!["pre"]
        );
    }

    #[test]
    fn remote_prefixes() {
        let m = ContainerMounts::default();
        let s = settings(Some("s3://snap/node-a"), &["gs://shared/"]);
        assert_eq!(
            from_annotation("s3://snap/node-a/x.mapsnap", &m, &s, "k", None, false)
                .expect("allowed"),
            Resolved::Remote("s3://snap/node-a/x.mapsnap".into())
        );
        assert!(from_annotation("gs://shared/a/b", &m, &s, "k", None, false).is_ok());
        assert!(from_annotation("GS://Shared/a/b", &m, &s, "k", None, false).is_ok());
        for bad in [
            "s3://snap/node-ab/x",
            "s3://other/x",
            "gs://sharedx/y",
            "http://x/y",
            "s3://snap/node-a/%2e%2e/node-b/x",
            "s3://snap/node-a/../node-b/x",
            "s3://snap/node-a//../x",
            "s3://snap/node-a",
        ] {
            let e = from_annotation(bad, &m, &s, "k", None, false).expect_err(bad);
            assert!(e.is_refusal(), "{bad}: {e}");
        }
        let none = settings(None, &[]);
        let e = from_annotation("s3://snap/x", &m, &none, "k", None, false).expect_err("no base");
        assert!(e.to_string().contains("allows no object storage"), "{e}");
    }

    #[test]
    fn tenant_scoping() {
        let m = ContainerMounts::default();
        let s = settings(Some("s3://snap/node-a"), &["s3://shared/snaps/"]);
        let a = ns("team-a");
        assert_eq!(
            from_annotation("app/v1.mapsnap", &m, &s, "k", Some(&a), false).expect("ok"),
            Resolved::Remote("s3://snap/node-a/team-a/app/v1.mapsnap".into())
        );
        assert!(
            from_annotation("s3://shared/snaps/team-a/x", &m, &s, "k", Some(&a), false).is_ok()
        );
        for bad in [
            "s3://shared/snaps/team-b/x",
            "s3://shared/snaps/team-a",
            "s3://snap/node-a/team-b/app/v1.mapsnap",
            "../team-b/app/v1.mapsnap",
        ] {
            let e = from_annotation(bad, &m, &s, "k", Some(&a), false).expect_err(bad);
            assert!(e.is_refusal(), "{bad}: {e}");
        }
        let mut t = Tenant {
            namespace: Some("team-a".into()),
            pod: Some("lb-0".into()),
            container: None,
        };
        let mut cfg = HookSettings::default();
        assert_eq!(t.prefix(&cfg).expect("ok"), Some(ns("team-a")));
        cfg.tenant_prefix = "{namespace}/{pod}".into();
        assert_eq!(
            t.prefix(&cfg).expect("ok"),
            Some(vec!["team-a".to_string(), "lb-0".to_string()])
        );
        cfg.tenant_prefix = String::new();
        assert_eq!(t.prefix(&cfg).expect("ok"), None);
        cfg.tenant_prefix = "{namespace}".into();
        t.namespace = Some("../x".into());
        assert!(t.prefix(&cfg).is_err());
        t.namespace = None;
        assert!(t.prefix(&cfg).is_err());
    }

    #[test]
    fn relative_names_go_under_the_base() {
        let m = ContainerMounts::default();
        let s = settings(Some("s3://snap/node-a/"), &[]);
        assert_eq!(
            from_annotation("app/v1.mapsnap", &m, &s, "k", None, false).expect("ok"),
            Resolved::Remote("s3://snap/node-a/app/v1.mapsnap".into())
        );
        assert!(from_annotation("../x", &m, &s, "k", None, false).is_err());
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().to_str().expect("utf-8");
        let local = settings(Some(base), &[]);
        match from_annotation("a/b", &m, &local, "k", Some(&ns("t")), false).expect("ok") {
            Resolved::File { rel, shown, .. } => {
                assert_eq!(rel.as_string(), "t/a/b");
                assert_eq!(shown, format!("{base}/t/a/b"));
            }
            other => panic!("{other:?}"),
        }
        assert!(from_annotation("a/b", &m, &settings(None, &[]), "k", None, false).is_err());
    }

    #[test]
    fn container_paths_need_a_mount() {
        let m = ContainerMounts::default();
        let s = settings(None, &[]);
        for bad in ["/etc/shadow", "file:///etc/shadow", "/x/../etc"] {
            let e = from_annotation(bad, &m, &s, "k", None, false).expect_err(bad);
            assert!(e.is_refusal(), "{bad}: {e}");
        }
    }

    #[test]
    fn manifests() {
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().join("base");
        std::fs::create_dir_all(base.join("team-a")).expect("mkdir");
        let base_s = base.to_str().expect("utf-8");
        let s = settings(Some(base_s), &["s3://snap/"]);
        let img = Arc::new(Anchor::open_trusted(t.path(), "image dir").expect("open"));
        match from_manifest("image:pins.mapsnap", &img, &s, None).expect("ok") {
            Resolved::File { rel, .. } => assert_eq!(rel.as_string(), "pins.mapsnap"),
            other => panic!("{other:?}"),
        }
        assert!(from_manifest("image:../x", &img, &s, None).is_err());
        assert!(from_manifest("image:a/b", &img, &s, None).is_err());
        assert!(from_manifest("s3://snap/x", &img, &s, None).is_ok());
        assert!(from_manifest("s3://snap/team-a/x", &img, &s, Some(&ns("team-a"))).is_ok());
        assert!(from_manifest("s3://snap/team-b/x", &img, &s, Some(&ns("team-a"))).is_err());
        assert!(from_manifest("s3://other/x", &img, &s, None).is_err());
        assert!(from_manifest(&format!("{base_s}/team-a/b"), &img, &s, None).is_ok());
        assert!(
            from_manifest(&format!("{base_s}/team-b/b"), &img, &s, Some(&ns("team-a"))).is_err()
        );
        assert!(from_manifest("/etc/shadow", &img, &s, None).is_err());
        assert!(from_manifest(&format!("{base_s}/../../etc/shadow"), &img, &s, None).is_err());
    }
}
