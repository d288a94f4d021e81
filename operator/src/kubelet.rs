//! The kubelet checkpoint API (KEP-2008): `POST /checkpoint/{namespace}/{pod}/{container}?timeout=N`.
//!
//! Two ways to reach it:
//! - [`DirectKubelet`] (default): the node agent calls its own node's kubelet
//!   (`https://<node IP>:10250`) with its service-account token, verifying the kubelet's
//!   serving certificate. The kubelet authorizes the agent itself: `nodes/checkpoint create`
//!   is its only grant for this.
//! - [`checkpoint_via_proxy`] (opt-in): the controller calls
//!   `POST /api/v1/nodes/{node}/proxy/checkpoint/...` on the API server. The API server then
//!   calls the kubelet with **its own** kubelet-client certificate, so the kubelet checks
//!   `nodes/checkpoint` for the API server's user (a ClusterRoleBinding the chart creates when
//!   asked), and the controller needs `nodes/proxy create`, which also allows exec on every
//!   node.
//!
//! The kubelet answers errors as plain text (go-restful `WriteError`), with codes that must be
//! told apart ([`classify`]): 404 "pod does not exist", 404 "container X does not exist",
//! 404 "cannot parse value of timeout parameter", `404 page not found` (no such route: the
//! ContainerCheckpoint feature gate is off), 500 "checkpointing of ns/pod/ctr failed (...)",
//! 401 "Unauthorized", 403 "Forbidden (user=..., verb=create, resource=nodes,
//! subresource=checkpoint)".

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::Client;
use serde::Deserialize;

/// Extra time the client waits beyond the kubelet's own timeout.
pub const CLIENT_GRACE: Duration = Duration::from_secs(30);
/// The kubelet's default HTTPS port.
pub const KUBELET_PORT: u16 = 10250;
/// The service-account token and cluster CA every pod gets.
pub const SA_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const SA_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// A failed kubelet checkpoint call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletFailure {
    /// HTTP status; 0 when no answer came (timeout, connection, TLS).
    pub code: u16,
    pub message: String,
}

/// What a kubelet failure means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeletErrorKind {
    /// No HTTP answer (connection refused, TLS failure, timeout): may pass.
    NoAnswer,
    /// 401: the kubelet did not accept the token (webhook authentication off?).
    Unauthenticated,
    /// 403: the caller lacks `nodes/checkpoint create`.
    Forbidden,
    /// `404 page not found`: no checkpoint route (the ContainerCheckpoint gate is off).
    FeatureDisabled,
    /// 404 "pod does not exist": the kubelet does not know the pod (gone, or another node).
    PodNotFound,
    /// 404 "container X does not exist".
    ContainerNotFound,
    /// 404 "cannot parse value of timeout parameter".
    BadTimeout,
    /// Another 404.
    NotFound,
    /// 500 "checkpointing of ... failed (...)": the runtime or CRIU failed; may pass.
    CheckpointFailed,
    /// Anything else (502, 503, ...): may pass.
    Other,
}

impl KubeletErrorKind {
    /// CamelCase reason for conditions and events.
    pub fn reason(self) -> &'static str {
        match self {
            KubeletErrorKind::NoAnswer => "KubeletUnreachable",
            KubeletErrorKind::Unauthenticated => "KubeletUnauthorized",
            KubeletErrorKind::Forbidden => "Forbidden",
            KubeletErrorKind::FeatureDisabled => "CheckpointUnsupported",
            KubeletErrorKind::PodNotFound => "PodNotFound",
            KubeletErrorKind::ContainerNotFound => "ContainerNotFound",
            KubeletErrorKind::BadTimeout => "BadCheckpointTimeout",
            KubeletErrorKind::NotFound => "KubeletNotFound",
            KubeletErrorKind::CheckpointFailed | KubeletErrorKind::Other => {
                "KubeletCheckpointFailed"
            }
        }
    }

    /// Whether trying again may help.
    pub fn transient(self) -> bool {
        matches!(
            self,
            KubeletErrorKind::NoAnswer
                | KubeletErrorKind::CheckpointFailed
                | KubeletErrorKind::Other
        )
    }
}

/// Tells the kubelet's answers apart (by code and exact text, as the kubelet writes them).
pub fn classify(code: u16, message: &str) -> KubeletErrorKind {
    let m = message.trim();
    match code {
        0 => KubeletErrorKind::NoAnswer,
        401 => KubeletErrorKind::Unauthenticated,
        403 => KubeletErrorKind::Forbidden,
        404 if m == "404 page not found" => KubeletErrorKind::FeatureDisabled,
        404 if m == "pod does not exist" => KubeletErrorKind::PodNotFound,
        404 if m.starts_with("container ") && m.ends_with(" does not exist") => {
            KubeletErrorKind::ContainerNotFound
        }
        404 if m == "cannot parse value of timeout parameter" => KubeletErrorKind::BadTimeout,
        404 => KubeletErrorKind::NotFound,
        500 if m.starts_with("checkpointing of ") => KubeletErrorKind::CheckpointFailed,
        _ => KubeletErrorKind::Other,
    }
}

