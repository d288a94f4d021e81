//! Storage settings: built-in defaults < config file (`/etc/mapsnap/config.toml`) <
//! `MAPSNAP_STORAGE_*` and the providers' own environment variables (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`) < command-line flags. Never from a snapshot or a location string.
//!
//! ```toml
//! [storage]
//! timeout = "30m"        # overall deadline of one command's transfers
//! retries = 5            # retries of one request on transient errors (exponential backoff)
//! retry_timeout = "1m"   # stop retrying one request after this long
//! part_size = "8MiB"     # multipart part size; smaller snapshots are one PUT
//! concurrency = 2        # parts in flight at once (memory: (concurrency + 1) * part_size)
//!
//! [s3]                   # object_store AmazonS3ConfigKey names, e.g.
//! endpoint = "http://127.0.0.1:9000"
//! region = "us-east-1"
//! allow_http = true
//! virtual_hosted_style_request = false
//!
//! [gcs]                  # GoogleConfigKey names, e.g. service_account = "/path/key.json";
//!                        # a test server: base_url, allow_http, bearer_token
//! [azure]                # AzureConfigKey names, e.g. account_name = "myaccount";
//!                        # an emulator: use_emulator = true, endpoint = "http://127.0.0.1:10000/devstoreaccount1"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{ErrorKind, Result, StorageError};

/// Where the config file is looked for when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/mapsnap/config.toml";

/// Settings for remote locations (local files need none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// Overall deadline for the transfers of one storage handle (one command).
    pub timeout: Duration,
    /// Retries of one request on transient errors (connect failures, 5xx, throttling).
    pub retries: usize,
    /// Stop retrying one request after this long.
    pub retry_timeout: Duration,
    /// Multipart part size, and the size up to which an upload is a single PUT.
    pub part_size: usize,
    /// Parts uploaded at once.
    pub concurrency: usize,
    /// `[s3]` options, as object_store `AmazonS3ConfigKey` names and string values.
    pub s3: Vec<(String, String)>,
    /// `[gcs]` options (`GoogleConfigKey`).
    pub gcs: Vec<(String, String)>,
    /// `[azure]` options (`AzureConfigKey`).
    pub azure: Vec<(String, String)>,
    /// The config file these came from, if any.
    pub file: Option<PathBuf>,
}

/// S3's smallest part (all but the last part of a multipart upload).
pub const MIN_PART_SIZE: usize = 5 << 20;

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30 * 60),
            retries: 5,
            retry_timeout: Duration::from_secs(60),
            part_size: 8 << 20,
            concurrency: 2,
            s3: Vec::new(),
            gcs: Vec::new(),
            azure: Vec::new(),
            file: None,
        }
    }
}

