//! The objects one opted-in namespace needs, built from the namespace's settings
//! and the config. Pure: the reconcile loop applies them, `render` prints them.

mod grafana;
mod postgres;
mod prometheus;

use k8s_openapi::api::core::v1::Namespace;
use serde_json::{Value, json};

pub use grafana::{
    dashboard, dashboard_config_map, datasource_config_map, datasource_uid, grafana_uid,
};
pub use postgres::{postgres_exporter_objects, postgres_exporter_pod_labels};
pub use prometheus::{monitoring_objects, prometheus_selector_labels, statsd_service_labels};

/// Name of the Service in front of the injected sidecars.
pub const STATSD_SERVICE: &str = "chiller-metrics-statsd";
/// Name of the Prometheus object (its pods are `prometheus-chiller-metrics-N`).
pub const PROMETHEUS: &str = "chiller-metrics";
/// ServiceAccount, Role and RoleBinding of the namespace's Prometheus.
pub const PROMETHEUS_ACCOUNT: &str = "chiller-metrics-prometheus";
/// Deployment, Service and ServiceMonitor of the Postgres exporter.
pub const POSTGRES_EXPORTER: &str = "chiller-metrics-postgres-exporter";
/// Port of postgres_exporter.
pub const POSTGRES_EXPORTER_PORT: u16 = 9187;
/// Port name of postgres_exporter, on its container and Service.
pub const POSTGRES_EXPORTER_PORT_NAME: &str = "metrics";
/// UID and GID Prometheus and the exporter run as (`nobody`).
pub const NON_ROOT_ID: i64 = 65534;
/// `app.kubernetes.io/component` of the statsd Service and its ServiceMonitor.
pub const STATSD_COMPONENT: &str = "statsd-exporter";
/// `app.kubernetes.io/component` of the Postgres exporter objects.
pub const POSTGRES_COMPONENT: &str = "postgres-exporter";

use crate::{
    config::{Config, ConfigError, MAPPING_FILE},
    keys::{self, Keys},
};

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid Postgres address {0:?}: expected host:port/database")]
    PostgresAddress(String),
    #[error("{annotation} is set but {missing} is not; both are needed for the Postgres exporter")]
    PostgresIncomplete { annotation: String, missing: String },
    #[error("invalid namespace name {0:?}: expected a DNS label (lowercase letters, digits, '-')")]
    Namespace(String),
    #[error("cannot write YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
}

/// The Postgres database a namespace asks us to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    /// Secret (same namespace) with `username` and `password` keys.
    pub secret: String,
}

impl PostgresTarget {
    /// Parses `host:port/database` (port defaults to 5432).
    pub fn parse(address: &str, secret: &str) -> Result<Self, DesiredError> {
        let bad = || DesiredError::PostgresAddress(address.to_string());
        let (host_port, database) = address.trim().split_once('/').ok_or_else(bad)?;
        let (host, port) = match host_port.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().map_err(|_| bad())?),
            None => (host_port, 5432),
        };
        if host.is_empty() || database.is_empty() || secret.trim().is_empty() {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_string(),
            port,
            database: database.to_string(),
            secret: secret.trim().to_string(),
        })
    }
}

/// What the loop needs to know about one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSettings {
    pub name: String,
    /// The Namespace's uid, for owner references (absent when rendering offline).
    pub uid: Option<String>,
    pub postgres: Option<PostgresTarget>,
}

impl NamespaceSettings {
    /// Reads the settings from the Namespace's annotations.
    pub fn from_namespace(namespace: &Namespace, keys: &Keys) -> Result<Self, DesiredError> {
        let annotations = namespace.metadata.annotations.clone().unwrap_or_default();
        let postgres = match (
            annotations.get(&keys.postgres),
            annotations.get(&keys.postgres_secret),
        ) {
            (Some(address), Some(secret)) => Some(PostgresTarget::parse(address, secret)?),
            (None, None) => None,
            (Some(_), None) => {
                return Err(DesiredError::PostgresIncomplete {
                    annotation: keys.postgres.clone(),
                    missing: keys.postgres_secret.clone(),
                });
            }
            (None, Some(_)) => {
                return Err(DesiredError::PostgresIncomplete {
                    annotation: keys.postgres_secret.clone(),
                    missing: keys.postgres.clone(),
                });
            }
        };
        Ok(Self {
            name: namespace.metadata.name.clone().unwrap_or_default(),
            uid: namespace.metadata.uid.clone(),
            postgres,
        })
    }
}

