//! Settings of the controller (from its command line, set by the Helm chart).

use std::time::Duration;

/// The container runtime of the cluster's nodes (both restore from a checkpoint OCI image;
/// the runtime decides which settings docs and hooks name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// CRI-O >= 1.26 (restore on targets with `container_level_enabled = "checkpoint_restore"`).
    Crio,
    /// containerd >= 2.1 (restore on targets with `enable_experimental_restore_via_create`).
    Containerd,
}

/// Who calls the kubelet checkpoint API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KubeletAccess {
    /// The source node's agent calls its own kubelet (only `nodes/checkpoint create`).
    #[default]
    Agent,
    /// The controller calls it through the API server's node proxy (`nodes/proxy create` for
    /// the controller, `nodes/checkpoint create` for the API server's kubelet-client user).
    ApiServerProxy,
}

impl KubeletAccess {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(KubeletAccess::Agent),
            "apiserver-proxy" => Some(KubeletAccess::ApiServerProxy),
            _ => None,
        }
    }
}

impl Runtime {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "crio" | "cri-o" => Some(Runtime::Crio),
            "containerd" => Some(Runtime::Containerd),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Crio => "crio",
            Runtime::Containerd => "containerd",
        }
    }
}

/// Controller settings. `Default` holds the documented defaults (also the chart's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The operator's namespace: agent leases and the leader lease live there.
    pub namespace: String,
    /// Default storage prefix (`s3://bucket/prefix`, ...), Helm `storage.location`.
    pub storage_location: String,
    /// Prefixes a `spec.storage.location` may use (the default location is always allowed).
    pub allowed_locations: Vec<String>,
    /// The cluster's runtime (Helm `runtime`).
    pub runtime: Runtime,
    /// Who calls the kubelet (Helm `kubelet.access`).
    pub kubelet_access: KubeletAccess,
    /// Pull secrets (in the restored pod's namespace) put on restored pods for the checkpoint
    /// image (Helm `restore.registry.pullSecretName`).
    pub image_pull_secrets: Vec<String>,
    /// The kubelet's checkpoint timeout when the spec sets none.
    pub checkpoint_timeout: Duration,
    /// How long an agent may take on a small task (hook request file, cleanup).
    pub agent_timeout: Duration,
    /// How long an agent may take to upload or download an archive.
    pub transfer_timeout: Duration,
    /// How long the source pod may take to be running (Resolve), or a referenced checkpoint
    /// to succeed (ResolveCheckpoint).
    pub wait_timeout: Duration,
    /// How long the restored pod may take to run.
    pub restore_timeout: Duration,
    /// Attempts of a step before the object fails (transient errors only).
    pub max_attempts: u32,
    /// First retry delay; doubles with each attempt up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Re-check interval while waiting (agents and pods also trigger reconciles by watch).
    pub poll_interval: Duration,
    /// How long a hook request file stays valid.
    pub hook_request_ttl: Duration,
    /// An agent whose lease was not renewed for this long is considered gone.
    pub agent_lease_stale: Duration,
    /// The kubelet checkpoint directory on the nodes (where restore archives are put).
    pub node_checkpoint_dir: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: "mapsnap-system".into(),
            storage_location: "file:///var/lib/mapsnap/snapshots".into(),
            allowed_locations: Vec::new(),
            runtime: Runtime::Crio,
            kubelet_access: KubeletAccess::Agent,
            image_pull_secrets: Vec::new(),
            checkpoint_timeout: Duration::from_secs(120),
            agent_timeout: Duration::from_secs(60),
            transfer_timeout: Duration::from_secs(30 * 60),
            wait_timeout: Duration::from_secs(5 * 60),
            restore_timeout: Duration::from_secs(10 * 60),
            max_attempts: 3,
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(5 * 60),
            poll_interval: Duration::from_secs(10),
            hook_request_ttl: Duration::from_secs(30 * 60),
            agent_lease_stale: Duration::from_secs(40),
            node_checkpoint_dir: "/var/lib/kubelet/checkpoints".into(),
        }
    }
}

impl Config {
    /// The delay before attempt `attempt + 1` (attempt counts from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff_base
            .checked_mul(factor)
            .map_or(self.backoff_max, |d| d.min(self.backoff_max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let c = Config::default();
        assert_eq!(c.backoff(1), Duration::from_secs(5));
        assert_eq!(c.backoff(2), Duration::from_secs(10));
        assert_eq!(c.backoff(3), Duration::from_secs(20));
        assert_eq!(c.backoff(10), Duration::from_secs(300));
        assert_eq!(c.backoff(100), Duration::from_secs(300));
    }
}
