//! The hook's flows: OCI stages (restore before the process runs, wait-and-fill after it
//! started, snapshot at stop) and CRIU's post-dump action (snapshot at the frozen instant).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use mapsnap::anchor::{Anchor, RelPath};
use mapsnap::convert::RestoreConversion;
use oci_spec::runtime::Spec;

use crate::annotations::{Annotations, Existing, Policy, RestoreMode};
use crate::config::{CheckpointRead, NodeConfig};
use crate::container::{self, RuntimeContainer};
use crate::error::{HookError, Result};
use crate::finish::{self, FinishJob};
use crate::location::{self, IMAGE_PREFIX, Resolved, Tenant};
use crate::manifest::{
    self, CheckpointManifest, FinishedLater, IMAGE_SNAPSHOT, MANIFEST_VERSION, PinnedMap, Request,
};
use crate::mounts::ContainerMounts;
use crate::seal::NodeTrust;
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
    pub container_name: Option<String>,
}

impl Container {
    pub fn tenant(&self) -> Tenant {
        Tenant {
            namespace: self.pod_namespace.clone(),
            pod: self.pod_name.clone(),
            container: self.container_name.clone(),
        }
    }

    /// The tenant prefix a location chosen by this container resolves below (None: not
    /// scoped). Paths in the container's own volumes need none.
    pub fn scope(&self, location: &str, cfg: &NodeConfig) -> Result<Option<Vec<String>>> {
        if location.starts_with('/') || location.starts_with("file://") {
            return Ok(None);
        }
        self.tenant().prefix(&cfg.hook)
    }
}

/// The largest config.json read.
pub const MAX_SPEC_SIZE: u64 = 4 << 20;

/// The pod identity keys: CRI-O / Podman style first, then containerd's.
const NAMESPACE_KEYS: &[&str] = &[
    "io.kubernetes.pod.namespace",
    "io.kubernetes.cri.sandbox-namespace",
];
const POD_KEYS: &[&str] = &["io.kubernetes.pod.name", "io.kubernetes.cri.sandbox-name"];
const CONTAINER_KEYS: &[&str] = &[
    "io.kubernetes.container.name",
    "io.kubernetes.cri.container-name",
];

/// One pod identity value: every key that is present must agree (a pod annotation that
/// tries to pass for the runtime's own key is refused, not believed).
fn identity(all: &BTreeMap<String, String>, keys: &[&str]) -> Result<Option<String>> {
    let mut found: Option<&String> = None;
    for k in keys {
        if let Some(v) = all.get(*k) {
            match found {
                Some(f) if f != v => {
                    return Err(HookError::refused(
                        format!("annotation {k}"),
                        format!("it disagrees with {}", keys[0]),
                    ));
                }
                _ => found = Some(v),
            }
        }
    }
    Ok(found.cloned())
}

