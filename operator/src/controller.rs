//! The controller's thin API layer: runs what [`crate::reconcile::decide`] asks for against
//! the API server, and writes what [`crate::reconcile::apply`] decides (status by server-side
//! apply, events, finalizer).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::config::Config;
use crate::crd::{
    ANNOTATION_CHECKPOINT, BpfMapCheckpoint, BpfMapCheckpointStatus, FINALIZER,
    LABEL_CHECKPOINT_UID, Phase, Step,
};
use crate::error::Error;
use crate::http::Health;
use crate::kubelet;
use crate::layout;
use crate::lease::lease_fresh;
use crate::metrics::{ActionLabels, ReasonLabels, ResultLabels, StepLabels};
use crate::pods::{self, SourceCheck};
use crate::reconcile::{self, Decision, EventNote, Outcome, Then, Transition};

/// Field manager of the controller's status writes.
pub const FIELD_MANAGER: &str = "mapsnap-controller";
/// Upper bound on steps run in one reconcile.
const MAX_STEPS_PER_RECONCILE: usize = 16;

/// The current time (a function so tests can fix it).
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// What every reconcile shares.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub recorder: Recorder,
    pub health: Arc<Health>,
    pub clock: Clock,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(client: Client, config: Config, health: Arc<Health>, instance: &str) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(instance.to_string()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            health,
            clock: Arc::new(Timestamp::now),
        }
    }

    fn now(&self) -> Timestamp {
        (self.clock)()
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn api_code(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        _ => 0,
    }
}

/// Reconciles one object: runs steps until one has to wait.
pub async fn reconcile(obj: Arc<BpfMapCheckpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let res = reconcile_inner((*obj).clone(), &ctx).await;
    let m = &ctx.health.metrics;
    m.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    let result = if res.is_ok() { "ok" } else { "error" };
    m.reconciles
        .get_or_create(&ResultLabels {
            result: result.into(),
        })
        .inc();
    res
}