impl KubeletFailure {
    pub fn kind(&self) -> KubeletErrorKind {
        classify(self.code, &self.message)
    }
}

/// The kubelet's path of a checkpoint call.
pub fn kubelet_path(namespace: &str, pod: &str, container: &str, timeout: Duration) -> String {
    format!(
        "/checkpoint/{namespace}/{pod}/{container}?timeout={}",
        timeout.as_secs().max(1)
    )
}

/// The API server's node-proxy path of a checkpoint call.
pub fn checkpoint_path(
    node: &str,
    namespace: &str,
    pod: &str,
    container: &str,
    timeout: Duration,
) -> String {
    format!(
        "/api/v1/nodes/{node}/proxy{}",
        kubelet_path(namespace, pod, container, timeout)
    )
}

#[derive(Deserialize)]
struct CheckpointResponse {
    #[serde(default)]
    items: Vec<String>,
}

/// The archive path from the kubelet's answer (`{"items":["/var/lib/kubelet/checkpoints/..."]}`).
pub fn parse_response(body: &str) -> Result<String, String> {
    let r: CheckpointResponse = serde_json::from_str(body)
        .map_err(|e| format!("unexpected answer from the kubelet ({e}): {body:.200}"))?;
    r.items
        .into_iter()
        .find(|p| !p.is_empty())
        .ok_or_else(|| format!("the kubelet named no checkpoint archive: {body:.200}"))
}

/// A DNS label or subdomain (namespace, pod, container names) before it goes into a path.
fn check_segment(what: &str, s: &str) -> Result<(), KubeletFailure> {
    if crate::layout::is_object_name(s) {
        Ok(())
    } else {
        Err(KubeletFailure {
            code: 0,
            message: format!("invalid {what} {s:?}"),
        })
    }
}

/// Asks the kubelet on `node` to checkpoint a container through the API server's node proxy
/// (the opt-in path); returns the archive's path there.
pub async fn checkpoint_via_proxy(
    client: &Client,
    node: &str,
    namespace: &str,
    pod: &str,
    container: &str,
    timeout: Duration,
) -> Result<String, KubeletFailure> {
    check_segment("node name", node)?;
    check_segment("namespace", namespace)?;
    check_segment("pod name", pod)?;
    check_segment("container name", container)?;
    let path = checkpoint_path(node, namespace, pod, container, timeout);
    let req = http::Request::post(path)
        .body(Vec::new())
        .map_err(|e| KubeletFailure {
            code: 0,
            message: e.to_string(),
        })?;
    let call = client.request_text(req);
    match tokio::time::timeout(timeout + CLIENT_GRACE, call).await {
        Err(_) => Err(KubeletFailure {
            code: 0,
            message: format!("no answer within {}s", (timeout + CLIENT_GRACE).as_secs()),
        }),
        // kube-rs keeps a plain-text error body as the message.
        Ok(Err(kube::Error::Api(s))) => Err(KubeletFailure {
            code: s.code,
            message: s.message.trim().to_string(),
        }),
        Ok(Err(e)) => Err(KubeletFailure {
            code: 0,
            message: e.to_string(),
        }),
        Ok(Ok(body)) => {
            parse_response(&body).map_err(|message| KubeletFailure { code: 0, message })
        }
    }
}

/// How the agent checks the kubelet's serving certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KubeletTls {
    /// CA bundle (PEM) that signed the kubelet's serving certificate. Default: the cluster CA
    /// of the service account (right when the kubelets' serving certificates come from the
    /// cluster CA: `serverTLSBootstrap: true` and approved CSRs).
    pub ca_file: Option<PathBuf>,
    /// The name to verify the certificate for, when it carries the node's name rather than its
    /// IP (the connection still goes to the IP).
    pub server_name: Option<String>,
    /// Accept any certificate (documented override for self-signed kubelet certificates; the
    /// token is then sent to whoever answers on that address).
    pub insecure_skip_verify: bool,
}

/// Why the direct kubelet client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KubeletSetupError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no certificate in {}: {message}", path.display())]
    BadCa { path: PathBuf, message: String },
    #[error("cannot build the HTTPS client: {0}")]
    Client(String),
}

/// The agent's client of its own node's kubelet.
#[derive(Debug, Clone)]
pub struct DirectKubelet {
    client: reqwest::Client,
    base: String,
    token_file: PathBuf,
}

