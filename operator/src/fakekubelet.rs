//! A local HTTPS server (rustls, a CA and serving certificate generated per test) that answers
//! `POST /checkpoint/{ns}/{pod}/{container}` exactly like the kubelet's checkpoint handler
//! (pkg/kubelet/server/server.go) and its auth filter: plain-text errors, 401 "Unauthorized",
//! 403 "Forbidden (user=..., ...)", 404 "pod does not exist" / "container X does not exist" /
//! "cannot parse value of timeout parameter", `404 page not found` when the feature gate is
//! off (no route), 500 "checkpointing of ns/pod/ctr failed (...)", and on success
//! `{"items":["<archive path>"]}` as application/json.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// What the runtime does when asked to checkpoint (writes the archive, runs the hook); returns
/// the archive path or the runtime's error text.
pub type OnCheckpoint = Arc<dyn Fn(&str, &str, &str) -> Result<String, String> + Send + Sync>;

/// One call the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
}

/// The server's state, changeable while it runs.
pub struct KubeletState {
    /// `ns/pod` -> container names.
    pub pods: BTreeMap<String, Vec<String>>,
    /// The ContainerCheckpoint feature gate (false: the route does not exist).
    pub gate: bool,
    /// Token -> user name; other tokens get 401.
    pub tokens: BTreeMap<String, String>,
    /// Users allowed `create nodes/checkpoint`.
    pub allowed: Vec<String>,
    pub on_checkpoint: OnCheckpoint,
    pub calls: Vec<Call>,
}

/// A running fake kubelet.
pub struct FakeKubelet {
    pub addr: SocketAddr,
    /// The CA that signed the serving certificate (PEM file).
    pub ca_file: PathBuf,
    /// Another CA (PEM file) that did not.
    pub other_ca_file: PathBuf,
    pub token_file: PathBuf,
    pub state: Arc<Mutex<KubeletState>>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const AGENT_USER: &str = "system:serviceaccount:mapsnap-system:mapsnap-agent";
pub const AGENT_TOKEN: &str = "agent-token";

fn ca(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).expect("ca").pem();
    (params, key, pem)
}

impl FakeKubelet {
    /// Starts the server on 127.0.0.1 with a certificate for `node_name` and 127.0.0.1.
    pub async fn start(node_name: &str, on_checkpoint: OnCheckpoint) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_params, ca_key, ca_pem) = ca("kubernetes");
        let (_, _, other_pem) = ca("someone-else");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec![node_name.to_string()]).expect("params");
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params.signed_by(&key, &issuer).expect("serving cert");
        let ca_file = dir.path().join("ca.crt");
        let other_ca_file = dir.path().join("other-ca.crt");
        let token_file = dir.path().join("token");
        std::fs::write(&ca_file, ca_pem).expect("ca");
        std::fs::write(&other_ca_file, other_pem).expect("ca");
        std::fs::write(&token_file, format!("{AGENT_TOKEN}\n")).expect("token");

        let certs = vec![cert.der().clone()];
        let key_der =
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key_der)
            .expect("tls config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(KubeletState {
            pods: BTreeMap::new(),
            gate: true,
            tokens: BTreeMap::from([(AGENT_TOKEN.to_string(), AGENT_USER.to_string())]),
            allowed: vec![AGENT_USER.to_string()],
            on_checkpoint,
            calls: Vec::new(),
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    // A client that refuses our certificate ends the handshake: not an error here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_file,
            other_ca_file,
            token_file,
            state,
            _dir: dir,
            task,
        }
    }

    pub fn add_pod(&self, ns: &str, pod: &str, containers: &[&str]) {
        self.state.lock().expect("state").pods.insert(
            format!("{ns}/{pod}"),
            containers.iter().map(|c| c.to_string()).collect(),
        );
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().expect("state").calls.clone()
    }
}

fn text(status: u16, body: &str) -> Response<Full<Bytes>> {
    // Go's net/http sniffs plain text for go-restful's WriteErrorString.
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

async fn handle(state: &Mutex<KubeletState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let _ = req.into_body().collect().await;
    let mut st = state.lock().expect("state");
    st.calls.push(Call {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        authorization: authorization.clone(),
    });
    // Authentication, then authorization (the kubelet's auth filter runs before routing).
    let user = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .and_then(|t| st.tokens.get(t).cloned());
    let Some(user) = user else {
        return text(401, "Unauthorized");
    };
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if parts.first() == Some(&"checkpoint") && !st.allowed.contains(&user) {
        return text(
            403,
            &format!(
                "Forbidden (user={user}, verb=create, resource=nodes, subresource=checkpoint)"
            ),
        );
    }
    if !st.gate || parts.len() != 4 || parts[0] != "checkpoint" {
        // No route: Go's http.NotFound.
        return text(404, "404 page not found\n");
    }
    if method != "POST" {
        return text(405, "405: Method Not Allowed");
    }
    let (ns, pod, ctr) = (parts[1], parts[2], parts[3]);
    let Some(containers) = st.pods.get(&format!("{ns}/{pod}")).cloned() else {
        return text(404, "pod does not exist");
    };
    if !containers.iter().any(|c| c == ctr) {
        return text(404, &format!("container {ctr} does not exist"));
    }
    // The last `timeout` value wins; it must parse as an integer.
    let timeouts: Vec<&str> = query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("timeout="))
        .collect();
    if let Some(t) = timeouts.last()
        && t.parse::<i64>().is_err()
    {
        return text(404, "cannot parse value of timeout parameter");
    }
    let on = st.on_checkpoint.clone();
    drop(st);
    match on(ns, pod, ctr) {
        Ok(location) => Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                "{{\"items\":[\"{location}\"]}}"
            ))))
            .expect("response"),
        Err(e) => text(
            500,
            &format!("checkpointing of {ns}/{pod}/{ctr} failed ({e})"),
        ),
    }
}
