//! The node agent's thin API layer: renews the node's lease, watches `BpfMapCheckpoint`
//! objects for tasks addressed to this node, runs them ([`crate::node`]) and answers in
//! `status.agentResult` (server-side apply, as its own field manager).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{AgentOperation, AgentResult, AgentTask, BpfMapCheckpoint};
use crate::error::Error;
use crate::http::Health;
use crate::kubelet::DirectKubelet;
use crate::layout;
use crate::lease;
use crate::metrics::{DirectionLabels, OperationLabels};
use crate::node::NodeAgent;

/// Field manager of the agent's status writes.
pub const FIELD_MANAGER: &str = "mapsnap-agent";

/// What the agent's reconciles share.
#[derive(Clone)]
pub struct AgentContext {
    pub client: Client,
    /// This node's name.
    pub node: String,
    pub node_agent: Arc<NodeAgent>,
    /// This node's kubelet (None: the controller calls it through the API server).
    pub kubelet: Option<Arc<DirectKubelet>>,
    pub health: Arc<Health>,
    pub clock: crate::controller::Clock,
}

impl std::fmt::Debug for AgentContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentContext")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The task in `cr` this agent has to run now, if any.
pub fn pending_task(cr: &BpfMapCheckpoint, node: &str) -> Option<AgentTask> {
    let status = cr.status.as_ref()?;
    let task = status.agent_task.as_ref().filter(|t| t.node == node)?;
    let answered = status
        .agent_result
        .as_ref()
        .is_some_and(|r| r.id == task.id);
    (!answered).then(|| task.clone())
}

/// Runs the task addressed to this node (if any) and answers it.
pub async fn reconcile(
    obj: Arc<BpfMapCheckpoint>,
    ctx: Arc<AgentContext>,
) -> Result<Action, Error> {
    let Some(task) = pending_task(&obj, &ctx.node) else {
        return Ok(Action::await_change());
    };
    let (Some(ns), Some(name), Some(uid)) = (
        obj.metadata.namespace.clone(),
        obj.metadata.name.clone(),
        obj.metadata.uid.clone(),
    ) else {
        return Err(Error::Incomplete(obj.name_any()));
    };
    let now = (ctx.clock)();
    let op = task.operation.map_or("Unknown", |o| o.as_str());
    let result = if now > task.expires.0 {
        AgentResult {
            id: task.id.clone(),
            node: ctx.node.clone(),
            succeeded: false,
            reason: Some("TaskExpired".into()),
            message: Some(format!(
                "the task expired at {} before the agent saw it",
                task.expires.0
            )),
            finish_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
            ..AgentResult::default()
        }
    } else if task.operation == Some(AgentOperation::KubeletCheckpoint) {
        kubelet_checkpoint(&ctx, &ns, &task).await
    } else {
        let started = std::time::Instant::now();
        let agent = ctx.node_agent.clone();
        let key = format!("{ns}/{name}");
        let node = ctx.node.clone();
        let t = task.clone();
        let clock = ctx.clock.clone();
        let result =
            tokio::task::spawn_blocking(move || agent.execute(&key, &uid, &t, &node, clock()))
                .await
                .map_err(|e| Error::Join(e.to_string()))?;
        let m = &ctx.health.metrics;
        let labels = OperationLabels {
            operation: op.into(),
            result: if result.succeeded { "ok" } else { "error" }.into(),
        };
        m.agent_tasks.get_or_create(&labels).inc();
        m.agent_task_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if result.succeeded {
            let bytes = u64::try_from(result.archive_size.unwrap_or(0)).unwrap_or(0);
            let dir = match task.operation {
                Some(AgentOperation::UploadArchive) => Some("upload"),
                Some(AgentOperation::DownloadArchive) => Some("download"),
                _ => None,
            };
            if let Some(d) = dir {
                m.agent_bytes
                    .get_or_create(&DirectionLabels {
                        direction: d.into(),
                    })
                    .inc_by(bytes);
            }
        }
        result
    };
    tracing::info!(
        object = %obj.key(),
        task = %task.id,
        operation = op,
        succeeded = result.succeeded,
        "{}",
        result.message.as_deref().unwrap_or("")
    );
    answer(&ctx.client, &ns, &name, &result).await?;
    if result.succeeded && task.operation == Some(AgentOperation::UploadArchive) {
        let agent = ctx.node_agent.clone();
        let t = task.clone();
        let r = tokio::task::spawn_blocking(move || agent.after_upload(&t))
            .await
            .map_err(|e| Error::Join(e.to_string()))?;
        if let Err(e) = r {
            tracing::warn!(object = %obj.key(), "cannot remove the node-local archive: {e}");
        }
    }
    Ok(Action::await_change())
}

