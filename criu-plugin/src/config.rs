//! The plugin's settings: a deadline for its dump and restore work and limits on what it reads
//! from the image directory.
//!
//! Read at each `init` from `/etc/mapsnap/criu-plugin.toml` (another file with
//! `MAPSNAP_CRIU_CONFIG`; a missing file means defaults), then environment variables, which win:
//!
//! ```toml
//! deadline = "120s"              # MAPSNAP_CRIU_DEADLINE
//! max_snapshot_bytes = "4GiB"    # MAPSNAP_CRIU_MAX_SNAPSHOT_BYTES
//! max_index_bytes = "16MiB"      # MAPSNAP_CRIU_MAX_INDEX_BYTES
//! cpu_mismatch = "refuse"        # MAPSNAP_CPU_MISMATCH: "refuse" or "fit"
//! # Signed per-map snapshots (files only the administrator controls; no environment override):
//! trust_keys = ["/etc/mapsnap/trust"]            # minisign .pub files or directories of them
//! signing_key = "/etc/mapsnap/signing/mapsnap.key"  # password-less minisign secret key
//! ```
//!
//! With `trust_keys`, a restore refuses a per-map snapshot that is unsigned, signed by a key
//! outside the set or altered, before any map is created; with `signing_key`, every per-map
//! snapshot a dump writes gets a signature beside it (`mapsnap-map-<id>.snap.minisig`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use mapsnap::restore::{CpuPolicy, RestoreOptions};
use mapsnap::storage::{format_duration, parse_duration, parse_size};
use mapsnap::trust::{SecretKey, TrustSet};

use crate::error::PluginError;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/mapsnap/criu-plugin.toml";
pub const CONFIG_ENV: &str = "MAPSNAP_CRIU_CONFIG";
pub const DEADLINE_ENV: &str = "MAPSNAP_CRIU_DEADLINE";
pub const MAX_SNAPSHOT_ENV: &str = "MAPSNAP_CRIU_MAX_SNAPSHOT_BYTES";
pub const MAX_INDEX_ENV: &str = "MAPSNAP_CRIU_MAX_INDEX_BYTES";
/// `fit` restores per-CPU maps dumped on a machine with another number of possible CPUs
/// (first CPUs' values kept, the others zero); by default they are refused.
pub const CPU_MISMATCH_ENV: &str = "MAPSNAP_CPU_MISMATCH";

/// The largest config file read (it holds four lines).
const MAX_CONFIG_BYTES: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    /// All dump work of one `criu dump` (from `init`), or all restore work of one
    /// `criu restore`, must finish within this; the tasks stay frozen meanwhile.
    pub deadline: Duration,
    /// The largest snapshot file accepted from an image directory.
    pub max_snapshot_bytes: u64,
    /// The largest index (`mapsnap-criu.json`) accepted from an image directory.
    pub max_index_bytes: u64,
    pub cpu_policy: CpuPolicy,
    /// minisign public keys (or directories of `*.pub`) restores accept signatures from.
    pub trust_keys: Vec<PathBuf>,
    /// The minisign secret key dumps sign with.
    pub signing_key: Option<PathBuf>,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(120),
            max_snapshot_bytes: 4 << 30,
            max_index_bytes: 16 << 20,
            cpu_policy: CpuPolicy::Error,
            trust_keys: Vec::new(),
            signing_key: None,
        }
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    deadline: Option<String>,
    max_snapshot_bytes: Option<toml::Value>,
    max_index_bytes: Option<toml::Value>,
    cpu_mismatch: Option<String>,
    trust_keys: Option<Vec<String>>,
    signing_key: Option<String>,
}

fn bad(what: &str, e: impl std::fmt::Display) -> PluginError {
    PluginError::Config(format!("{what}: {e}"))
}

