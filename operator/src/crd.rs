//! The `BpfMapCheckpoint` custom resource (`mapsnap.io/v1alpha1`): its spec, its status and the
//! CRD generated from them (see docs/API.md for the design and the reasons behind it).
//!
//! Validation that the API server enforces lives in the schema: enums, lengths, patterns, and
//! CEL rules (`x-kubernetes-validations`) for the field combinations of each action and for the
//! spec's immutability. The controller checks again what the schema cannot (storage prefixes,
//! the container of a multi-container pod), so an object that bypassed validation (an old CRD)
//! still fails cleanly.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the resource.
pub const GROUP: &str = "mapsnap.io";
/// API version of the resource.
pub const VERSION: &str = "v1alpha1";
/// Finalizer that deletes the snapshot, the archive and node-local files (unless `Retain`).
pub const FINALIZER: &str = "mapsnap.io/cleanup";
/// Annotation on a restored pod: where mapsnap-hook restores the container's maps from.
pub const ANNOTATION_RESTORE_FROM: &str = "mapsnap.io/restore-from";
/// Annotations on a restored pod: timestamp members to rebase, and how (`spec.rebase`).
pub const ANNOTATION_REBASE: &str = "mapsnap.io/rebase";
pub const ANNOTATION_REBASE_MODE: &str = "mapsnap.io/rebase-mode";
/// Annotation on a restored pod: the `BpfMapCheckpoint` (`<namespace>/<name>`) that made it.
pub const ANNOTATION_CHECKPOINT: &str = "mapsnap.io/checkpoint";
/// Label on a restored pod: the UID of the `BpfMapCheckpoint` that made it (ownership check).
pub const LABEL_CHECKPOINT_UID: &str = "mapsnap.io/checkpoint-uid";
/// Label on a restored pod: the name of the `BpfMapCheckpoint` that made it.
pub const LABEL_RESTORED_BY: &str = "mapsnap.io/restored-by";

/// A request to checkpoint a container with its BPF maps, to restore one on a node, or both
/// (a live migration).
// clippy reads the repeated `type_ = "string"` of the printcolumns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mapsnap.io",
    version = "v1alpha1",
    kind = "BpfMapCheckpoint",
    plural = "bpfmapcheckpoints",
    singular = "bpfmapcheckpoint",
    shortname = "bmc",
    category = "mapsnap",
    namespaced,
    status = "BpfMapCheckpointStatus",
    derive = "PartialEq",
    doc = "BpfMapCheckpoint checkpoints a container together with its eBPF maps, restores it on a \
           node, or migrates it (checkpoint then restore). The spec is immutable: create a new \
           object for a new operation.",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.source.pod"),
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.target.node"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Maps",
        type_ = "integer",
        json_path = ".status.checkpoint.mapCount"
    ),
    printcolumn(name = "Size", type_ = "string", json_path = ".status.checkpoint.size"),
    printcolumn(
        name = "Restored",
        type_ = "string",
        json_path = ".status.restore.pod",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self == oldSelf").message("spec is immutable: create a new BpfMapCheckpoint"),
    validation = Rule::new(
        "self.action == 'Restore' ? (has(self.source.checkpointRef) && !has(self.source.pod) && !has(self.source.container)) : (has(self.source.pod) && !has(self.source.checkpointRef))"
    ).message("Checkpoint and Migrate take source.pod (and optionally source.container); Restore takes source.checkpointRef only").field_path(".source"),
    validation = Rule::new("self.action == 'Checkpoint' ? !has(self.target) : has(self.target)")
        .message("target is required for Restore and Migrate, and not allowed for Checkpoint")
        .field_path(".target"),
    validation = Rule::new("!has(self.sourcePodPolicy) || self.action == 'Migrate'")
        .message("sourcePodPolicy applies to Migrate only")
        .field_path(".sourcePodPolicy"),
    validation = Rule::new("!has(self.switchover) || self.action == 'Migrate'")
        .message("switchover applies to Migrate only")
        .field_path(".switchover"),
    validation = Rule::new("!has(self.storage) || self.action != 'Restore'")
        .message("a Restore reads from where its checkpoint was stored: storage is not allowed")
        .field_path(".storage"),
    validation = Rule::new("!has(self.checkpointTimeoutSeconds) || self.action != 'Restore'")
        .message("checkpointTimeoutSeconds applies to Checkpoint and Migrate only")
        .field_path(".checkpointTimeoutSeconds"),
    validation = Rule::new("!has(self.rebase) || self.action != 'Checkpoint'")
        .message("rebase applies to Restore and Migrate only (it acts when maps are restored)")
        .field_path(".rebase")
)]
pub struct BpfMapCheckpointSpec {
    /// What to do: `Checkpoint` a running container (with its maps) into storage, `Restore` a
    /// finished checkpoint on a node, or `Migrate` (checkpoint, then restore on the target).
    pub action: Action,