/// Reads the bundle's config.json (bounded; a FIFO or device is refused without blocking);
/// annotations from `state` win over the spec's.
pub fn load_container(
    id: &str,
    bundle: &Path,
    state_annotations: Option<&BTreeMap<String, String>>,
) -> Result<Container> {
    let path = bundle.join("config.json");
    let spec_err = |msg: String| HookError::Spec {
        path: path.clone(),
        msg,
    };
    let dir =
        Anchor::open_trusted(bundle, "the bundle").map_err(|e| spec_err(e.source.to_string()))?;
    let rel = RelPath::parse("config.json").map_err(|e| spec_err(e.to_string()))?;
    let bytes = dir
        .read_file(&rel, MAX_SPEC_SIZE)
        .map_err(|e| spec_err(format!("{} {}", e.op, e.source)))?;
    let spec: Spec = serde_json::from_slice(&bytes).map_err(|e| spec_err(e.to_string()))?;
    let mut all: BTreeMap<String, String> = spec
        .annotations()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    if let Some(s) = state_annotations {
        all.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let annotations = Annotations::parse(&all)?;
    if !annotations.unknown.is_empty() {
        let shown: Vec<String> = annotations
            .unknown
            .iter()
            .take(8)
            .map(|k| crate::location::truncate(k, 64))
            .collect();
        tracing::warn!(
            annotations = shown.join(", "),
            count = annotations.unknown.len(),
            "unknown mapsnap.io/ annotations, ignored (known: {})",
            crate::annotations::KNOWN.join(", ")
        );
    }
    Ok(Container {
        id: id.to_string(),
        mounts: ContainerMounts::from_spec(&spec),
        annotations,
        pod_namespace: identity(&all, NAMESPACE_KEYS)?,
        pod_name: identity(&all, POD_KEYS)?,
        container_name: identity(&all, CONTAINER_KEYS)?,
    })
}

/// The policy that applies: the container's, else the node's.
pub fn policy_of(annotations: Option<&Annotations>, cfg: &NodeConfig) -> Policy {
    annotations
        .and_then(|a| a.policy)
        .unwrap_or(cfg.hook.policy)
}

/// Resolves `restore-from` for `ctr`: a location the node agent's request names is taken as
/// the operator decided it; anything else stays below the pod's tenant prefix.
fn restore_source(ctr: &Container, from: &str, cfg: &NodeConfig) -> Result<Source> {
    let backed = check_restore_request(ctr, Some(from), cfg)?;
    let scope = if backed { None } else { ctr.scope(from, cfg)? };
    let res = location::from_annotation(
        from,
        &ctr.mounts,
        &cfg.hook,
        crate::annotations::RESTORE_FROM,
        scope.as_deref(),
        false,
    )?;
    Source::open(&res, &cfg.storage, None, &NodeTrust::load(&cfg.hook.trust)?)
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
                let dir = Arc::new(Anchor::open_trusted(
                    &image_dir,
                    "the CRIU image directory",
                )?);
                if let Some(m) = CheckpointManifest::read_at(&dir)? {
                    if let Some(from) = newer_than_manifest(ctr, &m, cfg) {
                        tracing::info!(
                            snapshot = crate::location::truncate(from, 256),
                            "restoring the pins from the snapshot the operator chose over the \
                             checkpoint's (taken when the source stopped)"
                        );
                        let src = restore_source(ctr, from, cfg)?;
                        return restore_pinned(&src, state, ctr, cfg, Existing::Keep);
                    }
                    return restore_from_manifest(&m, &dir, state, ctr, cfg, deadline);
                }
                tracing::info!("restoring a checkpoint without a mapsnap-hook manifest");
            }
            match (&ctr.annotations.restore_from, ctr.annotations.restore_mode) {
                (Some(from), RestoreMode::Pin) => {
                    let src = restore_source(ctr, from, cfg)?;
                    restore_pinned(&src, state, ctr, cfg, Existing::Fail)
                }
                _ => Ok("nothing to restore".into()),
            }
        }
        Stage::Poststart => match (&ctr.annotations.restore_from, ctr.annotations.restore_mode) {
            (Some(from), RestoreMode::Wait) => {
                let src = restore_source(ctr, from, cfg)?;
                let wait_until = deadline.min(Instant::now() + cfg.hook.wait_timeout);
                let maps = snapshot::fill_pins(
                    &src,
                    &ctr.mounts,
                    ctr.annotations.fill_mode,
                    wait_until,
                    rebase_options(&ctr.annotations)?,
                )?;
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
            // Both run even when one fails; the first error is returned (and logged).
            let requested = stop_snapshot(ctr, cfg).transpose();
            let annotated = ctr
                .annotations
                .snapshot_on_stop
                .then(|| annotated_stop_snapshot(state, ctr, cfg));
            let results: Vec<Result<String>> =
                [requested, annotated].into_iter().flatten().collect();
            if results.is_empty() {
                return Ok("no snapshot asked at stop".into());
            }
            let mut done = Vec::new();
            for r in results {
                done.push(r?);
            }
            Ok(done.join("; "))
        }
        Stage::CreateContainer | Stage::StartContainer => Ok(format!(
            "nothing to do at {stage} (it runs inside the container)"
        )),
    }
}

/// Leaf name of the stop snapshot, beside the checkpoint's snapshot (docs/API.md).
pub const STOP_SNAPSHOT: &str = "maps-stop.mapsnap";

/// `mapsnap.io/snapshot-on-stop`: the pins to the annotated (or default) location.
fn annotated_stop_snapshot(state: &HookState, ctr: &Container, cfg: &NodeConfig) -> Result<String> {
    let default = format!("stop/{}.mapsnap", state.id);
    let to = ctr.annotations.snapshot_to.as_deref().unwrap_or(&default);
    let scope = ctr.scope(to, cfg)?;
    let dest = location::from_annotation(
        to,
        &ctr.mounts,
        &cfg.hook,
        crate::annotations::SNAPSHOT_TO,
        scope.as_deref(),
        true,
    )?;
    let w = take_snapshot(ctr, &dest, true, "poststop", cfg, stopped_mode(cfg))?;
    Ok(format!(
        "saved {} pinned maps to {} ({} bytes, sha256 {})",
        top_count(&w),
        w.location,
        w.size,
        w.sha256
    ))
}

