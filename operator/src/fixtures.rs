//! Test fixtures: objects, a fixed clock, node directories, and a mock API server (a
//! `tower_test` service) that asserts each request the controller or the agent makes, in
//! order, and answers it like the API server would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

use crate::agent::{self, AgentContext};
use crate::config::Config;
use crate::controller::{self, Context};
use crate::crd::{
    Action as CrAction, AgentResult, BpfMapCheckpoint, BpfMapCheckpointSpec,
    BpfMapCheckpointStatus, CheckpointRef, FINALIZER, Source, SourcePodPolicy, Target,
};
use crate::fakekubelet::FakeKubelet;
use crate::http::Health;
use crate::kubelet::{DirectKubelet, KubeletTls};
use crate::layout;
use crate::node::{CheckpointImages, HookRequest, NodeAgent, NodeError, NodePaths, StorageBlobs};

/// The registry repository of the harness.
pub const REGISTRY_REPO: &str = "registry.test:5000/mapsnap/checkpoints";

/// Stands in for the registry in the controller's reconcile tests (the image build and push
/// are tested against a real registry with `crate::ckptimage`): the image's digest is the
/// archive's SHA-256, so a test can tell which archive was "pushed"; every call is recorded.
#[derive(Debug, Default)]
pub struct RecordingImages {
    pub pushed: Mutex<Vec<(String, String, String)>>,
    pub deleted: Mutex<Vec<String>>,
}

impl CheckpointImages for RecordingImages {
    fn repository(&self) -> &str {
        REGISTRY_REPO
    }

    fn build_and_push(
        &self,
        archive: std::fs::File,
        container: &str,
        tag: &str,
    ) -> Result<String, NodeError> {
        use sha2::Digest;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut { archive }, &mut bytes)
            .map_err(|e| NodeError::io("cannot read", std::path::Path::new(tag), e))?;
        let reference = format!(
            "{REGISTRY_REPO}@sha256:{}",
            hex::encode(sha2::Sha256::digest(&bytes))
        );
        self.pushed.lock().expect("lock").push((
            container.to_string(),
            tag.to_string(),
            reference.clone(),
        ));
        Ok(reference)
    }

    fn delete(&self, reference: &str) -> Result<(), NodeError> {
        self.deleted
            .lock()
            .expect("lock")
            .push(reference.to_string());
        Ok(())
    }
}

/// A fake kubelet served from its own runtime thread (the harness is built outside async).
pub struct KubeletThread {
    pub kubelet: FakeKubelet,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for KubeletThread {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl KubeletThread {
    pub fn start(node: &str, on: crate::fakekubelet::OnCheckpoint) -> Self {
        // Built on a thread of its own: the tests run inside a runtime, where another cannot
        // block.
        let node = node.to_string();
        let (rt, kubelet) = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let kubelet = rt.block_on(FakeKubelet::start(&node, on));
            (rt, kubelet)
        })
        .join()
        .expect("kubelet thread");
        Self {
            kubelet,
            runtime: Some(rt),
        }
    }
}

pub const NS: &str = "edge";
pub const POD: &str = "lb-0";
pub const CONTAINER: &str = "lb";
pub const NODE_A: &str = "node-a";
pub const NODE_B: &str = "node-b";
pub const OPERATOR_NS: &str = "mapsnap-system";
pub const CONTAINER_ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
pub const POD_UID: &str = "11111111-2222-3333-4444-555555555555";
pub const CR_UID: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

/// 2025-06-01T12:00:00Z.
pub fn t0() -> Timestamp {
    Timestamp::from_second(1_748_779_200).expect("valid time")
}

/// A clock the test moves.
#[derive(Clone)]
pub struct TestClock(pub Arc<Mutex<Timestamp>>);

impl TestClock {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(t0())))
    }

    pub fn advance(&self, d: Duration) {
        let mut t = self.0.lock().expect("clock");
        *t = t.saturating_add(d).expect("time in range");
    }

    pub fn clock(&self) -> controller::Clock {
        let c = self.0.clone();
        Arc::new(move || *c.lock().expect("clock"))
    }
}

