//! Where a snapshot named by an annotation, a request or a checkpoint manifest is, on this
//! host. Nobody but the node's own config decides where on the host a file is read or
//! written:
//!
//! - `s3://`, `gs://`, `az://` URLs: only under a prefix of `allowed_locations` (or the
//!   `storage_base` when it is remote);
//! - an absolute path (or `file:///path`) in an annotation is a path *inside the container*,
//!   mapped through its bind mounts (a volume it mounts), never a host path;
//! - a bare relative name (`app/v3.mapsnap`) goes under the node's `storage_base`;
//! - in a checkpoint manifest, `image:NAME` is a file in the CRIU image directory.

use std::path::{Path, PathBuf};

use crate::config::HookSettings;
use crate::error::{HookError, Result};
use crate::mounts::{ContainerMounts, components};

/// A snapshot location resolved for this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A host file.
    Local(PathBuf),
    /// An object store URL.
    Remote(String),
}

impl Resolved {
    /// As the storage layer takes it.
    pub fn as_location(&self) -> String {
        match self {
            Resolved::Local(p) => p.display().to_string(),
            Resolved::Remote(u) => u.clone(),
        }
    }
}

impl std::fmt::Display for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_location())
    }
}

const SCHEMES: &[&str] = &["s3://", "gs://", "az://"];

fn is_remote(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    SCHEMES.iter().any(|p| lower.starts_with(p))
}

/// Checks a remote URL against the node's allowed prefixes.
pub fn check_remote(url: &str, settings: &HookSettings, what: &str) -> Result<String> {
    mapsnap::storage::Location::parse(url)?;
    let mut allowed: Vec<&str> = settings
        .allowed_locations
        .iter()
        .map(String::as_str)
        .collect();
    if let Some(base) = settings.storage_base.as_deref().filter(|b| is_remote(b)) {
        allowed.push(base);
    }
    let ok = allowed.iter().any(|prefix| {
        let p = prefix.trim_end_matches('/');
        url == p || url.starts_with(&format!("{p}/"))
    });
    if ok {
        Ok(url.to_string())
    } else {
        Err(HookError::refused(
            format!("{what} {url}"),
            if allowed.is_empty() {
                "this node allows no object storage locations (set [hook] storage_base or \
                 allowed_locations in /etc/mapsnap/config.toml)"
                    .to_string()
            } else {
                format!("it is not under an allowed prefix ({})", allowed.join(", "))
            },
        ))
    }
}

/// A bare relative name under the node's storage base.
fn under_base(name: &str, settings: &HookSettings, what: &str) -> Result<Resolved> {
    let refuse = |reason: String| HookError::refused(format!("{what} {name:?}"), reason);
    let comps = components(name, false).map_err(|r| refuse(r.into()))?;
    let Some(base) = settings.storage_base.as_deref() else {
        return Err(refuse(
            "a relative name needs [hook] storage_base in the node config".into(),
        ));
    };
    if is_remote(base) {
        Ok(Resolved::Remote(format!(
            "{}/{}",
            base.trim_end_matches('/'),
            comps.join("/")
        )))
    } else {
        let mut p = PathBuf::from(base.strip_prefix("file://").unwrap_or(base));
        for c in &comps {
            p.push(c);
        }
        Ok(Resolved::Local(p))
    }
}

/// Resolves a location given by a container annotation (`restore-from`, `snapshot-to`,
/// `checkpoint-to`).
pub fn from_annotation(
    text: &str,
    mounts: &ContainerMounts,
    settings: &HookSettings,
    key: &str,
) -> Result<Resolved> {
    if is_remote(text) {
        return check_remote(text, settings, key).map(Resolved::Remote);
    }
    if let Some(rest) = text.strip_prefix("file://") {
        return mounts.file_to_host(rest).map(Resolved::Local);
    }
    if text.contains("://") {
        return Err(HookError::refused(
            format!("{key} {text:?}"),
            "unknown scheme (s3://, gs://, az://, file:// or a path)",
        ));
    }
    if text.starts_with('/') {
        return mounts.file_to_host(text).map(Resolved::Local);
    }
    under_base(text, settings, key)
}

/// Resolves the location in a node agent request (trusted: written by root on this node).
pub fn from_request(text: &str, settings: &HookSettings) -> Result<Resolved> {
    if text.contains("://") && !text.starts_with("file://") {
        mapsnap::storage::Location::parse(text)?;
        return Ok(Resolved::Remote(text.to_string()));
    }
    let path = text.strip_prefix("file://").unwrap_or(text);
    if path.starts_with('/') {
        Ok(Resolved::Local(PathBuf::from(path)))
    } else {
        under_base(path, settings, "request snapshot")
    }
}

/// Prefix of locations inside the CRIU image directory, in checkpoint manifests.
pub const IMAGE_PREFIX: &str = "image:";