async fn reconcile_inner(mut cr: BpfMapCheckpoint, ctx: &Context) -> Result<Action, Error> {
    if cr.metadata.namespace.is_none() || cr.metadata.name.is_none() || cr.metadata.uid.is_none() {
        return Err(Error::Incomplete(cr.name_any()));
    }
    for _ in 0..MAX_STEPS_PER_RECONCILE {
        let now = ctx.now();
        let t = match reconcile::decide(&cr, now, &ctx.config) {
            Decision::Idle => return Ok(Action::await_change()),
            Decision::Requeue(d) => return Ok(Action::requeue(d.max(Duration::from_millis(100)))),
            Decision::AddFinalizer => {
                cr = add_finalizer(ctx, &cr).await?;
                continue;
            }
            Decision::Apply(t) => *t,
            Decision::Execute(step) => {
                let outcome = execute(ctx, &cr, step).await;
                // The step may have taken a while (the kubelet call): record when it ended.
                reconcile::apply(&cr, step, outcome, ctx.now(), &ctx.config)
            }
        };
        let then = t.then;
        cr = write(ctx, cr, t).await?;
        match then {
            Then::Continue => {}
            Then::Requeue(d) => return Ok(Action::requeue(d.max(Duration::from_millis(100)))),
            Then::AwaitChange => return Ok(Action::await_change()),
        }
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// The runtime's policy on reconcile errors (API failures while writing): look again soon.
pub fn error_policy(obj: Arc<BpfMapCheckpoint>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(object = %obj.key(), "reconcile failed: {err}");
    Action::requeue(Duration::from_secs(15))
}

fn checkpoints(ctx: &Context, ns: &str) -> Api<BpfMapCheckpoint> {
    Api::namespaced(ctx.client.clone(), ns)
}

/// Adds the finalizer (merge patch carrying the resourceVersion read: a concurrent change
/// makes it fail with 409 and the reconcile is retried).
async fn add_finalizer(ctx: &Context, cr: &BpfMapCheckpoint) -> Result<BpfMapCheckpoint, Error> {
    let mut finalizers = cr.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    patch_finalizers(ctx, cr, finalizers).await
}

async fn remove_finalizer(ctx: &Context, cr: &BpfMapCheckpoint) -> Result<BpfMapCheckpoint, Error> {
    let finalizers: Vec<String> = cr
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(ctx, cr, finalizers).await
}

async fn patch_finalizers(
    ctx: &Context,
    cr: &BpfMapCheckpoint,
    finalizers: Vec<String>,
) -> Result<BpfMapCheckpoint, Error> {
    let ns = cr.namespace().unwrap_or_default();
    let patch = json!({
        "metadata": {
            "resourceVersion": cr.resource_version(),
            "finalizers": finalizers,
        }
    });
    let updated = checkpoints(ctx, &ns)
        .patch(
            &cr.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(updated)
}

/// Writes a transition: the status (if it changed), then its events, then the finalizer.
async fn write(
    ctx: &Context,
    cr: BpfMapCheckpoint,
    t: Transition,
) -> Result<BpfMapCheckpoint, Error> {
    let mut cr = cr;
    let before = cr.status.clone();
    if before.as_ref() != Some(&t.status) {
        record_metrics(ctx, &cr, before.as_ref(), &t.status);
        cr = patch_status(ctx, &cr, &t.status).await?;
    }
    for e in &t.events {
        publish(ctx, &cr, e).await;
    }
    if t.remove_finalizer {
        cr = remove_finalizer(ctx, &cr).await?;
    }
    Ok(cr)
}

fn record_metrics(
    ctx: &Context,
    cr: &BpfMapCheckpoint,
    before: Option<&BpfMapCheckpointStatus>,
    after: &BpfMapCheckpointStatus,
) {
    let m = &ctx.health.metrics;
    let action = cr.spec.action.as_str().to_string();
    let before_step = before.and_then(|s| s.step);
    let before_attempt = before.and_then(|s| s.attempt);
    if let Some(step) = after.step
        && before_step != Some(step)
    {
        m.steps
            .get_or_create(&StepLabels {
                action: action.clone(),
                step: step.as_str().into(),
            })
            .inc();
    }
    let was = before.and_then(|s| s.phase);
    if after.phase != was {
        match after.phase {
            Some(Phase::Succeeded) => {
                m.succeeded.get_or_create(&ActionLabels { action }).inc();
            }
            Some(Phase::Failed) => {
                let reason = after
                    .conditions
                    .iter()
                    .find(|c| c.type_ == reconcile::FAILED)
                    .map_or(String::new(), |c| c.reason.clone());
                m.failed
                    .get_or_create(&ReasonLabels { action, reason })
                    .inc();
            }
            _ => {}
        }
    } else if before_step == after.step
        && after.attempt > before_attempt
        && before_attempt.is_some()
    {
        let reason = after
            .conditions
            .iter()
            .find(|c| c.type_ == reconcile::PROGRESSING)
            .map_or(String::new(), |c| c.reason.clone());
        m.retries
            .get_or_create(&ReasonLabels { action, reason })
            .inc();
    }
}

/// Server-side apply of the status, as the controller's field manager. `agentResult` is left
/// out: the agent owns it.
async fn patch_status(
    ctx: &Context,
    cr: &BpfMapCheckpoint,
    status: &BpfMapCheckpointStatus,
) -> Result<BpfMapCheckpoint, Error> {
    let mut value = serde_json::to_value(status)?;
    if let Some(o) = value.as_object_mut() {
        o.remove("agentResult");
    }
    let patch = json!({
        "apiVersion": BpfMapCheckpoint::api_version(&()),
        "kind": BpfMapCheckpoint::kind(&()),
        "status": value,
    });
    let ns = cr.namespace().unwrap_or_default();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let updated = checkpoints(ctx, &ns)
        .patch_status(&cr.name_any(), &pp, &Patch::Apply(&patch))
        .await?;
    Ok(updated)
}

async fn publish(ctx: &Context, cr: &BpfMapCheckpoint, e: &EventNote) {
    let ev = Event {
        type_: if e.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: e.reason.clone(),
        note: Some(reconcile::event_note(&e.note)),
        action: e.action.clone(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&ev, &cr.object_ref(&())).await {
        tracing::warn!(object = %cr.key(), "cannot publish event {}: {err}", e.reason);
    }
}

async fn agent_live(ctx: &Context, node: &str) -> Result<bool, kube::Error> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let lease = leases.get_opt(&layout::agent_lease_name(node)).await?;
    Ok(lease.is_some_and(|l| lease_fresh(&l, ctx.now(), ctx.config.agent_lease_stale)))
}

/// Any node with a live agent (for deleting stored data when the source node has none).
async fn any_live_agent(ctx: &Context) -> Result<Option<String>, kube::Error> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let list = leases.list(&ListParams::default()).await?;
    let now = ctx.now();
    let mut nodes: Vec<String> = list
        .items
        .iter()
        .filter(|l| lease_fresh(l, now, ctx.config.agent_lease_stale))
        .filter_map(|l| {
            let name = l.metadata.name.as_deref()?;
            name.strip_prefix(layout::AGENT_LEASE_PREFIX)?;
            l.spec.as_ref()?.holder_identity.as_ref()?;
            l.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(layout::LEASE_ANNOTATION_NODE).cloned())
        })
        .collect();
    nodes.sort();
    Ok(nodes.into_iter().next())
}

/// Runs one step against the API and reports what it observed.
async fn execute(ctx: &Context, cr: &BpfMapCheckpoint, step: Step) -> Outcome {
    match execute_inner(ctx, cr, step).await {
        Ok(o) => o,
        Err(e) => Outcome::ApiError(describe(&e)),
    }
}

/// One line about an API error.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} (HTTP {} {})", s.message.trim(), s.code, s.reason),
        other => other.to_string(),
    }
}