/// Checks the stop location of a request: exactly [`STOP_SNAPSHOT`] beside the request's
/// snapshot, below `<namespace>/<name>/<uid>/` of the request's checkpoint object, whose
/// namespace is the container's own (when it names a pod). The agent checked the snapshot
/// against the object's storage prefix; this keeps the stop snapshot in the same place.
pub fn check_stop_location(r: &Request, stop: &str, pod_namespace: Option<&str>) -> Result<()> {
    let refuse = |why: String| {
        HookError::refused(
            format!(
                "request stopSnapshot {}",
                crate::location::truncate(stop, 256)
            ),
            why,
        )
    };
    let beside = r
        .snapshot
        .rsplit_once('/')
        .map(|(dir, _)| format!("{dir}/{STOP_SNAPSHOT}"));
    if beside.as_deref() != Some(stop) {
        return Err(refuse(format!(
            "it is not {STOP_SNAPSHOT} beside the request's snapshot"
        )));
    }
    let Some((ns, name)) = r.checkpoint.split_once('/') else {
        return Err(refuse(
            "the request names no <namespace>/<name> checkpoint".into(),
        ));
    };
    let parts: Vec<&str> = stop.rsplit('/').take(4).collect();
    if parts.len() != 4 || parts[3] != ns || parts[2] != name || parts[1].is_empty() {
        return Err(refuse(format!(
            "it is not below {ns}/{name}/<uid>/ of the request's checkpoint"
        )));
    }
    if let Some(pod_ns) = pod_namespace.filter(|p| *p != ns) {
        return Err(refuse(format!(
            "the checkpoint is in namespace {ns}, the container in {pod_ns}"
        )));
    }
    Ok(())
}

/// The node agent asked for the pins when this container stops (a Migrate that stops the
/// source after its checkpoint): writes them to the request's `stopSnapshot`, never over an
/// existing object (the first stop wins; a leftover is the agent's to remove), with the
/// storage manifest beside it, which is what the agent waits for. None: not asked.
fn stop_snapshot(ctr: &Container, cfg: &NodeConfig) -> Result<Option<String>> {
    let Some(r) = Request::read(&cfg.hook.request_dir, &ctr.id, jiff::Timestamp::now())? else {
        return Ok(None);
    };
    let Some(stop) = r.stop_snapshot.clone().filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    check_stop_location(&r, &stop, ctr.pod_namespace.as_deref())?;
    if !ctr.annotations.checkpoint {
        return Ok(Some(
            "stop snapshot asked, but the container opted out (mapsnap.io/checkpoint-maps=false)"
                .into(),
        ));
    }
    if ctr.mounts.bpf().next().is_none() {
        return Ok(Some(
            "stop snapshot asked, but the container has no bpffs mount".into(),
        ));
    }
    let dest = location::from_request(&stop, &cfg.hook, true)?;
    let w = take_snapshot(
        ctr,
        &dest,
        false,
        "poststop, stop snapshot",
        cfg,
        stopped_mode(cfg),
    )?;
    Ok(Some(format!(
        "saved {} pinned maps at stop to {} ({} bytes, sha256 {}) for checkpoint {}",
        top_count(&w),
        w.location,
        w.size,
        w.sha256,
        r.checkpoint
    )))
}

/// At a restore from an archive whose manifest names the checkpoint's snapshot: the pod's
/// `restore-from` when it names another snapshot and the node agent's restore request for the
/// pod names exactly that one (the operator chose a newer state, taken when the source
/// stopped). An annotation alone never overrides the manifest.
fn newer_than_manifest<'a>(
    ctr: &'a Container,
    m: &CheckpointManifest,
    cfg: &NodeConfig,
) -> Option<&'a str> {
    let from = ctr.annotations.restore_from.as_deref()?;
    if ctr.annotations.restore_mode != RestoreMode::Pin || from == m.snapshot {
        return None;
    }
    let (Some(ns), Some(pod)) = (&ctr.pod_namespace, &ctr.pod_name) else {
        return None;
    };
    match manifest::RestoreRequest::read(
        &cfg.hook.restore_request_dir,
        ns,
        pod,
        jiff::Timestamp::now(),
    ) {
        Ok(Some(r)) if r.snapshot == from => Some(from),
        _ => None,
    }
}

