//! `coordination.k8s.io/v1` leases: the controller's leader election, and the heartbeat each
//! node agent renews so the controller knows which nodes have one.
//!
//! Leader election follows client-go's protocol: a lease held by another identity is taken
//! only once it expired (`renewTime + leaseDurationSeconds`), every write carries the
//! `resourceVersion` it read (a concurrent taker gets 409 Conflict), and a leader that cannot
//! renew before its lease expires stops (the process exits and restarts as a candidate).

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

/// What a candidate does with the leader lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAction {
    /// No lease: create it, holding it.
    Create,
    /// Held by us: renew it.
    Renew,
    /// Expired (or released): take it over.
    Take,
    /// Held by someone else: wait this long before looking again.
    Wait(Duration),
}

fn expiry(lease: &Lease, fallback: Duration) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    let last = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let secs = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(fallback, Duration::from_secs);
    last.saturating_add(secs).ok()
}

/// Whether a lease was renewed recently enough: within its own duration, and within `stale`.
pub fn lease_fresh(lease: &Lease, now: Timestamp, stale: Duration) -> bool {
    let Some(spec) = lease.spec.as_ref() else {
        return false;
    };
    let Some(last) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return false;
    };
    let own = expiry(lease, stale).unwrap_or(Timestamp::MIN);
    let limit = last.0.saturating_add(stale).unwrap_or(Timestamp::MAX);
    now < own.min(limit)
}

/// The leader-election decision for `identity` at `now`.
pub fn leader_action(
    lease: Option<&Lease>,
    identity: &str,
    now: Timestamp,
    duration: Duration,
) -> LeaseAction {
    let Some(lease) = lease else {
        return LeaseAction::Create;
    };
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or("");
    if holder == identity {
        return LeaseAction::Renew;
    }
    match expiry(lease, duration) {
        Some(t) if !holder.is_empty() && now < t => LeaseAction::Wait(
            Duration::try_from(now.duration_until(t))
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(500)),
        ),
        _ => LeaseAction::Take,
    }
}

/// A lease held by `identity` from `now`.
pub fn held_lease(
    name: &str,
    namespace: &str,
    identity: &str,
    duration: Duration,
    now: Timestamp,
    previous: Option<&Lease>,
) -> Lease {
    let prev_spec = previous.and_then(|l| l.spec.clone()).unwrap_or_default();
    let same_holder = prev_spec.holder_identity.as_deref() == Some(identity);
    let transitions = prev_spec.lease_transitions.unwrap_or(0);
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            resource_version: previous.and_then(|l| l.metadata.resource_version.clone()),
            labels: previous.and_then(|l| l.metadata.labels.clone()),
            annotations: previous.and_then(|l| l.metadata.annotations.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(identity.to_string()),
            lease_duration_seconds: i32::try_from(duration.as_secs()).ok(),
            acquire_time: if same_holder {
                prev_spec.acquire_time
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if same_holder || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }),
    }
}

/// Leader election over one lease.
#[derive(Clone)]
pub struct LeaderElection {
    pub api: Api<Lease>,
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
    /// How often the leader renews it.
    pub renew_every: Duration,
    /// A leader that has not renewed for this long stops (shorter than `duration`, so it stops
    /// before a standby may take the lease over); each renewal call is bounded by what is
    /// left of it.
    pub renew_deadline: Duration,
}

impl std::fmt::Debug for LeaderElection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElection")
            .field("lease", &format!("{}/{}", self.namespace, self.name))
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Why leadership ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader lease {0}: {1}")]
    Lost(String, String),
    #[error("leader lease: {0}")]
    Kube(#[from] kube::Error),
}

impl LeaderElection {
    /// One round: tries to become or stay leader. `Ok(None)` = leader now, `Ok(Some(d))` =
    /// someone else leads, look again after `d`.
    pub async fn try_acquire(&self) -> Result<Option<Duration>, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let action = leader_action(current.as_ref(), &self.identity, now, self.duration);
        let lease = held_lease(
            &self.name,
            &self.namespace,
            &self.identity,
            self.duration,
            now,
            current.as_ref(),
        );
        let pp = PostParams::default();
        let res = match action {
            LeaseAction::Wait(d) => return Ok(Some(d)),
            LeaseAction::Create => self.api.create(&pp, &lease).await.map(|_| ()),
            LeaseAction::Renew | LeaseAction::Take => {
                self.api.replace(&self.name, &pp, &lease).await.map(|_| ())
            }
        };
        match res {
            Ok(()) => Ok(None),
            // Someone else wrote first: look again soon.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Some(Duration::from_secs(1))),
            Err(e) => Err(e),
        }
    }

    /// Waits until this identity leads.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        loop {
            match self.try_acquire().await {
                Ok(None) => return Ok(()),
                Ok(Some(d)) => tokio::time::sleep(d.min(self.renew_every)).await,
                Err(e) => {
                    tracing::warn!("leader election: {e}");
                    tokio::time::sleep(self.renew_every).await;
                }
            }
        }
    }

    /// Renews the lease until a renewal does not succeed within the renew deadline (counted
    /// from the last successful one); returns why. The caller must stop working then: a
    /// standby may take the lease once `duration` has passed since the last renewal.
    pub async fn hold(&self) -> LeaderError {
        let deadline = self.renew_deadline.min(self.duration);
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_every).await;
            let left = deadline.saturating_sub(last_ok.elapsed());
            if left.is_zero() {
                return LeaderError::Lost(
                    self.name.clone(),
                    format!("not renewed within {}s", deadline.as_secs()),
                );
            }
            match tokio::time::timeout(left, self.try_acquire()).await {
                Err(_) => {
                    return LeaderError::Lost(
                        self.name.clone(),
                        format!(
                            "the renewal did not finish within the renew deadline ({}s)",
                            deadline.as_secs()
                        ),
                    );
                }
                Ok(Ok(None)) => last_ok = tokio::time::Instant::now(),
                Ok(Ok(Some(_))) => {
                    return LeaderError::Lost(
                        self.name.clone(),
                        "another identity holds it".into(),
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!("renewing the leader lease: {e}");
                    if last_ok.elapsed() >= deadline {
                        return LeaderError::Lost(self.name.clone(), e.to_string());
                    }
                }
            }
        }
    }
}