    /// The container to checkpoint (`pod`, `container`), or the checkpoint to restore
    /// (`checkpointRef`).
    pub source: Source,

    /// Where to restore (Restore and Migrate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,

    /// Migrate only: what happens to the source pod once the restored pod runs. `Keep`
    /// (default) leaves it running; `Delete` deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pod_policy: Option<SourcePodPolicy>,

    /// Migrate only: when the source stops serving. `KeepServing` (default) leaves it in
    /// service until the restored pod runs, so the restored pod starts from state that is as
    /// old as the checkpoint (what the source learnt meanwhile is lost). `StopAfterCheckpoint`
    /// deletes the source pod right after a successful checkpoint: no service until the
    /// restored pod runs, but the pinned maps it restores are the newest (the hook's
    /// snapshot at the source's stop, see docs/OPERATOR.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover: Option<Switchover>,

    /// Checkpoint and Migrate: where the snapshot and the archive go. Defaults to the
    /// operator's configured location (Helm value `storage.location`). Credentials are never
    /// part of this object: they come from the Secret the operator was installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,

    /// What happens to the stored snapshot and archive (and node-local copies) when this
    /// object is deleted: `Delete` (default) removes them, `Retain` keeps them.
    #[serde(default)]
    pub retention_policy: RetentionPolicy,

    /// Checkpoint and Migrate: how long the kubelet may take to checkpoint the container
    /// (the kubelet API's `timeout`). Defaults to the operator's configured value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 3600))]
    pub checkpoint_timeout_seconds: Option<i32>,

    /// Restore and Migrate: timestamps in the restored pinned maps to move to the target
    /// node's clocks (set on the restored pod as mapsnap-hook's `mapsnap.io/rebase` and
    /// `mapsnap.io/rebase-mode` annotations; see docs/CONVERT.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebase: Option<Rebase>,
}

/// Clock rebasing of restored map entries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rebase {
    /// Members holding timestamps, besides those the programs' BTF tags
    /// (`mapsnap:clock=...`). With no members, only tagged members are rebased.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub members: Vec<RebaseMember>,
    /// `PreserveRemaining` (default): the distance to "now" is what it was at dump time.
    /// `Elapsed`: the time the snapshot spent in transit counts too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RebaseMode>,
}

/// One timestamp member.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct RebaseMember {
    /// Dotted member path from the value (`value.` optional) or the key (`key.`):
    /// `value.ct.expires`.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,15}$")
    )]
    pub path: String,
    /// The clock and unit it holds: `monotonic_ns`, `boottime_s`, `realtime_ms`, `tai_us`,
    /// `monotonic_jiffies` or `jiffies`.
    #[schemars(regex(
        pattern = r"^((monotonic|boottime|realtime|tai|jiffies)_(ns|us|ms|s|jiffies)|jiffies)$"
    ))]
    pub clock: String,
}

/// How the time between dump and restore counts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RebaseMode {
    PreserveRemaining,
    Elapsed,
}

impl RebaseMode {
    /// The annotation's value.
    pub fn as_annotation(self) -> &'static str {
        match self {
            RebaseMode::PreserveRemaining => "preserve-remaining",
            RebaseMode::Elapsed => "elapsed",
        }
    }
}