impl PluginConfig {
    /// Defaults, the config file, then the environment.
    pub fn load() -> Result<Self, PluginError> {
        let path = std::env::var_os(CONFIG_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        let mut cfg = Self::default();
        cfg.apply_file(&path)?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), PluginError> {
        use std::io::Read;
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(bad(&path.display().to_string(), e)),
        };
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| bad(&path.display().to_string(), e))?;
        self.apply_toml(&text)
            .map_err(|e| PluginError::Config(format!("{}: {e}", path.display())))
    }

    fn apply_toml(&mut self, text: &str) -> Result<(), String> {
        let f: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let size = |v: &toml::Value| match v {
            toml::Value::Integer(i) => u64::try_from(*i).map_err(|e| e.to_string()),
            toml::Value::String(s) => parse_size(s).map(|n| n as u64),
            other => Err(format!("{other:?} is not a size")),
        };
        if let Some(d) = &f.deadline {
            self.deadline = parse_duration(d).map_err(|e| format!("deadline: {e}"))?;
        }
        if let Some(v) = &f.max_snapshot_bytes {
            self.max_snapshot_bytes = size(v).map_err(|e| format!("max_snapshot_bytes: {e}"))?;
        }
        if let Some(v) = &f.max_index_bytes {
            self.max_index_bytes = size(v).map_err(|e| format!("max_index_bytes: {e}"))?;
        }
        if let Some(c) = &f.cpu_mismatch {
            self.cpu_policy = cpu_policy(c)?;
        }
        let absolute = |key: &str, v: &str| {
            let p = PathBuf::from(v);
            if p.is_absolute() {
                Ok(p)
            } else {
                Err(format!("{key}: {v:?} must be an absolute path"))
            }
        };
        if let Some(v) = &f.trust_keys {
            self.trust_keys = v
                .iter()
                .map(|p| absolute("trust_keys", p))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = f.signing_key.as_deref().filter(|v| !v.is_empty()) {
            self.signing_key = Some(absolute("signing_key", v)?);
        }
        Ok(())
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), PluginError> {
        if let Some(v) = get(DEADLINE_ENV) {
            self.deadline = parse_duration(&v).map_err(|e| bad(DEADLINE_ENV, e))?;
        }
        if let Some(v) = get(MAX_SNAPSHOT_ENV) {
            self.max_snapshot_bytes = parse_size(&v).map_err(|e| bad(MAX_SNAPSHOT_ENV, e))? as u64;
        }
        if let Some(v) = get(MAX_INDEX_ENV) {
            self.max_index_bytes = parse_size(&v).map_err(|e| bad(MAX_INDEX_ENV, e))? as u64;
        }
        if let Some(v) = get(CPU_MISMATCH_ENV) {
            self.cpu_policy = cpu_policy(&v).map_err(|e| bad(CPU_MISMATCH_ENV, e))?;
        }
        if self.deadline.is_zero() {
            return Err(PluginError::Config(
                "the deadline must be above zero".into(),
            ));
        }
        Ok(())
    }

    pub fn restore_options(&self) -> RestoreOptions {
        RestoreOptions {
            cpu_policy: self.cpu_policy,
            ..RestoreOptions::default()
        }
    }

    /// The keys restores accept signatures from (None: signatures are not checked).
    pub fn trust_set(&self) -> Result<Option<TrustSet>, PluginError> {
        if self.trust_keys.is_empty() {
            return Ok(None);
        }
        TrustSet::from_paths(&self.trust_keys)
            .map(Some)
            .map_err(|source| PluginError::Trust {
                what: "trust_keys".into(),
                source,
            })
    }

    /// The key dumps sign with (None: per-map snapshots are not signed).
    pub fn signer(&self) -> Result<Option<SecretKey>, PluginError> {
        let Some(p) = &self.signing_key else {
            return Ok(None);
        };
        SecretKey::from_file(p, None)
            .map(Some)
            .map_err(|source| PluginError::Trust {
                what: "signing_key".into(),
                source,
            })
    }

    /// For log lines: `deadline 2m, snapshots up to 4294967296 bytes`.
    pub fn summary(&self) -> String {
        format!(
            "deadline {}, snapshots up to {} bytes",
            format_duration(self.deadline),
            self.max_snapshot_bytes
        )
    }
}

fn cpu_policy(v: &str) -> Result<CpuPolicy, String> {
    match v {
        "fit" => Ok(CpuPolicy::Fit),
        "refuse" => Ok(CpuPolicy::Error),
        other => Err(format!("{other:?}: expected \"refuse\" or \"fit\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment() {
        let mut c = PluginConfig::default();
        c.apply_toml("deadline = \"5s\"\nmax_snapshot_bytes = \"1MiB\"\nmax_index_bytes = 4096\n")
            .expect("toml");
        assert_eq!(c.deadline, Duration::from_secs(5));
        assert_eq!(c.max_snapshot_bytes, 1 << 20);
        assert_eq!(c.max_index_bytes, 4096);
        c.apply_env(|k| match k {
            DEADLINE_ENV => Some("250ms".into()),
            CPU_MISMATCH_ENV => Some("fit".into()),
            _ => None,
        })
        .expect("env");
        assert_eq!(c.deadline, Duration::from_millis(250));
        assert_eq!(c.cpu_policy, CpuPolicy::Fit);
        assert_eq!(
            c.max_snapshot_bytes,
            1 << 20,
            "untouched by the environment"
        );
    }

    #[test]
    fn trust_files() {
        let mut c = PluginConfig::default();
        assert!(c.trust_set().expect("none").is_none());
        assert!(c.signer().expect("none").is_none());
        c.apply_toml("trust_keys = [\"/etc/mapsnap/trust\"]\nsigning_key = \"/s/k.key\"\n")
            .expect("toml");
        assert_eq!(c.trust_keys, vec![PathBuf::from("/etc/mapsnap/trust")]);
        assert_eq!(c.signing_key, Some(PathBuf::from("/s/k.key")));
        // A configured key that cannot be read fails, naming the setting (never "unsigned").
        let e = c.signer().expect_err("missing key").to_string();
        assert!(e.contains("signing_key") && e.contains("/s/k.key"), "{e}");
        assert!(c.apply_toml("trust_keys = [\"rel.pub\"]").is_err());
        assert!(c.apply_toml("signing_key = \"k.key\"").is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        let mut c = PluginConfig::default();
        assert!(c.apply_toml("deadlin = \"5s\"").is_err(), "unknown key");
        assert!(c.apply_toml("cpu_mismatch = \"maybe\"").is_err());
        assert!(
            c.apply_env(|k| (k == DEADLINE_ENV).then(|| "0s".into()))
                .is_err()
        );
        assert!(
            c.apply_env(|k| (k == MAX_SNAPSHOT_ENV).then(|| "lots".into()))
                .is_err()
        );
    }
}
