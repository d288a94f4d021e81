//! Prometheus metrics of the controller and the agent (served on `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub action: String,
    pub step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub action: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

/// Every metric, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result (`ok`, `error`).
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_seconds: Histogram,
    /// Steps entered, by action and step.
    pub steps: Family<StepLabels, Counter>,
    /// Objects that reached Succeeded, by action.
    pub succeeded: Family<ActionLabels, Counter>,
    /// Objects that reached Failed, by action and reason.
    pub failed: Family<ReasonLabels, Counter>,
    /// Retries, by action and reason.
    pub retries: Family<ReasonLabels, Counter>,
    /// 1 while this controller replica leads.
    pub leader: Gauge,
    /// Agent tasks by operation and result.
    pub agent_tasks: Family<OperationLabels, Counter>,
    pub agent_task_seconds: HistogramFamily<OperationLabels>,
    /// Bytes the agent moved (`upload`, `download`).
    pub agent_bytes: Family<DirectionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mapsnap_operator");
        let m = Self {
            reconciles: Family::default(),
            reconcile_seconds: duration_histogram(),
            steps: Family::default(),
            succeeded: Family::default(),
            failed: Family::default(),
            retries: Family::default(),
            leader: Gauge::default(),
            agent_tasks: Family::default(),
            agent_task_seconds: Family::new_with_constructor(
                duration_histogram as fn() -> Histogram,
            ),
            agent_bytes: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconciles",
            "Reconciles of BpfMapCheckpoint objects",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            m.reconcile_seconds.clone(),
        );
        registry.register("steps", "Steps entered", m.steps.clone());
        registry.register("succeeded", "Objects that succeeded", m.succeeded.clone());
        registry.register("failed", "Objects that failed, by reason", m.failed.clone());
        registry.register(
            "retries",
            "Step retries after transient errors, by reason",
            m.retries.clone(),
        );
        registry.register(
            "leader",
            "1 while this controller replica is the leader",
            m.leader.clone(),
        );
        registry.register(
            "agent_tasks",
            "Node agent tasks, by operation and result",
            m.agent_tasks.clone(),
        );
        registry.register(
            "agent_task_duration_seconds",
            "Time a node agent task took",
            m.agent_task_seconds.clone(),
        );
        registry.register(
            "agent_bytes",
            "Bytes a node agent moved to or from storage",
            m.agent_bytes.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_registered_metrics() {
        let m = Metrics::default();
        m.reconciles
            .get_or_create(&ResultLabels {
                result: "ok".into(),
            })
            .inc();
        m.agent_task_seconds
            .get_or_create(&OperationLabels {
                operation: "UploadArchive".into(),
                result: "ok".into(),
            })
            .observe(0.5);
        let text = m.encode();
        assert!(
            text.contains("mapsnap_operator_reconciles_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mapsnap_operator_agent_task_duration_seconds_count"),
            "{text}"
        );
        assert!(text.contains("mapsnap_operator_leader 0"), "{text}");
    }
}