/// A new object, as a user creates it (no finalizer, no status).
pub fn new_cr(name: &str, action: CrAction) -> BpfMapCheckpoint {
    let (source, target, policy) = match action {
        CrAction::Checkpoint => (
            Source {
                pod: Some(POD.into()),
                container: Some(CONTAINER.into()),
                checkpoint_ref: None,
            },
            None,
            None,
        ),
        CrAction::Migrate => (
            Source {
                pod: Some(POD.into()),
                container: None,
                checkpoint_ref: None,
            },
            Some(Target {
                node: NODE_B.into(),
                pod_name: None,
            }),
            Some(SourcePodPolicy::Delete),
        ),
        CrAction::Restore => (
            Source {
                pod: None,
                container: None,
                checkpoint_ref: Some(CheckpointRef {
                    name: "lb-ckpt".into(),
                }),
            },
            Some(Target {
                node: NODE_B.into(),
                pod_name: Some("lb-restored".into()),
            }),
            None,
        ),
    };
    let mut cr = BpfMapCheckpoint::new(
        name,
        BpfMapCheckpointSpec {
            action,
            source,
            target,
            source_pod_policy: policy,
            switchover: None,
            storage: None,
            retention_policy: Default::default(),
            checkpoint_timeout_seconds: None,
            rebase: None,
        },
    );
    cr.metadata.namespace = Some(NS.into());
    cr.metadata.uid = Some(CR_UID.into());
    cr.metadata.generation = Some(1);
    cr.metadata.resource_version = Some("100".into());
    cr
}

/// The same object once the controller added its finalizer.
pub fn with_finalizer(mut cr: BpfMapCheckpoint) -> BpfMapCheckpoint {
    cr.metadata.finalizers = Some(vec![FINALIZER.into()]);
    cr
}

/// The source pod `lb-0` on node-a, running (or pending).
pub fn source_pod(running: bool) -> Pod {
    let status = if running {
        json!({
            "phase": "Running",
            "containerStatuses": [{
                "name": CONTAINER, "image": "registry.example/lb:1", "imageID": "", "ready": true,
                "restartCount": 0, "containerID": format!("cri-o://{CONTAINER_ID}"),
                "state": {"running": {"startedAt": "2025-06-01T11:00:00Z"}}
            }]
        })
    } else {
        json!({"phase": "Pending"})
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": POD, "namespace": NS, "uid": POD_UID,
            "labels": {"app": "lb", "pod-template-hash": "7d9f"},
            "annotations": {
                "prometheus.io/scrape": "true",
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
                "k8s.v1.cni.cncf.io/network-status": "[]"
            },
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "lb-7d9f",
                                 "uid": "rs-uid", "controller": true}]
        },
        "spec": {
            "nodeName": NODE_A,
            "nodeSelector": {"kubernetes.io/hostname": NODE_A},
            "priority": 0,
            "preemptionPolicy": "PreemptLowerPriority",
            "overhead": {"cpu": "250m"},
            "hostname": "lb-0",
            "subdomain": "lb",
            "containers": [{"name": CONTAINER, "image": "registry.example/lb:1",
                            "volumeMounts": [
                                {"name": "bpf", "mountPath": "/sys/fs/bpf"},
                                {"name": "kube-api-access-x7k2p", "readOnly": true,
                                 "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}],
            "volumes": [
                {"name": "bpf", "hostPath": {"path": "/sys/fs/bpf/lb"}},
                {"name": "kube-api-access-x7k2p", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}]
        },
        "status": status
    }))
    .expect("pod fixture")
}