/// Resolves the snapshot location of a checkpoint manifest found in `image_dir` (which came
/// with a checkpoint archive, so it is checked like an annotation but cannot name container
/// paths).
pub fn from_manifest(text: &str, image_dir: &Path, settings: &HookSettings) -> Result<Resolved> {
    if let Some(name) = text.strip_prefix(IMAGE_PREFIX) {
        let comps = components(name, false)
            .map_err(|r| HookError::refused(format!("manifest snapshot {text:?}"), r))?;
        if comps.len() != 1 {
            return Err(HookError::refused(
                format!("manifest snapshot {text:?}"),
                "an image-directory snapshot must be a plain file name",
            ));
        }
        return Ok(Resolved::Local(image_dir.join(&comps[0])));
    }
    if is_remote(text) {
        return check_remote(text, settings, "manifest snapshot").map(Resolved::Remote);
    }
    // A local snapshot written on the checkpointing node: only under a local storage base.
    let base = settings
        .storage_base
        .as_deref()
        .filter(|b| !is_remote(b))
        .map(|b| PathBuf::from(b.strip_prefix("file://").unwrap_or(b)));
    if let (Some(base), true) = (base, text.starts_with('/')) {
        let p = PathBuf::from(text);
        let rel = p.strip_prefix(&base).map_err(|_| {
            HookError::refused(
                format!("manifest snapshot {text:?}"),
                format!(
                    "a local snapshot must be under the storage base {}",
                    base.display()
                ),
            )
        })?;
        let rel = rel.to_str().unwrap_or("");
        return under_base(rel, settings, "manifest snapshot");
    }
    Err(HookError::refused(
        format!("manifest snapshot {text:?}"),
        "not an image-directory file, an allowed remote location or a file under the local \
         storage base",
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

    #[test]
    fn remote_prefixes() {
        let m = ContainerMounts::default();
        let s = settings(Some("s3://snap/node-a"), &["gs://shared/"]);
        assert_eq!(
            from_annotation("s3://snap/node-a/x.mapsnap", &m, &s, "k").expect("allowed"),
            Resolved::Remote("s3://snap/node-a/x.mapsnap".into())
        );
        assert!(from_annotation("gs://shared/a/b", &m, &s, "k").is_ok());
        for bad in [
            "s3://snap/node-ab/x",
            "s3://other/x",
            "gs://sharedx/y",
            "http://x/y",
        ] {
            let e = from_annotation(bad, &m, &s, "k").expect_err(bad);
            assert!(e.is_refusal(), "{bad}: {e}");
        }
        let none = settings(None, &[]);
        let e = from_annotation("s3://snap/x", &m, &none, "k").expect_err("no base");
        assert!(e.to_string().contains("allows no object storage"), "{e}");
    }

    #[test]
    fn relative_names_go_under_the_base() {
        let m = ContainerMounts::default();
        let s = settings(Some("s3://snap/node-a/"), &[]);
        assert_eq!(
            from_annotation("app/v1.mapsnap", &m, &s, "k").expect("ok"),
            Resolved::Remote("s3://snap/node-a/app/v1.mapsnap".into())
        );
        assert!(from_annotation("../x", &m, &s, "k").is_err());
        let local = settings(Some("/var/lib/mapsnap"), &[]);
        assert_eq!(
            from_annotation("a/b", &m, &local, "k").expect("ok"),
            Resolved::Local(PathBuf::from("/var/lib/mapsnap/a/b"))
        );
        assert!(from_annotation("a/b", &m, &settings(None, &[]), "k").is_err());
    }

    #[test]
    fn container_paths_need_a_mount() {
        let m = ContainerMounts::default();
        let s = settings(None, &[]);
        for bad in ["/etc/shadow", "file:///etc/shadow", "/x/../etc"] {
            let e = from_annotation(bad, &m, &s, "k").expect_err(bad);
            assert!(e.is_refusal(), "{bad}: {e}");
        }
    }

    #[test]
    fn manifests() {
        let s = settings(Some("/var/lib/mapsnap"), &["s3://snap/"]);
        let img = Path::new("/tmp/img");
        assert_eq!(
            from_manifest("image:pins.mapsnap", img, &s).expect("ok"),
            Resolved::Local(img.join("pins.mapsnap"))
        );
        assert!(from_manifest("image:../x", img, &s).is_err());
        assert!(from_manifest("image:a/b", img, &s).is_err());
        assert!(from_manifest("s3://snap/x", img, &s).is_ok());
        assert!(from_manifest("s3://other/x", img, &s).is_err());
        assert!(from_manifest("/var/lib/mapsnap/a/b", img, &s).is_ok());
        assert!(from_manifest("/etc/shadow", img, &s).is_err());
        assert!(from_manifest("/var/lib/mapsnap/../../etc/shadow", img, &s).is_err());
    }
}
