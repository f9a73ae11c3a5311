//! The namespace's Prometheus, its RBAC, and the Service and ServiceMonitor
//! in front of the injected statsd exporter sidecars.

use serde_json::{Value, json};

use super::{
    DesiredObject, NON_ROOT_ID, NamespaceSettings, PROMETHEUS, PROMETHEUS_ACCOUNT,
    STATSD_COMPONENT, STATSD_SERVICE, desired, headless_service, metadata, metadata_with_labels,
};
use crate::{
    config::Config,
    keys::{self, Keys},
};

/// The label every Namespace carries with its own name (set by the API server).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
const COMPONENT: &str = "app.kubernetes.io/component";
const API_GROUP_RBAC: &str = "rbac.authorization.k8s.io";

/// Pod labels copied onto every scraped series, so panels can tell apps apart.
pub const POD_TARGET_LABELS: [&str; 4] = [
    "app",
    "app.kubernetes.io/name",
    "app.kubernetes.io/component",
    "app.kubernetes.io/instance",
];

/// Labels the namespace's Prometheus selects its ServiceMonitors by.
pub fn prometheus_selector_labels(settings: &NamespaceSettings, keys: &Keys) -> Value {
    json!({
        keys::MANAGED_BY_KEY: keys::MANAGED_BY,
        keys.owner_namespace.clone(): settings.name,
    })
}

/// Labels of the statsd Service, which its ServiceMonitor selects on.
pub fn statsd_service_labels(settings: &NamespaceSettings, keys: &Keys) -> Value {
    let mut labels = prometheus_selector_labels(settings, keys);
    labels[COMPONENT] = json!(STATSD_COMPONENT);
    labels
}

/// A ServiceMonitor scraping port `port` of the Services labeled `service_labels`.
pub(super) fn service_monitor(
    settings: &NamespaceSettings,
    config: &Config,
    name: &str,
    component: &str,
    service_labels: Value,
    port: &str,
    pod_target_labels: &[&str],
) -> DesiredObject {
    let mut spec = json!({
        "selector": { "matchLabels": service_labels },
        "namespaceSelector": { "matchNames": [settings.name] },
        "endpoints": [{
            "port": port,
            "path": "/metrics",
            "scheme": "http",
            "interval": config.reconcile.prometheus.scrape_interval,
        }],
    });
    if !pod_target_labels.is_empty() {
        spec["podTargetLabels"] = json!(pod_target_labels);
    }
    desired(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        "servicemonitors",
        json!({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": metadata_with_labels(settings, config, &settings.name, name, &[(COMPONENT, component)]),
            "spec": spec,
        }),
    )
}

/// RBAC, the statsd Service and ServiceMonitor, and the Prometheus, in apply order.
pub fn monitoring_objects(settings: &NamespaceSettings, config: &Config) -> Vec<DesiredObject> {
    vec![
        service_account(settings, config),
        role(settings, config),
        role_binding(settings, config),
        statsd_service(settings, config),
        service_monitor(
            settings,
            config,
            STATSD_SERVICE,
            STATSD_COMPONENT,
            statsd_service_labels(settings, &config.keys()),
            &config.sidecar.metrics_port_name,
            &POD_TARGET_LABELS,
        ),
        prometheus(settings, config),
    ]
}

fn service_account(settings: &NamespaceSettings, config: &Config) -> DesiredObject {
    desired(
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(settings, config, &settings.name, PROMETHEUS_ACCOUNT),
        }),
    )
}

/// Target discovery in this namespace only. Prometheus reads nothing else
/// from the API: the operator mounts its configuration.
fn role(settings: &NamespaceSettings, config: &Config) -> DesiredObject {
    let read = json!(["get", "list", "watch"]);
    desired(
        "rbac.authorization.k8s.io/v1",
        "Role",
        "roles",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(settings, config, &settings.name, PROMETHEUS_ACCOUNT),
            "rules": [
                { "apiGroups": [""], "resources": ["services", "endpoints", "pods"], "verbs": read },
                { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read },
            ],
        }),
    )
}

fn role_binding(settings: &NamespaceSettings, config: &Config) -> DesiredObject {
    desired(
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        "rolebindings",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(settings, config, &settings.name, PROMETHEUS_ACCOUNT),
            "roleRef": { "apiGroup": API_GROUP_RBAC, "kind": "Role", "name": PROMETHEUS_ACCOUNT },
            "subjects": [{
                "kind": "ServiceAccount",
                "name": PROMETHEUS_ACCOUNT,
                "namespace": settings.name,
            }],
        }),
    )
}

/// Headless Service over every injected pod. The target port is numeric: a
/// named port on a native sidecar is not resolved by every endpoints controller.
fn statsd_service(settings: &NamespaceSettings, config: &Config) -> DesiredObject {
    let keys = config.keys();
    let mut meta = metadata(settings, config, &settings.name, STATSD_SERVICE);
    meta["labels"] = statsd_service_labels(settings, &keys);
    headless_service(
        meta,
        json!({ keys.injected.clone(): "true" }),
        &config.sidecar.metrics_port_name,
        config.sidecar.metrics_port,
        json!(config.sidecar.metrics_port),
    )
}

/// The namespace's own Prometheus: it sees only this namespace's ServiceMonitors,
/// and its pods opt out of injection.
fn prometheus(settings: &NamespaceSettings, config: &Config) -> DesiredObject {
    let keys = config.keys();
    let prom = &config.reconcile.prometheus;
    let this_namespace = json!({ "matchLabels": { NAMESPACE_NAME_LABEL: settings.name } });
    desired(
        "monitoring.coreos.com/v1",
        "Prometheus",
        "prometheuses",
        json!({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "Prometheus",
            "metadata": metadata(settings, config, &settings.name, PROMETHEUS),
            "spec": {
                "replicas": prom.replicas,
                "serviceAccountName": PROMETHEUS_ACCOUNT,
                "serviceDiscoveryRole": "EndpointSlice",
                "scrapeInterval": prom.scrape_interval,
                "retention": prom.retention,
                "retentionSize": prom.retention_size,
                "resources": prom.resources,
                // PodMonitors, Probes, rules and ScrapeConfigs: a null selector selects none.
                "serviceMonitorSelector": { "matchLabels": prometheus_selector_labels(settings, &keys) },
                "serviceMonitorNamespaceSelector": this_namespace,
                "podMonitorNamespaceSelector": this_namespace,
                "probeNamespaceSelector": this_namespace,
                "ruleNamespaceSelector": this_namespace,
                "scrapeConfigNamespaceSelector": this_namespace,
                "podMetadata": {
                    "labels": {
                        keys.inject.clone(): keys::DISABLED,
                        keys.owner_namespace.clone(): settings.name,
                    },
                },
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": NON_ROOT_ID,
                    "runAsGroup": NON_ROOT_ID,
                    "fsGroup": NON_ROOT_ID,
                    "seccompProfile": { "type": "RuntimeDefault" },
                },
            },
        }),
    )
}
