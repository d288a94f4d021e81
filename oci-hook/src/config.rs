//! Node settings: the `[hook]` table of `/etc/mapsnap/config.toml` (the file the storage
//! settings live in too: `[storage]`, `[s3]`, `[gcs]`, `[azure]`).
//!
//! ```toml
//! [hook]
//! log_file = "/var/log/mapsnap-hook.log"   # JSON lines; "" for stderr only
//! deadline = "25s"             # overall limit of one hook run (keep it below the hook timeout)
//! wait_timeout = "20s"         # poststart `wait` mode: how long to wait for the app's pins
//! request_dir = "/run/mapsnap/requests"  # the node agent's checkpoint requests
//! state_dir = "/run/mapsnap/hook"        # restore markers (idempotence)
//! runtime_roots = ["/run/runc", "/run/crun", "/run/containerd/runc/k8s.io"]
//! storage_base = "s3://snapshots/node-a" # where relative snapshot names go
//! allowed_locations = ["s3://snapshots/"] # remote prefixes annotations may name
//! policy = "strict"            # default when a container does not say (strict|best-effort)
//! operator = false            # set by the Helm chart: the mapsnap operator manages this node
//! require_restore_request = false  # default: `operator`; restore-from only with the agent's request
//! require_checkpoint_request = false  # default: `operator`; checkpoint-to only with a request
//! tenant_prefix = "{namespace}"  # names a pod chooses resolve below this (templated)
//! restore_request_dir = "/run/mapsnap/restores"
//! checkpoint_read = "frozen"  # post-dump: read pinned maps while frozen, or "after" the freeze
//! checkpoint_readers = 2      # reader threads for one big map inside the freeze
//! # Signed and encrypted snapshots (files the administrator controls, e.g. mounted Secrets):
//! trust_keys = ["/etc/mapsnap/trust"]    # minisign .pub files or directories of *.pub
//! identities = ["/etc/mapsnap/identities/age.key"]  # age identities / OpenSSH keys
//! signing_key = "/etc/mapsnap/signing/mapsnap.key"  # password-less minisign secret key
//! recipients = ["/etc/mapsnap/recipients.txt"]      # age recipients files (`age -R`)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use mapsnap::storage::{StorageConfig, parse_duration};
use serde::Deserialize;

use crate::annotations::Policy;
use crate::error::{HookError, Result};

/// Where the config file is read from when none is named.
pub const DEFAULT_CONFIG: &str = "/etc/mapsnap/config.toml";

/// Environment variable naming another config file.
pub const CONFIG_ENV: &str = "MAPSNAP_HOOK_CONFIG";

/// The `[hook]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSettings {
    pub log_file: Option<PathBuf>,
    pub deadline: Duration,
    pub wait_timeout: Duration,
    pub request_dir: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_roots: Vec<PathBuf>,
    pub storage_base: Option<String>,
    pub allowed_locations: Vec<String>,
    pub policy: Policy,
    pub require_restore_request: bool,
    pub restore_request_dir: PathBuf,
    /// The mapsnap operator manages this node (the chart sets it): requests are required by
    /// default.
    pub operator: bool,
    /// `checkpoint-to` counts only when the node agent made a request for the checkpoint
    /// (without one, a checkpoint's maps go into the CRIU image directory).
    pub require_checkpoint_request: bool,
    /// Template of the per-tenant prefix that names chosen by a pod (relative names, remote
    /// URLs) must stay below: `{namespace}`, `{pod}`, `{container}` and literal components,
    /// separated by `/`. Empty: no scoping (single-tenant nodes only).
    pub tenant_prefix: String,
    /// When CRIU's post-dump reads the pinned maps (docs/ARCHITECTURE.md, "Checkpoint freeze").
    pub checkpoint_read: CheckpointRead,
    /// Reader threads for one big map read inside the freeze (at least 1).
    pub checkpoint_readers: usize,
    /// Signing, verification and encryption of the snapshots the hook writes and reads.
    pub trust: TrustSettings,
}

