//! Reconcile scenarios against the mock API server (fixtures.rs): every request the
//! controller and the agents make is asserted, in order, and answered. The agents' node-side
//! work runs for real on temporary directories and `file://` storage.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;

use crate::crd::{
    Action as CrAction, AgentOperation, BpfMapCheckpoint, BpfMapCheckpointStatus, CheckpointStatus,
    FINALIZER, Phase, Step, StepRecord,
};
use crate::fixtures::*;
use crate::node::{HookRequest, RestoreRequest, summarize};
use crate::pods::{self, SourceCheck};
use crate::reconcile::{self, Decision};

const POLL: Duration = Duration::from_secs(10);

fn condition<'a>(s: &'a BpfMapCheckpointStatus, t: &str) -> (&'a str, &'a str, &'a str) {
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no {t} condition in {:?}", s.conditions));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

/// Drives a new Checkpoint or Migrate object through Resolve and PrepareHook (the agent on
/// node-a writes the hook request file). Returns with the object at KubeletCheckpoint's
/// doorstep: the next reconcile calls the kubelet.
async fn drive_to_kubelet(h: &mut Harness) {
    let pod = source_pod(true);
    let lease = agent_lease(NODE_A, Duration::from_secs(5));
    let name = h.cr().metadata.name.clone().expect("name");
    let migrate = h.cr().spec.action == CrAction::Migrate;
    let action = h
        .reconcile(move |mut api| async move {
            api.finalizers(&[FINALIZER]).await;
            let s = api.status().await;
            assert_eq!(s.phase, Some(Phase::Pending));
            assert_eq!(s.step, Some(Step::Resolve));
            assert_eq!(s.observed_generation, Some(1));
            let c = s.checkpoint.expect("locations are recorded at once");
            assert!(
                c.snapshot
                    .ends_with(&format!("/store/{NS}/{name}/{CR_UID}/maps.mapsnap")),
                "{}",
                c.snapshot
            );
            assert!(c.archive.ends_with(&format!("/{CR_UID}/checkpoint.tar")));
            assert_eq!(condition(&s_or(&api), "Ready").0, "False");
            api.event("Accepted", false).await;
            api.get_pod(POD, Some(&pod)).await;
            api.get_lease(NODE_A, Some(&lease)).await;
            let s = api.status().await;
            assert_eq!(s.phase, Some(Phase::Checkpointing));
            assert_eq!(s.step, Some(Step::PrepareHook));
            let src = s.source.expect("source");
            assert_eq!(
                (
                    src.node.as_str(),
                    src.container.as_str(),
                    src.container_id.as_str()
                ),
                (NODE_A, CONTAINER, CONTAINER_ID)
            );
            assert_eq!(src.runtime, "cri-o");
            let tmpl = src.pod_template.expect("template");
            assert_eq!(tmpl.labels.get("app").map(String::as_str), Some("lb"));
            assert!(!tmpl.labels.contains_key("pod-template-hash"));
            let task = s.agent_task.expect("task");
            assert_eq!(task.id, "preparehook-1");
            assert_eq!(task.node, NODE_A);
            assert_eq!(task.operation, Some(AgentOperation::PrepareCheckpoint));
            assert_eq!(task.container_id.as_deref(), Some(CONTAINER_ID));
            assert_eq!(
                task.expires.0,
                t0().saturating_add(Duration::from_secs(1800)).expect("t")
            );
            let note = api.event("Resolved", false).await;
            assert!(note.contains("node-a"), "{note}");
            if migrate {
                let note = api.event("OwnedSourcePod", true).await;
                assert!(note.contains("ReplicaSet/lb-7d9f"), "{note}");
            }
            api
        })
        .await;
    assert_eq!(action, requeue(POLL));

    // Agents only act on tasks for their node.
    let action = h.agent(NODE_B, |api| async move { api }).await;
    assert_eq!(action, Action::await_change());
    h.agent(NODE_A, |mut api| async move {
        let r = api.agent_result().await;
        assert!(r.succeeded, "{r:?}");
        assert_eq!((r.id.as_str(), r.node.as_str()), ("preparehook-1", NODE_A));
        api
    })
    .await;
    // An answered task is not run again.
    h.agent(NODE_A, |api| async move { api }).await;

    let req_path = h
        .node(NODE_A)
        .paths
        .requests
        .join(format!("{CONTAINER_ID}.json"));
    let req: HookRequest =
        serde_json::from_slice(&std::fs::read(&req_path).expect("request file")).expect("json");
    let name = h.cr().metadata.name.clone().expect("name");
    assert_eq!(req.checkpoint, format!("{NS}/{name}"));
    assert_eq!(
        Some(req.snapshot.clone()),
        h.status().checkpoint.map(|c| c.snapshot)
    );
    assert_eq!(req.created, "2025-06-01T12:00:00Z");
    assert_eq!(req.expires, "2025-06-01T12:30:00Z");
}

fn s_or(api: &MockApi) -> BpfMapCheckpointStatus {
    api.cr.status.clone().unwrap_or_default()
}

/// From KubeletCheckpoint: the agent on node-a calls its kubelet (a real HTTPS server that
/// answers like the kubelet; the hook writes the snapshot during the checkpoint), then
/// uploads. Returns the kubelet archive path on node-a.
async fn drive_kubelet_and_upload(h: &mut Harness) -> String {
    let action = h
        .reconcile(move |mut api| async move {
            let s = api.status().await;
            assert_eq!(s.step, Some(Step::KubeletCheckpoint));
            let task = s
                .agent_task
                .expect("the kubelet call is the source agent's task");
            assert_eq!(task.operation, Some(AgentOperation::KubeletCheckpoint));
            assert_eq!(task.id, "kubeletcheckpoint-1");
            assert_eq!(task.node, NODE_A);
            assert_eq!(
                (task.pod.as_deref(), task.container.as_deref()),
                (Some(POD), Some(CONTAINER))
            );
            assert_eq!(task.timeout_seconds, Some(120));
            api.event("HookPrepared", false).await;
            api
        })
        .await;
    assert_eq!(action, requeue(POLL));
    h.agent(NODE_A, |mut api| async move {
        let r = api.agent_result().await;
        assert!(r.succeeded, "{r:?}");
        assert!(
            r.node_archive
                .as_deref()
                .is_some_and(|p| p.ends_with("checkpoint-lb-0_edge-lb-2025-06-01T12:00:00Z.tar")),
            "{r:?}"
        );
        api
    })
    .await;
    let calls = h.kubelet.kubelet.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].method, "POST");
    assert_eq!(calls[0].path, format!("/checkpoint/{NS}/{POD}/{CONTAINER}"));
    assert_eq!(calls[0].query, "timeout=120");
    assert_eq!(
        calls[0].authorization.as_deref(),
        Some("Bearer agent-token"),
        "the agent authenticates with its service-account token"
    );
    let action = h
        .reconcile(move |mut api| async move {
            let s = api.status().await;
            assert_eq!(s.step, Some(Step::UploadArchive));
            let c = s.checkpoint.expect("checkpoint");
            let path = c.node_archive.clone().expect("archive path");
            let task = s.agent_task.expect("task");
            assert_eq!(task.operation, Some(AgentOperation::UploadArchive));
            assert_eq!(task.node_archive.as_deref(), Some(path.as_str()));
            let note = api.event("CheckpointCreated", false).await;
            assert!(note.contains(&path), "{note}");
            api
        })
        .await;
    assert_eq!(action, requeue(POLL));
    let path = h
        .status()
        .checkpoint
        .and_then(|c| c.node_archive)
        .expect("path");

    h.agent(NODE_A, |mut api| async move {
        let r = api.agent_result().await;
        assert!(r.succeeded, "{r:?}");
        assert_eq!(r.id, "uploadarchive-1");
        assert_eq!(r.archive_size, Some(25));
        let m = r.manifest.expect("manifest");
        assert_eq!(m.maps.len(), 2);
        assert_eq!(m.maps[0].entries, 1200);
        api
    })
    .await;
    // Uploaded next to the snapshot; the node-local archive and the request file are gone.
    let archive = h.status().checkpoint.map(|c| c.archive).expect("archive");
    assert_eq!(
        std::fs::read(h.stored(&archive)).expect("uploaded archive"),
        b"archive bytes, 25 of them"
    );
    assert!(
        !std::path::Path::new(&path).exists(),
        "node-local archive removed"
    );
    // Removed, unless the hook must still write the stop snapshot when the source stops.
    let stop = h.cr().spec.switchover == Some(crate::crd::Switchover::StopAfterCheckpoint);
    assert_eq!(
        h.node(NODE_A)
            .paths
            .requests
            .join(format!("{CONTAINER_ID}.json"))
            .exists(),
        stop,
        "hook request kept only for a stop snapshot"
    );
    path
}