/// An agent's lease for `node`, renewed `age` before t0.
pub fn agent_lease(node: &str, age: Duration) -> Lease {
    let renewed = t0().checked_sub(age).expect("time in range");
    Lease {
        metadata: ObjectMeta {
            name: Some(layout::agent_lease_name(node)),
            namespace: Some(OPERATOR_NS.into()),
            annotations: Some(BTreeMap::from([(
                layout::LEASE_ANNOTATION_NODE.to_string(),
                node.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(format!("mapsnap-agent-{node}-xyz")),
            lease_duration_seconds: Some(30),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }),
    }
}

/// One node's directories, for the agent running "on" it.
#[derive(Clone)]
pub struct NodeDirs {
    pub paths: NodePaths,
}

impl NodeDirs {
    pub fn new(root: &Path, node: &str) -> Self {
        let base = root.join(node);
        let paths = NodePaths {
            requests: base.join("run/mapsnap/requests"),
            restores: base.join("run/mapsnap/restores"),
            checkpoints: base.join("var/lib/kubelet/checkpoints"),
        };
        for d in [&paths.requests, &paths.restores, &paths.checkpoints] {
            std::fs::create_dir_all(d).expect("node dir");
        }
        Self { paths }
    }

    /// What the kubelet does on a checkpoint call: writes the archive; returns its path.
    pub fn kubelet_writes_archive(&self, content: &[u8]) -> String {
        let p = self.paths.checkpoints.join(format!(
            "checkpoint-{POD}_{NS}-{CONTAINER}-2025-06-01T12:00:00Z.tar"
        ));
        std::fs::write(&p, content).expect("archive");
        p.display().to_string()
    }

    /// What mapsnap-hook does at CRIU's post-dump: reads the request file and writes the
    /// snapshot and its manifest where it says. Returns the request.
    pub fn hook_writes_snapshot(&self, container_id: &str, snapshot: &[u8]) -> HookRequest {
        let req = self.hook_request(container_id);
        write_snapshot(&req.snapshot, snapshot, container_id);
        req
    }

    /// What mapsnap-hook does at the container's poststop when the request names a stop
    /// snapshot: writes it, then its manifest (the agent waits for the manifest).
    pub fn hook_writes_stop_snapshot(&self, container_id: &str, snapshot: &[u8]) -> String {
        let req = self.hook_request(container_id);
        let stop = req
            .stop_snapshot
            .expect("the hook request names a stop snapshot");
        write_snapshot(&stop, snapshot, container_id);
        stop
    }

    fn hook_request(&self, container_id: &str) -> HookRequest {
        let req_path = self.paths.requests.join(format!("{container_id}.json"));
        serde_json::from_slice(
            &std::fs::read(&req_path).expect("the agent wrote the hook request file"),
        )
        .expect("hook request JSON")
    }
}

/// A snapshot and its manifest at a `file://` location, as the hook writes them.
fn write_snapshot(location: &str, snapshot: &[u8], container_id: &str) {
    let path = match mapsnap::storage::Location::parse(location).expect("location") {
        mapsnap::storage::Location::Local(p) => p,
        other => panic!("tests use file:// locations, got {other:?}"),
    };
    std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
    std::fs::write(&path, snapshot).expect("snapshot");
    let manifest = test_manifest(location, snapshot, container_id);
    std::fs::write(
        format!("{}{}", path.display(), mapsnap::storage::MANIFEST_SUFFIX),
        manifest.to_json(),
    )
    .expect("manifest");
}

/// A manifest as mapsnap-hook writes it.
pub fn test_manifest(
    location: &str,
    snapshot: &[u8],
    container_id: &str,
) -> mapsnap::storage::Manifest {
    use sha2::Digest;
    mapsnap::storage::Manifest {
        manifest_version: mapsnap::storage::MANIFEST_VERSION,
        format_version: 1,
        snapshot: location.to_string(),
        sha256: hex::encode(sha2::Sha256::digest(snapshot)),
        size: snapshot.len() as u64,
        created: "2025-06-01T12:00:00Z".into(),
        created_unix: 1_748_779_200,
        tool: "mapsnap 0.1.0".into(),
        source: mapsnap::storage::ManifestSource {
            host: NODE_A.into(),
            kernel: "6.18.0".into(),
            possible_cpus: 2,
            selection: format!("container:{container_id}"),
            container_id: Some(container_id.to_string()),
            pod: Some(format!("{NS}/{POD}")),
            pod_uid: Some(POD_UID.into()),
        },
        maps: vec![
            mapsnap::storage::ManifestMap {
                name: "conntrack".into(),
                map_type: "lru_hash".into(),
                entries: 1200,
                bytes: 76_800,
                pin_path: Some("conntrack".into()),
                inner: false,
            },
            mapsnap::storage::ManifestMap {
                name: "backends".into(),
                map_type: "array".into(),
                entries: 16,
                bytes: 1024,
                pin_path: Some("backends".into()),
                inner: false,
            },
        ],
        skipped: Vec::new(),
    }
}

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One request, as received.
pub struct Received {
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub body: Value,
    send: tower_test::mock::SendResponse<Response<Body>>,
}

impl Received {
    pub fn respond(self, status: u16, body: &Value) {
        let bytes = serde_json::to_vec(body).expect("json");
        let resp = Response::builder()
            .status(StatusCode::from_u16(status).expect("status"))
            .header("content-type", "application/json")
            .body(Body::from(bytes))
            .expect("response");
        self.send.send_response(resp);
    }

    pub fn respond_text(self, status: u16, body: &str) {
        let resp = Response::builder()
            .status(StatusCode::from_u16(status).expect("status"))
            .body(Body::from(body.as_bytes().to_vec()))
            .expect("response");
        self.send.send_response(resp);
    }
}

/// A Kubernetes `Status` error body.
pub fn status_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// Checks a status (as written) against the generated CRD's status schema.
pub fn assert_valid_status(status: &Value) {
    let crd = serde_json::to_value(crate::crd::crd()).expect("crd");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"];
    let mut errs = Vec::new();
    crate::schema_check::check(schema, status, ".status", &mut errs);
    assert!(
        errs.is_empty(),
        "the status does not fit the CRD: {errs:?}\n{status}"
    );
}

fn cr_path(name: &str) -> String {
    format!("/apis/mapsnap.io/v1alpha1/namespaces/{NS}/bpfmapcheckpoints/{name}")
}

/// The mock API server: asserts requests in order and keeps the object's state.
pub struct MockApi {
    handle: Handle,
    /// The object as the API server holds it.
    pub cr: BpfMapCheckpoint,
}

impl MockApi {
    /// The next request; asserts method and path.
    pub async fn expect(&mut self, method: &str, path: &str) -> Received {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
            .unwrap_or_else(|| panic!("the client went away; expected {method} {path}"));
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.expect("request body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("request body is JSON")
        };
        let query: BTreeMap<String, String> = parts
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_string(), v.to_string())
            })
            .collect();
        let got = format!("{} {}", parts.method, parts.uri.path());
        assert_eq!(
            got,
            format!("{method} {path}"),
            "unexpected request (body {body})"
        );
        Received {
            query,
            content_type: parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            body,
            send,
        }
    }

    fn cr_json(&self) -> Value {
        serde_json::to_value(&self.cr).expect("cr json")
    }

    fn bump(&mut self) {
        let rv: u64 = self
            .cr
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        self.cr.metadata.resource_version = Some((rv + 1).to_string());
    }

    /// The controller's finalizer patch (merge patch with the resourceVersion read); asserts
    /// the new list.
    pub async fn finalizers(&mut self, expect: &[&str]) {
        assert!(
            self.finalizers_or_conflict(expect).await,
            "the finalizer patch carried a stale resourceVersion"
        );
    }

    /// Like [`Self::finalizers`], but answers a stale `resourceVersion` as the API server
    /// does (409 Conflict); returns whether the patch was applied.
    pub async fn finalizers_or_conflict(&mut self, expect: &[&str]) -> bool {
        let name = self.cr.metadata.name.clone().expect("name");
        let r = self.expect("PATCH", &cr_path(&name)).await;
        assert_eq!(r.content_type, "application/merge-patch+json");
        let meta = &r.body["metadata"];
        assert!(
            meta["resourceVersion"].is_string(),
            "the finalizer patch must carry the resourceVersion it read"
        );
        if meta["resourceVersion"].as_str() != self.cr.metadata.resource_version.as_deref() {
            r.respond(
                409,
                &status_error(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on bpfmapcheckpoints.mapsnap.io \"{name}\": \
                         the object has been modified; please apply your changes to the latest \
                         version and try again"
                    ),
                ),
            );
            return false;
        }
        let got: Vec<String> = serde_json::from_value(meta["finalizers"].clone()).expect("list");
        assert_eq!(got, expect);
        self.cr.metadata.finalizers = Some(got);
        self.bump();
        let body = self.cr_json();
        r.respond(200, &body);
        true
    }

    /// The controller's status write: server-side apply, as `mapsnap-controller`, without
    /// `agentResult`. Applies it (keeping the agent's field) and returns the new status.
    pub async fn status(&mut self) -> BpfMapCheckpointStatus {
        let name = self.cr.metadata.name.clone().expect("name");
        let r = self
            .expect("PATCH", &format!("{}/status", cr_path(&name)))
            .await;
        assert_eq!(r.content_type, "application/apply-patch+yaml");
        assert_eq!(
            r.query.get("fieldManager").map(String::as_str),
            Some("mapsnap-controller")
        );
        assert_eq!(r.query.get("force").map(String::as_str), Some("true"));
        assert_eq!(r.body["apiVersion"], "mapsnap.io/v1alpha1");
        assert_eq!(r.body["kind"], "BpfMapCheckpoint");
        assert!(
            r.body["status"].get("agentResult").is_none(),
            "the controller must not write agentResult"
        );
        assert_valid_status(&r.body["status"]);
        let mut status: BpfMapCheckpointStatus =
            serde_json::from_value(r.body["status"].clone()).expect("status");
        status.agent_result = self.cr.status.as_ref().and_then(|s| s.agent_result.clone());
        self.cr.status = Some(status.clone());
        self.bump();
        let body = self.cr_json();
        r.respond(200, &body);
        status
    }

    /// The agent's answer: server-side apply of `status.agentResult` only, as
    /// `mapsnap-agent`.
    pub async fn agent_result(&mut self) -> AgentResult {
        let name = self.cr.metadata.name.clone().expect("name");
        let r = self
            .expect("PATCH", &format!("{}/status", cr_path(&name)))
            .await;
        assert_eq!(r.content_type, "application/apply-patch+yaml");
        assert_eq!(
            r.query.get("fieldManager").map(String::as_str),
            Some("mapsnap-agent")
        );
        assert_eq!(r.query.get("force").map(String::as_str), Some("true"));
        let keys: Vec<&String> = r.body["status"]
            .as_object()
            .expect("status object")
            .keys()
            .collect();
        assert_eq!(keys, ["agentResult"], "the agent writes agentResult only");
        assert_valid_status(&r.body["status"]);
        let result: AgentResult =
            serde_json::from_value(r.body["status"]["agentResult"].clone()).expect("result");
        self.cr
            .status
            .get_or_insert_with(Default::default)
            .agent_result = Some(result.clone());
        self.bump();
        let body = self.cr_json();
        r.respond(200, &body);
        result
    }

    /// An event about the object (created, or patched when the recorder counts a repeat);
    /// asserts its reason and type, returns its note.
    pub async fn event(&mut self, reason: &str, warning: bool) -> String {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected event {reason}"))
            .unwrap_or_else(|| panic!("the client went away; expected event {reason}"));
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.expect("body");
        let body: Value = serde_json::from_slice(&bytes).expect("event JSON");
        let path = parts.uri.path().to_string();
        let events = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events");
        let ok = (parts.method == "POST" && path == events)
            || (parts.method == "PATCH" && path.starts_with(&format!("{events}/")));
        assert!(
            ok,
            "expected event {reason}, got {} {path}: {body}",
            parts.method
        );
        assert_eq!(body["reason"], reason, "event: {body}");
        assert_eq!(
            body["type"],
            if warning { "Warning" } else { "Normal" },
            "event: {body}"
        );
        assert_eq!(body["regarding"]["kind"], "BpfMapCheckpoint");
        assert_eq!(
            body["regarding"]["name"],
            self.cr.metadata.name.clone().expect("name").as_str()
        );
        assert_eq!(body["reportingController"], "mapsnap-controller");
        let note = body["note"].as_str().unwrap_or_default().to_string();
        let resp = Response::builder()
            .status(if parts.method == "POST" { 201 } else { 200 })
            .body(Body::from(bytes.to_vec()))
            .expect("response");
        send.send_response(resp);
        note
    }

    pub async fn get_pod(&mut self, name: &str, pod: Option<&Pod>) {
        let r = self
            .expect("GET", &format!("/api/v1/namespaces/{NS}/pods/{name}"))
            .await;
        match pod {
            Some(p) => r.respond(200, &serde_json::to_value(p).expect("pod")),
            None => r.respond(
                404,
                &status_error(404, "NotFound", &format!("pods \"{name}\" not found")),
            ),
        }
    }

    pub async fn get_lease(&mut self, node: &str, lease: Option<&Lease>) {
        let name = layout::agent_lease_name(node);
        let r = self
            .expect(
                "GET",
                &format!("/apis/coordination.k8s.io/v1/namespaces/{OPERATOR_NS}/leases/{name}"),
            )
            .await;
        match lease {
            Some(l) => r.respond(200, &serde_json::to_value(l).expect("lease")),
            None => r.respond(
                404,
                &status_error(404, "NotFound", &format!("leases \"{name}\" not found")),
            ),
        }
    }

    pub async fn get_checkpoint(&mut self, name: &str, cr: Option<&BpfMapCheckpoint>) {
        let r = self.expect("GET", &cr_path(name)).await;
        match cr {
            Some(c) => r.respond(200, &serde_json::to_value(c).expect("cr")),
            None => r.respond(404, &status_error(404, "NotFound", "not found")),
        }
    }

    /// The kubelet checkpoint call through the node proxy (opt-in path); the API server
    /// passes the kubelet's answer through: JSON on success, plain text on errors.
    pub async fn kubelet(&mut self, node: &str, timeout: u64, status: u16, body: &str) {
        let r = self
            .expect(
                "POST",
                &format!("/api/v1/nodes/{node}/proxy/checkpoint/{NS}/{POD}/{CONTAINER}"),
            )
            .await;
        assert_eq!(r.query.get("timeout"), Some(&timeout.to_string()));
        if status == 200 {
            r.respond(200, &serde_json::from_str(body).expect("kubelet JSON"));
        } else {
            r.respond_text(status, body);
        }
    }

    /// The restored pod's creation refused by ResourceQuota admission (403, with the text the
    /// API server writes).
    pub async fn create_pod_over_quota(&mut self) {
        let r = self
            .expect("POST", &format!("/api/v1/namespaces/{NS}/pods"))
            .await;
        let name = r.body["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        r.respond(
            403,
            &status_error(
                403,
                "Forbidden",
                &format!(
                    "pods \"{name}\" is forbidden: exceeded quota: compute-resources, \
                     requested: pods=1, used: pods=10, limited: pods=10"
                ),
            ),
        );
    }

    /// The restored pod's creation; answers 201 with a UID; returns the pod as sent.
    pub async fn create_pod(&mut self) -> Pod {
        let r = self
            .expect("POST", &format!("/api/v1/namespaces/{NS}/pods"))
            .await;
        let mut pod: Pod = serde_json::from_value(r.body.clone()).expect("pod");
        let sent = pod.clone();
        pod.metadata.uid = Some("restored-pod-uid".into());
        r.respond(201, &serde_json::to_value(&pod).expect("pod"));
        sent
    }

    pub async fn delete_pod(&mut self, name: &str, expect_uid: &str, status: u16) {
        let r = self
            .expect("DELETE", &format!("/api/v1/namespaces/{NS}/pods/{name}"))
            .await;
        assert_eq!(
            r.body["preconditions"]["uid"], expect_uid,
            "the delete must be conditional on the checkpointed pod's UID"
        );
        if status == 200 {
            let mut pod = source_pod(true);
            pod.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t0()));
            r.respond(200, &serde_json::to_value(&pod).expect("pod"));
        } else {
            r.respond(
                status,
                &status_error(status, "Conflict", "precondition failed"),
            );
        }
    }
}