/// Calls this node's kubelet for the task's container (in the object's namespace: a task
/// cannot name a pod elsewhere) and reports the archive path or the kubelet's answer.
async fn kubelet_checkpoint(ctx: &AgentContext, ns: &str, task: &AgentTask) -> AgentResult {
    let started = std::time::Instant::now();
    let mut result = AgentResult {
        id: task.id.clone(),
        node: ctx.node.clone(),
        ..AgentResult::default()
    };
    let timeout = Duration::from_secs(
        task.timeout_seconds
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(120)
            .clamp(1, 3600),
    );
    let outcome = match (
        ctx.kubelet.as_ref(),
        task.pod.as_deref(),
        task.container.as_deref(),
    ) {
        (None, ..) => Err((
            None,
            "AgentMisconfigured",
            "this agent has no kubelet client (chart value kubelet.access is not agent)".into(),
        )),
        (_, None, _) | (_, _, None) => Err((
            None,
            "TaskRefused",
            "the task names no pod or container".into(),
        )),
        (Some(k), Some(pod), Some(container)) => k
            .checkpoint(ns, pod, container, timeout)
            .await
            .map_err(|f| {
                let reason = f.kind().reason();
                (Some(i32::from(f.code)), reason, f.message)
            }),
    };
    match outcome {
        Ok(path) => {
            result.succeeded = true;
            result.message = Some(format!("the kubelet wrote {path}"));
            result.node_archive = Some(path);
        }
        Err((code, reason, message)) => {
            result.http_status = code;
            result.reason = Some(reason.into());
            result.permanent = code.is_none();
            result.message = Some(message);
        }
    }
    let m = &ctx.health.metrics;
    let labels = OperationLabels {
        operation: AgentOperation::KubeletCheckpoint.as_str().into(),
        result: if result.succeeded { "ok" } else { "error" }.into(),
    };
    m.agent_tasks.get_or_create(&labels).inc();
    m.agent_task_seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    result.finish_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time((ctx
        .clock)(
    )));
    result
}

/// Writes the agent's answer (server-side apply of `status.agentResult` only).
pub async fn answer(
    client: &Client,
    ns: &str,
    name: &str,
    result: &AgentResult,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": BpfMapCheckpoint::api_version(&()),
        "kind": BpfMapCheckpoint::kind(&()),
        "status": { "agentResult": result },
    });
    let api: Api<BpfMapCheckpoint> = Api::namespaced(client.clone(), ns);
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

pub fn error_policy(obj: Arc<BpfMapCheckpoint>, err: &Error, _ctx: Arc<AgentContext>) -> Action {
    tracing::warn!(object = %obj.key(), "agent reconcile failed: {err}");
    Action::requeue(Duration::from_secs(10))
}

/// Renews this node's lease forever; readiness follows the last renewal.
pub async fn heartbeat(
    client: Client,
    namespace: String,
    node: String,
    identity: String,
    capabilities: BTreeMap<String, String>,
    health: Arc<Health>,
    every: Duration,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let name = layout::agent_lease_name(&node);
    let mut annotations =
        BTreeMap::from([(layout::LEASE_ANNOTATION_NODE.to_string(), node.clone())]);
    annotations.extend(capabilities);
    let duration = every * 3;
    loop {
        // Bounded: a renewal that hangs must not leave the agent reported ready.
        let beat =
            lease::heartbeat_once(&api, &name, &namespace, &identity, duration, &annotations);
        let r = match tokio::time::timeout(every, beat).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {}s", every.as_secs())),
        };
        match r {
            Ok(()) => health
                .ready
                .store(true, std::sync::atomic::Ordering::Relaxed),
            Err(e) => {
                tracing::warn!("renewing lease {namespace}/{name}: {e}");
                health
                    .ready
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Runs the agent's watch until a shutdown signal.
pub async fn run(ctx: Arc<AgentContext>) {
    let api: Api<BpfMapCheckpoint> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default().any_semantic())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!("agent reconcile: {e}");
            }
        })
        .await;
}

/// `Timestamp::now`, for the default clock.
pub fn system_clock() -> crate::controller::Clock {
    Arc::new(Timestamp::now)
}