#[tokio::test]
async fn checkpoint_happy_path() {
    let mut h = Harness::new(new_cr("lb-ckpt", CrAction::Checkpoint));
    drive_to_kubelet(&mut h).await;
    drive_kubelet_and_upload(&mut h).await;

    let action = h
        .reconcile(|mut api| async move {
            let s = api.status().await;
            assert_eq!(s.phase, Some(Phase::Succeeded));
            assert_eq!(s.step, Some(Step::Done));
            assert_eq!(s.completion_time, Some(Time(t0())));
            assert!(s.agent_task.is_none());
            let c = s.checkpoint.clone().expect("checkpoint");
            assert_eq!(c.map_count, Some(2));
            assert_eq!(c.archive_size, Some(25));
            assert_eq!(c.size.as_deref(), Some("39B"));
            assert_eq!(c.manifest.as_ref().map(|m| m.size), Some(14));
            assert_eq!(
                condition(&s, "Ready"),
                ("True", "Checkpointed", condition(&s, "Ready").2)
            );
            assert_eq!(condition(&s, "Progressing").0, "False");
            assert_eq!(condition(&s, "Failed").0, "False");
            let names: Vec<Step> = s.steps.iter().map(|r| r.name).collect();
            assert_eq!(
                names,
                [
                    Step::Resolve,
                    Step::PrepareHook,
                    Step::KubeletCheckpoint,
                    Step::UploadArchive
                ]
            );
            assert!(
                s.steps
                    .iter()
                    .all(|r| r.completion_time.is_some() && r.attempts == 1)
            );
            let note = api.event("Checkpointed", false).await;
            assert!(note.contains("2 maps"), "{note}");
            api.event("Succeeded", false).await;
            api
        })
        .await;
    assert_eq!(action, Action::await_change());
    // Terminal: nothing more to do.
    assert_eq!(h.reconcile_quiet().await, Action::await_change());
}

/// A Succeeded checkpoint object, with its archive and snapshot in the harness's store.
fn succeeded_checkpoint(h: &Harness) -> BpfMapCheckpoint {
    use sha2::Digest;
    let mut cr = with_finalizer(new_cr("lb-ckpt", CrAction::Checkpoint));
    cr.metadata.uid = Some("0c0c0c0c-0000-0000-0000-000000000000".into());
    let prefix = format!("file://{}/{NS}/lb-ckpt/0c0c", h.store.display());
    let snapshot = format!("{prefix}/maps.mapsnap");
    let archive = format!("{prefix}/checkpoint.tar");
    let archive_bytes = b"the checkpoint archive".to_vec();
    std::fs::create_dir_all(h.stored(&archive).parent().expect("dir")).expect("mkdir");
    std::fs::write(h.stored(&archive), &archive_bytes).expect("archive");
    let manifest = test_manifest(&snapshot, b"snap", CONTAINER_ID);
    let SourceCheck::Ready(source) = pods::resolve_source(&source_pod(true), None) else {
        panic!("fixture pod resolves");
    };
    let done = |name| StepRecord {
        name,
        start_time: Time(t0()),
        completion_time: Some(Time(t0())),
        attempts: 1,
    };
    cr.status = Some(BpfMapCheckpointStatus {
        phase: Some(Phase::Succeeded),
        step: Some(Step::Done),
        source: Some(*source),
        checkpoint: Some(CheckpointStatus {
            snapshot,
            archive,
            node_archive: None,
            archive_sha256: Some(hex::encode(sha2::Sha256::digest(&archive_bytes))),
            archive_size: Some(archive_bytes.len() as i64),
            manifest: Some(summarize(&manifest)),
            map_count: Some(2),
            size: Some("26B".into()),
            checkpoint_time: Some(Time(t0())),
            ..CheckpointStatus::default()
        }),
        steps: vec![done(Step::Resolve), done(Step::UploadArchive)],
        ..BpfMapCheckpointStatus::default()
    });
    cr
}

