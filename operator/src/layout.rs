//! Names and places derived from an object: storage keys, the restored pod's name, agent
//! lease names, node-local file names. Pure functions, shared by the controller and the agent.

use sha2::{Digest, Sha256};

/// Object name of the map snapshot under an object's prefix.
pub const SNAPSHOT_NAME: &str = "maps.mapsnap";
/// Object name of the snapshot of the pins taken when the source stops (Migrate with
/// `switchover: StopAfterCheckpoint`), beside [`SNAPSHOT_NAME`].
pub const STOP_SNAPSHOT_NAME: &str = "maps-stop.mapsnap";
/// Object name of the kubelet checkpoint archive under an object's prefix.
pub const ARCHIVE_NAME: &str = "checkpoint.tar";
/// Name of the controller's leader-election lease.
pub const LEADER_LEASE: &str = "mapsnap-controller";
/// Prefix of each node agent's lease name.
pub const AGENT_LEASE_PREFIX: &str = "mapsnap-agent-";
/// Annotation on an agent lease: the node it stands for.
pub const LEASE_ANNOTATION_NODE: &str = "mapsnap.io/node";
/// Annotation on an agent lease: the node's runtime.
pub const LEASE_ANNOTATION_RUNTIME: &str = "mapsnap.io/runtime";
/// Annotation on an agent lease: the runtime's version, when the agent could tell.
pub const LEASE_ANNOTATION_RUNTIME_VERSION: &str = "mapsnap.io/runtime-version";
/// Annotation on an agent lease: whether the node's runtime restores containers from
/// checkpoint images: `enabled`, `disabled` or `unknown`.
pub const LEASE_ANNOTATION_RESTORE: &str = "mapsnap.io/restore";
/// Annotation on an agent lease: why restore is disabled or unknown (the setting read).
pub const LEASE_ANNOTATION_RESTORE_REASON: &str = "mapsnap.io/restore-reason";

/// Why the node behind an agent lease cannot restore, if its lease says so (`unknown` is not
/// a refusal: the restore is tried).
pub fn restore_refusal(lease: &k8s_openapi::api::coordination::v1::Lease) -> Option<String> {
    let a = lease.metadata.annotations.as_ref()?;
    if a.get(LEASE_ANNOTATION_RESTORE).map(String::as_str) != Some("disabled") {
        return None;
    }
    let runtime = a.get(LEASE_ANNOTATION_RUNTIME).map_or("?", String::as_str);
    let version = a
        .get(LEASE_ANNOTATION_RUNTIME_VERSION)
        .map(|v| format!(" {v}"))
        .unwrap_or_default();
    let why = a
        .get(LEASE_ANNOTATION_RESTORE_REASON)
        .map_or("restore is disabled", String::as_str);
    Some(format!("{runtime}{version}: {why}"))
}

/// Why a storage location was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("storage location {location:?} is not allowed: {why}")]
pub struct LocationError {
    pub location: String,
    pub why: String,
}

fn trim(loc: &str) -> &str {
    loc.trim_end_matches('/')
}

/// Checks a storage prefix: a supported scheme, no credentials, query or fragment, no `..`
/// segment, and (for a spec override) under one of the allowed prefixes.
pub fn check_location(location: &str, allowed: &[String]) -> Result<(), LocationError> {
    let err = |why: &str| LocationError {
        location: location.to_string(),
        why: why.to_string(),
    };
    let Some((scheme, rest)) = location.split_once("://") else {
        return Err(err("it is not a URL (s3://, gs://, az:// or file:///)"));
    };
    if !matches!(scheme, "s3" | "gs" | "az" | "file") {
        return Err(err(
            "unsupported scheme (use s3://, gs://, az:// or file:///)",
        ));
    }
    if rest.contains(['?', '#', '@', '\\']) {
        return Err(err("credentials, queries and fragments are not allowed"));
    }
    if rest.split('/').any(|seg| seg == "..") {
        return Err(err("`..` segments are not allowed"));
    }
    let loc = trim(location);
    if allowed.is_empty() {
        return Ok(());
    }
    let ok = allowed.iter().any(|a| {
        let a = trim(a);
        loc == a || loc.strip_prefix(a).is_some_and(|r| r.starts_with('/'))
    });
    if ok {
        Ok(())
    } else {
        Err(err(&format!(
            "it is not under an allowed prefix ({})",
            allowed.join(", ")
        )))
    }
}

