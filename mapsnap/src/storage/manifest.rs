//! The manifest stored beside each snapshot (`<key>.manifest.json`): what the snapshot is,
//! readable without downloading it, and the SHA-256 and size a download is checked against.

use serde::{Deserialize, Serialize};

use crate::dump::DumpReport;
use crate::format::StreamDigest;
use crate::model::SnapshotInfo;

/// Version of the manifest's own layout.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub manifest_version: u32,
    /// Snapshot format version (see docs/FORMAT.md).
    pub format_version: u16,
    /// The snapshot's location when it was written.
    pub snapshot: String,
    /// Lowercase hex SHA-256 of the whole snapshot (what `sha256sum` prints).
    pub sha256: String,
    /// Snapshot size in bytes.
    pub size: u64,
    /// RFC 3339, UTC.
    pub created: String,
    pub created_unix: u64,
    /// mapsnap version that wrote it.
    pub tool: String,
    pub source: ManifestSource,
    pub maps: Vec<ManifestMap>,
    /// Maps skipped as unsupported, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// Where the maps came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSource {
    pub host: String,
    pub kernel: String,
    pub possible_cpus: u32,
    /// What was dumped, as given (`pin:/sys/fs/bpf/app`, `container-pid:4321`, ...).
    pub selection: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// `namespace/name` when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

/// One map in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestMap {
    pub name: String,
    #[serde(rename = "type")]
    pub map_type: String,
    pub entries: u64,
    /// Key and value bytes of its entries, before compression.
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_path: Option<String>,
    /// An inner map of a map of maps.
    #[serde(default, skip_serializing_if = "is_false")]
    pub inner: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Manifest {
    /// The manifest of a finished dump.
    pub fn new(
        snapshot: &str,
        info: &SnapshotInfo,
        report: &DumpReport,
        source: ManifestSource,
    ) -> Self {
        Self {
            manifest_version: MANIFEST_VERSION,
            format_version: crate::format::VERSION,
            snapshot: snapshot.to_string(),
            sha256: report.digest.sha256_hex(),
            size: report.digest.bytes,
            created: rfc3339(info.created_unix),
            created_unix: info.created_unix,
            tool: info.tool.clone(),
            source: ManifestSource {
                host: info.hostname.clone(),
                kernel: info.kernel.clone(),
                possible_cpus: info.possible_cpus,
                selection: info.source.clone(),
                ..source
            },
            maps: report
                .maps
                .iter()
                .map(|m| ManifestMap {
                    name: m.name.clone(),
                    map_type: m.map_type.to_string(),
                    entries: m.entries,
                    bytes: m.bytes,
                    pin_path: m.pin_path.clone(),
                    inner: m.inner,
                })
                .collect(),
            skipped: report.skipped.clone(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses and checks a manifest read from outside, within the default manifest size
    /// limit (see [`Manifest::parse`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        Self::parse(bytes, crate::limits::Limits::default().max_manifest)
    }

    /// Parses a manifest of at most `max_bytes` and checks what later code relies on: a
    /// 64-digit lowercase hex SHA-256, pin paths that stay relative, a bounded map list.
    pub fn parse(bytes: &[u8], max_bytes: u64) -> Result<Self, serde_json::Error> {
        use serde::de::Error as _;
        if bytes.len() as u64 > max_bytes {
            return Err(serde_json::Error::custom(format!(
                "the manifest is {} bytes, more than the limit of {max_bytes} (raise it with \
                 --max-manifest-bytes if it is trusted)",
                bytes.len()
            )));
        }
        let m: Self = serde_json::from_slice(bytes)?;
        m.validate().map_err(serde_json::Error::custom)?;
        Ok(m)
    }

    /// Why this manifest cannot be trusted as a description of a snapshot, if it cannot.
    pub fn validate(&self) -> Result<(), String> {
        let max_maps = crate::limits::Limits::default().max_maps as usize;
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err("its sha256 is not 64 lowercase hex digits".into());
        }
        if self.maps.len() > max_maps {
            return Err(format!(
                "it lists {} maps, more than {max_maps}",
                self.maps.len()
            ));
        }
        for m in &self.maps {
            if let Some(p) = &m.pin_path {
                crate::anchor::RelPath::parse(p).map_err(|e| format!("map {:?}: {e}", m.name))?;
            }
        }
        Ok(())
    }

    /// The expected SHA-256, decoded.
    pub fn sha256_bytes(&self) -> Option<[u8; 32]> {
        let v = hex::decode(&self.sha256).ok()?;
        v.try_into().ok()
    }

    /// Why `digest` (of a snapshot as read) is not the snapshot this manifest describes.
    pub fn mismatch(&self, digest: &StreamDigest) -> Option<String> {
        if self.size != digest.bytes || self.sha256 != digest.sha256_hex() {
            return Some(format!(
                "the snapshot ({} bytes, sha256 {}) does not match its manifest ({} bytes, \
                 sha256 {}): it was replaced or damaged after it was written",
                digest.bytes,
                digest.sha256_hex(),
                self.size,
                self.sha256
            ));
        }
        None
    }
}

/// Container id and pod uid of a process, from its cgroup path (Docker, containerd, CRI-O,
/// Podman and the kubelet's `kubepods` layout, cgroup v1 or v2). Empty when not in one.
pub fn container_of_pid(pid: u32) -> (Option<String>, Option<String>) {
    match std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
        Ok(text) => container_of_cgroup(&text),
        Err(_) => (None, None),
    }
}

