//! Process metrics, served in the OpenMetrics text format on the admin port.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
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

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chiller_metrics");
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "admissions",
            "Pod admission reviews answered, by outcome and reason",
            admissions.clone(),
        );
        let admission_duration = Histogram::new([
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
        ]);
        registry.register(
            "admission_duration_seconds",
            "Time spent answering an admission review",
            admission_duration.clone(),
        );
        let rejected_requests = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejected_requests",
            "Webhook requests answered with a 4xx, by reason",
            rejected_requests.clone(),
        );
        let tls_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Attempts to load a changed serving certificate, by result",
            tls_reloads.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Attempts to load a changed config file, by result (a failure keeps the running config)",
            config_reloads.clone(),
        );
        let reconcile_runs = Counter::default();
        registry.register(
            "reconcile_runs",
            "Namespace reconciliations run",
            reconcile_runs.clone(),
        );
        let reconcile_failures = Family::<ReconcileFailureLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Namespace reconciliations that failed, by reason",
            reconcile_failures.clone(),
        );
        let reconcile_duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "reconcile_duration_seconds",
            "Time one namespace reconciliation took",
            reconcile_duration.clone(),
        );
        let uninjected_pods = Family::<NamespaceLabels, Gauge>::default();
        registry.register(
            "uninjected_pods",
            "Pods in an opted-in namespace that should carry the sidecar but do not",
            uninjected_pods.clone(),
        );
        let outdated_pods = Family::<NamespaceLabels, Gauge>::default();
        registry.register(
            "outdated_pods",
            "Injected pods in an opted-in namespace whose config hash is not the current one",
            outdated_pods.clone(),
        );
        let workload_restarts = Counter::default();
        registry.register(
            "workload_restarts",
            "Deployments and StatefulSets restarted so their pods get injected",
            workload_restarts.clone(),
        );
        let outdated_restarts = Counter::default();
        registry.register(
            "outdated_restarts",
            "Deployments and StatefulSets restarted so their pods get the current sidecar config",
            outdated_restarts.clone(),
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