/// With `[hook] require_restore_request` (the default when the operator manages the node), a
/// restore counts only when the node agent wrote a restore request for the pod naming this
/// snapshot (`want`; None: any request for the pod): anyone who can create pods can set
/// annotations, only the operator makes the agent write requests. Returns whether a matching
/// request backs the location.
fn check_restore_request(ctr: &Container, want: Option<&str>, cfg: &NodeConfig) -> Result<bool> {
    let what = match want {
        Some(w) => format!(
            "{} {}",
            crate::annotations::RESTORE_FROM,
            crate::location::truncate(w, 256)
        ),
        None => "restore of the checkpoint's maps".to_string(),
    };
    let (ns, pod) = match (&ctr.pod_namespace, &ctr.pod_name) {
        (Some(n), Some(p)) => (n.as_str(), p.as_str()),
        _ if !cfg.hook.require_restore_request => return Ok(false),
        _ => {
            return Err(HookError::refused(
                what,
                "this node requires a restore request and the container names no pod \
                 (io.kubernetes.pod.namespace / io.kubernetes.pod.name)",
            ));
        }
    };
    let req = match manifest::RestoreRequest::read(
        &cfg.hook.restore_request_dir,
        ns,
        pod,
        jiff::Timestamp::now(),
    ) {
        Ok(r) => r,
        Err(e) if cfg.hook.require_restore_request => return Err(e),
        Err(_) => None,
    };
    let matches = |r: &manifest::RestoreRequest| want.is_none_or(|w| r.snapshot == w);
    match req {
        Some(r) if matches(&r) => Ok(true),
        _ if !cfg.hook.require_restore_request => Ok(false),
        Some(_) => Err(HookError::refused(
            what,
            format!("the node agent's restore request for {ns}/{pod} names another snapshot"),
        )),
        None => Err(HookError::refused(
            what,
            format!("no (unexpired) restore request for pod {ns}/{pod} on this node"),
        )),
    }
}

/// A stopped container's pins: as many readers as inside a freeze, synced.
fn stopped_mode(cfg: &NodeConfig) -> snapshot::WriteMode {
    snapshot::WriteMode {
        threads: cfg.hook.checkpoint_readers,
        sync: true,
    }
}

fn top_count(w: &snapshot::Written) -> usize {
    w.report.maps.iter().filter(|m| !m.inner).count()
}

/// What a snapshot of `ctr`'s pins records as its source.
fn pins_source(ctr: &Container, why: &str) -> String {
    format!(
        "container:{} ({why}; bpffs mounts {})",
        ctr.id,
        ctr.mounts.bpf_destinations()
    )
}

fn take_snapshot(
    ctr: &Container,
    dest: &Resolved,
    overwrite: bool,
    why: &str,
    cfg: &NodeConfig,
    mode: snapshot::WriteMode,
) -> Result<snapshot::Written> {
    let (maps, _links) = snapshot::collect_pins(&ctr.mounts, &ctr.annotations.maps)?;
    let source = pins_source(ctr, why);
    let trust = NodeTrust::load(&cfg.hook.trust)?;
    let w = snapshot::write_snapshot(
        &maps,
        dest,
        overwrite,
        &source,
        &ctr.id,
        &cfg.storage,
        mode,
        &trust,
    )?;
    if let Some(k) = &w.signer {
        tracing::info!(key_id = k, encrypted = w.encrypted, "signed");
    }
    for m in w.report.maps.iter().filter(|m| !m.inner).take(64) {
        tracing::info!(
            map = m.name,
            pin = m.pin_path.as_deref().unwrap_or(""),
            entries = m.entries,
            "saved"
        );
    }
    Ok(w)
}

