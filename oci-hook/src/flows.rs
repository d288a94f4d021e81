//! The hook's flows: OCI stages (restore before the process runs, wait-and-fill after it
//! started, snapshot at stop) and CRIU's post-dump action (snapshot at the frozen instant).

use std::path::{Path, PathBuf};
use std::time::Instant;

use oci_spec::runtime::Spec;

use crate::annotations::{Annotations, Existing, Policy, RestoreMode};
use crate::config::NodeConfig;
use crate::container::{self, RuntimeContainer};
use crate::error::{HookError, Result};
use crate::location::{self, IMAGE_PREFIX, Resolved};
use crate::manifest::{
    self, CheckpointManifest, IMAGE_SNAPSHOT, MANIFEST_VERSION, PinnedMap, Request,
};
use crate::mounts::ContainerMounts;
use crate::snapshot::{self, PinOutcome, Source};
use crate::state::HookState;

/// OCI hook stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl std::str::FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "prestart" => Self::Prestart,
            "createRuntime" | "create-runtime" => Self::CreateRuntime,
            "createContainer" | "create-container" => Self::CreateContainer,
            "startContainer" | "start-container" => Self::StartContainer,
            "poststart" => Self::Poststart,
            "poststop" => Self::Poststop,
            other => {
                return Err(format!(
                    "unknown stage {other:?} (prestart, createRuntime, poststart, poststop)"
                ));
            }
        })
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Prestart => "prestart",
            Self::CreateRuntime => "createRuntime",
            Self::CreateContainer => "createContainer",
            Self::StartContainer => "startContainer",
            Self::Poststart => "poststart",
            Self::Poststop => "poststop",
        })
    }
}

/// A container as a hook sees it: its mounts and annotations.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub mounts: ContainerMounts,
    pub annotations: Annotations,
    /// From the CRI annotations, when the container belongs to a pod.
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

