//! Pure functions over pods: resolving the source container, judging the restored pod's
//! progress, and building the restored pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LocalObjectReference, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{
    ANNOTATION_CHECKPOINT, ANNOTATION_REBASE, ANNOTATION_REBASE_MODE, ANNOTATION_RESTORE_FROM,
    BpfMapCheckpoint, LABEL_CHECKPOINT_UID, LABEL_RESTORED_BY, PodTemplateCopy, RebaseMode,
    SourceStatus,
};
use crate::layout;

/// Labels of the source pod that are not copied to the restored pod: they tie a pod to one
/// revision or one replica of its controller.
pub const LABELS_NOT_COPIED: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
    "controller-uid",
    "job-name",
];

/// Annotations of the source pod that are not copied to the restored pod: they belong to one
/// pod instance (set by controllers, admission or kubectl) or to a restore of their own.
pub const ANNOTATIONS_NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    "kubernetes.io/config.seen",
    "kubernetes.io/config.source",
    "kubernetes.io/config.hash",
    "kubernetes.io/config.mirror",
    "controller.kubernetes.io/pod-deletion-cost",
    "batch.kubernetes.io/job-completion-index",
    "pod.kubernetes.io/claimed-by",
];

/// Annotation prefixes not copied: our own (the restore sets them anew) and the CNI's record
/// of the source pod's network (the restored pod gets a new IP).
pub const ANNOTATION_PREFIXES_NOT_COPIED: &[&str] = &["mapsnap.io/", "k8s.v1.cni.cncf.io/"];

/// Whether a source pod annotation goes to the restored pod.
pub fn annotation_copied(key: &str) -> bool {
    !ANNOTATIONS_NOT_COPIED.contains(&key)
        && !ANNOTATION_PREFIXES_NOT_COPIED
            .iter()
            .any(|p| key.starts_with(p))
}

/// Whether an image reference names its image by digest (`name@sha256:<64 hex>`), with a
/// repository part the kubelet can parse (no path, no spaces).
pub fn is_digest_ref(image: &str) -> bool {
    let Some((repo, digest)) = image.rsplit_once("@sha256:") else {
        return false;
    };
    digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && !repo.is_empty()
        && !repo.starts_with('/')
        && !repo.ends_with('/')
        && !repo.contains("//")
        && repo.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'.' | b'-' | b'_' | b'/' | b':')
        })
}

/// Name prefix of the service account token volume admission adds to every pod.
const TOKEN_VOLUME_PREFIX: &str = "kube-api-access-";

/// Container waiting reasons that mean the restored container will not start by itself.
const FATAL_WAITING: &[&str] = &[
    "CreateContainerError",
    "CreateContainerConfigError",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CrashLoopBackOff",
    "RunContainerError",
];

/// The source pod, judged.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceCheck {
    /// Running, with a container ID: ready to checkpoint.
    Ready(Box<SourceStatus>),
    /// Not yet (pending, container starting): wait and look again.
    Wait { reason: String, message: String },
    /// Cannot be checkpointed as asked (no such container, ambiguous container).
    Invalid { reason: String, message: String },
}

/// Splits a container ID (`cri-o://abc`) into the runtime and the ID.
pub fn split_container_id(id: &str) -> Option<(&str, &str)> {
    let (runtime, id) = id.split_once("://")?;
    if runtime.is_empty() || id.is_empty() {
        return None;
    }
    Some((runtime, id))
}

