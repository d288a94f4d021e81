//! The controller's decisions, as pure functions of the object, the time and the settings.
//!
//! [`decide`] looks at a `BpfMapCheckpoint` and says what to do next: add the finalizer, run
//! a step that needs the API ([`Decision::Execute`]), or move on from what the status already
//! shows (an agent's answer arrived, a timeout passed: [`Decision::Apply`]). After the thin
//! layer in [`crate::controller`] ran a step, [`apply`] turns what it observed
//! ([`Outcome`]) into the next status, the events to publish and when to look again.
//!
//! Everything the flow needs to resume lives in the status (the step, its attempt, the retry
//! time, the agent task), so a restarted controller continues where the last one stopped.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::config::{Config, KubeletAccess};
use crate::crd::{
    Action, AgentOperation, AgentResult, AgentTask, BpfMapCheckpoint, BpfMapCheckpointStatus,
    CheckpointStatus, FINALIZER, Phase, RestoreStatus, RetentionPolicy, SourcePodPolicy, Step,
    StepRecord, Switchover,
};
use crate::kubelet::KubeletErrorKind;
pub use crate::kubelet::KubeletFailure;
use crate::layout;
use crate::pods::{self, PodProgress, SourceCheck};

/// Condition types.
pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const FAILED: &str = "Failed";
/// Migrate with `switchover: StopAfterCheckpoint`: whether the restored pinned maps are those
/// of the source's stop (`True`), or only those of the checkpoint (`False`: changes the
/// source made after it are lost).
pub const MAP_STATE_FRESH: &str = "MapStateFresh";

/// An event to publish about the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventNote {
    pub warning: bool,
    /// CamelCase reason (`Resolved`, `KubeletCheckpointFailed`, ...).
    pub reason: String,
    /// The step it is about.
    pub action: String,
    pub note: String,
}

/// The API server's limit on an event's note, in bytes.
pub const EVENT_NOTE_MAX_BYTES: usize = 1024;

/// An event note cut to the API server's limit (1024 bytes, not characters), on a character
/// boundary.
pub fn event_note(note: &str) -> String {
    if note.len() <= EVENT_NOTE_MAX_BYTES {
        return note.to_string();
    }
    let mut end = EVENT_NOTE_MAX_BYTES;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note[..end].to_string()
}

/// When to look at the object again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// At once, in the same reconcile.
    Continue,
    /// After this long (or earlier, on a change).
    Requeue(Duration),
    /// Only when the object or a restored pod changes.
    AwaitChange,
}

/// A new status, with its events.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub status: BpfMapCheckpointStatus,
    pub events: Vec<EventNote>,
    pub then: Then,
    /// Cleanup finished (or gave up): remove the finalizer.
    pub remove_finalizer: bool,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    AddFinalizer,
    /// Run this step against the API, then [`apply`] its outcome.
    Execute(Step),
    /// Write this transition.
    Apply(Box<Transition>),
    /// Nothing to do before this long.
    Requeue(Duration),
    /// Nothing to do until something changes.
    Idle,
}

/// What running a step observed.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// An API call failed in a way that may pass (connection, 5xx, throttling, conflict).
    ApiError(String),
    /// Resolve: the source pod does not exist.
    PodMissing,
    /// Resolve: the source pod, judged; for a ready source, whether its node's agent is live.
    Source {
        check: SourceCheck,
        agent_live: bool,
        owner: Option<String>,
    },
    /// KubeletCheckpoint: the archive path on the node, or the failure.
    Kubelet(Result<String, KubeletFailure>),
    /// ResolveCheckpoint: the referenced object, if it exists.
    Referenced(Option<Box<BpfMapCheckpoint>>),
    /// PrepareRestore: whether the target node's agent is live, and why its node cannot
    /// restore (from the capabilities its lease reports), if it cannot.
    TargetAgent { live: bool, refusal: Option<String> },
    /// CreatePod: created (or found, made by this object).
    PodCreated { name: String, uid: Option<String> },
    /// CreatePod: refused (`code` 0: the pod could not be built).
    PodCreateFailed { code: u16, message: String },
    /// WaitPod: the restored pod, if it exists.
    RestoredPod(Option<Box<Pod>>),
    /// DeleteSource: whether the source pod was deleted by us.
    SourceDeleted { deleted: bool, note: String },
    /// CleanupSource / CleanupTarget: the node whose agent takes the task, if one is live.
    CleanupAgent { node: Option<String> },
}