/// When the pinned maps of a checkpoint are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckpointRead {
    /// Inside CRIU's freeze, with several reader threads; compression and any upload run in
    /// a detached process after the tasks are released. The snapshot is the maps at the
    /// frozen instant (for everything the container's tasks write).
    #[default]
    Frozen,
    /// After the freeze: post-dump only opens the maps and hands them to a detached process.
    /// The freeze grows by a few milliseconds whatever the map size; the snapshot is the maps
    /// a little after the checkpoint.
    After,
}

impl std::str::FromStr for CheckpointRead {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "frozen" => Ok(Self::Frozen),
            "after" => Ok(Self::After),
            other => Err(format!("{other:?} is not frozen or after")),
        }
    }
}

/// Key files for signed and encrypted snapshots. Only the node's config names them (never an
/// annotation, a request or the CRD): they are the administrator's, typically Secrets the
/// chart mounts. Loaded when a snapshot is written or read ([`crate::seal::NodeTrust`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustSettings {
    /// minisign public keys, or directories whose `*.pub` files are: with any, a restore
    /// refuses snapshots that are unsigned, signed by another key or altered. Several keys
    /// at once for rotation.
    pub trust_keys: Vec<PathBuf>,
    /// age identity files or unencrypted OpenSSH private keys, to read encrypted snapshots.
    pub identities: Vec<PathBuf>,
    /// A password-less minisign secret key: every snapshot the hook writes is signed with it.
    pub signing_key: Option<PathBuf>,
    /// age recipients files (one `age1...` or `ssh-ed25519 ...` per line): every snapshot the
    /// hook writes is encrypted to all of them.
    pub recipients: Vec<PathBuf>,
}

impl TrustSettings {
    /// Whether any key is configured.
    pub fn any(&self) -> bool {
        !self.trust_keys.is_empty()
            || !self.identities.is_empty()
            || self.signing_key.is_some()
            || !self.recipients.is_empty()
    }
}

/// The default tenant prefix: a pod's namespace.
pub const DEFAULT_TENANT_PREFIX: &str = "{namespace}";

impl Default for HookSettings {
    fn default() -> Self {
        Self {
            log_file: Some(PathBuf::from("/var/log/mapsnap-hook.log")),
            deadline: Duration::from_secs(25),
            wait_timeout: Duration::from_secs(20),
            request_dir: PathBuf::from("/run/mapsnap/requests"),
            state_dir: PathBuf::from("/run/mapsnap/hook"),
            runtime_roots: [
                "/run/runc",
                "/run/crun",
                "/run/containerd/runc/k8s.io",
                "/run/containerd/runc/default",
                "/run/user/0/runc",
            ]
            .iter()
            .map(PathBuf::from)
            .collect(),
            storage_base: None,
            allowed_locations: Vec::new(),
            policy: Policy::Strict,
            require_restore_request: false,
            restore_request_dir: PathBuf::from("/run/mapsnap/restores"),
            operator: false,
            require_checkpoint_request: false,
            tenant_prefix: DEFAULT_TENANT_PREFIX.to_string(),
            checkpoint_read: CheckpointRead::Frozen,
            checkpoint_readers: 2,
            trust: TrustSettings::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    log_file: Option<String>,
    deadline: Option<String>,
    wait_timeout: Option<String>,
    request_dir: Option<String>,
    state_dir: Option<String>,
    runtime_roots: Option<Vec<String>>,
    storage_base: Option<String>,
    allowed_locations: Option<Vec<String>>,
    policy: Option<String>,
    require_restore_request: Option<bool>,
    restore_request_dir: Option<String>,
    operator: Option<bool>,
    require_checkpoint_request: Option<bool>,
    tenant_prefix: Option<String>,
    checkpoint_read: Option<String>,
    checkpoint_readers: Option<usize>,
    trust_keys: Option<Vec<String>>,
    identities: Option<Vec<String>>,
    signing_key: Option<String>,
    recipients: Option<Vec<String>>,
}

/// Everything the hook reads from the node's config file.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub hook: HookSettings,
    pub storage: StorageConfig,
    /// The file these came from (None: defaults, no file).
    pub file: Option<PathBuf>,
}

impl NodeConfig {
    /// Reads `path`, else `$MAPSNAP_HOOK_CONFIG`, else [`DEFAULT_CONFIG`] when it exists.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let (path, required) = match (path, env) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut c = Self::parse(&text, &path.display().to_string())?;
                c.file = Some(path);
                Ok(c)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                let mut storage = StorageConfig::default();
                storage.apply_env()?;
                Ok(Self {
                    hook: HookSettings::default(),
                    storage,
                    file: None,
                })
            }
            Err(e) => Err(HookError::Config {
                file: path.display().to_string(),
                msg: format!("cannot read it: {e}"),
            }),
        }
    }

    /// Parses a config file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let bad = |msg: String| HookError::Config {
            file: origin.to_string(),
            msg,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| bad(format!("invalid TOML: {}", e.message())))?;
        let hook = match table.remove("hook") {
            None => HookSettings::default(),
            Some(v) => {
                let raw: RawHook = v
                    .try_into()
                    .map_err(|e: toml::de::Error| bad(format!("[hook]: {}", e.message())))?;
                settings(raw).map_err(|m| bad(format!("[hook] {m}")))?
            }
        };
        // The rest belongs to the storage layer, which refuses tables it does not know.
        let rest = toml::to_string(&table).map_err(|e| bad(format!("cannot re-read: {e}")))?;
        let mut storage = StorageConfig::from_toml(&rest, origin)?;
        storage.apply_env()?;
        Ok(Self {
            hook,
            storage,
            file: None,
        })
    }
}