/// Creates or renews an agent's node lease once.
pub async fn heartbeat_once(
    api: &Api<Lease>,
    name: &str,
    namespace: &str,
    identity: &str,
    duration: Duration,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<(), kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(name).await?;
    let mut lease = held_lease(name, namespace, identity, duration, now, current.as_ref());
    lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .extend(annotations.clone());
    let pp = PostParams::default();
    match current {
        None => api.create(&pp, &lease).await.map(|_| ()),
        Some(_) => api.replace(name, &pp, &lease).await.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).expect("valid")
    }

    fn lease(holder: &str, renewed: i64, secs: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(secs),
                renew_time: Some(MicroTime(ts(renewed))),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn leader_election_decisions() {
        let d = Duration::from_secs(15);
        assert_eq!(leader_action(None, "a", ts(0), d), LeaseAction::Create);
        assert_eq!(
            leader_action(Some(&lease("a", 0, 15)), "a", ts(5), d),
            LeaseAction::Renew
        );
        assert_eq!(
            leader_action(Some(&lease("b", 0, 15)), "a", ts(5), d),
            LeaseAction::Wait(Duration::from_secs(10))
        );
        assert_eq!(
            leader_action(Some(&lease("b", 0, 15)), "a", ts(16), d),
            LeaseAction::Take
        );
        assert_eq!(
            leader_action(Some(&lease("", 0, 15)), "a", ts(1), d),
            LeaseAction::Take
        );
        let taken = held_lease("l", "ns", "a", d, ts(16), Some(&lease("b", 0, 15)));
        let spec = taken.spec.expect("spec");
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(ts(16))));
    }

    fn mock() -> (
        Api<Lease>,
        tower_test::mock::Handle<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >,
    ) {
        let (svc, handle) = tower_test::mock::pair();
        (
            Api::namespaced(kube::Client::new(svc, "default"), "ns"),
            handle,
        )
    }

    fn election(api: Api<Lease>) -> LeaderElection {
        LeaderElection {
            api,
            name: "leader".into(),
            namespace: "ns".into(),
            identity: "me".into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }

    fn respond(
        send: tower_test::mock::SendResponse<http::Response<kube::client::Body>>,
        code: u16,
        body: serde_json::Value,
    ) {
        send.send_response(
            http::Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(kube::client::Body::from(
                    serde_json::to_vec(&body).expect("json"),
                ))
                .expect("response"),
        );
    }

    /// A leader whose renewals hang (an API server that accepts the connection and never
    /// answers) stops before the lease expires for the standbys.
    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewals_hang_stops_before_a_standby_may_take_over() {
        let (api, mut handle) = mock();
        let e = election(api);
        let started = tokio::time::Instant::now();
        let hold = tokio::spawn(async move { e.hold().await });
        // The first renewal's GET arrives and is never answered.
        let (req, _send) = handle.next_request().await.expect("request");
        assert_eq!(req.method(), "GET");
        let lost = hold.await.expect("join");
        let waited = started.elapsed();
        assert!(
            matches!(&lost, LeaderError::Lost(_, m) if m.contains("renew deadline")),
            "{lost:?}"
        );
        assert!(
            waited <= Duration::from_secs(10) && waited < Duration::from_secs(15),
            "stopped after {waited:?}"
        );
    }

    /// A renewal that lost a race (409 Conflict on the replace with a stale resourceVersion)
    /// is not leadership.
    #[tokio::test]
    async fn a_conflicting_lease_update_is_not_leadership() {
        let (api, mut handle) = mock();
        let e = election(api);
        let task = tokio::spawn(async move { e.try_acquire().await });
        let (req, send) = handle.next_request().await.expect("get");
        assert_eq!(req.method(), "GET");
        let mut held = lease("me", 0, 15);
        held.metadata.name = Some("leader".into());
        held.metadata.namespace = Some("ns".into());
        held.metadata.resource_version = Some("5".into());
        respond(send, 200, serde_json::to_value(&held).expect("lease"));
        let (req, send) = handle.next_request().await.expect("put");
        assert_eq!(req.method(), "PUT");
        let body = req.into_body().collect_bytes().await.expect("body");
        let sent: Lease = serde_json::from_slice(&body).expect("lease");
        assert_eq!(sent.metadata.resource_version.as_deref(), Some("5"));
        respond(
            send,
            409,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "Conflict", "code": 409,
                "message": "Operation cannot be fulfilled on leases.coordination.k8s.io \"leader\": the object has been modified; please apply your changes to the latest version and try again"}),
        );
        assert_eq!(
            task.await.expect("join").expect("no error"),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn agent_lease_freshness() {
        let stale = Duration::from_secs(40);
        assert!(lease_fresh(&lease("n", 0, 30), ts(20), stale));
        assert!(!lease_fresh(&lease("n", 0, 30), ts(31), stale));
        assert!(!lease_fresh(&lease("n", 0, 3600), ts(41), stale));
        assert!(!lease_fresh(&Lease::default(), ts(0), stale));
    }
}