impl Rebase {
    /// The restored pod's `mapsnap.io/rebase` value (None: no members).
    pub fn annotation(&self) -> Option<String> {
        (!self.members.is_empty()).then(|| {
            self.members
                .iter()
                .map(|m| format!("{}={}", m.path, m.clock))
                .collect::<Vec<_>>()
                .join(",")
        })
    }
}

/// The operation a `BpfMapCheckpoint` asks for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Action {
    Checkpoint,
    Restore,
    Migrate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Checkpoint => "Checkpoint",
            Action::Restore => "Restore",
            Action::Migrate => "Migrate",
        }
    }

    /// Whether this action checkpoints a running container.
    pub fn checkpoints(self) -> bool {
        matches!(self, Action::Checkpoint | Action::Migrate)
    }

    /// Whether this action restores a pod.
    pub fn restores(self) -> bool {
        matches!(self, Action::Restore | Action::Migrate)
    }
}

/// The source: a running container, or a finished checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Name of the pod (in this object's namespace) whose container is checkpointed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub pod: Option<String>,

    /// Name of the container to checkpoint; may be left out when the pod has one container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub container: Option<String>,

    /// Restore only: a `BpfMapCheckpoint` in this namespace whose Checkpoint (or Migrate)
    /// succeeded. Only checkpoints of the same namespace can be restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_ref: Option<CheckpointRef>,
}

/// A reference to another `BpfMapCheckpoint` in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct CheckpointRef {
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// Where to restore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// The node to restore on (the checkpoint archive is fetched there and the restored pod is
    /// bound to it). May be the source node.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub node: String,

    /// Name of the restored pod. Defaults to `<source pod>-<5 characters of this object's
    /// UID>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub pod_name: Option<String>,
}

/// Migrate only: the fate of the source pod.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SourcePodPolicy {
    /// Leave the source pod running.
    #[default]
    Keep,
    /// Delete the source pod once the restored pod is running.
    Delete,
}

/// Migrate only: when the source pod leaves service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Switchover {
    /// The source serves until the restored pod runs (the restored state is as old as the
    /// checkpoint).
    #[default]
    KeepServing,
    /// The source pod is deleted right after a successful checkpoint; the restored pod gets
    /// the pinned maps as they were when the source stopped.
    StopAfterCheckpoint,
}

/// Whether stored data outlives the object.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RetentionPolicy {
    /// Delete the snapshot, the archive and node-local copies with the object.
    #[default]
    Delete,
    /// Keep them.
    Retain,
}

/// Storage location override.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct StorageSpec {
    /// A prefix URL (`s3://bucket/prefix`, `gs://...`, `az://...`, `file:///path`) under one
    /// of the prefixes the operator allows (Helm value `storage.allowedLocations`). Objects go
    /// under `<location>/<namespace>/<name>/<uid>/`.
    #[schemars(
        length(min = 6, max = 1024),
        regex(pattern = r"^(s3|gs|az)://[a-z0-9][a-z0-9.-]*[a-z0-9](/[^?#]*)?$|^file:///[^?#]*$")
    )]
    pub location: String,
}

/// Coarse state, as shown by `kubectl get`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Accepted, nothing done yet (or waiting for an agent or a checkpoint to finish).
    Pending,
    /// Checkpointing the source container and storing the snapshot and archive.
    Checkpointing,
    /// Fetching the archive to the target node and starting the restored pod.
    Restoring,
    Succeeded,
    Failed,
    /// The object is being deleted; stored data and node-local files are being removed.
    Deleting,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Checkpointing => "Checkpointing",
            Phase::Restoring => "Restoring",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Deleting => "Deleting",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// The step the controller is at (finer than the phase). Steps run in this order; each is
