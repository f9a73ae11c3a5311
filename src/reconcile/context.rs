//! What every reconcile shares: the client, config, caches, metrics, the
//! event recorder and whether this replica leads; plus the error type and the
//! error policy.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{Client, ResourceExt, runtime::controller::Action};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{desired::DesiredError, events::EventSeries, live::LiveCache, pods::PodCache};
use crate::{admin::Metrics, inject::Injector, keys::Keys, live_config::LiveInjector};

pub use super::live::FIELD_MANAGER;
/// First retry delay after a failed reconcile; doubles per failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A workload is restarted for injection at most once per this period.
pub const RESTART_COOLDOWN: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(
        "namespace {namespace}: the Prometheus Operator CRDs are not installed ({kinds} not served by the API server)"
    )]
    PrometheusOperatorMissing { namespace: String, kinds: String },
    #[error("namespace {namespace}: invalid settings: {source}")]
    Settings {
        namespace: String,
        #[source]
        source: DesiredError,
    },
    #[error(
        "namespace {namespace}: {kind} {name} was restarted for the current sidecar config at {since} and is not available after {timeout_seconds} s; rollout of outdated workloads stopped"
    )]
    RolloutStuck {
        namespace: String,
        kind: String,
        name: String,
        since: String,
        timeout_seconds: u64,
    },
    #[error("namespace {namespace}: the watch of {what} has not listed them yet")]
    NotSynced {
        namespace: String,
        what: &'static str,
    },
    #[error("{action} {kind} {namespace}/{name}: {source}")]
    Api {
        action: &'static str,
        kind: String,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ReconcileError {
    /// The `reason` label of `reconcile_failures`.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Self::PrometheusOperatorMissing { .. } => "crd_missing",
            Self::Settings { .. } => "invalid_settings",
            Self::RolloutStuck { .. } => "rollout_stuck",
            Self::NotSynced { .. } => "not_synced",
            Self::Api { .. } => "api_error",
        }
    }

    /// The `reason` of the namespace status annotation.
    pub fn status_reason(&self) -> &'static str {
        match self {
            Self::PrometheusOperatorMissing { .. } => "PrometheusOperatorMissing",
            Self::Settings { .. } => "InvalidSettings",
            Self::RolloutStuck { .. } => "RolloutStuck",
            Self::NotSynced { .. } => "NotSynced",
            Self::Api { .. } => "ApplyFailed",
        }
    }
}

/// The namespace status annotation (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceStatus {
    pub ready: bool,
    pub reason: String,
    pub message: String,
    /// Pods that should carry the sidecar but do not.
    pub uninjected_pods: usize,
    /// Pods carrying the sidecar, outdated ones included.
    #[serde(default)]
    pub injected_pods: usize,
    /// Injected pods whose config hash is not the current one.
    #[serde(default)]
    pub outdated_pods: usize,
    /// Pods the webhook skipped with a warning, by reason.
    #[serde(default)]
    pub skipped_pods: BTreeMap<String, usize>,
    /// The config hash pods are injected with now.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config_hash: String,
}

/// A workload some uninjected pods belong to: their controller (or a bare
/// pod itself), or the Namespace whose bare pods are reported together.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Workload {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: Option<String>,
}

#[derive(Debug, Default)]
struct Memory {
    /// Consecutive failures per namespace.
    failures: HashMap<String, u32>,
    /// Uninjected pods last reported per namespace and workload, while this
    /// replica leads: a new leader reports once more, counted in the same
    /// Event series (kept on the API server).
    reported: HashMap<String, BTreeMap<Workload, BTreeSet<String>>>,
    /// Skips reported per namespace, as (workload, reason).
    skips_reported: HashMap<String, BTreeSet<(Workload, String)>>,
    /// The status last written per namespace, and the resourceVersion of
    /// the Namespace it was written over.
    status_written: HashMap<String, (String, NamespaceStatus)>,
}

pub struct Context {
    pub client: Client,
    /// Fixed for the process: the domain never changes on a reload.
    pub keys: Keys,
    /// The current config, reloaded with `serve`'s config file.
    injector: Arc<LiveInjector>,
    pub metrics: Arc<Metrics>,
    /// Events, counted in series kept on the API server.
    pub recorder: EventSeries,
    pub live: LiveCache,
    /// Pods and ReplicaSet owners, from watches.
    pub pods: PodCache,
    /// True while this replica holds the lease; nothing is written otherwise.
    pub leading: watch::Receiver<bool>,
    pub restart_cooldown: Duration,
    memory: Mutex<Memory>,
}

impl Context {
    pub fn new(
        client: Client,
        injector: impl Into<Arc<LiveInjector>>,
        metrics: Arc<Metrics>,
        leading: watch::Receiver<bool>,
        identity: &str,
    ) -> Self {
        let injector = injector.into();
        let keys = injector.current().keys().clone();
        let recorder = EventSeries::new(client.clone(), FIELD_MANAGER, identity);
        Self {
            live: LiveCache::new(&keys),
            pods: PodCache::new(&keys),
            client,
            keys,
            injector,
            metrics,
            recorder,
            leading,
            restart_cooldown: RESTART_COOLDOWN,
            memory: Mutex::default(),
        }
    }

    /// The injector of the current config (and with it the config).
    pub fn injector(&self) -> Arc<Injector> {
        self.injector.current()
    }

