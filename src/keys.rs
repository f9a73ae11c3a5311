//! Label and annotation keys, all under one domain (`metrics.chiller.io` by default).

/// The domain of every key unless the config names another.
pub const DEFAULT_DOMAIN: &str = "metrics.chiller.io";

/// The key names, built from the configured domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// Namespace label `…/inject=enabled`, pod label `…/inject=disabled`,
    /// pod annotation `…/inject: "false"`.
    pub inject: String,
    /// Pod label set on injected pods.
    pub injected: String,
    /// Pod annotation recording what was injected.
    pub status: String,
    /// Pod annotation carrying the statsd mapping the sidecar reads (through
    /// a downward-API volume), so it is there from the pod's first second.
    pub mapping: String,
    /// Pod annotation naming the target containers.
    pub containers: String,
    /// Pod annotation overriding the statsd prefix.
    pub statsd_prefix: String,
    /// Namespace annotation narrowing which pods are injected.
    pub pod_selector: String,
    /// Namespace annotation `host:port/db` enabling the Postgres exporter.
    pub postgres: String,
    /// Namespace annotation naming the Secret with the Postgres credentials.
    pub postgres_secret: String,
    /// Namespace annotation enabling rollout restarts of uninjected workloads.
    pub restart_uninjected: String,
    /// Namespace annotation where the reconciler records its status.
    pub reconcile_status: String,
    /// Pod annotation recording why the webhook skipped a pod (a reason that
    /// deserves a warning).
    pub skipped: String,
    /// Namespace annotation enabling rollout restarts of outdated workloads.
    pub rollout_outdated: String,
    /// Workload annotation: the config hash it was last restarted for.
    pub restarted_for_config: String,
    /// Workload annotation: when it was restarted for that config.
    pub restarted_for_config_at: String,
    /// Label on every object the reconciler creates, naming the app namespace it serves.
    pub owner_namespace: String,
    /// `<domain>/`, the start of every key above.
    prefix: String,
}

/// Value of the namespace opt-in label.
pub const ENABLED: &str = "enabled";
/// Value of the pod opt-out label.
pub const DISABLED: &str = "disabled";
/// The label every object we create carries.
pub const MANAGED_BY_KEY: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "chiller-metrics";
/// The annotation `kubectl logs` and `kubectl exec` use to pick a container.
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

impl Keys {
    pub fn new(domain: &str) -> Self {
        let key = |name: &str| format!("{domain}/{name}");
        Self {
            inject: key("inject"),
            injected: key("injected"),
            status: key("status"),
            mapping: key("statsd-mapping"),
            containers: key("containers"),
            statsd_prefix: key("statsd-prefix"),
            pod_selector: key("pod-selector"),
            postgres: key("postgres"),
            postgres_secret: key("postgres-secret"),
            restart_uninjected: key("restart-uninjected"),
            reconcile_status: key("reconcile-status"),
            skipped: key("skipped"),
            rollout_outdated: key("rollout-outdated"),
            restarted_for_config: key("restarted-for-config"),
            restarted_for_config_at: key("restarted-for-config-at"),
            owner_namespace: key("owner-namespace"),
            prefix: key(""),
        }
    }

    /// Whether `key` is under our domain.
    pub fn is_ours(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_DOMAIN)
    }
}