fn settings(raw: RawHook) -> std::result::Result<HookSettings, String> {
    let mut s = HookSettings::default();
    let dur = |key: &str, v: &str| parse_duration(v).map_err(|m| format!("{key}: {m}"));
    if let Some(v) = raw.log_file {
        s.log_file = (!v.is_empty()).then(|| PathBuf::from(v));
    }
    if let Some(v) = raw.deadline {
        s.deadline = dur("deadline", &v)?;
        if s.deadline.is_zero() {
            return Err("deadline: must be more than 0".into());
        }
    }
    if let Some(v) = raw.wait_timeout {
        s.wait_timeout = dur("wait_timeout", &v)?;
    }
    if let Some(v) = raw.request_dir {
        s.request_dir = absolute("request_dir", &v)?;
    }
    if let Some(v) = raw.state_dir {
        s.state_dir = absolute("state_dir", &v)?;
    }
    if let Some(v) = raw.runtime_roots {
        s.runtime_roots = v
            .iter()
            .map(|r| absolute("runtime_roots", r))
            .collect::<std::result::Result<_, _>>()?;
    }
    if let Some(v) = raw.storage_base {
        if v.is_empty() {
            s.storage_base = None;
        } else {
            mapsnap::storage::Location::parse(&v).map_err(|e| format!("storage_base: {e}"))?;
            s.storage_base = Some(v);
        }
    }
    if let Some(v) = raw.allowed_locations {
        for l in &v {
            crate::location::RemoteUrl::parse(l, true).map_err(|m| {
                format!(
                    "allowed_locations: {l:?} is not a URL prefix like s3://bucket/prefix/: {m}"
                )
            })?;
        }
        s.allowed_locations = v;
    }
    s.operator = raw.operator.unwrap_or(false);
    // With the operator installed, only what its agent asked for counts, unless the node's
    // config says otherwise explicitly.
    s.require_restore_request = raw.require_restore_request.unwrap_or(s.operator);
    s.require_checkpoint_request = raw.require_checkpoint_request.unwrap_or(s.operator);
    if let Some(v) = raw.tenant_prefix {
        check_tenant_template(&v).map_err(|m| format!("tenant_prefix: {m}"))?;
        s.tenant_prefix = v;
    }
    if let Some(v) = raw.restore_request_dir {
        s.restore_request_dir = absolute("restore_request_dir", &v)?;
    }
    if let Some(v) = raw.policy {
        s.policy = v.parse().map_err(|m| format!("policy: {m}"))?;
    }
    if let Some(v) = raw.checkpoint_read {
        s.checkpoint_read = v.parse().map_err(|m| format!("checkpoint_read: {m}"))?;
    }
    if let Some(v) = raw.checkpoint_readers {
        if !(1..=8).contains(&v) {
            return Err(format!("checkpoint_readers: {v} is not between 1 and 8"));
        }
        s.checkpoint_readers = v;
    }
    let paths = |key: &str, v: Option<Vec<String>>| {
        v.unwrap_or_default()
            .iter()
            .map(|p| absolute(key, p))
            .collect::<std::result::Result<Vec<_>, _>>()
    };
    s.trust.trust_keys = paths("trust_keys", raw.trust_keys)?;
    s.trust.identities = paths("identities", raw.identities)?;
    s.trust.recipients = paths("recipients", raw.recipients)?;
    s.trust.signing_key = match raw.signing_key.filter(|v| !v.is_empty()) {
        Some(v) => Some(absolute("signing_key", &v)?),
        None => None,
    };
    Ok(s)
}