/// One object to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredObject {
    pub api_version: &'static str,
    pub kind: &'static str,
    /// Resource name in the API path, e.g. `configmaps`.
    pub plural: &'static str,
    pub namespace: String,
    pub name: String,
    /// The whole object, with apiVersion, kind and metadata.
    pub value: Value,
}

/// Label on every object we create for a namespace, wherever it lives.
pub fn owner_namespace_label(keys: &Keys) -> String {
    format!(
        "{}/owner-namespace",
        keys.inject
            .rsplit_once('/')
            .map(|(d, _)| d)
            .unwrap_or_default()
    )
}

/// Metadata every object gets: managed-by, owner-namespace, and an owner
/// reference to the Namespace so deleting it collects everything.
pub fn metadata(
    settings: &NamespaceSettings,
    config: &Config,
    namespace: &str,
    name: &str,
) -> Value {
    let keys = config.keys();
    let mut meta = json!({
        "name": name,
        "namespace": namespace,
        "labels": {
            keys::MANAGED_BY_KEY: keys::MANAGED_BY,
            keys.owner_namespace.clone(): settings.name,
        },
    });
    if let Some(uid) = &settings.uid {
        meta["ownerReferences"] = json!([{
            "apiVersion": "v1",
            "kind": "Namespace",
            "name": settings.name,
            "uid": uid,
        }]);
    }
    meta
}

/// The statsd mapping ConfigMap the injected sidecar mounts.
pub fn mapping_config_map(settings: &NamespaceSettings, config: &Config) -> DesiredObject {
    let name = config.sidecar.mapping_config_map.clone();
    DesiredObject {
        api_version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        namespace: settings.name.clone(),
        value: json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(settings, config, &settings.name, &name),
            "data": { MAPPING_FILE: config.mapping },
        }),
        name,
    }
}

/// A [`DesiredObject`] around `value`, which already carries its metadata.
fn desired(
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
    value: Value,
) -> DesiredObject {
    let text = |field: &str| {
        value["metadata"][field]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    DesiredObject {
        api_version,
        kind,
        plural,
        namespace: text("namespace"),
        name: text("name"),
        value,
    }
}

/// A headless Service with one TCP port.
fn headless_service(
    meta: Value,
    selector: Value,
    port_name: &str,
    port: u16,
    target_port: Value,
) -> DesiredObject {
    desired(
        "v1",
        "Service",
        "services",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "clusterIP": "None",
                "selector": selector,
                "ports": [{
                    "name": port_name,
                    "port": port,
                    "targetPort": target_port,
                    "protocol": "TCP",
                }],
            },
        }),
    )
}

/// `metadata(...)` with extra labels.
fn metadata_with_labels(
    settings: &NamespaceSettings,
    config: &Config,
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Value {
    let mut meta = metadata(settings, config, namespace, name);
    for (key, value) in labels {
        meta["labels"][*key] = json!(value);
    }
    meta
}

/// Everything the namespace needs, in apply order: RBAC before the Prometheus
/// that uses it, Services before the ServiceMonitors that select them.
pub fn desired_objects(settings: &NamespaceSettings, config: &Config) -> Vec<DesiredObject> {
    let mut objects = vec![mapping_config_map(settings, config)];
    objects.extend(monitoring_objects(settings, config));
    if let Some(target) = &settings.postgres {
        objects.extend(postgres_exporter_objects(settings, config, target));
    }
    objects.push(datasource_config_map(settings, config));
    objects.push(dashboard_config_map(settings, config));
    objects
}

/// Multi-document YAML of the objects.
pub fn render_yaml(objects: &[DesiredObject]) -> Result<String, DesiredError> {
    let mut out = String::new();
    for (i, object) in objects.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_norway::to_string(&object.value)?);
    }
    Ok(out)
}