/// Reads the bundle's config.json; annotations from `state` win over the spec's.
pub fn load_container(
    id: &str,
    bundle: &Path,
    state_annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<Container> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path).map_err(|e| HookError::Spec {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let mut all: std::collections::BTreeMap<String, String> = spec
        .annotations()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    if let Some(s) = state_annotations {
        all.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let annotations = Annotations::parse(&all)?;
    for k in &annotations.unknown {
        tracing::warn!(
            annotation = k,
            "unknown mapsnap.io/ annotation, ignored (known: {})",
            crate::annotations::KNOWN.join(", ")
        );
    }
    Ok(Container {
        id: id.to_string(),
        mounts: ContainerMounts::from_spec(&spec),
        annotations,
        pod_namespace: all.get("io.kubernetes.pod.namespace").cloned(),
        pod_name: all.get("io.kubernetes.pod.name").cloned(),
    })
}

/// The policy that applies: the container's, else the node's.
pub fn policy_of(annotations: Option<&Annotations>, cfg: &NodeConfig) -> Policy {
    annotations
        .and_then(|a| a.policy)
        .unwrap_or(cfg.hook.policy)
}

/// Runs one OCI stage. Returns a one-line summary of what was done.
pub fn oci(
    stage: Stage,
    state: &HookState,
    ctr: &Container,
    cfg: &NodeConfig,
    ancestors: &[(u32, Vec<String>)],
    deadline: Instant,
) -> Result<String> {
    manifest::check_id(&state.id)?;
    match stage {
        Stage::Prestart | Stage::CreateRuntime => {
            if let Some(image_dir) = container::restoring_image_dir(ancestors) {
                if let Some(m) = CheckpointManifest::read(&image_dir)? {
                    return restore_from_manifest(&m, &image_dir, state, ctr, cfg);
                }
                tracing::info!(image_dir = %image_dir.display(), "restoring a checkpoint without a mapsnap-hook manifest");
            }
            match (&ctr.annotations.restore_from, ctr.annotations.restore_mode) {
                (Some(from), RestoreMode::Pin) => {
                    check_restore_request(ctr, from, cfg)?;
                    let res = location::from_annotation(
                        from,
                        &ctr.mounts,
                        &cfg.hook,
                        crate::annotations::RESTORE_FROM,
                    )?;
                    let src = Source::open(&res, &cfg.storage, None)?;
                    restore_pinned(&src, state, ctr, cfg, Existing::Fail)
                }
                _ => Ok("nothing to restore".into()),
            }
        }
        Stage::Poststart => match (&ctr.annotations.restore_from, ctr.annotations.restore_mode) {
            (Some(from), RestoreMode::Wait) => {
                check_restore_request(ctr, from, cfg)?;
                let res = location::from_annotation(
                    from,
                    &ctr.mounts,
                    &cfg.hook,
                    crate::annotations::RESTORE_FROM,
                )?;
                let src = Source::open(&res, &cfg.storage, None)?;
                let wait_until = deadline.min(Instant::now() + cfg.hook.wait_timeout);
                let maps =
                    snapshot::fill_pins(&src, &ctr.mounts, ctr.annotations.fill_mode, wait_until)?;
                for m in &maps {
                    tracing::info!(
                        map = m.name,
                        target = m.target,
                        entries = m.entries,
                        "filled"
                    );
                }
                Ok(format!(
                    "filled {} pinned maps of the app from {}",
                    maps.len(),
                    src.name()
                ))
            }
            _ => Ok("nothing to fill".into()),
        },
        Stage::Poststop => {
            manifest::remove_marker(&cfg.hook.state_dir, &state.id);
            if !ctr.annotations.snapshot_on_stop {
                return Ok("no snapshot asked at stop".into());
            }
            let dest = match &ctr.annotations.snapshot_to {
                Some(to) => location::from_annotation(
                    to,
                    &ctr.mounts,
                    &cfg.hook,
                    crate::annotations::SNAPSHOT_TO,
                )?,
                None => location::from_annotation(
                    &format!("stop/{}.mapsnap", state.id),
                    &ctr.mounts,
                    &cfg.hook,
                    crate::annotations::SNAPSHOT_TO,
                )?,
            };
            let w = take_snapshot(ctr, &dest, true, "poststop", cfg)?;
            Ok(format!(
                "saved {} pinned maps to {} ({} bytes, sha256 {})",
                top_count(&w),
                w.location,
                w.size,
                w.sha256
            ))
        }
        Stage::CreateContainer | Stage::StartContainer => Ok(format!(
            "nothing to do at {stage} (it runs inside the container)"
        )),
    }
}

/// With `[hook] require_restore_request`, a `restore-from` annotation counts only when the
/// node agent wrote a matching restore request for the pod (docs/API.md): anyone who can
/// create pods can set annotations, only the operator makes the agent write requests.
fn check_restore_request(ctr: &Container, from: &str, cfg: &NodeConfig) -> Result<()> {
    if !cfg.hook.require_restore_request {
        return Ok(());
    }
    let (ns, pod) = match (&ctr.pod_namespace, &ctr.pod_name) {
        (Some(n), Some(p)) => (n.as_str(), p.as_str()),
        _ => {
            return Err(HookError::refused(
                format!("{} {from}", crate::annotations::RESTORE_FROM),
                "this node requires a restore request and the container names no pod \
                 (io.kubernetes.pod.namespace / io.kubernetes.pod.name)",
            ));
        }
    };
    let req = manifest::RestoreRequest::read(
        &cfg.hook.restore_request_dir,
        ns,
        pod,
        jiff::Timestamp::now(),
    )?;
    match req {
        Some(r) if r.snapshot == from => Ok(()),
        Some(r) => Err(HookError::refused(
            format!("{} {from}", crate::annotations::RESTORE_FROM),
            format!(
                "the node agent's restore request for {ns}/{pod} names {}",
                r.snapshot
            ),
        )),
        None => Err(HookError::refused(
            format!("{} {from}", crate::annotations::RESTORE_FROM),
            format!("no (unexpired) restore request for pod {ns}/{pod} on this node"),
        )),
    }
}

fn top_count(w: &snapshot::Written) -> usize {
    w.report.maps.iter().filter(|m| !m.inner).count()
}

fn take_snapshot(
    ctr: &Container,
    dest: &Resolved,
    overwrite: bool,
    why: &str,
    cfg: &NodeConfig,
) -> Result<snapshot::Written> {
    let (maps, _links) = snapshot::collect_pins(&ctr.mounts, &ctr.annotations.maps)?;
    let source = format!(
        "container:{} ({why}; bpffs mounts {})",
        ctr.id,
        ctr.mounts.bpf_destinations()
    );
    if let Resolved::Local(p) = dest
        && let Some(parent) = p.parent()
    {
        std::fs::create_dir_all(parent)
            .map_err(|e| HookError::io(format!("creating {}", parent.display()), e))?;
    }
    let w = snapshot::write_snapshot(&maps, dest, overwrite, &source, &ctr.id, &cfg.storage)?;
    for m in w.report.maps.iter().filter(|m| !m.inner) {
        tracing::info!(
            map = m.name,
            pin = m.pin_path.as_deref().unwrap_or(""),
            entries = m.entries,
            "saved"
        );
    }
    Ok(w)
}

fn restore_pinned(
    src: &Source,
    state: &HookState,
    ctr: &Container,
    cfg: &NodeConfig,
    default_existing: Existing,
) -> Result<String> {
    let existing = if ctr.annotations.existing_set {
        ctr.annotations.existing
    } else {
        default_existing
    };
    let summary_sha = src.verify()?.digest.sha256_hex();
    if manifest::marker_matches(&cfg.hook.state_dir, &state.id, state.pid(), &summary_sha) {
        return Ok(format!(
            "{} was already restored for this container (prestart and createRuntime both ran)",
            src.name()
        ));
    }
    let out = snapshot::restore_pins(src, &ctr.mounts, existing)?;
    if let Err(e) =
        manifest::write_marker(&cfg.hook.state_dir, &state.id, state.pid(), &summary_sha)
    {
        tracing::warn!(error = %e, "cannot write the restore marker");
    }
    Ok(match out {
        PinOutcome::Restored(maps) => {
            for m in &maps {
                tracing::info!(
                    map = m.name,
                    pin = m.target,
                    entries = m.entries,
                    "restored"
                );
            }
            format!("restored {} pinned maps from {}", maps.len(), src.name())
        }
        PinOutcome::Kept(n) => format!(
            "all {n} pins of {} exist already: kept them (mapsnap.io/existing=keep)",
            src.name()
        ),
    })
}

fn restore_from_manifest(
    m: &CheckpointManifest,
    image_dir: &Path,
    state: &HookState,
    ctr: &Container,
    cfg: &NodeConfig,
) -> Result<String> {
    tracing::info!(
        image_dir = %image_dir.display(),
        snapshot = m.snapshot,
        maps = m.maps.len(),
        "restoring the pinned maps of the checkpoint"
    );
    let res = location::from_manifest(&m.snapshot, image_dir, &cfg.hook)?;
    let expect = m.sha256_bytes().map(|s| (s, m.size));
    let src = Source::open(&res, &cfg.storage, expect)?;
    // Same node, pins never removed: the live maps are the checkpointed ones; keep them.
    restore_pinned(&src, state, ctr, cfg, Existing::Keep)
}

/// CRIU's environment for an action script.
#[derive(Debug, Clone, Default)]
pub struct CriuEnv {
    pub action: String,
    pub init_pid: Option<u32>,
    pub image_dir: Option<PathBuf>,
}

impl CriuEnv {
    pub fn from_env() -> Self {
        Self {
            action: std::env::var("CRTOOLS_SCRIPT_ACTION").unwrap_or_default(),
            init_pid: std::env::var("CRTOOLS_INIT_PID")
                .ok()
                .and_then(|v| v.trim().parse().ok()),
            image_dir: std::env::var_os("CRTOOLS_IMAGE_DIR").map(PathBuf::from),
        }
    }
}

/// What the CRIU action found, for the caller's policy decision.
#[derive(Debug)]
pub struct CriuTarget {
    pub container: RuntimeContainer,
    pub ctr: Container,
}

/// Finds the container being dumped from `CRTOOLS_INIT_PID`.
pub fn criu_container(
    env: &CriuEnv,
    cfg: &NodeConfig,
    ancestors: &[(u32, Vec<String>)],
) -> Result<CriuTarget> {
    let pid = env
        .init_pid
        .ok_or_else(|| HookError::Container("CRTOOLS_INIT_PID is not set".into()))?;
    let mut roots = container::runtime_roots_of(ancestors);
    roots.extend(cfg.hook.runtime_roots.iter().cloned());
    let rc = container::find_by_init_pid(pid, &roots)?;
    let ctr = match &rc.bundle {
        Some(b) if b.join("config.json").exists() => load_container(&rc.id, b, None)?,
        _ => {
            tracing::warn!(state = %rc.state_file.display(), "no bundle config.json: using the runtime state's mounts, without annotations");
            Container {
                id: rc.id.clone(),
                mounts: rc.state_mounts.clone(),
                annotations: Annotations {
                    checkpoint: true,
                    ..Annotations::default()
                },
                pod_namespace: None,
                pod_name: None,
            }
        }
    };
    Ok(CriuTarget { container: rc, ctr })
}

/// CRIU's post-dump: the container's tasks are frozen; snapshot its pinned maps and write the
/// manifest into the image directory. Every other action returns at once.
pub fn criu_post_dump(env: &CriuEnv, target: &CriuTarget, cfg: &NodeConfig) -> Result<String> {
    let image_dir = env
        .image_dir
        .as_deref()
        .ok_or_else(|| HookError::Other("CRTOOLS_IMAGE_DIR is not set".into()))?;
    if CheckpointManifest::read(image_dir)?.is_some() {
        return Ok(
            "the manifest is already in the image directory (CRIU runs each action \
                   script twice under runc)"
                .into(),
        );
    }
    let ctr = &target.ctr;
    if !ctr.annotations.checkpoint {
        return Ok("the container opted out (mapsnap.io/checkpoint-maps=false)".into());
    }
    if ctr.mounts.bpf().next().is_none() {
        return Ok("the container has no bpffs mount: no pinned maps to save".into());
    }
    let request = Request::read(&cfg.hook.request_dir, &ctr.id, jiff::Timestamp::now())?;
    let (dest, overwrite, snapshot_field) = if let Some(r) = &request {
        // docs/API.md: a retried kubelet checkpoint reuses the request, so the snapshot of an
        // earlier attempt is replaced.
        let res = location::from_request(&r.snapshot, &cfg.hook)?;
        let field = res.as_location();
        (res, true, field)
    } else if let Some(to) = &ctr.annotations.checkpoint_to {
        let res = location::from_annotation(
            to,
            &ctr.mounts,
            &cfg.hook,
            crate::annotations::CHECKPOINT_TO,
        )?;
        if let Resolved::Local(_) = res {
            return Err(HookError::refused(
                format!("{} {to}", crate::annotations::CHECKPOINT_TO),
                "a checkpoint's maps go to object storage or into the image directory (a \
                 container volume does not travel with the checkpoint)",
            ));
        }
        let field = res.as_location();
        (res, true, field)
    } else {
        (
            Resolved::Local(image_dir.join(IMAGE_SNAPSHOT)),
            true,
            format!("{IMAGE_PREFIX}{IMAGE_SNAPSHOT}"),
        )
    };
    let w = take_snapshot(ctr, &dest, overwrite, "checkpoint post-dump", cfg)?;
    let m = CheckpointManifest {
        version: MANIFEST_VERSION,
        container_id: ctr.id.clone(),
        created: jiff::Timestamp::now().to_string(),
        snapshot: snapshot_field,
        sha256: w.sha256.clone(),
        size: w.size,
        maps: w
            .report
            .maps
            .iter()
            .filter(|m| !m.inner)
            .map(|m| PinnedMap {
                name: m.name.clone(),
                pin_path: m.pin_path.clone(),
                map_type: m.map_type.to_string(),
                entries: m.entries,
            })
            .collect(),
        checkpoint: request.map(|r| r.checkpoint).filter(|c| !c.is_empty()),
    };
    m.write(image_dir)?;
    Ok(format!(
        "saved {} pinned maps of container {} to {} ({} bytes, sha256 {}); manifest {}",
        m.maps.len(),
        ctr.id,
        w.location,
        w.size,
        w.sha256,
        CheckpointManifest::path(image_dir).display()
    ))
}