/// recorded in `status.steps` with its timings.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Step {
    /// Find the pod, its node, the container ID; check the node's agent.
    Resolve,
    /// The source node's agent writes the hook request file.
    PrepareHook,
    /// The source node's agent calls its kubelet's checkpoint API (or, opt-in, the controller
    /// calls it through the API server's node proxy).
    KubeletCheckpoint,
    /// The source node's agent uploads the archive and reads the snapshot's manifest.
    UploadArchive,
    /// Restore only: read the referenced checkpoint.
    ResolveCheckpoint,
    /// Check the target node's agent and what its runtime can do (restore enabled).
    PrepareRestore,
    /// The target node's agent fetches the archive, builds the checkpoint OCI image from it and
    /// pushes it to the registry.
    DownloadArchive,
    /// Create the restored pod on the target node.
    CreatePod,
    /// Wait until the restored pod runs.
    WaitPod,
    /// Migrate with `sourcePodPolicy: Delete` or `switchover: StopAfterCheckpoint`: delete
    /// the source pod.
    DeleteSource,
    /// Migrate with `switchover: StopAfterCheckpoint`, after the source pod's deletion: the
    /// source node's agent waits (bounded) for the snapshot mapsnap-hook writes of the pins
    /// when the source container stops.
    AwaitStopSnapshot,
    /// Nothing left to do.
    Done,
    /// Deletion: the source node's agent removes stored data and node-local files.
    CleanupSource,
    /// Deletion: the target node's agent removes its local archive copy.
    CleanupTarget,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Resolve => "Resolve",
            Step::PrepareHook => "PrepareHook",
            Step::KubeletCheckpoint => "KubeletCheckpoint",
            Step::UploadArchive => "UploadArchive",
            Step::ResolveCheckpoint => "ResolveCheckpoint",
            Step::PrepareRestore => "PrepareRestore",
            Step::DownloadArchive => "DownloadArchive",
            Step::CreatePod => "CreatePod",
            Step::WaitPod => "WaitPod",
            Step::DeleteSource => "DeleteSource",
            Step::AwaitStopSnapshot => "AwaitStopSnapshot",
            Step::Done => "Done",
            Step::CleanupSource => "CleanupSource",
            Step::CleanupTarget => "CleanupTarget",
        }
    }

    /// The phase a step belongs to.
    pub fn phase(self) -> Phase {
        match self {
            Step::Resolve | Step::PrepareHook | Step::KubeletCheckpoint | Step::UploadArchive => {
                Phase::Checkpointing
            }
            Step::ResolveCheckpoint
            | Step::PrepareRestore
            | Step::DownloadArchive
            | Step::CreatePod
            | Step::WaitPod
            | Step::DeleteSource
            | Step::AwaitStopSnapshot => Phase::Restoring,
            Step::Done => Phase::Succeeded,
            Step::CleanupSource | Step::CleanupTarget => Phase::Deleting,
        }
    }
}

/// Observed state. Written by the controller, except `agentResult` (written by the node
/// agent named in `agentTask`, with its own field manager).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BpfMapCheckpointStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// The current step (see `steps` for the history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,

    /// The generation of the spec this status is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` (the requested action completed), `Progressing` (work is under way; its reason
    /// names the step or why it waits) and `Failed` (with the reason and message of the
    /// failure).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Attempts of the current step so far (1 for the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,

    /// When the current attempt of the current step may be retried (after a transient error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_time: Option<Time>,

    /// When the controller started working on this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When it reached `Succeeded` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Each step with its timings and attempts, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub steps: Vec<StepRecord>,

    /// The source container, as resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceStatus>,

    /// The stored checkpoint: locations, the snapshot's manifest, the archive's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointStatus>,

    /// The restored pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatus>,

    /// Internal: the work asked of a node agent (written by the controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_task: Option<AgentTask>,

    /// Internal: the node agent's answer to `agentTask` (written by that agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_result: Option<AgentResult>,
}

/// One step's timings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    pub name: Step,
    pub start_time: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    pub attempts: u32,
}

/// The source container, as resolved from the pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    pub pod: String,
    pub pod_uid: String,
    pub node: String,
    pub container: String,
    /// The container's ID without the runtime prefix.
    pub container_id: String,
    /// The runtime named by the container ID's prefix (`cri-o`, `containerd`).
    pub runtime: String,
    /// The source pod as it was checkpointed (labels and spec), used to build the restored
    /// pod even after the source pod is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplateCopy>,
}