/// The restore's rebasing from `mapsnap.io/rebase` and `mapsnap.io/rebase-mode`: members the
/// pod names and those its BTF tags (`mapsnap:clock=...`) move to this host's clocks. None
/// (entries restored byte for byte) when the pod asks for neither.
pub fn rebase_options(a: &Annotations) -> Result<Option<RestoreConversion>> {
    if a.rebase.is_empty() && a.rebase_mode.is_none() {
        return Ok(None);
    }
    let mut conv = RestoreConversion::default();
    for r in &a.rebase {
        conv.add_rebase(&r.to_string())
            .map_err(|e| HookError::Annotation {
                key: crate::annotations::REBASE.into(),
                msg: e.to_string(),
            })?;
    }
    if let Some(m) = a.rebase_mode {
        conv.mode = m;
    }
    Ok(Some(conv))
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
    let out = snapshot::restore_pins(
        src,
        &ctr.mounts,
        existing,
        &cfg.hook.state_dir,
        rebase_options(&ctr.annotations)?,
    )?;
    if let Err(e) =
        manifest::write_marker(&cfg.hook.state_dir, &state.id, state.pid(), &summary_sha)
    {
        tracing::warn!(error = %e, "cannot write the restore marker");
    }
    Ok(match out {
        PinOutcome::Restored(maps) => {
            for m in maps.iter().take(64) {
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
    image_dir: &Arc<Anchor>,
    state: &HookState,
    ctr: &Container,
    cfg: &NodeConfig,
    deadline: Instant,
) -> Result<String> {
    tracing::info!(
        snapshot = crate::location::truncate(&m.snapshot, 256),
        maps = m.maps.len(),
        "restoring the pinned maps of the checkpoint"
    );
    // The archive came from elsewhere: the restore request (when required) must be there,
    // and a location outside the image directory must be the one it names, or be below the
    // pod's tenant prefix.
    let in_image = m.snapshot.starts_with(IMAGE_PREFIX);
    let backed = check_restore_request(ctr, (!in_image).then_some(m.snapshot.as_str()), cfg)?;
    let scope = if backed || in_image {
        None
    } else {
        ctr.tenant().prefix(&cfg.hook)?
    };
    let res = location::from_manifest(&m.snapshot, image_dir, &cfg.hook, scope.as_deref())?;
    let recorded = m.sha256_bytes().map(|s| (s, m.size));
    let no_sha = || {
        HookError::refused(
            "the checkpoint manifest".to_string(),
            "it carries no valid sha256 of the snapshot",
        )
    };
    let expect = match &m.finished_later {
        // Finished by a detached process after the freeze: wait until it is complete.
        Some(later) => {
            if later.read != "after" && recorded.is_none() {
                return Err(no_sha());
            }
            let until = deadline.min(Instant::now() + cfg.hook.wait_timeout);
            finish::wait_finished(&res, later, recorded, &cfg.storage, until)?
        }
        None => recorded.ok_or_else(no_sha)?,
    };
    let src = Source::open(
        &res,
        &cfg.storage,
        Some(expect),
        &NodeTrust::load(&cfg.hook.trust)?,
    )?;
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
            tracing::warn!(
                "no bundle config.json: using the runtime state's mounts, without annotations"
            );
            Container {
                id: rc.id.clone(),
                mounts: rc.state_mounts.clone(),
                annotations: Annotations {
                    checkpoint: true,
                    ..Annotations::default()
                },
                pod_namespace: None,
                pod_name: None,
                container_name: None,
            }
        }
    };
    Ok(CriuTarget { container: rc, ctr })
}

/// Left in the image directory by a post-dump that finished for a container that opted in
/// (nothing is written for the others): the installed action wrapper
/// ends a later post-dump of the same dump in the shell (see [`crate::install::criu_wrapper_text`]).
pub const POST_DUMP_MARKER: &str = "mapsnap-post-dump.done";

/// Marks this dump's post-dump done (a fresh file, so its mtime follows `pstree.img`). Only
/// saves the second run's start: a failure is logged, not returned.
pub fn mark_post_dump_done(env: &CriuEnv) {
    let Some(path) = env.image_dir.as_deref() else {
        return;
    };
    let r = Anchor::open_trusted(path, "the CRIU image directory").and_then(|dir| {
        dir.unlink(POST_DUMP_MARKER)?;
        dir.create_file(POST_DUMP_MARKER, 0o600).map(drop)
    });
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not mark post-dump done in the image directory");
    }
}

/// Whether the image directory already holds the manifest of the dump running now (same
/// init pid, start time and `pstree.img`): the second run of post-dump has nothing to do.
pub fn post_dump_done(env: &CriuEnv) -> bool {
    let (Some(pid), Some(path)) = (env.init_pid, env.image_dir.as_deref()) else {
        return false;
    };
    let Ok(dir) = Anchor::open_trusted(path, "the CRIU image directory") else {
        return false;
    };
    let Some(stamp) = manifest::DumpStamp::current(pid, &dir) else {
        return false;
    };
    matches!(CheckpointManifest::read_at(&dir), Ok(Some(m)) if m.dump.as_ref() == Some(&stamp))
}

/// Whether post-dump acts on this container: it carries a `mapsnap.io/` annotation or the
/// node agent asked for this checkpoint, and it did not opt out. Everything else is left
/// alone, so a checkpoint of a container that never asked for mapsnap is never failed by it.
pub fn opted_in(ctr: &Container, request: Option<&Request>) -> bool {
    (ctr.annotations.any || request.is_some()) && ctr.annotations.checkpoint
}

/// CRIU's post-dump: the container's tasks are frozen; snapshot its pinned maps and write the
/// manifest into the image directory. Every other action returns at once.
pub fn criu_post_dump(env: &CriuEnv, target: &CriuTarget, cfg: &NodeConfig) -> Result<String> {
    let image_path = env
        .image_dir
        .as_deref()
        .ok_or_else(|| HookError::Other("CRTOOLS_IMAGE_DIR is not set".into()))?;
    let dir = Arc::new(Anchor::open_trusted(
        image_path,
        "the CRIU image directory",
    )?);
    let ctr = &target.ctr;
    let request = match Request::read(&cfg.hook.request_dir, &ctr.id, jiff::Timestamp::now()) {
        Ok(r) => r,
        Err(e) if !ctr.annotations.any => {
            tracing::warn!(error = %e, "ignoring an unreadable request for a container without mapsnap.io/ annotations");
            None
        }
        Err(e) => return Err(e),
    };
    let stamp = env
        .init_pid
        .and_then(|p| manifest::DumpStamp::current(p, &dir));
    let existing = CheckpointManifest::read_at(&dir);
    if !opted_in(ctr, request.as_ref()) {
        // A manifest here is another checkpoint's (a reused directory): this one carries no
        // maps, so it must not seem to.
        if !matches!(existing, Ok(None)) {
            let m = existing.as_ref().ok().and_then(Option::as_ref);
            if let Err(e) = CheckpointManifest::remove_at(&dir, m) {
                tracing::warn!(error = %e, "cannot remove a stale manifest from the image directory");
            }
        }
        return Ok(if ctr.annotations.any {
            "the container opted out (mapsnap.io/checkpoint-maps=false)".into()
        } else {
            "the container has no mapsnap.io/ annotation and no request: not touched".into()
        });
    }
    match existing {
        Ok(Some(m)) if m.container_id == ctr.id && stamp.is_some() && m.dump == stamp => {
            return Ok(
                "the manifest of this dump is already in the image directory (CRIU runs each \
                 action script twice under runc)"
                    .into(),
            );
        }
        Ok(None) => {}
        Ok(Some(m)) => {
            tracing::warn!(
                "a stale manifest of another dump is in the image directory: replacing it"
            );
            CheckpointManifest::remove_at(&dir, Some(&m))?;
        }
        Err(e) => {
            tracing::warn!(error = %e, "an unreadable manifest is in the image directory: replacing it");
            CheckpointManifest::remove_at(&dir, None)?;
        }
    }
    if ctr.mounts.bpf().next().is_none() {
        return Ok("the container has no bpffs mount: no pinned maps to save".into());
    }
    let image_dest = || -> Result<(Resolved, String)> {
        let rel = RelPath::parse(IMAGE_SNAPSHOT).map_err(|e| HookError::Other(e.to_string()))?;
        let shown = format!("{IMAGE_PREFIX}{IMAGE_SNAPSHOT}");
        Ok((
            Resolved::File {
                dir: dir.clone(),
                rel,
                shown: shown.clone(),
            },
            shown,
        ))
    };
    // The destination, its name in the manifest, and (outside the image directory) the text
    // a detached finisher resolves again.
    let (dest, snapshot_field, later_dest) = if let Some(r) = &request {
        // docs/API.md: a retried kubelet checkpoint reuses the request, so the snapshot of an
        // earlier attempt is replaced.
        let res = location::from_request(&r.snapshot, &cfg.hook, true)?;
        let field = res.as_location();
        (res, field, Some(r.snapshot.clone()))
    } else if let Some(to) = &ctr.annotations.checkpoint_to {
        if cfg.hook.require_checkpoint_request {
            tracing::warn!(
                "mapsnap.io/checkpoint-to counts only with the node agent's request on this \
                 node ([hook] require_checkpoint_request): saving into the image directory"
            );
            let (res, field) = image_dest()?;
            (res, field, None)
        } else {
            let scope = ctr.scope(to, cfg)?;
            let res = location::from_annotation(
                to,
                &ctr.mounts,
                &cfg.hook,
                crate::annotations::CHECKPOINT_TO,
                scope.as_deref(),
                true,
            )?;
            if let Resolved::File { .. } = res {
                return Err(HookError::refused(
                    format!(
                        "{} {}",
                        crate::annotations::CHECKPOINT_TO,
                        crate::location::truncate(to, 256)
                    ),
                    "a checkpoint's maps go to object storage or into the image directory (a \
                     container volume does not travel with the checkpoint)",
                ));
            }
            let field = res.as_location();
            (res, field.clone(), Some(field))
        }
    } else {
        let (res, field) = image_dest()?;
        (res, field, None)
    };
    let frozen = snapshot::WriteMode {
        threads: cfg.hook.checkpoint_readers,
        sync: false,
    };
    let base = CheckpointManifest {
        version: MANIFEST_VERSION,
        container_id: ctr.id.clone(),
        created: jiff::Timestamp::now().to_string(),
        snapshot: snapshot_field,
        sha256: String::new(),
        size: 0,
        maps: Vec::new(),
        checkpoint: request.map(|r| r.checkpoint).filter(|c| !c.is_empty()),
        dump: stamp,
        finished_later: None,
        signer: None,
        encrypted: false,
    };
    let Some(later_dest) = later_dest else {
        if cfg.hook.checkpoint_read == CheckpointRead::After {
            tracing::warn!(
                "[hook] checkpoint_read = \"after\" needs a snapshot location outside the image \
                 directory (the runtime archives it as soon as CRIU exits): reading inside the \
                 freeze"
            );
        }
        let w = take_snapshot(ctr, &dest, true, "checkpoint post-dump", cfg, frozen)?;
        let m = CheckpointManifest {
            sha256: w.sha256.clone(),
            size: w.size,
            maps: pinned_maps(&w),
            signer: w.signer.clone(),
            encrypted: w.encrypted,
            ..base
        };
        m.write_at(&dir)?;
        return Ok(format!(
            "saved {} pinned maps of container {} to {} ({} bytes, sha256 {}); manifest \
             written into the image directory",
            m.maps.len(),
            ctr.id,
            w.location,
            w.size,
            w.sha256,
        ));
    };
    let nonce = manifest::new_nonce()?;
    let why = format!("checkpoint post-dump; {}", manifest::nonce_marker(&nonce));
    let later = |read: &str| {
        Some(FinishedLater {
            read: read.into(),
            nonce: nonce.clone(),
        })
    };
    match cfg.hook.checkpoint_read {
        CheckpointRead::Frozen => {
            // Read inside the freeze into a local spool; the copy (or upload) to the
            // destination runs after CRIU released the tasks.
            let spool_dir = Arc::new(finish::spool_dir(cfg)?);
            let name = finish::spool_name(&nonce);
            let spool = Resolved::File {
                dir: spool_dir.clone(),
                rel: RelPath::parse(&name).map_err(|e| HookError::Other(e.to_string()))?,
                shown: name.clone(),
            };
            match finish::sweep_spool(&spool_dir, finish::SPOOL_ORPHAN_AGE) {
                Ok(gone) if !gone.is_empty() => {
                    tracing::info!(removed = ?gone, "removed spools whose finisher died")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("could not sweep the spool directory: {e}"),
            }
            let w = take_snapshot(ctr, &spool, false, &why, cfg, frozen)?;
            let locked = match finish::lock_spool(&spool_dir, &name) {
                Ok(f) => f,
                Err(e) => {
                    let _ = spool_dir.unlink(&name);
                    return Err(e);
                }
            };
            let job = FinishJob {
                container_id: ctr.id.clone(),
                dest: later_dest,
                spool: Some(finish::SpoolFile {
                    fd: locked.as_raw_fd(),
                    name: name.clone(),
                }),
                maps: Vec::new(),
                source: String::new(),
                wait_pid: finish::criu_pid(),
            };
            let pid = match finish::spawn(&job, &[locked.as_raw_fd()], cfg.file.as_deref()) {
                Ok(p) => p,
                Err(e) => {
                    let _ = spool_dir.unlink(&name);
                    return Err(e);
                }
            };
            let m = CheckpointManifest {
                sha256: w.sha256.clone(),
                size: w.size,
                maps: pinned_maps(&w),
                finished_later: later("frozen"),
                ..base
            };
            m.write_at(&dir)?;
            Ok(format!(
                "read {} pinned maps of container {} inside the freeze ({} bytes, sha256 {}); \
                 process {pid} copies them to {} after the freeze; manifest written into the \
                 image directory",
                m.maps.len(),
                ctr.id,
                w.size,
                w.sha256,
                m.snapshot,
            ))
        }
        CheckpointRead::After => {
            // Only open the maps here; a detached process reads them once the tasks run again.
            let (maps, _links) = snapshot::collect_pins(&ctr.mounts, &ctr.annotations.maps)?;
            let job = FinishJob {
                container_id: ctr.id.clone(),
                dest: later_dest,
                spool: None,
                maps: maps
                    .iter()
                    .map(|f| finish::JobMap {
                        fd: f.map.fd().as_raw_fd(),
                        id: f.info.id,
                        pin: f.pin_rel.clone(),
                    })
                    .collect(),
                source: pins_source(ctr, &why),
                wait_pid: finish::criu_pid(),
            };
            let fds: Vec<_> = job.maps.iter().map(|m| m.fd).collect();
            let pid = finish::spawn(&job, &fds, cfg.file.as_deref())?;
            let m = CheckpointManifest {
                maps: maps
                    .iter()
                    .map(|f| PinnedMap {
                        name: f.info.name.clone(),
                        pin_path: f.pin_rel.clone(),
                        map_type: mapsnap::model::type_name(f.info.map_type).to_string(),
                        entries: 0,
                    })
                    .collect(),
                finished_later: later("after"),
                ..base
            };
            m.write_at(&dir)?;
            Ok(format!(
                "handed {} pinned maps of container {} to process {pid}, which reads them into \
                 {} after the freeze; manifest written into the image directory",
                m.maps.len(),
                ctr.id,
                m.snapshot,
            ))
        }
    }
}

fn pinned_maps(w: &snapshot::Written) -> Vec<PinnedMap> {
    w.report
        .maps
        .iter()
        .filter(|m| !m.inner)
        .map(|m| PinnedMap {
            name: m.name.clone(),
            pin_path: m.pin_path.clone(),
            map_type: m.map_type.to_string(),
            entries: m.entries,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(checkpoint: &str, snapshot: &str) -> Request {
        Request {
            checkpoint: checkpoint.into(),
            snapshot: snapshot.into(),
            stop_snapshot: None,
            created: None,
            expires: None,
        }
    }

    #[test]
    fn stop_location_stays_beside_the_snapshot_of_the_requests_object() {
        let r = request("edge/mig", "s3://b/p/edge/mig/u1/maps.mapsnap");
        let ok = "s3://b/p/edge/mig/u1/maps-stop.mapsnap";
        assert!(check_stop_location(&r, ok, Some("edge")).is_ok());
        assert!(check_stop_location(&r, ok, None).is_ok());
        for bad in [
            "s3://b/p/edge/mig/u1/maps.mapsnap",
            "s3://b/p/edge/mig/u2/maps-stop.mapsnap",
            "s3://b/p/other/mig/u1/maps-stop.mapsnap",
            "s3://b/p/edge/mig/u1/x/maps-stop.mapsnap",
        ] {
            assert!(check_stop_location(&r, bad, Some("edge")).is_err(), "{bad}");
        }
        // Another tenant's container, or an object whose location is not its own.
        assert!(check_stop_location(&r, ok, Some("other")).is_err());
        let moved = request("edge/mig", "s3://b/p/other/x/u1/maps.mapsnap");
        assert!(
            check_stop_location(&moved, "s3://b/p/other/x/u1/maps-stop.mapsnap", None).is_err()
        );
        let unnamed = request("", "s3://b/p/edge/mig/u1/maps.mapsnap");
        assert!(check_stop_location(&unnamed, ok, None).is_err());
    }
}