/// [`container_of_pid`] on the text of a `/proc/PID/cgroup` file.
pub fn container_of_cgroup(text: &str) -> (Option<String>, Option<String>) {
    let mut container = None;
    let mut pod = None;
    for line in text.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or_default();
        for comp in path.split('/') {
            let c = comp.trim_end_matches(".scope").trim_end_matches(".slice");
            let id = c.rsplit(['-', ':']).next().unwrap_or(c);
            if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                container = Some(id.to_string());
            }
            // "kubepods-besteffort-pod<uid>" (systemd driver) or "pod<uid>" (cgroupfs).
            if let Some(i) = c.rfind("pod") {
                let uid = c[i + 3..].replace('_', "-");
                if (i == 0 || c.contains("kubepods"))
                    && uid.len() == 36
                    && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
                {
                    pod = Some(uid);
                }
            }
        }
    }
    (container, pod)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_and_pod_from_cgroup() {
        let id = "0123456789abcdef".repeat(4);
        let systemd = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod12345678_90ab_cdef_1234_567890abcdef.slice/\
             cri-containerd-{id}.scope\n"
        );
        assert_eq!(
            container_of_cgroup(&systemd),
            (
                Some(id.clone()),
                Some("12345678-90ab-cdef-1234-567890abcdef".into())
            )
        );
        let cgroupfs =
            format!("12:memory:/kubepods/burstable/pod12345678-90ab-cdef-1234-567890abcdef/{id}\n");
        assert_eq!(container_of_cgroup(&cgroupfs).0, Some(id.clone()));
        let docker = format!("0::/system.slice/docker-{id}.scope\n");
        assert_eq!(container_of_cgroup(&docker), (Some(id), None));
        assert_eq!(container_of_cgroup("0::/user.slice\n"), (None, None));
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn json_round_trip_and_mismatch() {
        let m = Manifest {
            manifest_version: 1,
            format_version: 1,
            snapshot: "s3://b/k".into(),
            sha256: "00".repeat(32),
            size: 10,
            created: rfc3339(0),
            created_unix: 0,
            tool: "mapsnap".into(),
            source: ManifestSource::default(),
            maps: vec![ManifestMap {
                name: "m".into(),
                map_type: "hash".into(),
                entries: 1,
                bytes: 12,
                pin_path: None,
                inner: false,
            }],
            skipped: vec![],
        };
        let back = Manifest::from_json(&m.to_json()).expect("parse");
        assert_eq!(back, m);
        let text = String::from_utf8(m.to_json()).expect("utf8");
        assert!(text.contains("\"type\": \"hash\""), "{text}");
        let ok = StreamDigest {
            sha256: [0; 32],
            bytes: 10,
        };
        assert!(m.mismatch(&ok).is_none());
        let bad = StreamDigest {
            sha256: [1; 32],
            bytes: 10,
        };
        assert!(m.mismatch(&bad).is_some());
    }
}