/// A restored pod as the kubelet reports it. The kubelet parses every image as a reference
/// before any CRI call: one it cannot parse (an archive path) leaves the container waiting
/// with `InvalidImageName`, whatever the test asked for.
pub fn restored_pod_status(mut pod: Pod, running: bool) -> Pod {
    pod.metadata.uid = Some("restored-pod-uid".into());
    let bad_image = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == CONTAINER))
        .and_then(|c| c.image.clone())
        .filter(|i| !crate::pods::is_digest_ref(i) && !i.starts_with("registry.example/"));
    if let Some(img) = bad_image {
        let status = json!({"phase": "Pending", "containerStatuses": [{
            "name": CONTAINER, "image": img, "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "InvalidImageName", "message": format!(
                "Failed to apply default image tag \"{img}\": couldn't parse image name \"{img}\": invalid reference format")}}}]});
        pod.status = Some(serde_json::from_value(status).expect("status"));
        return pod;
    }
    let status = if running {
        json!({"phase": "Running", "containerStatuses": [{
            "name": CONTAINER, "image": "", "imageID": "", "ready": true, "restartCount": 0,
            "containerID": "cri-o://ffff", "state": {"running": {"startedAt": "2025-06-01T12:01:00Z"}}}]})
    } else {
        json!({"phase": "Pending", "containerStatuses": [{
            "name": CONTAINER, "image": "", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}}]})
    };
    pod.status = Some(serde_json::from_value(status).expect("status"));
    pod
}

