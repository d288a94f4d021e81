//! The kubelet checkpoint API (KEP-2008), called through the API server's node proxy:
//! `POST /api/v1/nodes/{node}/proxy/checkpoint/{namespace}/{pod}/{container}?timeout=N`.
//! The caller needs `nodes/proxy` (create); the kubelet then checks `nodes/checkpoint`.

use std::time::Duration;

use kube::Client;
use serde::Deserialize;

use crate::reconcile::KubeletFailure;

/// Extra time the client waits beyond the kubelet's own timeout.
pub const CLIENT_GRACE: Duration = Duration::from_secs(30);

/// The proxy path of a checkpoint call.
pub fn checkpoint_path(
    node: &str,
    namespace: &str,
    pod: &str,
    container: &str,
    timeout: Duration,
) -> String {
    format!(
        "/api/v1/nodes/{node}/proxy/checkpoint/{namespace}/{pod}/{container}?timeout={}",
        timeout.as_secs().max(1)
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

/// Asks the kubelet on `node` to checkpoint a container; returns the archive's path there.
pub async fn checkpoint(
    client: &Client,
    node: &str,
    namespace: &str,
    pod: &str,
    container: &str,
    timeout: Duration,
) -> Result<String, KubeletFailure> {
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
}