async fn execute_inner(
    ctx: &Context,
    cr: &BpfMapCheckpoint,
    step: Step,
) -> Result<Outcome, kube::Error> {
    let ns = cr.namespace().unwrap_or_default();
    let status = cr.status.clone().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    match step {
        Step::Resolve => {
            let name = cr.spec.source.pod.clone().unwrap_or_default();
            let Some(pod) = pods_api.get_opt(&name).await? else {
                return Ok(Outcome::PodMissing);
            };
            let check = pods::resolve_source(&pod, cr.spec.source.container.as_deref());
            let agent_live = match &check {
                SourceCheck::Ready(s) => agent_live(ctx, &s.node).await?,
                _ => false,
            };
            Ok(Outcome::Source {
                check,
                agent_live,
                owner: pods::controller_of(&pod),
            })
        }
        Step::KubeletCheckpoint => {
            let Some(source) = status.source.as_ref() else {
                return Ok(Outcome::Kubelet(Err(reconcile::KubeletFailure {
                    code: 0,
                    message: "no resolved source".into(),
                })));
            };
            let timeout = cr
                .spec
                .checkpoint_timeout_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(ctx.config.checkpoint_timeout, Duration::from_secs);
            let r = kubelet::checkpoint_via_proxy(
                &ctx.client,
                &source.node,
                &ns,
                &source.pod,
                &source.container,
                timeout,
            )
            .await;
            Ok(Outcome::Kubelet(r))
        }
        Step::ResolveCheckpoint => {
            let name = cr
                .spec
                .source
                .checkpoint_ref
                .as_ref()
                .map(|r| r.name.clone())
                .unwrap_or_default();
            let r = checkpoints(ctx, &ns).get_opt(&name).await?;
            Ok(Outcome::Referenced(r.map(Box::new)))
        }
        Step::PrepareRestore => {
            let node = cr
                .spec
                .target
                .as_ref()
                .map(|t| t.node.clone())
                .unwrap_or_default();
            let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
            let lease = leases.get_opt(&layout::agent_lease_name(&node)).await?;
            let live = lease
                .as_ref()
                .is_some_and(|l| lease_fresh(l, ctx.now(), ctx.config.agent_lease_stale));
            Ok(Outcome::TargetAgent {
                live,
                refusal: lease.as_ref().and_then(layout::restore_refusal),
            })
        }
        Step::CreatePod => {
            let Some(restore) = status.restore.as_ref() else {
                return Ok(Outcome::PodCreateFailed {
                    code: 0,
                    message: "no restore status".into(),
                });
            };
            let image = restore.image.clone().unwrap_or_default();
            let pod = match pods::restored_pod(
                cr,
                &restore.pod,
                &restore.node,
                &image,
                &ctx.config.image_pull_secrets,
            ) {
                Ok(p) => p,
                Err(message) => return Ok(Outcome::PodCreateFailed { code: 0, message }),
            };
            match pods_api.create(&PostParams::default(), &pod).await {
                Ok(p) => Ok(Outcome::PodCreated {
                    name: p.name_any(),
                    uid: p.metadata.uid,
                }),
                Err(e) if api_code(&e) == 409 => {
                    // Created by an earlier attempt (a controller that stopped before writing
                    // the status), or someone else's pod.
                    let existing = pods_api.get_opt(&restore.pod).await?;
                    let ours = existing.as_ref().is_some_and(|p| {
                        p.labels().get(LABEL_CHECKPOINT_UID) == cr.metadata.uid.as_ref()
                    });
                    match existing {
                        Some(p) if ours => Ok(Outcome::PodCreated {
                            name: p.name_any(),
                            uid: p.metadata.uid,
                        }),
                        _ => Ok(Outcome::PodCreateFailed {
                            code: 409,
                            message: format!(
                                "a pod named {} exists and was not made by this object; set \
                                 spec.target.podName",
                                restore.pod
                            ),
                        }),
                    }
                }
                Err(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422) => {
                    Ok(Outcome::PodCreateFailed {
                        code: s.code,
                        message: s.message,
                    })
                }
                Err(e) => Err(e),
            }
        }
        Step::WaitPod => {
            let name = status
                .restore
                .as_ref()
                .map(|r| r.pod.clone())
                .unwrap_or_default();
            Ok(Outcome::RestoredPod(
                pods_api.get_opt(&name).await?.map(Box::new),
            ))
        }
        Step::DeleteSource => {
            let Some(source) = status.source.as_ref() else {
                return Ok(Outcome::SourceDeleted {
                    deleted: false,
                    note: "no resolved source pod".into(),
                });
            };
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(source.pod_uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match pods_api.delete(&source.pod, &dp).await {
                Ok(_) => Ok(Outcome::SourceDeleted {
                    deleted: true,
                    note: format!("deleted the source pod {}", source.pod),
                }),
                Err(e) if not_found(&e) => Ok(Outcome::SourceDeleted {
                    deleted: false,
                    note: format!("the source pod {} was already gone", source.pod),
                }),
                Err(e) if api_code(&e) == 409 => Ok(Outcome::SourceDeleted {
                    deleted: false,
                    note: format!(
                        "pod {} is no longer the checkpointed pod (UID changed): left alone",
                        source.pod
                    ),
                }),
                Err(e) => Err(e),
            }
        }
        Step::CleanupSource => {
            let preferred = status.source.as_ref().map(|s| s.node.clone());
            if let Some(node) = preferred.as_deref()
                && agent_live(ctx, node).await?
            {
                return Ok(Outcome::CleanupAgent {
                    node: Some(node.to_string()),
                });
            }
            Ok(Outcome::CleanupAgent {
                node: any_live_agent(ctx).await?,
            })
        }
        Step::CleanupTarget => {
            let node = cr
                .spec
                .target
                .as_ref()
                .map(|t| t.node.clone())
                .unwrap_or_default();
            if agent_live(ctx, &node).await? {
                return Ok(Outcome::CleanupAgent { node: Some(node) });
            }
            // The pushed image can be deleted by any agent (they share the registry settings);
            // only the target's local files need the target.
            let pushed = status.restore.as_ref().is_some_and(|r| r.image.is_some());
            Ok(Outcome::CleanupAgent {
                node: if pushed {
                    any_live_agent(ctx).await?
                } else {
                    None
                },
            })
        }
        Step::PrepareHook
        | Step::UploadArchive
        | Step::DownloadArchive
        | Step::AwaitStopSnapshot
        | Step::Done => Ok(Outcome::ApiError(format!(
            "step {} has nothing to execute",
            step.as_str()
        ))),
    }
}

/// Maps a restored pod to the object that made it.
fn checkpoint_of_pod(pod: Pod) -> Option<ObjectRef<BpfMapCheckpoint>> {
    let key = pod.annotations().get(ANNOTATION_CHECKPOINT)?.clone();
    let (ns, name) = key.split_once('/')?;
    Some(ObjectRef::new(name).within(ns))
}

/// Runs the controller until a shutdown signal.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let objects: Api<BpfMapCheckpoint> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client);
    ctx.health
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    Controller::new(objects, watcher::Config::default().any_semantic())
        .watches(
            pods,
            watcher::Config::default().labels(LABEL_CHECKPOINT_UID),
            checkpoint_of_pod,
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(
                    "reconciled {}/{}",
                    obj.namespace.as_deref().unwrap_or(""),
                    obj.name
                ),
                Err(e) => tracing::debug!("reconcile: {e}"),
            }
        })
        .await;
}