#[tokio::test]
async fn restore_from_a_checkpoint() {
    let mut h = Harness::new(with_finalizer(new_cr("lb-restore", CrAction::Restore)));
    let reference = succeeded_checkpoint(&h);
    let lease_b = agent_lease(NODE_B, Duration::from_secs(3));
    let r2 = reference.clone();
    let action = h
        .reconcile(move |mut api| async move {
            let s = api.status().await;
            assert_eq!(
                (s.phase, s.step),
                (Some(Phase::Pending), Some(Step::ResolveCheckpoint))
            );
            assert!(
                s.checkpoint.is_none(),
                "a Restore stores nothing of its own"
            );
            api.event("Accepted", false).await;
            api.get_checkpoint("lb-ckpt", Some(&r2)).await;
            let s = api.status().await;
            assert_eq!(s.step, Some(Step::PrepareRestore));
            assert_eq!(
                s.checkpoint,
                r2.status.as_ref().and_then(|x| x.checkpoint.clone())
            );
            api.event("CheckpointFound", false).await;
            api.get_lease(NODE_B, Some(&lease_b)).await;
            let s = api.status().await;
            assert_eq!(
                (s.phase, s.step),
                (Some(Phase::Restoring), Some(Step::DownloadArchive))
            );
            let r = s.restore.expect("restore");
            assert_eq!((r.node.as_str(), r.pod.as_str()), (NODE_B, "lb-restored"));
            let task = s.agent_task.expect("task");
            assert_eq!(task.operation, Some(AgentOperation::DownloadArchive));
            assert_eq!(task.node, NODE_B);
            assert_eq!(task.restore_pod.as_deref(), Some("edge/lb-restored"));
            api
        })
        .await;
    assert_eq!(action, requeue(POLL));

    h.agent(NODE_B, |mut api| async move {
        let r = api.agent_result().await;
        assert!(r.succeeded, "{r:?}");
        assert!(
            r.image
                .as_deref()
                .is_some_and(|i| i.starts_with(&format!("{REGISTRY_REPO}@sha256:"))),
            "{r:?}"
        );
        api
    })
    .await;
    let local = h
        .node(NODE_B)
        .paths
        .checkpoints
        .join(format!("mapsnap-restore-{CR_UID}.tar"));
    assert!(
        !local.exists(),
        "the node copy goes once the image is pushed"
    );
    let pushed = h.images.pushed.lock().expect("lock").clone();
    assert_eq!(pushed.len(), 1);
    let (container, tag, image) = pushed[0].clone();
    assert_eq!(container, CONTAINER);
    assert_eq!(tag, format!("mapsnap-{CR_UID}"));
    {
        use sha2::Digest;
        assert_eq!(
            image,
            format!(
                "{REGISTRY_REPO}@sha256:{}",
                hex::encode(sha2::Sha256::digest(b"the checkpoint archive"))
            ),
            "the image was built from the fetched archive"
        );
    }
    let req: RestoreRequest = serde_json::from_slice(
        &std::fs::read(h.node(NODE_B).paths.restores.join("edge_lb-restored.json"))
            .expect("restore request"),
    )
    .expect("json");
    assert_eq!(req.pod, "edge/lb-restored");
    assert_eq!(req.archive, image);
    let snapshot = reference
        .status
        .as_ref()
        .and_then(|s| s.checkpoint.clone())
        .expect("c")
        .snapshot;
    assert_eq!(req.snapshot, snapshot);

    let image_s = image.clone();
    let snap = snapshot.clone();
    let created = std::sync::Arc::new(std::sync::Mutex::new(None));
    let created2 = created.clone();
    let action = h
        .reconcile(move |mut api| async move {
            let s = api.status().await;
            assert_eq!(s.step, Some(Step::CreatePod));
            assert_eq!(
                s.restore.and_then(|r| r.image).as_deref(),
                Some(image_s.as_str())
            );
            api.event("ImagePushed", false).await;
            let pod = api.create_pod().await;
            assert_eq!(pod.metadata.name.as_deref(), Some("lb-restored"));
            let spec = pod.spec.clone().expect("spec");
            assert_eq!(spec.node_name.as_deref(), Some(NODE_B));
            assert!(
                spec.node_selector.is_none(),
                "bound by nodeName, no selector"
            );
            assert_eq!(
                spec.containers[0].image.as_deref(),
                Some(image_s.as_str()),
                "the restored container runs the checkpoint image, by digest"
            );
            assert!(spec.overhead.is_none() && spec.hostname.is_none() && spec.subdomain.is_none());
            assert_eq!(
                spec.image_pull_secrets
                    .as_ref()
                    .map(|v| v.iter().map(|r| r.name.as_str()).collect::<Vec<_>>()),
                Some(vec!["mapsnap-pull"])
            );
            assert_eq!(
                spec.volumes.as_ref().map(Vec::len),
                Some(1),
                "token volume dropped"
            );
            assert_eq!(
                spec.containers[0].volume_mounts.as_ref().map(Vec::len),
                Some(1)
            );
            assert!(spec.priority.is_none() && spec.preemption_policy.is_none());
            let ann = pod.metadata.annotations.clone().expect("annotations");
            assert_eq!(ann.get("mapsnap.io/restore-from"), Some(&snap));
            assert_eq!(
                ann.get("prometheus.io/scrape").map(String::as_str),
                Some("true"),
                "the source pod's annotations are kept"
            );
            assert!(
                !ann.contains_key("kubectl.kubernetes.io/last-applied-configuration")
                    && !ann.contains_key("k8s.v1.cni.cncf.io/network-status"),
                "{ann:?}"
            );
            assert_eq!(
                ann.get("mapsnap.io/checkpoint").map(String::as_str),
                Some("edge/lb-restore")
            );
            let labels = pod.metadata.labels.clone().expect("labels");
            assert_eq!(labels.get("app").map(String::as_str), Some("lb"));
            assert_eq!(
                labels.get("mapsnap.io/checkpoint-uid").map(String::as_str),
                Some(CR_UID)
            );
            assert!(pod.metadata.owner_references.is_none());
            let s = api.status().await;
            assert_eq!(s.step, Some(Step::WaitPod));
            assert_eq!(
                s.restore.and_then(|r| r.pod_uid).as_deref(),
                Some("restored-pod-uid")
            );
            api.event("PodCreated", false).await;
            let pending = restored_pod_status(pod.clone(), false);
            api.get_pod("lb-restored", Some(&pending)).await;
            let s = api.status().await;
            assert_eq!(condition(&s, "Progressing").1, "PodStarting");
            api.event("PodStarting", false).await;
            *created2.lock().expect("lock") = Some(pod);
            api
        })
        .await;
    assert_eq!(action, requeue(POLL));

    h.clock.advance(Duration::from_secs(20));
    let pod = created.lock().expect("lock").clone().expect("pod");
    let running = restored_pod_status(pod, true);
    let action = h
        .reconcile(move |mut api| async move {
            api.get_pod("lb-restored", Some(&running)).await;
            let s = api.status().await;
            assert_eq!(s.phase, Some(Phase::Succeeded));
            assert_eq!(condition(&s, "Ready").1, "Restored");
            assert!(s.restore.and_then(|r| r.running_time).is_some());
            api.event("PodRunning", false).await;
            api.event("Succeeded", false).await;
            api
        })
        .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn migrate_deletes_the_source_pod_once_the_target_runs() {
    let mut h = Harness::new(new_cr("lb-to-node-b", CrAction::Migrate));
    drive_to_kubelet(&mut h).await;
    drive_kubelet_and_upload(&mut h).await;
    let lease_b = agent_lease(NODE_B, Duration::from_secs(1));
    let action = h
        .reconcile(move |mut api| async move {
            let s = api.status().await;
            assert_eq!(
                (s.phase, s.step),
                (Some(Phase::Restoring), Some(Step::PrepareRestore))
            );
            api.event("Checkpointed", false).await;
            api.get_lease(NODE_B, Some(&lease_b)).await;
            let s = api.status().await;
            assert_eq!(s.step, Some(Step::DownloadArchive));
            api
        })
        .await;
    assert_eq!(action, requeue(POLL));
    h.agent(NODE_B, |mut api| async move {
        assert!(api.agent_result().await.succeeded);
        api
    })
    .await;

    let expected_name = crate::layout::restored_pod_name(POD, CR_UID);
    let action = h
        .reconcile(move |mut api| async move {
            api.status().await;
            api.event("ImagePushed", false).await;
            let pod = api.create_pod().await;
            assert_eq!(pod.metadata.name.as_deref(), Some(expected_name.as_str()));
            api.status().await;
            api.event("PodCreated", false).await;
            api.get_pod(&expected_name, Some(&restored_pod_status(pod, true)))
                .await;
            let s = api.status().await;
            assert_eq!(s.step, Some(Step::DeleteSource));
            api.event("PodRunning", false).await;
            api.delete_pod(POD, POD_UID, 200).await;
            let s = api.status().await;
            assert_eq!(s.phase, Some(Phase::Succeeded));
            assert_eq!(condition(&s, "Ready").1, "Migrated");
            assert_eq!(s.restore.and_then(|r| r.source_pod_deleted), Some(true));
            api.event("SourcePodDeleted", false).await;
            api.event("Succeeded", false).await;
            api
        })
        .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn kubelet_500_through_the_proxy_is_retried_with_backoff_then_fails() {
    let mut h = Harness::new(new_cr("lb-ckpt", CrAction::Checkpoint));
    h.use_kubelet_access(crate::config::KubeletAccess::ApiServerProxy);
    drive_to_kubelet(&mut h).await;
    let fail = "checkpointing of edge/lb-0/lb failed (running \"criu\" failed: exit status 1)";
    let action = h
        .reconcile(move |mut api| async move {
            api.status().await;
            api.event("HookPrepared", false).await;
            let r = api
                .expect(
                    "POST",
                    &format!("/api/v1/nodes/{NODE_A}/proxy/checkpoint/{NS}/{POD}/{CONTAINER}"),
                )
                .await;
            r.respond_text(500, fail);
            let s = api.status().await;
            assert_eq!(
                (s.step, s.attempt),
                (Some(Step::KubeletCheckpoint), Some(2))
            );
            assert_eq!(
                s.next_retry_time,
                Some(Time(
                    t0().saturating_add(Duration::from_secs(5)).expect("t")
                ))
            );
            let (st, reason, msg) = condition(&s, "Progressing");
            assert_eq!((st, reason), ("True", "KubeletCheckpointFailed"));
            assert!(msg.contains("HTTP 500") && msg.contains("criu"), "{msg}");
            api.event("KubeletCheckpointFailed", true).await;
            api
        })
        .await;
    assert_eq!(action, requeue(Duration::from_secs(5)));
    // Before the backoff passes: nothing (even when a watch event wakes the controller).
    h.clock.advance(Duration::from_secs(2));
    assert_eq!(h.reconcile_quiet().await, requeue(Duration::from_secs(3)));

    h.clock.advance(Duration::from_secs(4));
    let action = h
        .reconcile(move |mut api| async move {
            api.kubelet(
                NODE_A,
                120,
                500,
                "checkpointing of edge/lb-0/lb failed (rpc error: code = Unknown desc = criu failed)",
            )
            .await;
            let s = api.status().await;
            assert_eq!(s.attempt, Some(3));
            api.event("KubeletCheckpointFailed", true).await;
            api
        })
        .await;
    assert_eq!(action, requeue(Duration::from_secs(10)));

    h.clock.advance(Duration::from_secs(10));
    let action = h
        .reconcile(move |mut api| async move {
            api.kubelet(
                NODE_A,
                120,
                503,
                "error trying to reach service: dial tcp 10.0.0.5:10250: connect: connection refused",
            )
            .await;
            let s = api.status().await;
            assert_eq!(s.phase, Some(Phase::Failed));
            let (st, reason, msg) = condition(&s, "Failed");
            assert_eq!((st, reason), ("True", "KubeletCheckpointFailed"));
            assert!(msg.contains("gave up after 3 attempts"), "{msg}");
            assert_eq!(condition(&s, "Ready").0, "False");
            assert_eq!(
                s.steps
                    .iter()
                    .find(|r| r.name == Step::KubeletCheckpoint)
                    .map(|r| r.attempts),
                Some(3)
            );
            api.event("KubeletCheckpointFailed", true).await;
            api
        })
        .await;
    assert_eq!(action, Action::await_change());
    assert_eq!(h.reconcile_quiet().await, Action::await_change());
}

#[tokio::test]
async fn proxy_404_without_the_feature_gate_fails_at_once() {
    let mut h = Harness::new(new_cr("lb-ckpt", CrAction::Checkpoint));
    h.use_kubelet_access(crate::config::KubeletAccess::ApiServerProxy);
    drive_to_kubelet(&mut h).await;
    h.reconcile(|mut api| async move {
        api.status().await;
        api.event("HookPrepared", false).await;
        api.kubelet(NODE_A, 120, 404, "404 page not found\n").await;
        let s = api.status().await;
        let (_, reason, msg) = condition(&s, "Failed");
        assert_eq!(reason, "CheckpointUnsupported");
        assert!(msg.contains("ContainerCheckpoint feature gate"), "{msg}");
        api.event("CheckpointUnsupported", true).await;
        api
    })
    .await;
}

/// The agent calls its kubelet (a real HTTPS server answering like the kubelet) and the
/// controller tells the kubelet's answers apart: each 404 has its own reason, a 403 names
/// the missing grant, a 500 is retried.
#[tokio::test]
async fn the_agents_kubelet_answers_are_told_apart() {
    type Setup = Box<dyn Fn(&mut crate::fakekubelet::KubeletState)>;
    // (what, kubelet setup, reason, permanent, text in the message)
    type Case = (&'static str, Setup, &'static str, bool, &'static str);
    let cases: Vec<Case> = vec![
        (
            "gate off",
            Box::new(|s| s.gate = false),
            "CheckpointUnsupported",
            true,
            "feature gate",
        ),
        (
            "pod gone",
            Box::new(|s| {
                s.pods.clear();
            }),
            "PodNotFound",
            true,
            "does not know the pod",
        ),
        (
            "container gone",
            Box::new(|s| {
                s.pods.insert(format!("{NS}/{POD}"), vec!["sidecar".into()]);
            }),
            "ContainerNotFound",
            true,
            "container lb does not exist",
        ),
        (
            "no grant",
            Box::new(|s| s.allowed.clear()),
            "Forbidden",
            true,
            "nodes/checkpoint (create)",
        ),
        (
            "criu fails",
            Box::new(|s| {
                s.on_checkpoint = std::sync::Arc::new(|_: &str, _: &str, _: &str| {
                    Err("rpc error: criu failed".into())
                })
            }),
            "KubeletCheckpointFailed",
            false,
            "HTTP 500",
        ),
    ];
    for (what, setup, reason, permanent, text) in cases {
        let mut h = Harness::new(new_cr("lb-ckpt", CrAction::Checkpoint));
        drive_to_kubelet(&mut h).await;
        setup(&mut h.kubelet.kubelet.state.lock().expect("state"));
        h.reconcile(|mut api| async move {
            api.status().await;
            api.event("HookPrepared", false).await;
            api
        })
        .await;
        h.agent(NODE_A, move |mut api| async move {
            let r = api.agent_result().await;
            assert!(!r.succeeded, "{what}: {r:?}");
            assert_eq!(r.reason.as_deref(), Some(reason), "{what}: {r:?}");
            assert!(r.http_status.is_some(), "{what}: {r:?}");
            api
        })
        .await;
        h.reconcile(move |mut api| async move {
            let s = api.status().await;
            let cond = if permanent { "Failed" } else { "Progressing" };
            let (_, got, msg) = condition(&s, cond);
            assert_eq!(got, reason, "{what}: {msg}");
            assert!(msg.contains(text), "{what}: {msg}");
            if permanent {
                assert_eq!(s.phase, Some(Phase::Failed), "{what}");
            } else {
                assert_eq!(s.attempt, Some(2), "{what}");
            }
            api.event(reason, true).await;
            api
        })
        .await;
    }
}

/// The agent checks the kubelet's serving certificate: with a CA that did not sign it, the
/// call fails before any request (no token sent), as a transient "no answer".
#[tokio::test]
async fn a_kubelet_with_a_certificate_from_another_ca_gets_no_token() {
    let k = crate::fakekubelet::FakeKubelet::start(
        NODE_A,
        std::sync::Arc::new(|_: &str, _: &str, _: &str| Ok("/x.tar".to_string())),
    )
    .await;
    k.add_pod(NS, POD, &[CONTAINER]);
    let tls = |ca: &std::path::Path, name: Option<&str>| crate::kubelet::KubeletTls {
        ca_file: Some(ca.to_path_buf()),
        server_name: name.map(str::to_string),
        insecure_skip_verify: false,
    };
    let call = |t: crate::kubelet::KubeletTls| {
        let c = crate::kubelet::DirectKubelet::new(k.addr.ip(), k.addr.port(), &t, &k.token_file)
            .expect("client");
        async move {
            c.checkpoint(NS, POD, CONTAINER, Duration::from_secs(5))
                .await
        }
    };
    let err = call(tls(&k.other_ca_file, None))
        .await
        .expect_err("refused");
    assert_eq!(err.code, 0, "{err:?}");
    assert!(
        err.message.to_lowercase().contains("certificate"),
        "{err:?}"
    );
    assert!(k.calls().is_empty(), "no request reached the server");
    // The right CA, by IP and by the node's name.
    assert_eq!(call(tls(&k.ca_file, None)).await.expect("ok"), "/x.tar");
    assert_eq!(
        call(tls(&k.ca_file, Some(NODE_A))).await.expect("ok"),
        "/x.tar"
    );
    // A name the certificate does not carry.
    assert!(call(tls(&k.ca_file, Some("node-z"))).await.is_err());
    // A bad timeout value, as only a hand-made request can send it.
    let t = tls(&k.ca_file, None);
    let _ = t;
    assert_eq!(
        crate::kubelet::classify(404, "cannot parse value of timeout parameter"),
        crate::kubelet::KubeletErrorKind::BadTimeout
    );
}

#[tokio::test]
async fn pod_missing_fails() {
    let mut h = Harness::new(with_finalizer(new_cr("lb-ckpt", CrAction::Checkpoint)));
    let action = h
        .reconcile(|mut api| async move {
            api.status().await;
            api.event("Accepted", false).await;
            api.get_pod(POD, None).await;
            let s = api.status().await;
            assert_eq!(s.phase, Some(Phase::Failed));
            let (st, reason, msg) = condition(&s, "Failed");
            assert_eq!((st, reason), ("True", "PodNotFound"));
            assert!(msg.contains("edge/lb-0 not found"), "{msg}");
            api.event("PodNotFound", true).await;
            api
        })
        .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn pending_pod_is_waited_for() {
    let mut h = Harness::new(with_finalizer(new_cr("lb-ckpt", CrAction::Checkpoint)));
    let pending = source_pod(false);
    let action = h
        .reconcile(move |mut api| async move {
            api.status().await;
            api.event("Accepted", false).await;
            api.get_pod(POD, Some(&pending)).await;
            let s = api.status().await;
            assert_eq!(s.phase, Some(Phase::Pending));
            assert_eq!(condition(&s, "Progressing").1, "PodNotRunning");
            api.event("PodNotRunning", false).await;
            api
        })
        .await;
    assert_eq!(action, requeue(POLL));
}

#[tokio::test]
async fn pod_on_a_node_without_agent() {
    let mut h = Harness::new(with_finalizer(new_cr("lb-ckpt", CrAction::Checkpoint)));
    let pod = source_pod(true);
    let p = pod.clone();
    let action = h
        .reconcile(move |mut api| async move {
            api.status().await;
            api.event("Accepted", false).await;
            api.get_pod(POD, Some(&p)).await;
            api.get_lease(NODE_A, None).await;
            let s = api.status().await;
            assert_eq!((s.step, s.attempt), (Some(Step::Resolve), Some(2)));
            assert!(s.source.is_none());
            let (_, reason, msg) = condition(&s, "Progressing");
            assert_eq!(reason, "AgentUnavailable");
            assert!(msg.contains("mapsnap-system/mapsnap-agent-node-a"), "{msg}");
            api.event("AgentUnavailable", true).await;
            api
        })
        .await;
    assert_eq!(action, requeue(Duration::from_secs(5)));

    // A stale lease (agent gone) counts as no agent.
    for (advance, attempt_after) in [(5, Some(3)), (10, None)] {
        h.clock.advance(Duration::from_secs(advance));
        let stale = agent_lease(NODE_A, Duration::from_secs(600));
        let p = pod.clone();
        h.reconcile(move |mut api| async move {
            api.get_pod(POD, Some(&p)).await;
            api.get_lease(NODE_A, Some(&stale)).await;
            let s = api.status().await;
            match attempt_after {
                Some(a) => assert_eq!(s.attempt, Some(a)),
                None => {
                    assert_eq!(s.phase, Some(Phase::Failed));
                    assert_eq!(condition(&s, "Failed").1, "AgentUnavailable");
                }
            }
            api.event("AgentUnavailable", true).await;
            api
        })
        .await;
    }
}

#[tokio::test]
async fn deleted_mid_flow_cleans_up_through_the_finalizer() {
    let mut h = Harness::new(new_cr("lb-ckpt", CrAction::Checkpoint));
    drive_to_kubelet(&mut h).await;
    // The kubelet checkpoint ran (snapshot and archive exist); the upload has not happened.
    h.reconcile(move |mut api| async move {
        api.status().await;
        api.event("HookPrepared", false).await;
        api
    })
    .await;
    h.agent(NODE_A, |mut api| async move {
        assert!(api.agent_result().await.succeeded);
        api
    })
    .await;
    h.reconcile(move |mut api| async move {
        api.status().await;
        api.event("CheckpointCreated", false).await;
        api
    })
    .await;
    let status = h.status();
    let ckpt = status.checkpoint.clone().expect("checkpoint");
    let node_archive = ckpt.node_archive.clone().expect("archive path");
    let snapshot_file = h.stored(&ckpt.snapshot);
    assert!(snapshot_file.exists());

    // kubectl delete: the API server sets deletionTimestamp (the finalizer holds it).
    h.cr_mut().metadata.deletion_timestamp = Some(Time(t0()));
    let lease = agent_lease(NODE_A, Duration::from_secs(2));
    let action = h
        .reconcile(move |mut api| async move {
            let s = api.status().await;
            assert_eq!(
                (s.phase, s.step),
                (Some(Phase::Deleting), Some(Step::CleanupSource))
            );
            assert!(
                s.agent_task.is_none(),
                "the in-flight upload task is withdrawn"
            );
            api.event("CleanupStarted", false).await;
            api.get_lease(NODE_A, Some(&lease)).await;
            let s = api.status().await;
            let task = s.agent_task.expect("cleanup task");
            assert_eq!(task.operation, Some(AgentOperation::Cleanup));
            assert_eq!(task.id, "cleanupsource-1");
            assert_eq!(task.container_id.as_deref(), Some(CONTAINER_ID));
            assert_eq!(task.delete_objects.len(), 2);
            api
        })
        .await;
    assert_eq!(action, requeue(POLL));

    h.agent(NODE_A, |mut api| async move {
        let r = api.agent_result().await;
        assert!(r.succeeded, "{r:?}");
        api
    })
    .await;
    assert!(!snapshot_file.exists(), "snapshot deleted");
    assert!(
        !std::path::Path::new(&format!("{}.manifest.json", snapshot_file.display())).exists(),
        "manifest deleted"
    );
    assert!(
        !std::path::Path::new(&node_archive).exists(),
        "node archive deleted"
    );
    assert!(!dirs_request(&h).exists(), "hook request deleted");

    let action = h
        .reconcile(|mut api| async move {
            let s = api.status().await;
            assert!(s.agent_task.is_none());
            api.event("CleanedUp", false).await;
            api.finalizers(&[]).await;
            api
        })
        .await;
    assert_eq!(action, Action::await_change());
    // Gone from our side: nothing more (the API server deletes the object now).
    assert_eq!(h.reconcile_quiet().await, Action::await_change());
}

fn dirs_request(h: &Harness) -> std::path::PathBuf {
    h.node(NODE_A)
        .paths
        .requests
        .join(format!("{CONTAINER_ID}.json"))
}

#[tokio::test]
async fn retained_data_is_left_on_delete() {
    let mut cr = with_finalizer(new_cr("lb-ckpt", CrAction::Checkpoint));
    cr.spec.retention_policy = crate::crd::RetentionPolicy::Retain;
    let mut h = Harness::new(cr);
    h.cr_mut().status = Some(BpfMapCheckpointStatus {
        phase: Some(Phase::Succeeded),
        step: Some(Step::Done),
        ..BpfMapCheckpointStatus::default()
    });
    h.cr_mut().metadata.deletion_timestamp = Some(Time(t0()));
    let action = h
        .reconcile(|mut api| async move {
            api.finalizers(&[]).await;
            api
        })
        .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn controller_restart_resumes_from_status() {
    let mut h = Harness::new(new_cr("lb-ckpt", CrAction::Checkpoint));
    drive_to_kubelet(&mut h).await;
    drive_kubelet_and_upload(&mut h).await;
    // The controller dies here, after the agent answered. A new one starts: it finishes from
    // the status alone (no second kubelet call, no pod lookup).
    h.restart_controller();
    let action = h
        .reconcile(|mut api| async move {
            let s = api.status().await;
            assert_eq!(s.phase, Some(Phase::Succeeded));
            api.event("Checkpointed", false).await;
            api.event("Succeeded", false).await;
            api
        })
        .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn controller_restart_during_restore_adopts_the_pod_it_created() {
    let mut h = restore_up_to_create_pod().await;
    // The pod POST reaches the API server but the answer is lost (controller killed): the
    // status still says CreatePod.
    let made = std::sync::Arc::new(std::sync::Mutex::new(None));
    let made2 = made.clone();
    h.reconcile(move |mut api| async move {
        api.status().await;
        api.event("ImagePushed", false).await;
        let r = api
            .expect("POST", &format!("/api/v1/namespaces/{NS}/pods"))
            .await;
        let mut pod: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(r.body.clone()).expect("pod");
        pod.metadata.uid = Some("restored-pod-uid".into());
        *made2.lock().expect("lock") = Some(pod);
        r.respond(
            504,
            &status_error(
                504,
                "Timeout",
                "the server was unable to return a response in time",
            ),
        );
        let s = api.status().await;
        assert_eq!((s.step, s.attempt), (Some(Step::CreatePod), Some(2)));
        let note = api.event("ApiError", true).await;
        assert!(note.contains("HTTP 504"), "{note}");
        api
    })
    .await;
    h.restart_controller();
    h.clock.advance(Duration::from_secs(6));
    let existing = made.lock().expect("lock").clone().expect("pod");
    h.reconcile(move |mut api| async move {
        let r = api
            .expect("POST", &format!("/api/v1/namespaces/{NS}/pods"))
            .await;
        r.respond(
            409,
            &status_error(409, "AlreadyExists", "pods \"lb-restored\" already exists"),
        );
        api.get_pod("lb-restored", Some(&existing)).await;
        let s = api.status().await;
        assert_eq!(s.step, Some(Step::WaitPod));
        assert_eq!(
            s.restore.and_then(|r| r.pod_uid).as_deref(),
            Some("restored-pod-uid")
        );
        api.event("PodCreated", false).await;
        api.get_pod("lb-restored", Some(&restored_pod_status(existing, true)))
            .await;
        let s = api.status().await;
        assert_eq!(s.phase, Some(Phase::Succeeded));
        api.event("PodRunning", false).await;
        api.event("Succeeded", false).await;
        api
    })
    .await;
}

/// A Restore driven until its next reconcile creates the pod (the target's agent pushed the
/// image).
async fn restore_up_to_create_pod() -> Harness {
    let mut h = Harness::new(with_finalizer(new_cr("lb-restore", CrAction::Restore)));
    let reference = succeeded_checkpoint(&h);
    let lease_b = agent_lease(NODE_B, Duration::from_secs(3));
    h.reconcile(move |mut api| async move {
        api.status().await;
        api.event("Accepted", false).await;
        api.get_checkpoint("lb-ckpt", Some(&reference)).await;
        api.status().await;
        api.event("CheckpointFound", false).await;
        api.get_lease(NODE_B, Some(&lease_b)).await;
        api.status().await;
        api
    })
    .await;
    h.agent(NODE_B, |mut api| async move {
        assert!(api.agent_result().await.succeeded);
        api
    })
    .await;
    h
}

/// ResourceQuota admission refuses the restored pod (403 "exceeded quota"): retried, since
/// quota frees up as other pods go.
#[tokio::test]
async fn a_pod_over_quota_is_retried() {
    let mut h = restore_up_to_create_pod().await;
    h.reconcile(|mut api| async move {
        api.status().await;
        api.event("ImagePushed", false).await;
        api.create_pod_over_quota().await;
        let s = api.status().await;
        assert_eq!((s.step, s.attempt), (Some(Step::CreatePod), Some(2)));
        let (_, reason, msg) = condition(&s, "Progressing");
        assert_eq!(reason, "QuotaExceeded");
        assert!(msg.contains("exceeded quota: compute-resources"), "{msg}");
        api.event("QuotaExceeded", true).await;
        api
    })
    .await;
}

/// A finalizer patch built from a stale object gets the API server's 409 and the reconcile
/// fails (the runtime retries with the fresh object).
#[tokio::test]
async fn a_stale_finalizer_patch_gets_a_conflict() {
    let mut h = Harness::new(new_cr("lb-ckpt", CrAction::Checkpoint));
    let seen = h.cr().clone();
    // Someone changed the object after the controller's cache saw it.
    h.cr_mut().metadata.resource_version = Some("105".into());
    let res = h
        .try_reconcile_as(seen, |mut api| async move {
            assert!(!api.finalizers_or_conflict(&[FINALIZER]).await);
            api
        })
        .await;
    let err = res.expect_err("a conflict fails the reconcile");
    assert!(
        err.to_string().contains("the object has been modified"),
        "{err}"
    );
    assert!(h.cr().metadata.finalizers.is_none(), "nothing was applied");
}

#[tokio::test]
async fn someone_elses_pod_name_is_a_conflict() {
    let mut h = restore_up_to_create_pod().await;
    h.reconcile(|mut api| async move {
        api.status().await;
        api.event("ImagePushed", false).await;
        let r = api
            .expect("POST", &format!("/api/v1/namespaces/{NS}/pods"))
            .await;
        r.respond(409, &status_error(409, "AlreadyExists", "exists"));
        api.get_pod("lb-restored", Some(&source_pod(true))).await;
        let s = api.status().await;
        assert_eq!(condition(&s, "Failed").1, "PodNameConflict");
        api.event("PodNameConflict", true).await;
        api
    })
    .await;
}

#[tokio::test]
async fn restore_waits_for_its_checkpoint_then_times_out() {
    let mut h = Harness::new(with_finalizer(new_cr("lb-restore", CrAction::Restore)));
    let mut running = new_cr("lb-ckpt", CrAction::Checkpoint);
    running.status = Some(BpfMapCheckpointStatus {
        phase: Some(Phase::Checkpointing),
        step: Some(Step::KubeletCheckpoint),
        ..BpfMapCheckpointStatus::default()
    });
    let r1 = running.clone();
    let action = h
        .reconcile(move |mut api| async move {
            api.status().await;
            api.event("Accepted", false).await;
            api.get_checkpoint("lb-ckpt", Some(&r1)).await;
            let s = api.status().await;
            assert_eq!(condition(&s, "Progressing").1, "CheckpointNotReady");
            api.event("CheckpointNotReady", false).await;
            api
        })
        .await;
    assert_eq!(action, requeue(POLL));
    h.clock.advance(Duration::from_secs(301));
    h.reconcile(move |mut api| async move {
        api.get_checkpoint("lb-ckpt", Some(&running)).await;
        let s = api.status().await;
        assert_eq!(s.phase, Some(Phase::Failed));
        let (_, reason, msg) = condition(&s, "Failed");
        assert_eq!(reason, "Timeout");
        assert!(
            msg.contains("CheckpointNotReady, still so after 300s"),
            "{msg}"
        );
        api.event("Timeout", true).await;
        api
    })
    .await;
}

// Pure decisions (no API).

#[test]
fn storage_location_outside_the_allowed_prefixes_is_refused() {
    let mut cr = with_finalizer(new_cr("x", CrAction::Checkpoint));
    cr.spec.storage = Some(crate::crd::StorageSpec {
        location: "s3://someone-elses-bucket/x".into(),
    });
    let cfg = crate::config::Config {
        storage_location: "s3://snaps/mapsnap".into(),
        allowed_locations: vec!["s3://snaps/teams".into()],
        ..crate::config::Config::default()
    };
    let Decision::Apply(t) = reconcile::decide(&cr, t0(), &cfg) else {
        panic!("expected a transition");
    };
    assert_eq!(t.status.phase, Some(Phase::Failed));
    let msg = &t
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .expect("c")
        .message;
    assert!(msg.contains("not under an allowed prefix"), "{msg}");

    cr.spec.storage = Some(crate::crd::StorageSpec {
        location: "s3://snaps/teams/edge".into(),
    });
    let Decision::Apply(t) = reconcile::decide(&cr, t0(), &cfg) else {
        panic!("expected a transition");
    };
    assert_eq!(t.status.step, Some(Step::Resolve));
    assert!(
        t.status
            .checkpoint
            .expect("c")
            .snapshot
            .starts_with("s3://snaps/teams/edge/edge/x/")
    );
}

#[test]
fn containerd_restores_and_a_target_that_cannot_fails_fast_with_the_setting() {
    // containerd is no longer refused up front: it restores from the same checkpoint image.
    let cr = with_finalizer(new_cr("x", CrAction::Migrate));
    let cfg = crate::config::Config {
        runtime: crate::config::Runtime::Containerd,
        ..crate::config::Config::default()
    };
    let Decision::Apply(t) = reconcile::decide(&cr, t0(), &cfg) else {
        panic!("expected a transition");
    };
    assert_eq!(t.status.step, Some(Step::Resolve));
    assert_ne!(t.status.phase, Some(Phase::Failed));

    // The target's agent reports (from the node's containerd config) that restore is off.
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(dir.path().join("etc/containerd")).expect("mkdir");
    std::fs::write(
        dir.path().join("etc/containerd/config.toml"),
        "version = 3\n",
    )
    .expect("cfg");
    let caps = crate::capabilities::probe(
        crate::config::Runtime::Containerd,
        dir.path(),
        Some("2.1.4".into()),
    );
    let mut lease = agent_lease(NODE_B, Duration::from_secs(1));
    lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .extend(caps.annotations());
    let refusal = crate::layout::restore_refusal(&lease);
    assert!(
        refusal
            .as_deref()
            .is_some_and(|r| r.contains("containerd 2.1.4")
                && r.contains("enable_experimental_restore_via_create")),
        "{refusal:?}"
    );
    let mut cr = with_finalizer(new_cr("x", CrAction::Restore));
    cr.status = Some(BpfMapCheckpointStatus {
        phase: Some(Phase::Restoring),
        step: Some(Step::PrepareRestore),
        attempt: Some(1),
        ..BpfMapCheckpointStatus::default()
    });
    let t = reconcile::apply(
        &cr,
        Step::PrepareRestore,
        reconcile::Outcome::TargetAgent {
            live: true,
            refusal,
        },
        t0(),
        &cfg,
    );
    assert_eq!(t.status.phase, Some(Phase::Failed));
    let (_, reason, msg) = condition(&t.status, "Failed");
    assert_eq!(reason, "RestoreUnsupported");
    assert!(
        msg.contains("enable_experimental_restore_via_create"),
        "{msg}"
    );
}

#[test]
fn agent_timeouts_are_retried() {
    let mut cr = with_finalizer(new_cr("x", CrAction::Checkpoint));
    let cfg = crate::config::Config::default();
    let Decision::Apply(t) = reconcile::decide(&cr, t0(), &cfg) else {
        panic!("start");
    };
    cr.status = Some(t.status);
    let SourceCheck::Ready(src) = pods::resolve_source(&source_pod(true), None) else {
        panic!("ready");
    };
    let t = reconcile::apply(
        &cr,
        Step::Resolve,
        reconcile::Outcome::Source {
            check: SourceCheck::Ready(src),
            agent_live: true,
            owner: None,
        },
        t0(),
        &cfg,
    );
    cr.status = Some(t.status);
    // Within the agent timeout: wait.
    let later = t0().saturating_add(Duration::from_secs(30)).expect("t");
    assert_eq!(reconcile::decide(&cr, later, &cfg), Decision::Requeue(POLL));
    // Past it: retry with a new task id after the backoff.
    let late = t0().saturating_add(Duration::from_secs(61)).expect("t");
    let Decision::Apply(t) = reconcile::decide(&cr, late, &cfg) else {
        panic!("timeout");
    };
    assert_eq!(t.status.attempt, Some(2));
    assert!(t.status.agent_task.is_none());
    cr.status = Some(t.status);
    let after_backoff = late.saturating_add(Duration::from_secs(6)).expect("t");
    let Decision::Apply(t) = reconcile::decide(&cr, after_backoff, &cfg) else {
        panic!("reassign");
    };
    assert_eq!(
        t.status.agent_task.map(|t| t.id).as_deref(),
        Some("preparehook-2")
    );
}

#[test]
fn objects_without_our_finalizer_get_it_first_and_deleted_ones_without_it_are_left() {
    let cr = new_cr("x", CrAction::Checkpoint);
    assert_eq!(
        reconcile::decide(&cr, t0(), &Default::default()),
        Decision::AddFinalizer
    );
    let mut gone = new_cr("x", CrAction::Checkpoint);
    gone.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    assert_eq!(
        reconcile::decide(&gone, t0(), &Default::default()),
        Decision::Idle
    );
}

#[tokio::test]
async fn cleanup_that_cannot_finish_gives_up_with_a_warning() {
    // A finished checkpoint whose objects cannot be deleted (files procfs will not unlink:
    // EPERM, a permanent failure without any network), so the finalizer goes anyway.
    let mut cr = with_finalizer(new_cr("lb-ckpt", CrAction::Checkpoint));
    let SourceCheck::Ready(source) = pods::resolve_source(&source_pod(true), None) else {
        panic!("fixture pod resolves");
    };
    cr.status = Some(BpfMapCheckpointStatus {
        phase: Some(Phase::Succeeded),
        step: Some(Step::Done),
        source: Some(*source),
        checkpoint: Some(CheckpointStatus {
            snapshot: "file:///proc/self/status".into(),
            archive: "file:///proc/self/limits".into(),
            ..CheckpointStatus::default()
        }),
        ..BpfMapCheckpointStatus::default()
    });
    cr.metadata.deletion_timestamp = Some(Time(t0()));
    let mut h = Harness::new(cr);
    let lease = agent_lease(NODE_A, Duration::from_secs(1));
    h.reconcile(move |mut api| async move {
        api.status().await;
        api.event("CleanupStarted", false).await;
        api.get_lease(NODE_A, Some(&lease)).await;
        let s = api.status().await;
        assert_eq!(
            s.agent_task.map(|t| t.delete_objects.len()),
            Some(2),
            "both objects"
        );
        api
    })
    .await;
    h.agent(NODE_A, |mut api| async move {
        let r = api.agent_result().await;
        assert!(!r.succeeded && r.permanent, "{r:?}");
        api
    })
    .await;
    let action = h
        .reconcile(|mut api| async move {
            api.status().await;
            let note = api.event("CleanupFailed", true).await;
            assert!(note.contains("/proc/self/status"), "{note}");
            assert!(note.contains("may be left behind"), "{note}");
            api.finalizers(&[]).await;
            api
        })
        .await;
    assert_eq!(action, Action::await_change());
}

#[test]
fn a_download_in_flight_at_deletion_still_gets_its_target_cleanup() {
    let mut cr = with_finalizer(new_cr("m", CrAction::Migrate));
    let SourceCheck::Ready(source) = pods::resolve_source(&source_pod(true), None) else {
        panic!("ready");
    };
    let rec = |name| StepRecord {
        name,
        start_time: Time(t0()),
        completion_time: None,
        attempts: 1,
    };
    cr.status = Some(BpfMapCheckpointStatus {
        phase: Some(Phase::Restoring),
        step: Some(Step::DownloadArchive),
        source: Some(*source),
        steps: vec![rec(Step::Resolve), rec(Step::DownloadArchive)],
        ..BpfMapCheckpointStatus::default()
    });
    assert_eq!(
        reconcile::cleanup_steps(&cr),
        [Step::CleanupSource, Step::CleanupTarget]
    );
    // Still so once the source cleanup replaced the download task.
    if let Some(s) = cr.status.as_mut() {
        s.phase = Some(Phase::Deleting);
        s.step = Some(Step::CleanupSource);
        s.agent_task = None;
    }
    assert_eq!(
        reconcile::cleanup_steps(&cr),
        [Step::CleanupSource, Step::CleanupTarget]
    );
    cr.spec.retention_policy = crate::crd::RetentionPolicy::Retain;
    assert!(reconcile::cleanup_steps(&cr).is_empty());
}

#[test]
fn event_notes_are_cut_at_1024_bytes_on_a_character_boundary() {
    // 1023 ASCII bytes then a 3-byte character: 1026 bytes, 1024 characters.
    let note = format!("{}€", "a".repeat(1023));
    assert_eq!(note.chars().count(), 1024);
    let cut = reconcile::event_note(&note);
    assert!(cut.len() <= 1024, "{} bytes", cut.len());
    assert_eq!(cut, "a".repeat(1023));
    let ok = "é".repeat(512);
    assert_eq!(reconcile::event_note(&ok), ok, "exactly 1024 bytes stays");
    assert_eq!(reconcile::event_note(&"é".repeat(600)).len(), 1024);
}

/// What the controller used to create (the archive path as the image) is what the kubelet
/// refuses before any CRI call: the mock answers it `InvalidImageName`, and the controller
/// reads that as a failed restore; the pod builder refuses such an image up front.
#[tokio::test]
async fn a_path_as_image_is_invalid_image_name() {
    let h = Harness::new(new_cr("lb-restore", CrAction::Restore));
    let mut cr = succeeded_checkpoint(&h);
    cr.spec.target = Some(crate::crd::Target {
        node: NODE_B.into(),
        pod_name: None,
    });
    let path = "/var/lib/kubelet/checkpoints/mapsnap-restore-x.tar";
    assert!(pods::restored_pod(&cr, "p", NODE_B, path, &[]).is_err());
    let digest = format!("{REGISTRY_REPO}@sha256:{}", "0".repeat(64));
    let mut pod = pods::restored_pod(&cr, "p", NODE_B, &digest, &[]).expect("pod");
    if let Some(c) = pod.spec.as_mut().map(|s| &mut s.containers[0]) {
        c.image = Some(path.into());
    }
    let seen = restored_pod_status(pod, true);
    match pods::restored_progress(&seen, CONTAINER) {
        pods::PodProgress::Failed { message, .. } => {
            assert!(message.contains("InvalidImageName"), "{message}");
            assert!(message.contains("invalid reference format"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

/// `spec.rebase` reaches mapsnap-hook as the restored pod's annotations, in the syntax the
/// hook parses; without it the pod carries neither.
#[tokio::test]
async fn the_restored_pod_carries_the_rebase_settings() {
    use crate::crd::{Rebase, RebaseMember, RebaseMode};
    let h = Harness::new(new_cr("lb-restore", CrAction::Restore));
    let mut cr = succeeded_checkpoint(&h);
    cr.spec.target = Some(crate::crd::Target {
        node: NODE_B.into(),
        pod_name: None,
    });
    let digest = format!("{REGISTRY_REPO}@sha256:{}", "0".repeat(64));
    let pod = pods::restored_pod(&cr, "p", NODE_B, &digest, &[]).expect("pod");
    let a = pod.metadata.annotations.expect("annotations");
    assert!(!a.contains_key("mapsnap.io/rebase") && !a.contains_key("mapsnap.io/rebase-mode"));
    cr.spec.rebase = Some(Rebase {
        members: vec![
            RebaseMember {
                path: "value.expires".into(),
                clock: "monotonic_ns".into(),
            },
            RebaseMember {
                path: "key.last_seen".into(),
                clock: "boottime_s".into(),
            },
        ],
        mode: Some(RebaseMode::Elapsed),
    });
    let pod = pods::restored_pod(&cr, "p", NODE_B, &digest, &[]).expect("pod");
    let a = pod.metadata.annotations.expect("annotations");
    assert_eq!(
        a["mapsnap.io/rebase"],
        "value.expires=monotonic_ns,key.last_seen=boottime_s"
    );
    assert_eq!(a["mapsnap.io/rebase-mode"], "elapsed");
    // A mode alone: tagged members only.
    cr.spec.rebase = Some(Rebase {
        members: Vec::new(),
        mode: None,
    });
    let pod = pods::restored_pod(&cr, "p", NODE_B, &digest, &[]).expect("pod");
    let a = pod.metadata.annotations.expect("annotations");
    assert!(!a.contains_key("mapsnap.io/rebase"));
    assert_eq!(a["mapsnap.io/rebase-mode"], "preserve-remaining");
}

/// The kubelet's answer to a timeout it cannot parse (only a hand-made request sends one),
/// from the server that answers like it, is told apart from the other 404s.
#[tokio::test]
async fn a_bad_timeout_is_its_own_404() {
    let k = crate::fakekubelet::FakeKubelet::start(
        NODE_A,
        std::sync::Arc::new(|_: &str, _: &str, _: &str| Ok("/x.tar".to_string())),
    )
    .await;
    k.add_pod(NS, POD, &[CONTAINER]);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&k.ca_file).expect("ca")).expect("pem");
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .expect("client");
    let resp = client
        .post(format!(
            "https://{}/checkpoint/{NS}/{POD}/{CONTAINER}?timeout=soon",
            k.addr
        ))
        .bearer_auth(crate::fakekubelet::AGENT_TOKEN)
        .send()
        .await
        .expect("answer");
    let code = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    assert_eq!(
        crate::kubelet::classify(code, &text),
        crate::kubelet::KubeletErrorKind::BadTimeout,
        "{code} {text}"
    );
}

fn hook_request_exists(h: &Harness) -> bool {
    h.node(NODE_A)
        .paths
        .requests
        .join(format!("{CONTAINER_ID}.json"))
        .exists()
}

/// Migrate with `switchover: StopAfterCheckpoint` up to the wait for the stop snapshot: the
/// hook request asks for it, the source pod is deleted right after the upload (before
/// anything is restored), then the source agent waits for it. Returns its location.
async fn drive_stop_after_checkpoint(h: &mut Harness) -> String {
    drive_to_kubelet(h).await;
    drive_kubelet_and_upload(h).await;
    let snapshot = h.status().checkpoint.expect("checkpoint").snapshot;
    let stop = snapshot.replace("/maps.mapsnap", "/maps-stop.mapsnap");
    assert!(
        stop.ends_with(&format!("/{NS}/lb-to-node-b/{CR_UID}/maps-stop.mapsnap")),
        "{stop}"
    );
    let req: HookRequest = serde_json::from_slice(
        &std::fs::read(
            h.node(NODE_A)
                .paths
                .requests
                .join(format!("{CONTAINER_ID}.json")),
        )
        .expect("request kept"),
    )
    .expect("json");
    assert_eq!(req.stop_snapshot.as_deref(), Some(stop.as_str()));
    let s2 = stop.clone();
    let action = h
        .reconcile(move |mut api| async move {
            let s = api.status().await;
            assert_eq!(
                (s.phase, s.step),
                (Some(Phase::Restoring), Some(Step::DeleteSource))
            );
            api.event("Checkpointed", false).await;
            api.delete_pod(POD, POD_UID, 200).await;
            let s = api.status().await;
            assert_eq!(s.step, Some(Step::AwaitStopSnapshot));
            assert_eq!(
                s.restore.as_ref().and_then(|r| r.source_pod_deleted),
                Some(true)
            );
            let task = s.agent_task.expect("task");
            assert_eq!(task.operation, Some(AgentOperation::AwaitStopSnapshot));
            assert_eq!(task.node, NODE_A);
            assert_eq!(task.stop_snapshot.as_deref(), Some(s2.as_str()));
            // The pod's grace period (30 s, the API default) plus agentTimeout (60 s).
            assert_eq!(task.expires, Time(t0() + Duration::from_secs(90)));
            api.event("SourcePodDeleted", false).await;
            api
        })
        .await;
    assert_eq!(action, requeue(POLL));
    stop
}

/// PrepareRestore (in the reconcile that saw the stop snapshot step end): the target's
/// lease, then the download task, which names `snapshot` for the restore request.
async fn prepare_restore(
    api: &mut MockApi,
    lease_b: &k8s_openapi::api::coordination::v1::Lease,
    snapshot: &str,
) {
    api.get_lease(NODE_B, Some(lease_b)).await;
    let s = api.status().await;
    assert_eq!(s.step, Some(Step::DownloadArchive));
    let task = s.agent_task.expect("task");
    assert_eq!(task.snapshot.as_deref(), Some(snapshot));
}

/// The restore after the stop snapshot step: target agent, restored pod, success. Returns the
/// snapshot the restored pod and the target's restore request name.
async fn drive_restore_after_stop(h: &mut Harness) -> String {
    h.agent(NODE_B, |mut api| async move {
        assert!(api.agent_result().await.succeeded);
        api
    })
    .await;
    let expected_name = crate::layout::restored_pod_name(POD, CR_UID);
    let request: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            h.node(NODE_B)
                .paths
                .restores
                .join(format!("{NS}_{expected_name}.json")),
        )
        .expect("restore request"),
    )
    .expect("json");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let action = h
        .reconcile(move |mut api| async move {
            api.status().await;
            api.event("ImagePushed", false).await;
            let pod = api.create_pod().await;
            let from = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("mapsnap.io/restore-from").cloned());
            tx.send(from).expect("send");
            api.status().await;
            api.event("PodCreated", false).await;
            api.get_pod(&expected_name, Some(&restored_pod_status(pod, true)))
                .await;
            // Succeeded at once: no second DeleteSource.
            let s = api.status().await;
            assert_eq!(s.phase, Some(Phase::Succeeded));
            assert_eq!(condition(&s, "Ready").1, "Migrated");
            api.event("PodRunning", false).await;
            api.event("Succeeded", false).await;
            api
        })
        .await;
    assert_eq!(action, Action::await_change());
    let from = rx.recv().await.flatten().expect("restore-from annotation");
    assert_eq!(
        request["snapshot"].as_str(),
        Some(from.as_str()),
        "the restore request backs the annotation"
    );
    from
}

/// The hook wrote the stop snapshot: the restored pod and the target's restore request name
/// it (the pinned maps as the source left them, not as they were at the checkpoint).
#[tokio::test]
async fn migrate_stop_after_checkpoint_restores_the_pins_saved_at_stop() {
    let mut cr = new_cr("lb-to-node-b", CrAction::Migrate);
    cr.spec.switchover = Some(crate::crd::Switchover::StopAfterCheckpoint);
    let mut h = Harness::new(cr);
    let stop = drive_stop_after_checkpoint(&mut h).await;
    // The source container stops: mapsnap-hook's poststop writes the stop snapshot.
    h.clock.advance(Duration::from_secs(12));
    h.node(NODE_A)
        .hook_writes_stop_snapshot(CONTAINER_ID, b"pins at stop");
    h.agent(NODE_A, |mut api| async move {
        let r = api.agent_result().await;
        assert!(r.succeeded, "{r:?}");
        assert_eq!(r.id, "awaitstopsnapshot-1");
        assert_eq!(r.manifest.expect("manifest").size, 12);
        api
    })
    .await;
    assert!(
        !hook_request_exists(&h),
        "the hook request is removed once the stop snapshot exists"
    );
    let s2 = stop.clone();
    h.reconcile(move |mut api| async move {
        let s = api.status().await;
        assert_eq!(s.step, Some(Step::PrepareRestore));
        let c = s.checkpoint.clone().expect("checkpoint");
        assert_eq!(c.stop_snapshot.as_deref(), Some(s2.as_str()));
        assert_eq!(c.stop_manifest.map(|m| m.size), Some(12));
        assert_eq!(condition(&s, "MapStateFresh").0, "True");
        let note = api.event("StopSnapshotFound", false).await;
        assert!(note.contains(&s2), "{note}");
        prepare_restore(&mut api, &agent_lease(NODE_B, Duration::ZERO), &s2).await;
        api
    })
    .await;
    let from = drive_restore_after_stop(&mut h).await;
    assert_eq!(from, stop);
    let s = h.status();
    assert_eq!(
        s.restore.as_ref().and_then(|r| r.source_pod_deleted),
        Some(true)
    );
    assert_eq!(condition(&s, "MapStateFresh").0, "True");
}

/// No stop snapshot before the agent's wait ends (the real agent waits, here the last
/// second of it): the restore goes on from the checkpoint's snapshot, with a warning and a
/// `MapStateFresh=False` condition saying the restored maps may be stale.
#[tokio::test]
async fn migrate_stop_after_checkpoint_falls_back_to_the_checkpoint_snapshot() {
    let mut cr = new_cr("lb-to-node-b", CrAction::Migrate);
    cr.spec.switchover = Some(crate::crd::Switchover::StopAfterCheckpoint);
    let mut h = Harness::new(cr);
    let stop = drive_stop_after_checkpoint(&mut h).await;
    let snapshot = h.status().checkpoint.expect("checkpoint").snapshot;
    h.clock.advance(Duration::from_secs(89));
    h.agent(NODE_A, |mut api| async move {
        let r = api.agent_result().await;
        assert!(r.succeeded, "{r:?}");
        assert!(r.manifest.is_none(), "{r:?}");
        assert!(
            r.message
                .as_deref()
                .is_some_and(|m| m.contains("no stop snapshot")),
            "{r:?}"
        );
        api
    })
    .await;
    assert!(
        !hook_request_exists(&h),
        "the hook request is removed: a late stop writes nothing"
    );
    let snap2 = snapshot.clone();
    h.reconcile(move |mut api| async move {
        let s = api.status().await;
        assert_eq!(s.step, Some(Step::PrepareRestore));
        assert_eq!(
            s.checkpoint.as_ref().and_then(|c| c.stop_snapshot.clone()),
            None
        );
        let (status, reason, message) = condition(&s, "MapStateFresh");
        assert_eq!((status, reason), ("False", "StopSnapshotMissing"));
        assert!(
            message.contains("after the checkpoint are lost"),
            "{message}"
        );
        let note = api.event("StopSnapshotMissing", true).await;
        assert!(note.contains(&stop), "{note}");
        let mut lease_b = agent_lease(NODE_B, Duration::ZERO);
        if let Some(spec) = lease_b.spec.as_mut() {
            spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                t0() + Duration::from_secs(89),
            ));
        }
        prepare_restore(&mut api, &lease_b, &snap2).await;
        api
    })
    .await;
    let from = drive_restore_after_stop(&mut h).await;
    assert_eq!(from, snapshot, "the checkpoint's snapshot");
}

/// The controller's own bound: an agent that never answers the wait does not hold the
/// Migrate (whose source is gone) forever.
#[test]
fn a_silent_stop_snapshot_wait_falls_back() {
    let mut cr = with_finalizer(new_cr("lb-to-node-b", CrAction::Migrate));
    cr.spec.switchover = Some(crate::crd::Switchover::StopAfterCheckpoint);
    let cfg = crate::config::Config::default();
    let task: crate::crd::AgentTask = serde_json::from_value(serde_json::json!({
        "id": "awaitstopsnapshot-1",
        "node": NODE_A,
        "operation": "AwaitStopSnapshot",
        "containerId": CONTAINER_ID,
        "created": "2025-06-01T12:00:00Z",
        "expires": "2025-06-01T12:01:30Z",
    }))
    .expect("task");
    cr.status = Some(BpfMapCheckpointStatus {
        phase: Some(Phase::Restoring),
        step: Some(Step::AwaitStopSnapshot),
        attempt: Some(1),
        checkpoint: Some(CheckpointStatus {
            snapshot: "s3://b/p/edge/lb-to-node-b/u/maps.mapsnap".into(),
            archive: "s3://b/p/edge/lb-to-node-b/u/checkpoint.tar".into(),
            ..CheckpointStatus::default()
        }),
        agent_task: Some(task),
        ..BpfMapCheckpointStatus::default()
    });
    // Within the bound: keep waiting.
    let early = reconcile::decide(&cr, t0() + Duration::from_secs(100), &cfg);
    assert!(matches!(early, Decision::Requeue(_)), "{early:?}");
    // 30 s grace + 60 s agent wait + 60 s to answer.
    let Decision::Apply(t) = reconcile::decide(&cr, t0() + Duration::from_secs(150), &cfg) else {
        panic!("expected a transition");
    };
    assert_eq!(t.status.step, Some(Step::PrepareRestore));
    assert_eq!(t.status.phase, Some(Phase::Restoring));
    assert_eq!(
        condition(&t.status, "MapStateFresh").1,
        "StopSnapshotMissing"
    );
    assert!(
        t.events
            .iter()
            .any(|e| e.warning && e.reason == "StopSnapshotMissing" && e.note.contains("150s")),
        "{:?}",
        t.events
    );
}

#[test]
fn switchover_applies_to_migrate_only() {
    let mut cr = with_finalizer(new_cr("x", CrAction::Checkpoint));
    cr.spec.switchover = Some(crate::crd::Switchover::StopAfterCheckpoint);
    let Decision::Apply(t) = reconcile::decide(&cr, t0(), &crate::config::Config::default()) else {
        panic!("expected a transition");
    };
    assert_eq!(t.status.phase, Some(Phase::Failed));
    assert!(condition(&t.status, "Failed").2.contains("switchover"));
}

/// The agent writes a stop snapshot into the hook request only as `maps-stop.mapsnap` beside
/// the object's own snapshot (anyone who can patch the status can write tasks).
#[test]
fn the_agent_asks_for_a_stop_snapshot_only_beside_the_objects_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dirs = NodeDirs::new(dir.path(), NODE_A);
    let store = format!("file://{}/store", dir.path().display());
    let agent = crate::node::NodeAgent::new(
        dirs.paths.clone(),
        std::sync::Arc::new(crate::node::StorageBlobs::new(
            mapsnap::storage::StorageConfig::default(),
        )),
    )
    .with_allowed_locations(vec![store.clone()]);
    let object = format!("{NS}/mig");
    let snapshot = format!("{store}/{NS}/mig/u1/maps.mapsnap");
    let run = |stop: &str| {
        let task: crate::crd::AgentTask = serde_json::from_value(serde_json::json!({
            "id": "preparehook-1",
            "node": NODE_A,
            "operation": "PrepareCheckpoint",
            "containerId": CONTAINER_ID,
            "snapshot": snapshot,
            "stopSnapshot": stop,
            "created": "2025-06-01T12:00:00Z",
            "expires": "2025-06-01T12:30:00Z",
        }))
        .expect("task");
        agent.execute(&object, "u1", &task, NODE_A, t0())
    };
    let good = format!("{store}/{NS}/mig/u1/maps-stop.mapsnap");
    let r = run(&good);
    assert!(r.succeeded, "{r:?}");
    let req: HookRequest = serde_json::from_slice(
        &std::fs::read(dirs.paths.requests.join(format!("{CONTAINER_ID}.json"))).expect("file"),
    )
    .expect("json");
    assert_eq!(req.stop_snapshot.as_deref(), Some(good.as_str()));
    for bad in [
        format!("{store}/{NS}/mig/u2/maps-stop.mapsnap"),
        format!("{store}/{NS}/other/u1/maps-stop.mapsnap"),
        format!("{store}/{NS}/mig/u1/checkpoint.tar"),
        format!("{store}/{NS}/mig/u1/maps.mapsnap"),
        format!("{store}-x/{NS}/mig/u1/maps-stop.mapsnap"),
    ] {
        let r = run(&bad);
        assert!(!r.succeeded && r.permanent, "{bad}: {r:?}");
        assert_eq!(r.reason.as_deref(), Some("TaskRefused"), "{bad}");
    }
}