/// Judges the source pod: which container, on which node, with which ID.
pub fn resolve_source(pod: &Pod, container: Option<&str>) -> SourceCheck {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let wait = |reason: &str, message: String| SourceCheck::Wait {
        reason: reason.into(),
        message,
    };
    let invalid = |reason: &str, message: String| SourceCheck::Invalid {
        reason: reason.into(),
        message,
    };
    let Some(spec) = pod.spec.as_ref() else {
        return invalid("PodInvalid", format!("pod {name} has no spec"));
    };
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    let container = match container {
        Some(c) if names.contains(&c) => c.to_string(),
        Some(c) => {
            return invalid(
                "ContainerNotFound",
                format!(
                    "pod {name} has no container {c:?} (it has {})",
                    names.join(", ")
                ),
            );
        }
        None if names.len() == 1 => names[0].to_string(),
        None => {
            return invalid(
                "ContainerRequired",
                format!(
                    "pod {name} has {} containers ({}): set spec.source.container",
                    names.len(),
                    names.join(", ")
                ),
            );
        }
    };
    let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else {
        return wait(
            "PodNotScheduled",
            format!("pod {name} is not scheduled to a node yet"),
        );
    };
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
    if phase != "Running" {
        return wait(
            "PodNotRunning",
            format!("pod {name} is {phase}, not Running"),
        );
    }
    let cs = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|v| v.iter().find(|c| c.name == container));
    let running = cs
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some());
    let id = cs.and_then(|c| c.container_id.as_deref()).unwrap_or("");
    let Some((runtime, id)) = split_container_id(id).filter(|_| running) else {
        return wait(
            "ContainerNotRunning",
            format!("container {container} of pod {name} is not running"),
        );
    };
    let labels = pod
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| !LABELS_NOT_COPIED.contains(&k.as_str()))
        .collect();
    let annotations = pod
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| annotation_copied(k))
        .collect();
    let mut template_spec = spec.clone();
    template_spec.node_name = None;
    SourceCheck::Ready(Box::new(SourceStatus {
        pod: name,
        pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
        node,
        container,
        container_id: id.to_string(),
        runtime: runtime.to_string(),
        pod_template: Some(PodTemplateCopy {
            labels,
            annotations,
            spec: template_spec,
        }),
    }))
}

/// The controller that owns a pod, as `Kind/name`, if any.
pub fn controller_of(pod: &Pod) -> Option<String> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| format!("{}/{}", o.kind, o.name))
}

/// Where the restored pod is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodProgress {
    /// The pod runs and the restored container is running.
    Running,
    /// Not yet; the text says what it waits for.
    Waiting(String),
    /// It will not run by itself.
    Failed { reason: String, message: String },
}

/// Judges the restored pod.
pub fn restored_progress(pod: &Pod, container: &str) -> PodProgress {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if phase == "Failed" || phase == "Succeeded" {
        let why = status
            .and_then(|s| s.message.clone().or_else(|| s.reason.clone()))
            .unwrap_or_default();
        return PodProgress::Failed {
            reason: "RestoredPodFailed".into(),
            message: format!("the restored pod is {phase}: {why}"),
        };
    }
    let cs = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|v| v.iter().find(|c| c.name == container));
    let state = cs.and_then(|c| c.state.as_ref());
    if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
        let reason = w.reason.clone().unwrap_or_default();
        if FATAL_WAITING.contains(&reason.as_str()) {
            return PodProgress::Failed {
                reason: "RestoreFailed".into(),
                message: format!(
                    "container {container}: {reason}: {}",
                    w.message.clone().unwrap_or_default()
                ),
            };
        }
        return PodProgress::Waiting(format!("container {container} is waiting ({reason})"));
    }
    if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
        return PodProgress::Failed {
            reason: "RestoreFailed".into(),
            message: format!(
                "container {container} terminated with exit code {}: {}",
                t.exit_code,
                t.message
                    .clone()
                    .or_else(|| t.reason.clone())
                    .unwrap_or_default()
            ),
        };
    }
    if phase == "Running" && state.is_some_and(|s| s.running.is_some()) {
        PodProgress::Running
    } else {
        PodProgress::Waiting(format!("the restored pod is {phase}"))
    }
}

