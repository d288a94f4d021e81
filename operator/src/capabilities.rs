//! What this node's runtime can do, read from its configuration files (mounted read-only in
//! the agent under a host root) and reported in the agent's lease, so that a restore aimed at
//! a node that cannot restore fails at PrepareRestore with the setting to change.
//!
//! - CRI-O: `[crio.checkpoint_restore] container_level_enabled` in `/etc/crio/crio.conf` and
//!   the drop-ins `/etc/crio/crio.conf.d/*.conf` (read in name order, later ones win).
//!   `"checkpoint_restore"` restores; `"checkpoint_only"` (the default of CRI-O releases since
//!   September 2026) does not. Not set: unknown (older releases restore, newer do not).
//! - containerd (>= 2.1): `enable_experimental_restore_via_create = true` (in the CRI plugin's
//!   section, `[plugins."io.containerd.grpc.v1.cri"]`, of `/etc/containerd/config.toml`)
//!   restores; absent or false does not (the default since 2.2.7 and 2.3.4).

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::Runtime;
use crate::layout;

/// Whether the node restores containers from checkpoint images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    Enabled,
    Disabled,
    Unknown,
}

impl Restore {
    pub fn as_str(self) -> &'static str {
        match self {
            Restore::Enabled => "enabled",
            Restore::Disabled => "disabled",
            Restore::Unknown => "unknown",
        }
    }
}

/// What the agent found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub runtime: Runtime,
    pub version: Option<String>,
    pub restore: Restore,
    /// The setting (and file) the verdict comes from.
    pub reason: String,
}

impl Capabilities {
    /// The lease annotations that carry it.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::from([
            (
                layout::LEASE_ANNOTATION_RUNTIME.to_string(),
                self.runtime.as_str().to_string(),
            ),
            (
                layout::LEASE_ANNOTATION_RESTORE.to_string(),
                self.restore.as_str().to_string(),
            ),
            (
                layout::LEASE_ANNOTATION_RESTORE_REASON.to_string(),
                self.reason.clone(),
            ),
        ]);
        if let Some(v) = &self.version {
            a.insert(
                layout::LEASE_ANNOTATION_RUNTIME_VERSION.to_string(),
                v.clone(),
            );
        }
        a
    }
}

/// Files bigger than this are not configuration files.
const MAX_CONFIG: u64 = 1 << 20;