/// The placeholders a tenant prefix may use.
pub const TENANT_PLACEHOLDERS: &[&str] = &["{namespace}", "{pod}", "{container}"];

/// Checks a tenant prefix template: `/`-separated components, each a placeholder or a literal
/// of `[A-Za-z0-9_.-]` (not `.` or `..`).
pub fn check_tenant_template(t: &str) -> std::result::Result<(), String> {
    if t.is_empty() {
        return Ok(());
    }
    for c in t.split('/') {
        if TENANT_PLACEHOLDERS.contains(&c) {
            continue;
        }
        let literal_ok = !c.is_empty()
            && c != "."
            && c != ".."
            && c.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-'));
        if !literal_ok {
            return Err(format!(
                "{c:?} is neither one of {} nor a plain name",
                TENANT_PLACEHOLDERS.join(", ")
            ));
        }
    }
    Ok(())
}

fn absolute(key: &str, v: &str) -> std::result::Result<PathBuf, String> {
    let p = PathBuf::from(v);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!("{key}: {v:?} must be an absolute path"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_table_is_read_and_the_rest_goes_to_storage() {
        let c = NodeConfig::parse(
            r#"
[hook]
deadline = "10s"
wait_timeout = "3s"
log_file = ""
runtime_roots = ["/tmp/runc-root"]
storage_base = "s3://snap/node-a"
allowed_locations = ["s3://snap/"]
policy = "best-effort"

[storage]
timeout = "1m"

[s3]
endpoint = "http://127.0.0.1:9000"
allow_http = true
"#,
            "test.toml",
        )
        .expect("parses");
        assert_eq!(c.hook.deadline, Duration::from_secs(10));
        assert_eq!(c.hook.wait_timeout, Duration::from_secs(3));
        assert_eq!(c.hook.log_file, None);
        assert_eq!(c.hook.runtime_roots, vec![PathBuf::from("/tmp/runc-root")]);
        assert_eq!(c.hook.policy, Policy::BestEffort);
        assert_eq!(c.hook.storage_base.as_deref(), Some("s3://snap/node-a"));
        assert_eq!(c.storage.timeout, Duration::from_secs(60));
        assert!(c.storage.s3.iter().any(|(k, _)| k == "endpoint"));
    }

    #[test]
    fn operator_requires_requests_by_default() {
        let c = NodeConfig::parse("[hook]\noperator = true\n", "t").expect("parses");
        assert!(c.hook.require_restore_request && c.hook.require_checkpoint_request);
        let c = NodeConfig::parse(
            "[hook]\noperator = true\nrequire_restore_request = false\n\
             tenant_prefix = \"tenants/{namespace}/{pod}\"\n",
            "t",
        )
        .expect("parses");
        assert!(!c.hook.require_restore_request && c.hook.require_checkpoint_request);
        assert_eq!(c.hook.tenant_prefix, "tenants/{namespace}/{pod}");
        let c = NodeConfig::parse("", "t").expect("parses");
        assert!(!c.hook.require_restore_request && !c.hook.require_checkpoint_request);
        assert_eq!(c.hook.tenant_prefix, "{namespace}");
        for bad in ["{ns}", "../x", "a//b", "{namespace}/.."] {
            let text = format!("[hook]\ntenant_prefix = \"{bad}\"\n");
            let e = NodeConfig::parse(&text, "t").expect_err(bad).to_string();
            assert!(e.contains("tenant_prefix"), "{e}");
        }
    }

    #[test]
    fn checkpoint_read_mode_and_readers() {
        let c = NodeConfig::parse("", "t").expect("parses");
        assert_eq!(c.hook.checkpoint_read, CheckpointRead::Frozen);
        assert_eq!(c.hook.checkpoint_readers, 2);
        let c = NodeConfig::parse(
            "[hook]\ncheckpoint_read = \"after\"\ncheckpoint_readers = 4\n",
            "t",
        )
        .expect("parses");
        assert_eq!(c.hook.checkpoint_read, CheckpointRead::After);
        assert_eq!(c.hook.checkpoint_readers, 4);
    }

    #[test]
    fn trust_files_come_from_the_config() {
        let c = NodeConfig::parse(
            "[hook]\ntrust_keys = [\"/etc/mapsnap/trust\", \"/k/old.pub\"]\n\
             identities = [\"/etc/mapsnap/id/age.key\"]\nsigning_key = \"/s/m.key\"\n\
             recipients = [\"/etc/mapsnap/recipients.txt\"]\n",
            "t",
        )
        .expect("parses");
        let t = &c.hook.trust;
        assert_eq!(
            t.trust_keys,
            vec![
                PathBuf::from("/etc/mapsnap/trust"),
                PathBuf::from("/k/old.pub")
            ]
        );
        assert_eq!(t.identities, vec![PathBuf::from("/etc/mapsnap/id/age.key")]);
        assert_eq!(t.signing_key.as_deref(), Some(Path::new("/s/m.key")));
        assert_eq!(
            t.recipients,
            vec![PathBuf::from("/etc/mapsnap/recipients.txt")]
        );
        assert!(t.any());
        assert!(!NodeConfig::parse("", "t").expect("parses").hook.trust.any());
    }

    #[test]
    fn defaults_without_hook_table() {
        let c = NodeConfig::parse("", "empty").expect("parses");
        assert_eq!(c.hook, HookSettings::default());
    }

    #[test]
    fn mistakes_are_refused_with_the_key() {
        for (text, want) in [
            ("[hook]\ndeadlin = \"1s\"", "deadlin"),
            ("[hook]\ndeadline = \"soon\"", "deadline"),
            ("[hook]\ndeadline = \"0s\"", "deadline"),
            ("[hook]\nrequest_dir = \"relative\"", "request_dir"),
            ("[hook]\npolicy = \"maybe\"", "policy"),
            ("[hook]\ncheckpoint_read = \"later\"", "checkpoint_read"),
            ("[hook]\ncheckpoint_readers = 0", "checkpoint_readers"),
            (
                "[hook]\nallowed_locations = [\"bucket\"]",
                "allowed_locations",
            ),
            ("[hoook]\n", "hoook"),
            ("[hook]\ntrust_keys = [\"keys/\"]", "trust_keys"),
            ("[hook]\nsigning_key = \"k.key\"", "signing_key"),
            ("[hook]\nrecipients = [\"r.txt\"]", "recipients"),
        ] {
            let e = NodeConfig::parse(text, "t.toml")
                .expect_err(text)
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