impl DirectKubelet {
    /// A client of the kubelet at `host:port`, authenticating with the token in `token_file`
    /// (read at every call: projected tokens rotate).
    pub fn new(
        host: IpAddr,
        port: u16,
        tls: &KubeletTls,
        token_file: &Path,
    ) -> Result<Self, KubeletSetupError> {
        let addr = SocketAddr::new(host, port);
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(10));
        if tls.insecure_skip_verify {
            b = b.tls_danger_accept_invalid_certs(true);
        } else {
            let ca = tls.ca_file.clone().unwrap_or_else(|| PathBuf::from(SA_CA));
            let pem = std::fs::read(&ca).map_err(|source| KubeletSetupError::Read {
                path: ca.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                KubeletSetupError::BadCa {
                    path: ca.clone(),
                    message: e.to_string(),
                }
            })?;
            if certs.is_empty() {
                return Err(KubeletSetupError::BadCa {
                    path: ca,
                    message: "empty bundle".into(),
                });
            }
            // Only this CA: a public CA must not vouch for a kubelet.
            b = b.tls_certs_only(certs);
        }
        let base = match tls.server_name.as_deref() {
            Some(name) => {
                b = b.resolve(name, addr);
                format!("https://{name}:{port}")
            }
            None => format!("https://{addr}"),
        };
        let client = b
            .build()
            .map_err(|e| KubeletSetupError::Client(e.to_string()))?;
        Ok(Self {
            client,
            base,
            token_file: token_file.to_path_buf(),
        })
    }

    /// The kubelet's base URL (`https://10.0.0.5:10250`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Asks the kubelet to checkpoint a container; returns the archive's path on this node.
    pub async fn checkpoint(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        timeout: Duration,
    ) -> Result<String, KubeletFailure> {
        check_segment("namespace", namespace)?;
        check_segment("pod name", pod)?;
        check_segment("container name", container)?;
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| KubeletFailure {
            code: 0,
            message: format!(
                "cannot read the service-account token {}: {e}",
                self.token_file.display()
            ),
        })?;
        let url = format!(
            "{}{}",
            self.base,
            kubelet_path(namespace, pod, container, timeout)
        );
        let call = async {
            let resp = self
                .client
                .post(&url)
                .bearer_auth(token.trim())
                .send()
                .await?;
            let status = resp.status().as_u16();
            let body = resp.text().await?;
            Ok::<_, reqwest::Error>((status, body))
        };
        let no_answer = |message: String| KubeletFailure { code: 0, message };
        match tokio::time::timeout(timeout + CLIENT_GRACE, call).await {
            Err(_) => Err(no_answer(format!(
                "no answer from {} within {}s",
                self.base,
                (timeout + CLIENT_GRACE).as_secs()
            ))),
            Ok(Err(e)) => Err(no_answer(format!("{}: {}", self.base, error_chain(&e)))),
            Ok(Ok((200, body))) => parse_response(&body).map_err(no_answer),
            Ok(Ok((code, body))) => Err(KubeletFailure {
                code,
                message: body.trim().chars().take(1000).collect(),
            }),
        }
    }
}

/// An error with its sources (reqwest hides the TLS reason in them).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_response() {
        assert_eq!(
            checkpoint_path("node-a", "edge", "lb-0", "lb", Duration::from_secs(60)),
            "/api/v1/nodes/node-a/proxy/checkpoint/edge/lb-0/lb?timeout=60"
        );
        let body = r#"{"items":["/var/lib/kubelet/checkpoints/checkpoint-lb-0_edge-lb-2025-01-01T00:00:00Z.tar"]}"#;
        assert_eq!(
            parse_response(body).expect("parsed"),
            "/var/lib/kubelet/checkpoints/checkpoint-lb-0_edge-lb-2025-01-01T00:00:00Z.tar"
        );
        assert!(parse_response(r#"{"items":[]}"#).is_err());
        assert!(parse_response("<html>").is_err());
    }

    #[test]
    fn the_kubelets_404s_are_told_apart() {
        use KubeletErrorKind as K;
        assert_eq!(classify(404, "404 page not found\n"), K::FeatureDisabled);
        assert_eq!(classify(404, "pod does not exist"), K::PodNotFound);
        assert_eq!(
            classify(404, "container lb does not exist"),
            K::ContainerNotFound
        );
        assert_eq!(
            classify(404, "cannot parse value of timeout parameter"),
            K::BadTimeout
        );
        assert_eq!(classify(404, "pods \"x\" not found"), K::NotFound);
        assert_eq!(
            classify(500, "checkpointing of edge/lb-0/lb failed (rpc error)"),
            K::CheckpointFailed
        );
        assert!(K::CheckpointFailed.transient() && !K::PodNotFound.transient());
        assert_eq!(
            classify(
                403,
                "Forbidden (user=system:serviceaccount:m:a, verb=create, resource=nodes, subresource=checkpoint)"
            ),
            K::Forbidden
        );
    }
}