impl StorageConfig {
    /// Defaults, then the config file, then `MAPSNAP_STORAGE_*` variables.
    ///
    /// `path` names the file (it must exist); `None` reads `MAPSNAP_CONFIG` or
    /// [`DEFAULT_CONFIG_PATH`] when that exists.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let env_path = std::env::var_os("MAPSNAP_CONFIG").map(PathBuf::from);
        let (path, required) = match (path, env_path) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let mut cfg = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut c = Self::from_toml(&text, &path.display().to_string())?;
                c.file = Some(path);
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Self::default(),
            Err(e) => {
                return Err(StorageError::new(
                    ErrorKind::Config,
                    path.display().to_string(),
                    format!("cannot read the mapsnap config file: {e}"),
                ));
            }
        };
        cfg.apply_env()?;
        Ok(cfg)
    }

    /// Parses a config file's text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let bad = |msg: String| StorageError::new(ErrorKind::Config, origin, msg);
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| bad(format!("invalid TOML: {}", e.message())))?;
        let mut cfg = Self::default();
        for (section, value) in &table {
            let Some(t) = value.as_table() else {
                return Err(bad(format!(
                    "`{section}` must be a table ([{section}]); known tables: storage, s3, gcs, azure"
                )));
            };
            match section.as_str() {
                "storage" => {
                    for (k, v) in t {
                        let text = scalar(v).ok_or_else(|| {
                            bad(format!("[storage] {k} must be a string or a number"))
                        })?;
                        cfg.set(k, &text)
                            .map_err(|m| bad(format!("[storage] {k}: {m}")))?;
                    }
                }
                "s3" | "gcs" | "azure" => {
                    let mut opts = Vec::new();
                    for (k, v) in t {
                        let text = scalar(v).ok_or_else(|| {
                            bad(format!(
                                "[{section}] {k} must be a string, a number or a boolean"
                            ))
                        })?;
                        check_provider_key(section, k).map_err(&bad)?;
                        opts.push((k.clone(), text));
                    }
                    match section.as_str() {
                        "s3" => cfg.s3 = opts,
                        "gcs" => cfg.gcs = opts,
                        _ => cfg.azure = opts,
                    }
                }
                other => {
                    return Err(bad(format!(
                        "unknown table [{other}]; known tables: storage, s3, gcs, azure"
                    )));
                }
            }
        }
        Ok(cfg)
    }

    /// Applies `MAPSNAP_STORAGE_{TIMEOUT,RETRIES,RETRY_TIMEOUT,PART_SIZE,CONCURRENCY}`.
    pub fn apply_env(&mut self) -> Result<()> {
        for key in [
            "timeout",
            "retries",
            "retry_timeout",
            "part_size",
            "concurrency",
        ] {
            let var = format!("MAPSNAP_STORAGE_{}", key.to_ascii_uppercase());
            if let Ok(v) = std::env::var(&var) {
                self.set(key, &v)
                    .map_err(|m| StorageError::new(ErrorKind::Config, var, m))?;
            }
        }
        Ok(())
    }

    /// Sets one `[storage]` key from text.
    pub fn set(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        match key {
            "timeout" => self.timeout = parse_duration(value)?,
            "retry_timeout" => self.retry_timeout = parse_duration(value)?,
            "retries" => {
                self.retries = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("{value:?} is not a whole number"))?
            }
            "concurrency" => {
                let n: usize = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("{value:?} is not a whole number"))?;
                if !(1..=64).contains(&n) {
                    return Err(format!("{n} is out of range (1 to 64)"));
                }
                self.concurrency = n;
            }
            "part_size" => {
                let n = parse_size(value)?;
                if !(MIN_PART_SIZE..=(5 << 30)).contains(&n) {
                    return Err(format!(
                        "{value} is out of range (5MiB to 5GiB, the S3 part size limits)"
                    ));
                }
                self.part_size = n;
            }
            other => {
                return Err(format!(
                    "unknown key `{other}`; known keys: timeout, retries, retry_timeout, \
                     part_size, concurrency"
                ));
            }
        }
        if self.timeout.is_zero() {
            return Err("the timeout must be more than 0".into());
        }
        Ok(())
    }
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// Refuses keys the provider's builder does not know, so a typo is an error, not a silent
/// default.
fn check_provider_key(section: &str, key: &str) -> std::result::Result<(), String> {
    #[cfg(feature = "remote")]
    use std::str::FromStr;
    let lower = key.to_ascii_lowercase();
    #[cfg(not(feature = "remote"))] // no builder to ask: remote locations are refused anyway
    let ok = !lower.is_empty();
    #[cfg(feature = "remote")]
    let ok = match section {
        "s3" => object_store::aws::AmazonS3ConfigKey::from_str(&lower).is_ok(),
        "gcs" => object_store::gcp::GoogleConfigKey::from_str(&lower).is_ok(),
        _ => object_store::azure::AzureConfigKey::from_str(&lower).is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "[{section}] {key}: unknown option (see the object_store crate's {} for the names)",
            match section {
                "s3" => "AmazonS3ConfigKey",
                "gcs" => "GoogleConfigKey",
                _ => "AzureConfigKey",
            }
        ))
    }
}

/// `"90s"`, `"5m"`, `"1h"`, `"250ms"`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 90s, 5m, 1h, 250ms)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" | "mins" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?} has an unknown unit (use ms, s, m or h)")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `"8MiB"`, `"16M"`, `"1GiB"`, `"65536"` (bytes). K/M/G and KiB/MiB/GiB are all powers of 1024.
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (like 8MiB)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{s:?} has an unknown unit (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `Duration` as the shortest of `1h30m`, `90s`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (h, 0, 0) => format!("{h}h"),
        _ => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("12"), Ok(Duration::from_secs(12)));
        assert!(parse_duration("5 weeks").is_err());
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("8 parsecs").is_err());
        assert_eq!(format_duration(Duration::from_secs(1800)), "30m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn config_file_is_parsed_and_checked() {
        let c = StorageConfig::from_toml(
            r#"
            [storage]
            timeout = "10m"
            retries = 2
            part_size = "16MiB"
            [s3]
            endpoint = "http://127.0.0.1:9000"
            allow_http = true
            region = "eu-west-1"
            "#,
            "test.toml",
        )
        .expect("parse");
        assert_eq!(c.timeout, Duration::from_secs(600));
        assert_eq!(c.retries, 2);
        assert_eq!(c.part_size, 16 << 20);
        assert!(c.s3.contains(&("allow_http".into(), "true".into())));

        let e = StorageConfig::from_toml("[s3]\nendpont = \"x\"\n", "test.toml")
            .expect_err("typo refused");
        assert!(e.to_string().contains("endpont"), "{e}");
        let e = StorageConfig::from_toml("[storage]\npart_size = \"1MiB\"\n", "test.toml")
            .expect_err("too small");
        assert!(e.to_string().contains("5MiB"), "{e}");
        let e = StorageConfig::from_toml("[minio]\n", "test.toml").expect_err("unknown table");
        assert!(e.to_string().starts_with("test.toml: unknown table"), "{e}");
    }
}