/// The parts of the source pod a restored pod is made from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct PodTemplateCopy {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The source pod's annotations, minus those tied to that pod instance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[schemars(schema_with = "preserve_unknown_object")]
    pub spec: PodSpec,
}

/// The stored checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    /// Location of the map snapshot (its manifest is `<snapshot>.manifest.json`).
    pub snapshot: String,
    /// Location of the kubelet's checkpoint archive.
    pub archive: String,
    /// The archive's path on the source node, as the kubelet returned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_archive: Option<String>,
    /// Lowercase hex SHA-256 of the archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_sha256: Option<String>,
    /// Archive size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_size: Option<i64>,
    /// The snapshot's manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ManifestSummary>,
    /// Number of maps in the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_count: Option<i64>,
    /// Snapshot plus archive size, human-readable (`12.3MiB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// When the kubelet finished the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_time: Option<Time>,
    /// Migrate with `switchover: StopAfterCheckpoint`: the snapshot of the pinned maps taken
    /// when the source stopped (`maps-stop.mapsnap` beside `snapshot`), set once it exists;
    /// the restore uses it instead of `snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_snapshot: Option<String>,
    /// The stop snapshot's manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_manifest: Option<ManifestSummary>,
}

impl CheckpointStatus {
    /// The snapshot a restore takes the pinned maps from: the stop snapshot when there is
    /// one, else the checkpoint's; None when the checkpoint carries no maps.
    pub fn restore_snapshot(&self) -> Option<&str> {
        match (&self.stop_snapshot, &self.manifest) {
            (Some(stop), _) => Some(stop),
            (None, Some(_)) => Some(&self.snapshot),
            (None, None) => None,
        }
    }
}

/// What the snapshot's manifest says.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManifestSummary {
    pub format_version: i64,
    /// Lowercase hex SHA-256 of the snapshot.
    pub sha256: String,
    /// Snapshot size in bytes.
    pub size: i64,
    /// When the snapshot was written (RFC 3339).
    pub created: String,
    #[serde(default)]
    pub maps: Vec<MapSummary>,
    /// Key id (16 hex digits) of the minisign signature beside the snapshot, as the
    /// signature names it: the key the source node's mapsnap-hook signed with. The restoring
    /// node's hook checks the signature itself against its trust set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer_key_id: Option<String>,
}

/// One map in the snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct MapSummary {
    pub name: String,
    #[serde(rename = "type")]
    pub map_type: String,
    pub entries: i64,
    pub bytes: i64,
}

/// The restored pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    pub node: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The archive's path on the target node (removed once the image is pushed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_archive: Option<String>,
    /// The checkpoint OCI image the restored container runs, by digest
    /// (`registry/repo@sha256:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Migrate with `sourcePodPolicy: Delete`: the source pod was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pod_deleted: Option<bool>,
    /// When the restored pod was seen running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_time: Option<Time>,
}

/// The node-side operations an agent performs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum AgentOperation {
    /// Write the hook request file for the container.
    PrepareCheckpoint,
    /// Call this node's kubelet checkpoint API for the container.
    KubeletCheckpoint,
    /// Upload the kubelet archive, read the snapshot's manifest, remove the request file and
    /// the node-local archive.
    UploadArchive,
    /// Fetch the archive, check its digest, build and push the checkpoint image, write the
    /// restore request file.
    DownloadArchive,
    /// Remove request files, node-local archives, stored objects and pushed images.
    Cleanup,
    /// Wait (until the task expires) for the stop snapshot's manifest in storage, then remove
    /// the hook request file.
    AwaitStopSnapshot,
}

impl AgentOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentOperation::PrepareCheckpoint => "PrepareCheckpoint",
            AgentOperation::KubeletCheckpoint => "KubeletCheckpoint",
            AgentOperation::UploadArchive => "UploadArchive",
            AgentOperation::DownloadArchive => "DownloadArchive",
            AgentOperation::Cleanup => "Cleanup",
            AgentOperation::AwaitStopSnapshot => "AwaitStopSnapshot",
        }
    }
}