/// The controller and the agents of two nodes, each with its mock API server, sharing one
/// object; node directories and storage in a temporary directory.
pub struct Harness {
    pub clock: TestClock,
    /// node-a's kubelet.
    pub kubelet: KubeletThread,
    pub images: Arc<RecordingImages>,
    pub config: Config,
    pub ctx: Arc<Context>,
    api: Option<MockApi>,
    pub agents: BTreeMap<String, (Arc<AgentContext>, Option<Handle>)>,
    pub nodes: BTreeMap<String, NodeDirs>,
    pub store: PathBuf,
    _dir: tempfile::TempDir,
}

fn mock_client() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

impl Harness {
    pub fn new(cr: BpfMapCheckpoint) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        let clock = TestClock::new();
        let config = Config {
            namespace: OPERATOR_NS.into(),
            storage_location: format!("file://{}", store.display()),
            image_pull_secrets: vec!["mapsnap-pull".into()],
            ..Config::default()
        };
        let (client, handle) = mock_client();
        let health = Arc::new(Health::default());
        let ctx = Arc::new(Context {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "mapsnap-controller".into(),
                    instance: Some("test".into()),
                },
            ),
            client,
            config: config.clone(),
            health,
            clock: clock.clock(),
        });
        let mut agents = BTreeMap::new();
        let mut nodes = BTreeMap::new();
        let images = Arc::new(RecordingImages::default());
        // node-a's kubelet: the runtime checkpoints (mapsnap-hook writes the snapshot at
        // CRIU's post-dump, then the archive is written) and answers with the archive path.
        let dirs_a = NodeDirs::new(dir.path(), NODE_A);
        let da = dirs_a.clone();
        let kubelet = KubeletThread::start(
            NODE_A,
            Arc::new(move |_ns: &str, _pod: &str, _ctr: &str| {
                da.hook_writes_snapshot(CONTAINER_ID, b"snapshot bytes");
                Ok(da.kubelet_writes_archive(b"archive bytes, 25 of them"))
            }),
        );
        kubelet.kubelet.add_pod(NS, POD, &[CONTAINER]);
        for node in [NODE_A, NODE_B] {
            let dirs = if node == NODE_A {
                dirs_a.clone()
            } else {
                NodeDirs::new(dir.path(), node)
            };
            let (client, handle) = mock_client();
            let node_agent = NodeAgent::new(
                dirs.paths.clone(),
                Arc::new(StorageBlobs::new(mapsnap::storage::StorageConfig::default())),
            )
            .with_allowed_locations(vec![config.storage_location.clone()])
            .with_images(images.clone());
            let direct = (node == NODE_A).then(|| {
                let tls = KubeletTls {
                    ca_file: Some(kubelet.kubelet.ca_file.clone()),
                    server_name: None,
                    insecure_skip_verify: false,
                };
                Arc::new(
                    DirectKubelet::new(
                        kubelet.kubelet.addr.ip(),
                        kubelet.kubelet.addr.port(),
                        &tls,
                        &kubelet.kubelet.token_file,
                    )
                    .expect("kubelet client"),
                )
            });
            let actx = Arc::new(AgentContext {
                client,
                node: node.into(),
                node_agent: Arc::new(node_agent),
                kubelet: direct,
                health: Arc::new(Health::default()),
                clock: clock.clock(),
            });
            agents.insert(node.to_string(), (actx, Some(handle)));
            nodes.insert(node.to_string(), dirs);
        }
        Self {
            clock,
            kubelet,
            images,
            config,
            ctx,
            api: Some(MockApi { handle, cr }),
            agents,
            nodes,
            store,
            _dir: dir,
        }
    }

    /// The object as the API server holds it.
    pub fn cr(&self) -> &BpfMapCheckpoint {
        &self.api.as_ref().expect("api").cr
    }

    pub fn cr_mut(&mut self) -> &mut BpfMapCheckpoint {
        &mut self.api.as_mut().expect("api").cr
    }

    pub fn status(&self) -> BpfMapCheckpointStatus {
        self.cr().status.clone().unwrap_or_default()
    }

    pub fn node(&self, node: &str) -> &NodeDirs {
        self.nodes.get(node).expect("node")
    }

    /// Runs one controller reconcile of the object against `scenario`, which answers (and
    /// asserts) every request it makes, in order.
    pub async fn reconcile<F, Fut>(&mut self, scenario: F) -> Action
    where
        F: FnOnce(MockApi) -> Fut,
        Fut: std::future::Future<Output = MockApi> + Send + 'static,
    {
        let cr = self.cr().clone();
        self.try_reconcile_as(cr, scenario)
            .await
            .expect("reconcile succeeded")
    }

    /// One controller reconcile of `seen` (the object as the controller's cache has it, which
    /// may be older than the API server's) against `scenario`.
    pub async fn try_reconcile_as<F, Fut>(
        &mut self,
        seen: BpfMapCheckpoint,
        scenario: F,
    ) -> Result<Action, crate::error::Error>
    where
        F: FnOnce(MockApi) -> Fut,
        Fut: std::future::Future<Output = MockApi> + Send + 'static,
    {
        let api = self.api.take().expect("api");
        let cr = seen;
        let server = tokio::spawn(scenario(api));
        let res = tokio::time::timeout(
            Duration::from_secs(10),
            controller::reconcile(Arc::new(cr), self.ctx.clone()),
        )
        .await;
        let api = match server.await {
            Ok(api) => api,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        self.api = Some(api);
        res.expect("reconcile did not finish (a request was not answered)")
    }

    /// Runs one reconcile of the agent on `node` (the real node-side work, against this
    /// harness's directories and storage) against `scenario`.
    pub async fn agent<F, Fut>(&mut self, node: &str, scenario: F) -> Action
    where
        F: FnOnce(MockApi) -> Fut,
        Fut: std::future::Future<Output = MockApi> + Send + 'static,
    {
        let (actx, handle) = self.agents.get_mut(node).expect("agent");
        let actx = actx.clone();
        let handle = handle.take().expect("agent handle");
        let cr = self.cr().clone();
        let server = tokio::spawn(scenario(MockApi {
            handle,
            cr: cr.clone(),
        }));
        let res = tokio::time::timeout(
            Duration::from_secs(10),
            agent::reconcile(Arc::new(cr), actx),
        )
        .await;
        let api = match server.await {
            Ok(api) => api,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let MockApi { handle, cr } = api;
        if let Some(slot) = self.agents.get_mut(node) {
            slot.1 = Some(handle);
        }
        *self.cr_mut() = cr;
        res.expect("agent reconcile did not finish")
            .expect("agent reconcile succeeded")
    }

    /// Asserts a reconcile that needs no request and returns `action`.
    pub async fn reconcile_quiet(&mut self) -> Action {
        self.reconcile(|api| async move { api }).await
    }
}

pub fn requeue(d: Duration) -> Action {
    Action::requeue(d)
}

impl Harness {
    /// Switches the controller to another way of calling the kubelet (before any request).
    pub fn use_kubelet_access(&mut self, access: crate::config::KubeletAccess) {
        self.config.kubelet_access = access;
        self.restart_controller();
    }

    /// A controller restart: a new process (new client, new event recorder, nothing in
    /// memory) facing the same API server state.
    pub fn restart_controller(&mut self) {
        let (client, handle) = mock_client();
        let ctx = Context {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "mapsnap-controller".into(),
                    instance: Some("test-2".into()),
                },
            ),
            client,
            config: self.config.clone(),
            health: Arc::new(Health::default()),
            clock: self.clock.clock(),
        };
        self.ctx = Arc::new(ctx);
        let cr = self.api.take().expect("api").cr;
        self.api = Some(MockApi { handle, cr });
    }

    /// The file behind a `file://` location of this harness's store.
    pub fn stored(&self, location: &str) -> PathBuf {
        match mapsnap::storage::Location::parse(location).expect("location") {
            mapsnap::storage::Location::Local(p) => p,
            other => panic!("not a local location: {other:?}"),
        }
    }
}