fn read_toml(path: &Path) -> Option<Result<toml::Table, String>> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_CONFIG {
        return Some(Err(format!(
            "{} is not a small regular file",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.parse::<toml::Table>()
            .map_err(|e| format!("{}: {e}", path.display())),
    )
}

/// Reads the node's runtime configuration under `host_root` (`/` on the node, `/host` in the
/// agent).
pub fn probe(runtime: Runtime, host_root: &Path, version: Option<String>) -> Capabilities {
    let (restore, reason) = match runtime {
        Runtime::Crio => probe_crio(host_root),
        Runtime::Containerd => probe_containerd(host_root),
    };
    Capabilities {
        runtime,
        version,
        restore,
        reason,
    }
}

fn probe_crio(root: &Path) -> (Restore, String) {
    let main = root.join("etc/crio/crio.conf");
    let mut files = vec![main];
    if let Ok(rd) = std::fs::read_dir(root.join("etc/crio/crio.conf.d")) {
        let mut drop_ins: Vec<_> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        drop_ins.sort();
        files.extend(drop_ins);
    }
    let mut found: Option<(String, String)> = None;
    for f in &files {
        match read_toml(f) {
            None => {}
            Some(Err(e)) => return (Restore::Unknown, format!("cannot read {e}")),
            Some(Ok(t)) => {
                let v = t
                    .get("crio")
                    .and_then(|c| c.get("checkpoint_restore"))
                    .and_then(|c| c.get("container_level_enabled"))
                    .and_then(|v| v.as_str());
                if let Some(v) = v {
                    found = Some((v.to_string(), f.display().to_string()));
                }
            }
        }
    }
    match found {
        Some((v, f)) if v == "checkpoint_restore" => (
            Restore::Enabled,
            format!("[crio.checkpoint_restore] container_level_enabled = \"{v}\" in {f}"),
        ),
        Some((v, f)) => (
            Restore::Disabled,
            format!(
                "[crio.checkpoint_restore] container_level_enabled = \"{v}\" in {f}; set \
                 \"checkpoint_restore\" on restore targets"
            ),
        ),
        None => (
            Restore::Unknown,
            "[crio.checkpoint_restore] container_level_enabled is not set: CRI-O releases since \
             September 2026 (1.34.14, 1.35.9, 1.36.6 and later) default to \"checkpoint_only\" \
             (no restore); set \"checkpoint_restore\" on restore targets"
                .into(),
        ),
    }
}

/// Looks for `key` anywhere in a TOML tree.
fn find_bool(v: &toml::Value, key: &str) -> Option<bool> {
    match v {
        toml::Value::Table(t) => t.iter().find_map(|(k, x)| {
            if k == key {
                x.as_bool()
            } else {
                find_bool(x, key)
            }
        }),
        _ => None,
    }
}

fn probe_containerd(root: &Path) -> (Restore, String) {
    let f = root.join("etc/containerd/config.toml");
    const KEY: &str = "enable_experimental_restore_via_create";
    match read_toml(&f) {
        None => (
            Restore::Disabled,
            format!(
                "{} not found: containerd restores only with {KEY} = true (containerd >= 2.1)",
                f.display()
            ),
        ),
        Some(Err(e)) => (Restore::Unknown, format!("cannot read {e}")),
        Some(Ok(t)) => match find_bool(&toml::Value::Table(t), KEY) {
            Some(true) => (Restore::Enabled, format!("{KEY} = true in {}", f.display())),
            other => (
                Restore::Disabled,
                format!(
                    "{KEY} is {} in {}: set it to true in [plugins.\"io.containerd.grpc.v1.cri\"] \
                     on restore targets (containerd >= 2.1; off by default since 2.2.7/2.3.4)",
                    if other.is_some() { "false" } else { "not set" },
                    f.display()
                ),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }

    #[test]
    fn crio_settings_and_drop_ins() {
        let d = tempfile::tempdir().expect("tmp");
        let c = probe(Runtime::Crio, d.path(), None);
        assert_eq!(c.restore, Restore::Unknown, "{c:?}");
        write(
            d.path(),
            "etc/crio/crio.conf",
            "[crio.checkpoint_restore]\ncontainer_level_enabled = \"checkpoint_only\"\n",
        );
        let c = probe(Runtime::Crio, d.path(), Some("1.35.2".into()));
        assert_eq!(c.restore, Restore::Disabled);
        assert!(c.reason.contains("checkpoint_only"), "{}", c.reason);
        // A drop-in later in name order wins.
        write(
            d.path(),
            "etc/crio/crio.conf.d/50-mapsnap.conf",
            "[crio.checkpoint_restore]\ncontainer_level_enabled = \"checkpoint_restore\"\n",
        );
        let c = probe(Runtime::Crio, d.path(), Some("1.35.2".into()));
        assert_eq!(c.restore, Restore::Enabled, "{c:?}");
        let a = c.annotations();
        assert_eq!(
            a.get("mapsnap.io/restore").map(String::as_str),
            Some("enabled")
        );
        assert_eq!(
            a.get("mapsnap.io/runtime-version").map(String::as_str),
            Some("1.35.2")
        );
    }

    #[test]
    fn containerd_setting() {
        let d = tempfile::tempdir().expect("tmp");
        assert_eq!(
            probe(Runtime::Containerd, d.path(), None).restore,
            Restore::Disabled
        );
        write(
            d.path(),
            "etc/containerd/config.toml",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n\
             enable_experimental_restore_via_create = true\n",
        );
        assert_eq!(
            probe(Runtime::Containerd, d.path(), None).restore,
            Restore::Enabled
        );
        write(
            d.path(),
            "etc/containerd/config.toml",
            "version = 3\n[plugins.'io.containerd.cri.v1.runtime']\n\
             enable_experimental_restore_via_create = false\n",
        );
        let c = probe(Runtime::Containerd, d.path(), None);
        assert_eq!(c.restore, Restore::Disabled);
        assert!(c.reason.contains("is false"), "{}", c.reason);
    }
}
