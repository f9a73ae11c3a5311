//! Process metrics, served in the OpenMetrics text format on the admin port.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Metric, Registry},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `injected`, `skipped`, `ignored` or `error`.
    pub outcome: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileFailureLabels {
    pub reason: String,
}

/// Every metric the process exports. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub admissions: Family<AdmissionLabels, Counter>,
    pub admission_duration: Histogram,
    pub rejected_requests: Family<ReasonLabels, Counter>,
    pub tls_reloads: Family<ResultLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub reconcile_runs: Counter,
    pub reconcile_failures: Family<ReconcileFailureLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub uninjected_pods: Family<NamespaceLabels, Gauge>,
    pub outdated_pods: Family<NamespaceLabels, Gauge>,
    pub workload_restarts: Counter,
    pub outdated_restarts: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers `metric` under `name` and returns it (metrics are shared handles).
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chiller_metrics");
        let admissions = register(
            &mut registry,
            "admissions",
            "Pod admission reviews answered, by outcome and reason",
            Family::<AdmissionLabels, Counter>::default(),
        );
        let admission_duration = register(
            &mut registry,
            "admission_duration_seconds",
            "Time spent answering an admission review",
            Histogram::new([
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
        );
        let rejected_requests = register(
            &mut registry,
            "rejected_requests",
            "Webhook requests answered with a 4xx, by reason",
            Family::<ReasonLabels, Counter>::default(),
        );
        let tls_reloads = register(
            &mut registry,
            "tls_reloads",
            "Attempts to load a changed serving certificate, by result",
            Family::<ResultLabels, Counter>::default(),
        );
        let config_reloads = register(
            &mut registry,
            "config_reloads",
            "Attempts to load a changed config file, by result (a failure keeps the running config)",
            Family::<ResultLabels, Counter>::default(),
        );
        let reconcile_runs = register(
            &mut registry,
            "reconcile_runs",
            "Namespace reconciliations run",
            Counter::default(),
        );
        let reconcile_failures = register(
            &mut registry,
            "reconcile_failures",
            "Namespace reconciliations that failed, by reason",
            Family::<ReconcileFailureLabels, Counter>::default(),
        );
        let reconcile_duration = register(
            &mut registry,
            "reconcile_duration_seconds",
            "Time one namespace reconciliation took",
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        );
        let uninjected_pods = register(
            &mut registry,
            "uninjected_pods",
            "Pods in an opted-in namespace that should carry the sidecar but do not",
            Family::<NamespaceLabels, Gauge>::default(),
        );
        let outdated_pods = register(
            &mut registry,
            "outdated_pods",
            "Injected pods in an opted-in namespace whose config hash is not the current one",
            Family::<NamespaceLabels, Gauge>::default(),
        );
        let workload_restarts = register(
            &mut registry,
            "workload_restarts",
            "Deployments and StatefulSets restarted so their pods get injected",
            Counter::default(),
        );
        let outdated_restarts = register(
            &mut registry,
            "outdated_restarts",
            "Deployments and StatefulSets restarted so their pods get the current sidecar config",
            Counter::default(),
        );
        Self {
            registry,
            admissions,
            admission_duration,
            rejected_requests,
            tls_reloads,
            config_reloads,
            reconcile_runs,
            reconcile_failures,
            reconcile_duration,
            uninjected_pods,
            outdated_pods,
            workload_restarts,
            outdated_restarts,
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn admission(&self, outcome: &'static str, reason: &'static str) {
        self.admissions
            .get_or_create(&AdmissionLabels { outcome, reason })
            .inc();
    }

    pub fn rejected(&self, reason: &'static str) {
        self.rejected_requests
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}