/// Work for the agent on `node`. The agent acts on it once, answering in `agentResult` with
/// the same `id`; a new attempt gets a new `id`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentTask {
    pub id: String,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<AgentOperation>,
    /// The container whose hook request file is written or removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// KubeletCheckpoint: the pod (in the object's namespace) and container to checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// KubeletCheckpoint: the kubelet API's `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
    /// The snapshot location (hook request; manifest to read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The stop snapshot's location (PrepareCheckpoint: asked of the hook at the container's
    /// stop; UploadArchive: the request stays for it; AwaitStopSnapshot: what to wait for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_snapshot: Option<String>,
    /// The archive location (upload to, download from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<String>,
    /// The archive's path on this node (upload from; remove).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_archive: Option<String>,
    /// Download: the expected digest and size of the archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_size: Option<i64>,
    /// Download: the restored pod (`<namespace>/<name>`) the restore request file is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_pod: Option<String>,
    /// Cleanup: stored objects to delete (each with its manifest, if any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete_objects: Vec<String>,
    /// Cleanup: pushed checkpoint images to delete (by digest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete_images: Vec<String>,
    pub created: Time,
    /// The hook request file's expiry (PrepareCheckpoint); the task's deadline otherwise.
    pub expires: Time,
}

/// An agent's answer to an `AgentTask`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentResult {
    /// The `id` of the task answered.
    pub id: String,
    pub node: String,
    pub succeeded: bool,
    /// A failure that retrying cannot fix (bad path, missing snapshot, digest mismatch).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,
    /// Upload: the archive's digest and size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_size: Option<i64>,
    /// Upload: the snapshot's manifest. AwaitStopSnapshot: the stop snapshot's (None: it did
    /// not appear before the task expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ManifestSummary>,
    /// Download: where the archive is on the node. KubeletCheckpoint: the kubelet's archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_archive: Option<String>,
    /// Download: the pushed checkpoint image, by digest (`registry/repo@sha256:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// KubeletCheckpoint: the kubelet's HTTP status (0: no answer) and plain-text error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i32>,
}

fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

impl BpfMapCheckpoint {
    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }
}

/// The CRD, cleaned of what the generator adds and the API server does not want:
/// `nullable: true` on optional fields (a spec field left out is absent, never null, so
/// `target: null` must fail validation rather than pass as "no target") and the `uint32`/
/// `uint64` formats schemars writes for unsigned integers (the API server warns about unknown
/// formats).
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let mut v = serde_json::to_value(BpfMapCheckpoint::crd()).unwrap_or_default();
    clean_schema(&mut v);
    serde_json::from_value(v).unwrap_or_else(|_| BpfMapCheckpoint::crd())
}

fn clean_schema(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            if o.get("nullable") == Some(&serde_json::Value::Bool(true)) {
                o.remove("nullable");
            }
            let fmt = o.get("format").and_then(|f| f.as_str()).map(str::to_string);
            match fmt.as_deref() {
                Some("uint32" | "uint16" | "uint8") => {
                    o.insert("format".into(), "int32".into());
                }
                Some("uint64" | "uint") => {
                    o.insert("format".into(), "int64".into());
                }
                _ => {}
            }
            for (_, x) in o.iter_mut() {
                clean_schema(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(clean_schema),
        _ => {}
    }
}

/// The CRD as YAML, as written to `crds/` and the chart (one document, with a header).
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    let body = serde_yaml_ng::to_string(&crd())?;
    Ok(format!(
        "# Generated by `cargo run -p mapsnap-operator --bin crdgen` from operator/src/crd.rs.\n\
         # Do not edit: change the Rust types and run crdgen again (a test fails when stale).\n\
         {body}"
    ))
}

/// Where the generated CRD is kept, relative to the workspace root.
pub const CRD_FILES: [&str; 2] = [
    "crds/bpfmapcheckpoints.yaml",
    "charts/mapsnap/crds/bpfmapcheckpoints.yaml",
];