/// Whether the object carries our finalizer.
pub fn has_finalizer(cr: &BpfMapCheckpoint) -> bool {
    cr.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

/// Whether a step runs on a node agent (its task is assigned and awaited, no API call).
pub fn is_agent_step(step: Step, cfg: &Config) -> bool {
    match step {
        Step::PrepareHook
        | Step::UploadArchive
        | Step::DownloadArchive
        | Step::AwaitStopSnapshot
        | Step::CleanupSource
        | Step::CleanupTarget => true,
        Step::KubeletCheckpoint => cfg.kubelet_access == KubeletAccess::Agent,
        _ => false,
    }
}

/// The id of the agent task for a step's attempt.
pub fn task_id(step: Step, attempt: u32) -> String {
    format!("{}-{attempt}", step.as_str().to_ascii_lowercase())
}

fn after(now: Timestamp, d: Duration) -> Timestamp {
    now.saturating_add(d).unwrap_or(Timestamp::MAX)
}

fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::try_from(now.duration_until(t)).unwrap_or(Duration::ZERO)
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

/// The phase shown while at a step.
fn phase_of(step: Step) -> Phase {
    match step {
        Step::Resolve | Step::ResolveCheckpoint => Phase::Pending,
        other => other.phase(),
    }
}

/// What to do next with `cr`.
pub fn decide(cr: &BpfMapCheckpoint, now: Timestamp, cfg: &Config) -> Decision {
    if cr.metadata.deletion_timestamp.is_some() {
        if !has_finalizer(cr) {
            return Decision::Idle;
        }
        return decide_cleanup(cr, now, cfg);
    }
    if !has_finalizer(cr) {
        return Decision::AddFinalizer;
    }
    let status = cr.status.clone().unwrap_or_default();
    let (Some(phase), Some(step)) = (status.phase, status.step) else {
        return Decision::Apply(Box::new(Machine::new(cr, now, cfg).start()));
    };
    if phase.is_terminal() || step == Step::Done {
        return Decision::Idle;
    }
    if let Some(t) = status.next_retry_time.as_ref().filter(|t| now < t.0) {
        return Decision::Requeue(until(now, t.0));
    }
    match step {
        Step::CleanupSource | Step::CleanupTarget | Step::Done => Decision::Idle,
        s if is_agent_step(s, cfg) => Machine::new(cr, now, cfg).await_agent(s),
        other => Decision::Execute(other),
    }
}

/// Turns the outcome of an executed step into the next status.
pub fn apply(
    cr: &BpfMapCheckpoint,
    step: Step,
    outcome: Outcome,
    now: Timestamp,
    cfg: &Config,
) -> Transition {
    let m = Machine::new(cr, now, cfg);
    if let Outcome::ApiError(msg) = &outcome {
        return m.retry("ApiError", msg);
    }
    match (step, outcome) {
        (Step::Resolve, o) => m.resolved(o),
        (Step::KubeletCheckpoint, Outcome::Kubelet(r)) => m.kubelet(r),
        (Step::ResolveCheckpoint, Outcome::Referenced(r)) => m.referenced(r),
        (Step::PrepareRestore, Outcome::TargetAgent { live, refusal }) => {
            m.target_agent(live, refusal)
        }
        (Step::CreatePod, o) => m.pod_created(o),
        (Step::WaitPod, Outcome::RestoredPod(p)) => m.restored_pod(p),
        (Step::DeleteSource, Outcome::SourceDeleted { deleted, note }) => {
            m.source_deleted(deleted, &note)
        }
        (Step::CleanupSource | Step::CleanupTarget, Outcome::CleanupAgent { node }) => {
            m.cleanup_agent(step, node)
        }
        (step, o) => m.fail(
            "InternalError",
            &format!("unexpected outcome of step {}: {o:?}", step.as_str()),
        ),
    }
}

/// The cleanup steps needed for an object being deleted, in order.
pub fn cleanup_steps(cr: &BpfMapCheckpoint) -> Vec<Step> {
    if cr.spec.retention_policy == RetentionPolicy::Retain {
        return Vec::new();
    }
    let status = cr.status.clone().unwrap_or_default();
    let mut steps = Vec::new();
    let checkpointed_something = status.source.is_some()
        || status
            .checkpoint
            .as_ref()
            .is_some_and(|c| c.node_archive.is_some() || c.manifest.is_some());
    if cr.spec.action.checkpoints() && checkpointed_something {
        steps.push(Step::CleanupSource);
    }
    // A download was asked (it may have finished after the object was deleted): stable
    // across the cleanup steps, unlike the current task.
    let fetching = status.steps.iter().any(|r| r.name == Step::DownloadArchive);
    let fetched = status
        .restore
        .as_ref()
        .is_some_and(|r| r.node_archive.is_some() || r.image.is_some());
    if cr.spec.action.restores() && (fetching || fetched) {
        steps.push(Step::CleanupTarget);
    }
    steps
}

fn decide_cleanup(cr: &BpfMapCheckpoint, now: Timestamp, cfg: &Config) -> Decision {
    let status = cr.status.clone().unwrap_or_default();
    let mut m = Machine::new(cr, now, cfg);
    let step = status.step.filter(|s| {
        status.phase == Some(Phase::Deleting)
            && matches!(s, Step::CleanupSource | Step::CleanupTarget)
    });
    let Some(step) = step else {
        // First look at the deleted object.
        let steps = cleanup_steps(cr);
        let Some(first) = steps.first().copied() else {
            return Decision::Apply(Box::new(m.done_cleanup(None)));
        };
        m.note(
            false,
            "CleanupStarted",
            &format!(
                "deleting stored data and node-local files ({})",
                steps
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        return Decision::Apply(Box::new(m.enter(first)));
    };
    if let Some(t) = status.next_retry_time.as_ref().filter(|t| now < t.0) {
        return Decision::Requeue(until(now, t.0));
    }
    let expected = task_id(step, m.attempt());
    let Some(task) = status.agent_task.as_ref().filter(|t| t.id == expected) else {
        return Decision::Execute(step);
    };
    match status.agent_result.as_ref().filter(|r| r.id == task.id) {
        Some(r) if r.succeeded => {
            m.note(
                false,
                "CleanedUp",
                &format!(
                    "agent on node {} removed {}",
                    r.node,
                    r.message.as_deref().unwrap_or("the files")
                ),
            );
            Decision::Apply(Box::new(m.next_cleanup(step)))
        }
        Some(r) => {
            let msg = format!(
                "agent on node {}: {}",
                r.node,
                r.message.as_deref().unwrap_or("failed")
            );
            Decision::Apply(Box::new(if r.permanent {
                let attempt = m.attempt();
                m.cleanup_give_up(step, &msg, attempt)
            } else {
                m.cleanup_retry(step, &msg)
            }))
        }
        None => {
            let deadline = after(task.created.0, cfg.agent_timeout);
            if now >= deadline {
                let msg = format!(
                    "agent on node {} did not answer within {}s",
                    task.node,
                    cfg.agent_timeout.as_secs()
                );
                Decision::Apply(Box::new(m.cleanup_retry(step, &msg)))
            } else {
                Decision::Requeue(until(now, deadline).min(cfg.poll_interval))
            }
        }
    }
}

/// One transition being built: the object, the status being changed, the events.
struct Machine<'a> {
    cr: &'a BpfMapCheckpoint,
    cfg: &'a Config,
    now: Timestamp,
    status: BpfMapCheckpointStatus,
    events: Vec<EventNote>,
}

impl<'a> Machine<'a> {
    fn new(cr: &'a BpfMapCheckpoint, now: Timestamp, cfg: &'a Config) -> Self {
        Self {
            cr,
            cfg,
            now,
            status: cr.status.clone().unwrap_or_default(),
            events: Vec::new(),
        }
    }

    fn step(&self) -> Step {
        self.status.step.unwrap_or(Step::Resolve)
    }

    fn attempt(&self) -> u32 {
        self.status.attempt.unwrap_or(1).max(1)
    }

    fn namespace(&self) -> &str {
        self.cr.metadata.namespace.as_deref().unwrap_or_default()
    }

    fn uid(&self) -> &str {
        self.cr.metadata.uid.as_deref().unwrap_or_default()
    }

    /// The kubelet API's `timeout` for this object.
    fn kubelet_timeout(&self) -> Duration {
        self.cr
            .spec
            .checkpoint_timeout_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.cfg.checkpoint_timeout, Duration::from_secs)
    }

    /// Migrate that takes the source out of service right after the checkpoint.
    fn stop_after_checkpoint(&self) -> bool {
        self.cr.spec.action == Action::Migrate
            && self.cr.spec.switchover.unwrap_or_default() == Switchover::StopAfterCheckpoint
    }

    /// Where the hook writes the pins when the source stops: beside the checkpoint's snapshot
    /// (None unless the Migrate stops the source after its checkpoint).
    fn stop_location(&self) -> Option<String> {
        if !self.stop_after_checkpoint() {
            return None;
        }
        let snapshot = &self.status.checkpoint.as_ref()?.snapshot;
        let prefix = snapshot.strip_suffix(&format!("/{}", layout::SNAPSHOT_NAME))?;
        Some(layout::stop_snapshot_location(prefix))
    }

    /// How long the source node's agent waits for the stop snapshot after the source pod's
    /// deletion: the pod's termination grace period (the kubelet kills the container then at
    /// the latest; the runtime runs poststop when it removes the container) plus
    /// `agentTimeout` for the removal and the upload.
    fn stop_wait(&self) -> Duration {
        let grace = self
            .status
            .source
            .as_ref()
            .and_then(|s| s.pod_template.as_ref())
            .and_then(|t| t.spec.termination_grace_period_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(30);
        Duration::from_secs(grace) + self.cfg.agent_timeout
    }

    /// No stop snapshot (not written in time, or the wait failed): the restore goes on from
    /// the checkpoint's snapshot, said loudly, since the source is gone and the checkpoint
    /// is good.
    fn stop_snapshot_missing(mut self, why: &str) -> Transition {
        let msg = format!(
            "no snapshot of the pinned maps from the source's stop ({why}): restoring the \
             checkpoint's snapshot; changes the source made to its pinned maps after the \
             checkpoint are lost"
        );
        self.note(true, "StopSnapshotMissing", &msg);
        self.set_condition(MAP_STATE_FRESH, false, "StopSnapshotMissing", &msg);
        self.enter(Step::PrepareRestore)
    }

    fn note(&mut self, warning: bool, reason: &str, note: &str) {
        self.events.push(EventNote {
            warning,
            reason: reason.into(),
            action: self.step().as_str().into(),
            note: note.into(),
        });
    }

    fn finish_transition(self, then: Then) -> Transition {
        Transition {
            status: self.status,
            events: self.events,
            then,
            remove_finalizer: false,
        }
    }

    fn set_condition(&mut self, type_: &str, status: bool, reason: &str, message: &str) {
        let generation = self.cr.metadata.generation;
        let value = if status { "True" } else { "False" };
        let conds = &mut self.status.conditions;
        match conds.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != value {
                    c.last_transition_time = Time(self.now);
                }
                c.status = value.into();
                c.reason = reason.into();
                c.message = message.into();
                c.observed_generation = generation;
            }
            None => conds.push(Condition {
                type_: type_.into(),
                status: value.into(),
                reason: reason.into(),
                message: message.into(),
                last_transition_time: Time(self.now),
                observed_generation: generation,
            }),
        }
    }

    fn condition_reason(&self, type_: &str) -> Option<&str> {
        self.status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.reason.as_str())
    }

    fn current_record(&mut self) -> Option<&mut StepRecord> {
        let step = self.status.step?;
        self.status.steps.iter_mut().rev().find(|r| r.name == step)
    }

    fn step_started(&self) -> Timestamp {
        let step = self.status.step;
        self.status
            .steps
            .iter()
            .rev()
            .find(|r| Some(r.name) == step)
            .map_or(self.now, |r| r.start_time.0)
    }

    fn complete_record(&mut self) {
        let now = self.now;
        if let Some(r) = self.current_record()
            && r.completion_time.is_none()
        {
            r.completion_time = Some(Time(now));
        }
    }

    /// The first status: validates what the schema could not, then enters the first step.
    fn start(mut self) -> Transition {
        self.status = BpfMapCheckpointStatus {
            start_time: Some(Time(self.now)),
            observed_generation: self.cr.metadata.generation,
            ..BpfMapCheckpointStatus::default()
        };
        if let Err(e) = self.validate() {
            self.status.step = Some(Step::Resolve);
            return self.fail("InvalidSpec", &e);
        }
        let spec = &self.cr.spec;
        if spec.action.checkpoints() {
            let base = spec
                .storage
                .as_ref()
                .map_or(self.cfg.storage_location.as_str(), |s| s.location.as_str());
            let prefix = layout::object_prefix(
                base,
                self.namespace(),
                self.cr.metadata.name.as_deref().unwrap_or_default(),
                self.uid(),
            );
            self.status.checkpoint = Some(CheckpointStatus {
                snapshot: layout::snapshot_location(&prefix),
                archive: layout::archive_location(&prefix),
                ..CheckpointStatus::default()
            });
        }
        self.set_condition(READY, false, "InProgress", "");
        self.set_condition(FAILED, false, "NoFailure", "");
        let what = match spec.action {
            Action::Restore => format!(
                "restore of checkpoint {} on node {}",
                spec.source
                    .checkpoint_ref
                    .as_ref()
                    .map_or("?", |r| r.name.as_str()),
                spec.target.as_ref().map_or("?", |t| t.node.as_str())
            ),
            action => format!(
                "{} of pod {}{}{}",
                action.as_str().to_ascii_lowercase(),
                spec.source.pod.as_deref().unwrap_or("?"),
                spec.source
                    .container
                    .as_deref()
                    .map(|c| format!(" container {c}"))
                    .unwrap_or_default(),
                spec.target
                    .as_ref()
                    .map(|t| format!(" to node {}", t.node))
                    .unwrap_or_default()
            ),
        };
        let first = if spec.action == Action::Restore {
            Step::ResolveCheckpoint
        } else {
            Step::Resolve
        };
        self.status.step = Some(first);
        self.note(false, "Accepted", &what);
        self.enter(first)
    }

    /// Checks the spec again (the schema may be older than this controller) and the things
    /// only the controller knows: allowed storage prefixes, the runtime's restore support.
    fn validate(&self) -> Result<(), String> {
        let spec = &self.cr.spec;
        let has_pod = spec.source.pod.is_some();
        let has_ref = spec.source.checkpoint_ref.is_some();
        match spec.action {
            Action::Restore if !has_ref || has_pod => {
                return Err("Restore takes source.checkpointRef (and no source.pod)".into());
            }
            Action::Checkpoint | Action::Migrate if !has_pod || has_ref => {
                return Err(format!(
                    "{} takes source.pod (and no source.checkpointRef)",
                    spec.action.as_str()
                ));
            }
            _ => {}
        }
        if spec.action.restores() != spec.target.is_some() {
            return Err("target is required for Restore and Migrate only".into());
        }
        if spec.source_pod_policy.is_some() && spec.action != Action::Migrate {
            return Err("sourcePodPolicy applies to Migrate only".into());
        }
        if spec.switchover.is_some() && spec.action != Action::Migrate {
            return Err("switchover applies to Migrate only".into());
        }
        if let Some(s) = spec.storage.as_ref() {
            if spec.action == Action::Restore {
                return Err("a Restore takes no storage".into());
            }
            let mut allowed = self.cfg.allowed_locations.clone();
            allowed.push(self.cfg.storage_location.clone());
            layout::check_location(&s.location, &allowed).map_err(|e| e.to_string())?;
        } else if spec.action.checkpoints() {
            layout::check_location(&self.cfg.storage_location, &[])
                .map_err(|e| format!("the operator's default {e}"))?;
        }
        Ok(())
    }

    /// Moves to `step`: records it, resets the attempt, builds its agent task.
    fn enter(mut self, step: Step) -> Transition {
        self.complete_record();
        self.status.step = Some(step);
        self.status.phase = Some(phase_of(step));
        self.status.attempt = Some(1);
        self.status.next_retry_time = None;
        self.status.agent_task = None;
        let rec = StepRecord {
            name: step,
            start_time: Time(self.now),
            completion_time: None,
            attempts: 1,
        };
        match self.status.steps.iter_mut().find(|r| r.name == step) {
            Some(r) => *r = rec,
            None => self.status.steps.push(rec),
        }
        self.set_condition(PROGRESSING, true, step.as_str(), &describe(step));
        if matches!(step, Step::CleanupSource | Step::CleanupTarget) {
            // The agent is chosen by the API layer (Execute).
            return self.finish_transition(Then::Continue);
        }
        if is_agent_step(step, self.cfg) {
            self.status.agent_task = self.task_for(step);
            if self.status.agent_task.is_none() {
                return self.fail(
                    "InternalError",
                    &format!("cannot build the agent task of step {}", step.as_str()),
                );
            }
            let then = Then::Requeue(self.cfg.poll_interval);
            return self.finish_transition(then);
        }
        self.finish_transition(Then::Continue)
    }

    fn step_timeout(&self, step: Step) -> Duration {
        match step {
            Step::UploadArchive | Step::DownloadArchive => self.cfg.transfer_timeout,
            // The kubelet's own timeout, plus the time to reach it.
            Step::KubeletCheckpoint => self.kubelet_timeout() + crate::kubelet::CLIENT_GRACE,
            Step::Resolve | Step::ResolveCheckpoint => self.cfg.wait_timeout,
            Step::WaitPod => self.cfg.restore_timeout,
            // The agent's own wait, plus the time to answer.
            Step::AwaitStopSnapshot => self.stop_wait() + self.cfg.agent_timeout,
            _ => self.cfg.agent_timeout,
        }
    }

    /// The agent task of an agent step (not the cleanup steps, whose node is chosen by the
    /// API layer).
    fn task_for(&self, step: Step) -> Option<AgentTask> {
        let source = self.status.source.as_ref();
        let ckpt = self.status.checkpoint.as_ref();
        let base = AgentTask {
            id: task_id(step, self.attempt()),
            node: String::new(),
            operation: None,
            container_id: None,
            pod: None,
            container: None,
            timeout_seconds: None,
            snapshot: ckpt.map(|c| c.snapshot.clone()),
            stop_snapshot: None,
            archive: None,
            node_archive: None,
            archive_sha256: None,
            archive_size: None,
            restore_pod: None,
            delete_objects: Vec::new(),
            delete_images: Vec::new(),
            created: Time(self.now),
            expires: Time(after(self.now, self.step_timeout(step))),
        };
        match step {
            Step::PrepareHook => Some(AgentTask {
                node: source?.node.clone(),
                operation: Some(AgentOperation::PrepareCheckpoint),
                container_id: Some(source?.container_id.clone()),
                stop_snapshot: self.stop_location(),
                expires: Time(after(self.now, self.cfg.hook_request_ttl)),
                ..base
            }),
            Step::KubeletCheckpoint => Some(AgentTask {
                node: source?.node.clone(),
                operation: Some(AgentOperation::KubeletCheckpoint),
                container_id: Some(source?.container_id.clone()),
                pod: Some(source?.pod.clone()),
                container: Some(source?.container.clone()),
                timeout_seconds: i32::try_from(self.kubelet_timeout().as_secs()).ok(),
                ..base
            }),
            Step::UploadArchive => Some(AgentTask {
                node: source?.node.clone(),
                operation: Some(AgentOperation::UploadArchive),
                container_id: Some(source?.container_id.clone()),
                stop_snapshot: self.stop_location(),
                archive: Some(ckpt?.archive.clone()),
                node_archive: Some(ckpt?.node_archive.clone()?),
                ..base
            }),
            Step::DownloadArchive => {
                let restore = self.status.restore.as_ref()?;
                Some(AgentTask {
                    node: restore.node.clone(),
                    operation: Some(AgentOperation::DownloadArchive),
                    // The restore request names what the restored pod's annotation names.
                    snapshot: Some(
                        ckpt?
                            .stop_snapshot
                            .clone()
                            .unwrap_or(ckpt?.snapshot.clone()),
                    ),
                    archive: Some(ckpt?.archive.clone()),
                    archive_sha256: Some(ckpt?.archive_sha256.clone()?),
                    archive_size: ckpt?.archive_size,
                    restore_pod: Some(format!("{}/{}", self.namespace(), restore.pod)),
                    container: Some(source?.container.clone()),
                    ..base
                })
            }
            Step::AwaitStopSnapshot => Some(AgentTask {
                node: source?.node.clone(),
                operation: Some(AgentOperation::AwaitStopSnapshot),
                container_id: Some(source?.container_id.clone()),
                stop_snapshot: Some(self.stop_location()?),
                expires: Time(after(self.now, self.stop_wait())),
                ..base
            }),
            _ => None,
        }
    }

    /// A transient failure: try the step again after a backoff, or fail after the last
    /// attempt.
    fn retry(mut self, reason: &str, message: &str) -> Transition {
        let attempt = self.attempt();
        let max = self.cfg.max_attempts.max(1);
        if attempt >= max {
            return self.fail(
                reason,
                &format!("{message} (gave up after {attempt} attempts)"),
            );
        }
        let delay = self.cfg.backoff(attempt);
        let next = after(self.now, delay);
        self.status.attempt = Some(attempt + 1);
        self.status.next_retry_time = Some(Time(next));
        self.status.agent_task = None;
        if let Some(r) = self.current_record() {
            r.attempts = attempt + 1;
        }
        let text = format!(
            "attempt {attempt}/{max} failed: {message}; retrying in {}s",
            delay.as_secs()
        );
        self.set_condition(PROGRESSING, true, reason, &text);
        self.note(true, reason, &text);
        self.finish_transition(Then::Requeue(delay))
    }

    /// A permanent failure.
    fn fail(mut self, reason: &str, message: &str) -> Transition {
        self.complete_record();
        self.status.phase = Some(Phase::Failed);
        self.status.completion_time = Some(Time(self.now));
        self.status.next_retry_time = None;
        self.status.agent_task = None;
        let step = self.step();
        let text = format!("{}: {message}", step.as_str());
        self.set_condition(READY, false, reason, &text);
        self.set_condition(PROGRESSING, false, "Failed", &text);
        self.set_condition(FAILED, true, reason, &text);
        self.note(true, reason, &text);
        self.finish_transition(Then::AwaitChange)
    }

    /// Waiting for something outside (pod starting, referenced checkpoint), within the step's
    /// timeout.
    fn wait(mut self, reason: &str, message: &str) -> Transition {
        let limit = self.step_timeout(self.step());
        let waited = elapsed(self.step_started(), self.now);
        if waited >= limit {
            return self.fail(
                "Timeout",
                &format!("{message} ({reason}, still so after {}s)", limit.as_secs()),
            );
        }
        if self.condition_reason(PROGRESSING) != Some(reason) {
            self.note(false, reason, message);
        }
        self.set_condition(PROGRESSING, true, reason, message);
        let then = Then::Requeue(self.cfg.poll_interval.min(limit - waited));
        self.finish_transition(then)
    }

    fn succeed(mut self, summary: &str) -> Transition {
        self.complete_record();
        self.status.step = Some(Step::Done);
        self.status.phase = Some(Phase::Succeeded);
        self.status.completion_time = Some(Time(self.now));
        self.status.next_retry_time = None;
        self.status.agent_task = None;
        let reason = match self.cr.spec.action {
            Action::Checkpoint => "Checkpointed",
            Action::Restore => "Restored",
            Action::Migrate => "Migrated",
        };
        self.set_condition(READY, true, reason, summary);
        self.set_condition(PROGRESSING, false, "Succeeded", summary);
        self.set_condition(FAILED, false, "NoFailure", "");
        self.note(false, "Succeeded", summary);
        self.finish_transition(Then::AwaitChange)
    }

    /// Waiting for the agent's answer to the current step's task.
    fn await_agent(self, step: Step) -> Decision {
        let expected = task_id(step, self.attempt());
        let Some(task) = self.status.agent_task.clone().filter(|t| t.id == expected) else {
            // After a retry's backoff (or an older controller's task): assign the task.
            let mut m = self;
            m.status.agent_task = m.task_for(step);
            if m.status.agent_task.is_none() {
                return Decision::Apply(Box::new(m.fail(
                    "InternalError",
                    &format!("cannot build the agent task of step {}", step.as_str()),
                )));
            }
            let then = Then::Requeue(m.cfg.poll_interval);
            return Decision::Apply(Box::new(m.finish_transition(then)));
        };
        let result = self.status.agent_result.clone().filter(|r| r.id == task.id);
        match result {
            Some(r) if r.succeeded => Decision::Apply(Box::new(self.agent_done(step, &r))),
            Some(r) if step == Step::AwaitStopSnapshot => {
                let why = format!(
                    "agent on node {}: {}",
                    r.node,
                    r.message.as_deref().unwrap_or("failed")
                );
                Decision::Apply(Box::new(self.stop_snapshot_missing(&why)))
            }
            // The kubelet's answer, as the agent relayed it: judged like the proxy's.
            Some(r) if step == Step::KubeletCheckpoint && r.http_status.is_some() => {
                let code = r
                    .http_status
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(0);
                let message = r.message.clone().unwrap_or_default();
                Decision::Apply(Box::new(
                    self.kubelet(Err(KubeletFailure { code, message })),
                ))
            }
            Some(r) => {
                let reason = r.reason.clone().unwrap_or_else(|| "AgentFailed".into());
                let msg = format!(
                    "agent on node {}: {}",
                    r.node,
                    r.message.as_deref().unwrap_or("failed")
                );
                Decision::Apply(Box::new(if r.permanent {
                    self.fail(&reason, &msg)
                } else {
                    self.retry(&reason, &msg)
                }))
            }
            None => {
                let deadline = after(task.created.0, self.step_timeout(step));
                if self.now >= deadline {
                    let msg = format!(
                        "the agent on node {} did not finish {} within {}s",
                        task.node,
                        task.operation.map_or("its task", |o| o.as_str()),
                        self.step_timeout(step).as_secs()
                    );
                    if step == Step::AwaitStopSnapshot {
                        return Decision::Apply(Box::new(self.stop_snapshot_missing(&msg)));
                    }
                    Decision::Apply(Box::new(self.retry("AgentTimeout", &msg)))
                } else {
                    Decision::Requeue(until(self.now, deadline).min(self.cfg.poll_interval))
                }
            }
        }
    }

    fn agent_done(mut self, step: Step, r: &AgentResult) -> Transition {
        match step {
            Step::KubeletCheckpoint => match r.node_archive.clone() {
                Some(path) => self.kubelet(Ok(path)),
                None => self.fail("AgentFailed", "the agent named no checkpoint archive"),
            },
            Step::PrepareHook => {
                let note = format!(
                    "agent on node {} wrote the hook request for container {}",
                    r.node,
                    short_id(
                        self.status
                            .source
                            .as_ref()
                            .map_or("", |s| s.container_id.as_str())
                    )
                );
                self.note(false, "HookPrepared", &note);
                self.enter(Step::KubeletCheckpoint)
            }
            Step::UploadArchive => {
                let Some(c) = self.status.checkpoint.as_mut() else {
                    return self.fail("InternalError", "no checkpoint status");
                };
                c.archive_sha256 = r.archive_sha256.clone();
                c.archive_size = r.archive_size;
                c.manifest = r.manifest.clone();
                let maps = r.manifest.as_ref().map_or(0, |m| m.maps.len() as i64);
                let snap = r.manifest.as_ref().map_or(0, |m| m.size.max(0) as u64);
                let arch = r.archive_size.unwrap_or(0).max(0) as u64;
                c.map_count = Some(maps);
                c.size = Some(layout::human_size(snap + arch));
                let summary = format!(
                    "{maps} maps ({} snapshot) at {}, archive ({}) at {}",
                    layout::human_size(snap),
                    c.snapshot,
                    layout::human_size(arch),
                    c.archive
                );
                if r.manifest.is_none() {
                    let note = format!(
                        "no map snapshot at {}: mapsnap-hook wrote none (the container has no \
                         bpffs mount, opted out with mapsnap.io/checkpoint=false, or the hook is \
                         not installed on node {}); the checkpoint carries no BPF maps",
                        c.snapshot, r.node
                    );
                    self.note(true, "NoMapSnapshot", &note);
                }
                self.note(false, "Checkpointed", &summary);
                if self.cr.spec.action == Action::Checkpoint {
                    self.succeed(&summary)
                } else if self.stop_after_checkpoint() {
                    self.enter(Step::DeleteSource)
                } else {
                    self.enter(Step::PrepareRestore)
                }
            }
            Step::DownloadArchive => {
                let Some(restore) = self.status.restore.as_mut() else {
                    return self.fail("InternalError", "no restore status");
                };
                let Some(image) = r.image.clone().filter(|i| crate::pods::is_digest_ref(i)) else {
                    return self.fail(
                        "AgentFailed",
                        &format!(
                            "the agent named no checkpoint image by digest (got {:?})",
                            r.image
                        ),
                    );
                };
                restore.node_archive = r.node_archive.clone();
                restore.image = Some(image.clone());
                let note = format!(
                    "agent on node {} fetched the archive and pushed the checkpoint image {image}",
                    r.node
                );
                self.note(false, "ImagePushed", &note);
                self.enter(Step::CreatePod)
            }
            Step::AwaitStopSnapshot => {
                let Some(m) = r.manifest.clone() else {
                    let why = r
                        .message
                        .clone()
                        .unwrap_or_else(|| "it did not appear in time".into());
                    return self.stop_snapshot_missing(&why);
                };
                let Some(stop) = self.stop_location() else {
                    return self.fail("InternalError", "no stop snapshot location");
                };
                let msg = format!(
                    "mapsnap-hook saved {} pinned maps ({}) when the source stopped, at {stop}: \
                     the restore uses them instead of the checkpoint's",
                    m.maps.len(),
                    layout::human_size(m.size.max(0) as u64)
                );
                if let Some(c) = self.status.checkpoint.as_mut() {
                    c.stop_snapshot = Some(stop);
                    c.stop_manifest = Some(m);
                }
                self.note(false, "StopSnapshotFound", &msg);
                self.set_condition(MAP_STATE_FRESH, true, "StopSnapshot", &msg);
                self.enter(Step::PrepareRestore)
            }
            other => self.fail(
                "InternalError",
                &format!("no agent result expected at step {}", other.as_str()),
            ),
        }
    }

    fn resolved(mut self, o: Outcome) -> Transition {
        let pod = self.cr.spec.source.pod.clone().unwrap_or_default();
        match o {
            Outcome::PodMissing => {
                let ns = self.namespace().to_string();
                self.fail("PodNotFound", &format!("pod {ns}/{pod} not found"))
            }
            Outcome::Source {
                check,
                agent_live,
                owner,
            } => match check {
                SourceCheck::Wait { reason, message } => self.wait(&reason, &message),
                SourceCheck::Invalid { reason, message } => self.fail(&reason, &message),
                SourceCheck::Ready(source) if !agent_live => {
                    let msg = format!(
                        "no mapsnap agent runs on node {} (lease {}/{} missing or stale): is \
                         the agent DaemonSet scheduled there?",
                        source.node,
                        self.cfg.namespace,
                        layout::agent_lease_name(&source.node)
                    );
                    self.retry("AgentUnavailable", &msg)
                }
                SourceCheck::Ready(source) => {
                    let note = format!(
                        "container {} ({}://{}) of pod {} on node {}",
                        source.container,
                        source.runtime,
                        short_id(&source.container_id),
                        source.pod,
                        source.node
                    );
                    self.note(false, "Resolved", &note);
                    if let Some(owner) = owner.filter(|_| self.cr.spec.action.restores()) {
                        self.note(
                            true,
                            "OwnedSourcePod",
                            &format!(
                                "pod {} is controlled by {owner}: the restored pod carries its \
                                 labels and may be adopted (or deleted) by that controller",
                                source.pod
                            ),
                        );
                    }
                    self.status.source = Some(*source);
                    self.enter(Step::PrepareHook)
                }
            },
            other => self.fail("InternalError", &format!("unexpected outcome {other:?}")),
        }
    }

    fn kubelet(mut self, r: Result<String, KubeletFailure>) -> Transition {
        let node = self
            .status
            .source
            .as_ref()
            .map_or(String::new(), |s| s.node.clone());
        match r {
            Ok(path) => {
                if let Some(c) = self.status.checkpoint.as_mut() {
                    c.node_archive = Some(path.clone());
                    c.checkpoint_time = Some(Time(self.now));
                }
                self.note(
                    false,
                    "CheckpointCreated",
                    &format!("the kubelet on node {node} wrote {path}"),
                );
                self.enter(Step::UploadArchive)
            }
            Err(f) => {
                let msg = format!(
                    "kubelet checkpoint on node {node} failed ({}): {}",
                    if f.code == 0 {
                        "no answer".to_string()
                    } else {
                        format!("HTTP {}", f.code)
                    },
                    f.message
                );
                let kind = f.kind();
                let hint = match (kind, self.cfg.kubelet_access) {
                    (KubeletErrorKind::Forbidden, KubeletAccess::Agent) => {
                        "; the agent's service account needs nodes/checkpoint (create)"
                    }
                    (KubeletErrorKind::Forbidden, KubeletAccess::ApiServerProxy) => {
                        "; through the node proxy the kubelet checks the API server's \
                         kubelet-client user, which needs nodes/checkpoint (create): set the \
                         chart's kubelet.apiServerUser to that user"
                    }
                    (KubeletErrorKind::Unauthenticated, _) => {
                        "; the kubelet did not accept the token (is its webhook authentication \
                         on?)"
                    }
                    (KubeletErrorKind::FeatureDisabled, _) => {
                        "; the kubelet has no checkpoint API: enable the ContainerCheckpoint \
                         feature gate (on by default since Kubernetes 1.30)"
                    }
                    (KubeletErrorKind::PodNotFound, _) => {
                        "; the kubelet does not know the pod (deleted, or not on this node)"
                    }
                    (KubeletErrorKind::NoAnswer, KubeletAccess::Agent) => {
                        "; check the agent's kubelet address and the kubelet's serving \
                         certificate (docs/OPERATOR.md)"
                    }
                    _ => "",
                };
                let msg = format!("{msg}{hint}");
                if kind.transient() {
                    self.retry(kind.reason(), &msg)
                } else {
                    self.fail(kind.reason(), &msg)
                }
            }
        }
    }

    fn referenced(mut self, r: Option<Box<BpfMapCheckpoint>>) -> Transition {
        let name = self
            .cr
            .spec
            .source
            .checkpoint_ref
            .as_ref()
            .map_or(String::new(), |r| r.name.clone());
        let Some(r) = r else {
            return self.wait(
                "CheckpointNotFound",
                &format!("BpfMapCheckpoint {name} not found in this namespace"),
            );
        };
        if r.spec.action == Action::Restore {
            return self.fail(
                "InvalidCheckpointRef",
                &format!("BpfMapCheckpoint {name} is a Restore, not a checkpoint"),
            );
        }
        if r.metadata.deletion_timestamp.is_some() {
            return self.fail(
                "CheckpointDeleted",
                &format!("BpfMapCheckpoint {name} is being deleted"),
            );
        }
        let rs = r.status.clone().unwrap_or_default();
        let ckpt_done = rs
            .checkpoint
            .as_ref()
            .is_some_and(|c| c.archive_sha256.is_some())
            && rs
                .steps
                .iter()
                .any(|s| s.name == Step::UploadArchive && s.completion_time.is_some());
        match rs.phase {
            Some(Phase::Failed) if !ckpt_done => {
                return self.fail(
                    "CheckpointFailed",
                    &format!("BpfMapCheckpoint {name} failed"),
                );
            }
            _ if !ckpt_done => {
                return self.wait(
                    "CheckpointNotReady",
                    &format!(
                        "BpfMapCheckpoint {name} has not finished its checkpoint yet (phase {})",
                        rs.phase.map_or("none", |p| p.as_str())
                    ),
                );
            }
            _ => {}
        }
        let (Some(source), Some(ckpt)) = (rs.source, rs.checkpoint) else {
            return self.fail(
                "InvalidCheckpointRef",
                &format!("BpfMapCheckpoint {name} records no source or checkpoint"),
            );
        };
        if source.pod_template.is_none() {
            return self.fail(
                "InvalidCheckpointRef",
                &format!("BpfMapCheckpoint {name} records no pod template"),
            );
        }
        self.note(
            false,
            "CheckpointFound",
            &format!(
                "restoring {name}: container {} of pod {}, {} maps",
                source.container,
                source.pod,
                ckpt.map_count.unwrap_or(0)
            ),
        );
        self.status.source = Some(source);
        self.status.checkpoint = Some(ckpt);
        self.enter(Step::PrepareRestore)
    }

    fn target_agent(mut self, live: bool, refusal: Option<String>) -> Transition {
        let Some(node) = self.cr.spec.target.as_ref().map(|t| t.node.clone()) else {
            return self.fail("InvalidSpec", "no target");
        };
        if !live {
            let msg = format!(
                "no mapsnap agent runs on target node {node} (lease {}/{} missing or stale)",
                self.cfg.namespace,
                layout::agent_lease_name(&node)
            );
            return self.retry("AgentUnavailable", &msg);
        }
        if let Some(why) = refusal {
            return self.fail(
                "RestoreUnsupported",
                &format!("node {node} cannot restore containers: {why}"),
            );
        }
        let source_pod = self
            .status
            .source
            .as_ref()
            .map_or(String::new(), |s| s.pod.clone());
        let pod = pods::restored_pod_name(self.cr, &source_pod);
        let deleted = self
            .status
            .restore
            .as_ref()
            .and_then(|r| r.source_pod_deleted);
        self.status.restore = Some(RestoreStatus {
            node,
            pod,
            source_pod_deleted: deleted,
            ..RestoreStatus::default()
        });
        self.enter(Step::DownloadArchive)
    }

    fn pod_created(mut self, o: Outcome) -> Transition {
        match o {
            Outcome::PodCreated { name, uid } => {
                let node = self
                    .status
                    .restore
                    .as_ref()
                    .map_or(String::new(), |r| r.node.clone());
                if let Some(r) = self.status.restore.as_mut() {
                    r.pod = name.clone();
                    r.pod_uid = uid;
                }
                self.note(
                    false,
                    "PodCreated",
                    &format!("created pod {name} on node {node} from the checkpoint"),
                );
                self.enter(Step::WaitPod)
            }
            Outcome::PodCreateFailed { code, message } => match code {
                409 => self.fail("PodNameConflict", &message),
                // ResourceQuota admission: may pass once other pods are gone.
                403 if message.contains("exceeded quota") => self.retry("QuotaExceeded", &message),
                0 => self.fail("PodTemplateInvalid", &message),
                400 | 403 | 422 => self.fail("PodRejected", &message),
                _ => self.retry("PodCreateFailed", &message),
            },
            other => self.fail("InternalError", &format!("unexpected outcome {other:?}")),
        }
    }

    fn restored_pod(mut self, p: Option<Box<Pod>>) -> Transition {
        let Some(restore) = self.status.restore.clone() else {
            return self.fail("InternalError", "no restore status");
        };
        let Some(pod) = p else {
            return self.fail(
                "RestoredPodDeleted",
                &format!("the restored pod {} was deleted", restore.pod),
            );
        };
        if restore.pod_uid.is_some() && pod.metadata.uid != restore.pod_uid {
            return self.fail(
                "RestoredPodReplaced",
                &format!("pod {} is not the pod this object created", restore.pod),
            );
        }
        let container = self
            .status
            .source
            .as_ref()
            .map_or(String::new(), |s| s.container.clone());
        match pods::restored_progress(&pod, &container) {
            PodProgress::Running => {
                if let Some(r) = self.status.restore.as_mut() {
                    r.running_time = Some(Time(self.now));
                }
                let note = format!(
                    "pod {} runs on node {} with the checkpointed container {container}",
                    restore.pod, restore.node
                );
                self.note(false, "PodRunning", &note);
                let delete = self.cr.spec.action == Action::Migrate
                    && !self.stop_after_checkpoint()
                    && self.cr.spec.source_pod_policy.unwrap_or_default()
                        == SourcePodPolicy::Delete;
                if delete {
                    self.enter(Step::DeleteSource)
                } else {
                    self.succeed(&note)
                }
            }
            PodProgress::Waiting(why) => self.wait("PodStarting", &why),
            PodProgress::Failed { reason, message } => self.fail(&reason, &message),
        }
    }

    fn source_deleted(mut self, deleted: bool, note: &str) -> Transition {
        if self.stop_after_checkpoint() && self.status.restore.is_none() {
            // Switchover right after the checkpoint: the restore comes next.
            self.note(
                !deleted,
                if deleted {
                    "SourcePodDeleted"
                } else {
                    "SourcePodKept"
                },
                note,
            );
            self.status.restore = Some(RestoreStatus {
                source_pod_deleted: Some(deleted),
                ..RestoreStatus::default()
            });
            // Pinned maps at the checkpoint: the hook saves them again when the source stops.
            let has_maps = self
                .status
                .checkpoint
                .as_ref()
                .is_some_and(|c| c.manifest.is_some());
            if has_maps && self.stop_location().is_some() {
                return self.enter(Step::AwaitStopSnapshot);
            }
            return self.enter(Step::PrepareRestore);
        }
        if let Some(r) = self.status.restore.as_mut() {
            r.source_pod_deleted = Some(deleted);
        }
        self.note(
            !deleted,
            if deleted {
                "SourcePodDeleted"
            } else {
                "SourcePodKept"
            },
            note,
        );
        let summary = self
            .status
            .restore
            .as_ref()
            .map(|r| format!("pod {} runs on node {}; {note}", r.pod, r.node))
            .unwrap_or_else(|| note.to_string());
        self.succeed(&summary)
    }

    /// Cleanup: the API layer chose the node whose agent does the step (or found none).
    fn cleanup_agent(mut self, step: Step, node: Option<String>) -> Transition {
        let Some(node) = node else {
            if step == Step::CleanupTarget {
                let node = self
                    .cr
                    .spec
                    .target
                    .as_ref()
                    .map_or(String::new(), |t| t.node.clone());
                self.note(
                    true,
                    "CleanupSkipped",
                    &format!(
                        "no agent runs on node {node}: its copy of the archive (in {}) is left \
                         behind",
                        self.cfg.node_checkpoint_dir
                    ),
                );
                return self.next_cleanup(step);
            }
            return self.cleanup_retry(
                step,
                "no mapsnap agent is running to delete the stored data",
            );
        };
        let source = self.status.source.clone();
        let on_source = source.as_ref().is_some_and(|s| s.node == node);
        let task = match step {
            Step::CleanupSource => {
                let ckpt = self.status.checkpoint.clone().unwrap_or_default();
                let mut objects = Vec::new();
                if !ckpt.snapshot.is_empty() {
                    objects.push(ckpt.snapshot.clone());
                }
                if !ckpt.archive.is_empty() {
                    objects.push(ckpt.archive.clone());
                }
                // Asked of the hook whether or not it was seen (a late stop may write it).
                objects.extend(self.stop_location());
                AgentTask {
                    id: task_id(step, self.attempt()),
                    node,
                    operation: Some(AgentOperation::Cleanup),
                    container_id: source.filter(|_| on_source).map(|s| s.container_id),
                    pod: None,
                    container: None,
                    timeout_seconds: None,
                    snapshot: None,
                    stop_snapshot: None,
                    archive: None,
                    node_archive: ckpt.node_archive.filter(|_| on_source),
                    archive_sha256: None,
                    archive_size: None,
                    restore_pod: None,
                    delete_objects: objects,
                    delete_images: Vec::new(),
                    created: Time(self.now),
                    expires: Time(after(self.now, self.cfg.agent_timeout)),
                }
            }
            _ => {
                let restore = self.status.restore.clone().unwrap_or_default();
                let archive = restore.node_archive.clone().unwrap_or_else(|| {
                    format!(
                        "{}/{}",
                        self.cfg.node_checkpoint_dir.trim_end_matches('/'),
                        layout::restore_archive_name(self.uid())
                    )
                });
                AgentTask {
                    id: task_id(step, self.attempt()),
                    node,
                    operation: Some(AgentOperation::Cleanup),
                    container_id: None,
                    pod: None,
                    container: None,
                    timeout_seconds: None,
                    snapshot: None,
                    stop_snapshot: None,
                    archive: None,
                    node_archive: Some(archive),
                    archive_sha256: None,
                    archive_size: None,
                    restore_pod: (!restore.pod.is_empty())
                        .then(|| format!("{}/{}", self.namespace(), restore.pod)),
                    delete_objects: Vec::new(),
                    // The image this object pushed (it holds the container's memory).
                    delete_images: restore.image.clone().into_iter().collect(),
                    created: Time(self.now),
                    expires: Time(after(self.now, self.cfg.agent_timeout)),
                }
            }
        };
        self.status.agent_task = Some(task);
        let then = Then::Requeue(self.cfg.poll_interval);
        self.finish_transition(then)
    }

    /// A cleanup step failed: retry with backoff, or give up on it (with a warning) so that
    /// deletion is never blocked forever.
    fn cleanup_retry(mut self, step: Step, message: &str) -> Transition {
        let attempt = self.attempt();
        let max = self.cfg.max_attempts.max(1);
        if attempt >= max {
            return self.cleanup_give_up(step, message, attempt);
        }
        let delay = self.cfg.backoff(attempt);
        self.status.attempt = Some(attempt + 1);
        self.status.next_retry_time = Some(Time(after(self.now, delay)));
        self.status.agent_task = None;
        if let Some(r) = self.current_record() {
            r.attempts = attempt + 1;
        }
        let text = format!(
            "attempt {attempt}/{max} failed: {message}; retrying in {}s",
            delay.as_secs()
        );
        self.set_condition(PROGRESSING, true, "CleanupRetrying", &text);
        self.note(true, "CleanupRetrying", &text);
        self.finish_transition(Then::Requeue(delay))
    }

    /// Gives up a cleanup step with a warning, and goes on with the next one.
    fn cleanup_give_up(mut self, step: Step, message: &str, attempt: u32) -> Transition {
        {
            let what = match step {
                Step::CleanupSource => self
                    .status
                    .checkpoint
                    .as_ref()
                    .map(|c| format!("{} and {}", c.snapshot, c.archive))
                    .unwrap_or_else(|| "stored data".into()),
                _ => "the archive on the target node".into(),
            };
            self.note(
                true,
                "CleanupFailed",
                &format!("{message}; gave up after {attempt} attempts: {what} may be left behind"),
            );
        }
        self.next_cleanup(step)
    }

    fn next_cleanup(self, step: Step) -> Transition {
        let steps = cleanup_steps(self.cr);
        let next = steps.iter().skip_while(|s| **s != step).nth(1).copied();
        match next {
            Some(n) => self.enter(n),
            None => self.done_cleanup(Some(step)),
        }
    }

    fn done_cleanup(mut self, last: Option<Step>) -> Transition {
        if last.is_some() {
            self.complete_record();
            self.status.agent_task = None;
            self.status.next_retry_time = None;
        }
        Transition {
            status: self.status,
            events: self.events,
            then: Then::AwaitChange,
            remove_finalizer: true,
        }
    }
}

fn describe(step: Step) -> String {
    match step {
        Step::Resolve => "finding the pod, its node and the container".into(),
        Step::PrepareHook => "the source node's agent writes the hook request".into(),
        Step::KubeletCheckpoint => "the kubelet checkpoints the container".into(),
        Step::UploadArchive => "the source node's agent uploads the checkpoint archive".into(),
        Step::ResolveCheckpoint => "reading the referenced checkpoint".into(),
        Step::PrepareRestore => "checking the target node's agent".into(),
        Step::DownloadArchive => "the target node's agent fetches the checkpoint archive".into(),
        Step::CreatePod => "creating the restored pod".into(),
        Step::WaitPod => "waiting for the restored pod to run".into(),
        Step::DeleteSource => "deleting the source pod".into(),
        Step::AwaitStopSnapshot => {
            "waiting for the snapshot of the pinned maps taken when the source stopped".into()
        }
        Step::Done => String::new(),
        Step::CleanupSource => "deleting stored data and the source node's files".into(),
        Step::CleanupTarget => "deleting the target node's archive copy".into(),
    }
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