/// Builds the restored pod: a copy of the checkpointed pod's spec bound to the target node,
/// the checkpointed container's image replaced by the checkpoint OCI image (by digest; the
/// kubelet parses every image as a reference, so an archive path would end in
/// `InvalidImageName`), with the registry's pull secrets, annotated for mapsnap-hook.
pub fn restored_pod(
    cr: &BpfMapCheckpoint,
    name: &str,
    node: &str,
    image: &str,
    pull_secrets: &[String],
) -> Result<Pod, String> {
    if !is_digest_ref(image) {
        return Err(format!(
            "{image:?} is not a checkpoint image by digest (repository@sha256:...)"
        ));
    }
    let status = cr.status.as_ref().ok_or("no status")?;
    let source = status.source.as_ref().ok_or("no resolved source")?;
    let template = source
        .pod_template
        .as_ref()
        .ok_or("the checkpoint recorded no pod template")?;
    let checkpoint = status.checkpoint.as_ref().ok_or("no checkpoint")?;
    // Without a manifest the checkpoint has no maps: no annotation, so the hook restores none.
    // A stop snapshot (newer than the checkpoint's) wins.
    let snapshot = checkpoint.restore_snapshot().map(str::to_string);
    let uid = cr.metadata.uid.clone().unwrap_or_default();
    let mut spec: PodSpec = template.spec.clone();
    spec.node_name = Some(node.to_string());
    spec.node_selector = None;
    spec.scheduling_gates = None;
    spec.ephemeral_containers = None;
    if let Some(a) = spec.affinity.as_mut() {
        a.node_affinity = None;
    }
    // Set by admission from the priority class / runtime class: a new pod may not carry them
    // (the API server refuses a pod whose overhead it did not set itself).
    spec.priority = None;
    spec.preemption_policy = None;
    spec.overhead = None;
    // The restored pod is another pod: a copied hostname/subdomain would make two pods answer
    // for one DNS name (and a StatefulSet's pod identity is not the restored pod's).
    spec.hostname = None;
    spec.subdomain = None;
    for s in pull_secrets {
        let list = spec.image_pull_secrets.get_or_insert_with(Vec::new);
        if !list.iter().any(|r| &r.name == s) {
            list.push(LocalObjectReference { name: s.clone() });
        }
    }
    // The service account token volume is injected again by admission.
    if let Some(vols) = spec.volumes.as_mut() {
        vols.retain(|v| !v.name.starts_with(TOKEN_VOLUME_PREFIX));
    }
    for c in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        if let Some(m) = c.volume_mounts.as_mut() {
            m.retain(|m| !m.name.starts_with(TOKEN_VOLUME_PREFIX));
        }
    }
    let c = spec
        .containers
        .iter_mut()
        .find(|c| c.name == source.container)
        .ok_or_else(|| format!("the pod template has no container {}", source.container))?;
    c.image = Some(image.to_string());
    c.image_pull_policy = Some("IfNotPresent".into());

    let mut labels: BTreeMap<String, String> = template.labels.clone();
    labels.insert(LABEL_CHECKPOINT_UID.into(), uid);
    if let Some(n) = cr.metadata.name.as_deref().filter(|n| n.len() <= 63) {
        labels.insert(LABEL_RESTORED_BY.into(), n.to_string());
    }
    let mut annotations: BTreeMap<String, String> = template
        .annotations
        .iter()
        .filter(|(k, _)| annotation_copied(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.insert(ANNOTATION_CHECKPOINT.to_string(), cr.key());
    if let Some(s) = snapshot {
        annotations.insert(ANNOTATION_RESTORE_FROM.to_string(), s);
    }
    if let Some(r) = &cr.spec.rebase {
        if let Some(members) = r.annotation() {
            annotations.insert(ANNOTATION_REBASE.to_string(), members);
        }
        // A mode alone still asks the hook to rebase the members BTF tags name.
        let mode = r.mode.unwrap_or(RebaseMode::PreserveRemaining);
        annotations.insert(
            ANNOTATION_REBASE_MODE.to_string(),
            mode.as_annotation().to_string(),
        );
    }
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: cr.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// The restored pod's name for an object: `spec.target.podName`, else derived.
pub fn restored_pod_name(cr: &BpfMapCheckpoint, source_pod: &str) -> String {
    cr.spec
        .target
        .as_ref()
        .and_then(|t| t.pod_name.clone())
        .unwrap_or_else(|| {
            layout::restored_pod_name(source_pod, cr.metadata.uid.as_deref().unwrap_or_default())
        })
}