/// The storage prefix of one object: `<base>/<namespace>/<name>/<uid>`.
pub fn object_prefix(base: &str, namespace: &str, name: &str, uid: &str) -> String {
    format!("{}/{namespace}/{name}/{uid}", trim(base))
}

/// Where the snapshot of one object goes.
pub fn snapshot_location(prefix: &str) -> String {
    format!("{prefix}/{SNAPSHOT_NAME}")
}

/// Where the stop snapshot of one object goes.
pub fn stop_snapshot_location(prefix: &str) -> String {
    format!("{prefix}/{STOP_SNAPSHOT_NAME}")
}

/// Where the archive of one object goes.
pub fn archive_location(prefix: &str) -> String {
    format!("{prefix}/{ARCHIVE_NAME}")
}

/// Lowercase hex SHA-256 of a string.
pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The restored pod's default name: `<source pod>-<5 hex characters of the object's UID>`,
/// within 63 characters (pod host names are cut there).
pub fn restored_pod_name(source_pod: &str, uid: &str) -> String {
    let suffix = &sha256_hex(uid)[..5];
    let mut base: String = source_pod.chars().take(63 - 6).collect();
    while base.ends_with(['-', '.']) {
        base.pop();
    }
    format!("{base}-{suffix}")
}

/// The lease an agent renews for its node (node names longer than fit are hashed).
pub fn agent_lease_name(node: &str) -> String {
    let name = format!("{AGENT_LEASE_PREFIX}{node}");
    if name.len() <= 253 {
        name
    } else {
        format!("{AGENT_LEASE_PREFIX}{}", &sha256_hex(node)[..32])
    }
}

/// File name of an archive fetched for restore into the kubelet checkpoint directory.
pub fn restore_archive_name(uid: &str) -> String {
    format!("mapsnap-restore-{uid}.tar")
}

/// Tag of the checkpoint image pushed for one object (the image is then named by digest).
pub fn image_tag(uid: &str) -> String {
    format!("mapsnap-{uid}")
}

/// File name of a restore request: `<namespace>_<pod>.json`.
pub fn restore_request_name(namespace: &str, pod: &str) -> String {
    format!("{namespace}_{pod}.json")
}

/// Whether `s` is a Kubernetes object name (a DNS subdomain: lowercase letters, digits, `-`
/// and `.`, not starting with `.`), safe to put into a path or a file name.
pub fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with('.')
}

/// Human-readable size (`12.3MiB`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_checked_against_allowed_prefixes() {
        let allowed = vec![
            "s3://snaps/mapsnap".to_string(),
            "file:///srv/snaps/".into(),
        ];
        assert!(check_location("s3://snaps/mapsnap", &allowed).is_ok());
        assert!(check_location("s3://snaps/mapsnap/team-a", &allowed).is_ok());
        assert!(check_location("file:///srv/snaps/x", &allowed).is_ok());
        for bad in [
            "s3://snaps/mapsnap-evil",
            "s3://other/mapsnap",
            "s3://snaps/mapsnap/../x",
            "s3://key:secret@snaps/mapsnap",
            "s3://snaps/mapsnap?endpoint=x",
            "http://snaps/mapsnap",
            "/srv/snaps",
        ] {
            assert!(check_location(bad, &allowed).is_err(), "{bad}");
        }
        assert!(check_location("gs://any/where", &[]).is_ok());
    }

    #[test]
    fn names() {
        let p = object_prefix("s3://b/p/", "edge", "lb", "u-1");
        assert_eq!(p, "s3://b/p/edge/lb/u-1");
        assert_eq!(snapshot_location(&p), "s3://b/p/edge/lb/u-1/maps.mapsnap");
        assert_eq!(archive_location(&p), "s3://b/p/edge/lb/u-1/checkpoint.tar");
        assert_eq!(
            stop_snapshot_location(&p),
            "s3://b/p/edge/lb/u-1/maps-stop.mapsnap"
        );
        let n = restored_pod_name("lb-0", "uid");
        assert!(n.starts_with("lb-0-") && n.len() == 10, "{n}");
        let long = restored_pod_name(&"a".repeat(100), "uid");
        assert_eq!(long.len(), 63);
        assert_eq!(agent_lease_name("node-a"), "mapsnap-agent-node-a");
        assert!(agent_lease_name(&"n".repeat(250)).len() <= 253);
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(3 * 1024 * 1024 + 300 * 1024), "3.3MiB");
    }
}