    /// Changes each time a new config replaces the running one.
    pub fn config_changes(&self) -> watch::Receiver<u64> {
        self.injector.changes()
    }

    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().expect("reconcile memory lock poisoned")
    }

    pub(super) fn record_success(&self, namespace: &str) {
        self.memory().failures.remove(namespace);
    }

    fn record_failure(&self, namespace: &str) -> u32 {
        let mut memory = self.memory();
        let failures = memory.failures.entry(namespace.to_string()).or_insert(0);
        *failures = failures.saturating_add(1);
        *failures
    }

    /// Replaces the namespace's reported uninjected pods; returns the workloads
    /// whose set of pods changed (and so deserve a new event).
    pub(super) fn update_reported(
        &self,
        namespace: &str,
        current: BTreeMap<Workload, BTreeSet<String>>,
    ) -> BTreeSet<Workload> {
        let mut memory = self.memory();
        let previous = memory.reported.remove(namespace).unwrap_or_default();
        let changed = current
            .iter()
            .filter(|(workload, pods)| previous.get(*workload) != Some(*pods))
            .map(|(workload, _)| workload.clone())
            .collect();
        if !current.is_empty() {
            memory.reported.insert(namespace.to_string(), current);
        }
        changed
    }
}

impl Context {
    /// Takes the (workload, reason) skips seen now in a namespace; returns
    /// those never reported, at most `limit`, and remembers them as
    /// reported. Pairs no longer seen are forgotten, so a skip that comes
    /// back is reported again.
    pub(super) fn skips_to_report(
        &self,
        namespace: &str,
        current: &BTreeSet<(Workload, String)>,
        limit: usize,
    ) -> Vec<(Workload, String)> {
        let mut memory = self.memory();
        let reported = memory
            .skips_reported
            .entry(namespace.to_string())
            .or_default();
        let new = select_new(reported, current, limit);
        if reported.is_empty() {
            memory.skips_reported.remove(namespace);
        }
        new
    }
}

/// Forgets reported items no longer current; returns up to `limit` current
/// items not reported yet, and marks them reported.
fn select_new<T: Ord + Clone>(
    reported: &mut BTreeSet<T>,
    current: &BTreeSet<T>,
    limit: usize,
) -> Vec<T> {
    reported.retain(|item| current.contains(item));
    let new: Vec<T> = current
        .iter()
        .filter(|item| !reported.contains(*item))
        .take(limit)
        .cloned()
        .collect();
    reported.extend(new.iter().cloned());
    new
}

/// Retry delay after the `failures`-th consecutive failure.
pub fn backoff_delay(failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1));
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// Requeues a failed namespace with exponential backoff (per namespace; a
/// success resets it). Other namespaces are unaffected.
pub fn error_policy(
    namespace: Arc<Namespace>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    let name = namespace.name_any();
    let delay = backoff_delay(ctx.record_failure(&name));
    tracing::warn!(namespace = %name, %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

impl Context {
    /// Whether `status` is what we wrote over this very version of the
    /// namespace: the watch has not brought our patch back yet.
    pub(super) fn status_in_flight(&self, namespace: &Namespace, status: &NamespaceStatus) -> bool {
        let memory = self.memory();
        written_over(
            memory.status_written.get(&namespace.name_any()),
            namespace.metadata.resource_version.as_deref(),
            status,
        )
    }

    pub(super) fn remember_status(&self, namespace: &Namespace, status: Option<&NamespaceStatus>) {
        let mut memory = self.memory();
        let name = namespace.name_any();
        match (status, namespace.metadata.resource_version.clone()) {
            (Some(status), Some(version)) => {
                memory
                    .status_written
                    .insert(name, (version, status.clone()));
            }
            _ => {
                memory.status_written.remove(&name);
            }
        }
    }
}

/// Whether `written` is `status`, written over `version` of the namespace.
fn written_over(
    written: Option<&(String, NamespaceStatus)>,
    version: Option<&str>,
    status: &NamespaceStatus,
) -> bool {
    matches!((written, version), (Some((over, written)), Some(version)) if over == version && written == status)
}

/// A 404 from the API server.
pub(super) fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_not_found())
}

/// `text` cut to at most `max` characters (an Event note's limit).
pub(super) fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => text[..at].to_string(),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_counts_as_written_only_over_the_namespace_version_it_was_written_over() {
        let ready = NamespaceStatus {
            ready: true,
            ..Default::default()
        };
        let written = ("41".to_string(), ready.clone());
        assert!(written_over(Some(&written), Some("41"), &ready));
        // The watch brought a newer namespace: compare with what it says.
        assert!(!written_over(Some(&written), Some("42"), &ready));
        // A different status is written, whatever the version.
        assert!(!written_over(
            Some(&written),
            Some("41"),
            &NamespaceStatus::default()
        ));
        assert!(!written_over(None, Some("41"), &ready));
    }

    #[test]
    fn each_skip_is_reported_once_while_it_lasts_and_at_most_limit_at_a_time() {
        let mut reported = BTreeSet::new();
        let current: BTreeSet<u32> = [1, 2, 3].into();
        assert_eq!(select_new(&mut reported, &current, 2), vec![1, 2]);
        assert_eq!(
            select_new(&mut reported, &current, 2),
            vec![3],
            "the rest next time"
        );
        assert!(
            select_new(&mut reported, &current, 2).is_empty(),
            "never twice"
        );
        // 2 goes away and comes back: reported again.
        assert!(select_new(&mut reported, &[1, 3].into(), 2).is_empty());
        assert_eq!(select_new(&mut reported, &current, 2), vec![2]);
    }
}
