//! The Grafana datasource and dashboard ConfigMaps, picked up by Grafana's
//! sidecar through the `grafana_datasource` and `grafana_dashboard` labels.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{DesiredObject, NamespaceSettings, desired, metadata_with_labels};
use crate::config::Config;

/// The dashboard; every `datasource` in it gets the namespace's datasource uid.
const DASHBOARD: &str = include_str!("dashboard.json");
/// Longest uid Grafana accepts.
pub const MAX_UID_LEN: usize = 40;
const HASH_LEN: usize = 12;

/// A Grafana uid for `namespace`: `kind`, as much of the namespace as fits,
/// and a hash of the whole namespace, so namespaces sharing a long prefix
/// still get distinct uids. At most 40 characters of `[a-z0-9-]`.
pub fn grafana_uid(kind: &str, namespace: &str) -> String {
    let digest = Sha256::digest(namespace.as_bytes());
    let hash: String = digest
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<String>()[..HASH_LEN]
        .to_string();
    let room = MAX_UID_LEN.saturating_sub(kind.len() + HASH_LEN + 2);
    let readable: String = namespace
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(room)
        .collect();
    let readable = readable.trim_end_matches(['-', '_']);
    if readable.is_empty() {
        format!("{kind}-{hash}")
    } else {
        format!("{kind}-{readable}-{hash}")
    }
}

/// uid of the namespace's Prometheus datasource.
pub fn datasource_uid(namespace: &str) -> String {
    grafana_uid("prom", namespace)
}

fn dashboard_uid(namespace: &str) -> String {
    grafana_uid("gunicorn", namespace)
}

/// Where the Grafana ConfigMaps go: the configured Grafana namespace, or the app's.
fn grafana_namespace(settings: &NamespaceSettings, config: &Config) -> String {
    config
        .reconcile
        .grafana_namespace
        .clone()
        .unwrap_or_else(|| settings.name.clone())
}

/// The namespace's Prometheus as a Grafana datasource named after the namespace.
pub fn datasource_config_map(settings: &NamespaceSettings, config: &Config) -> DesiredObject {
    let ns = &settings.name;
    let provisioning = json!({
        "apiVersion": 1,
        "datasources": [{
            "name": format!("chiller-metrics {ns}"),
            "uid": datasource_uid(ns),
            "type": "prometheus",
            "access": "proxy",
            "url": format!("http://prometheus-operated.{ns}.svc:9090"),
            "isDefault": false,
            "editable": false,
            "jsonData": { "timeInterval": config.reconcile.prometheus.scrape_interval },
        }],
    });
    let yaml = serde_norway::to_string(&provisioning).expect("JSON values serialize to YAML");
    grafana_config_map(
        settings,
        config,
        &format!("chiller-metrics-datasource-{ns}"),
        ("grafana_datasource", "1"),
        format!("chiller-metrics-{ns}-datasource.yaml"),
        yaml,
    )
}

/// The dashboard for `namespace`, with every panel on its datasource.
pub fn dashboard(namespace: &str) -> Value {
    let mut dashboard: Value =
        serde_json::from_str(DASHBOARD).expect("dashboard.json is valid JSON");
    set_datasource_uid(&mut dashboard, &datasource_uid(namespace));
    dashboard["uid"] = json!(dashboard_uid(namespace));
    dashboard["title"] = json!(format!("gunicorn ({namespace})"));
    dashboard
}

fn set_datasource_uid(value: &mut Value, uid: &str) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if key == "datasource" && child.is_object() {
                    child["uid"] = json!(uid);
                } else {
                    set_datasource_uid(child, uid);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| set_datasource_uid(item, uid)),
        _ => {}
    }
}

pub fn dashboard_config_map(settings: &NamespaceSettings, config: &Config) -> DesiredObject {
    let ns = &settings.name;
    let text = serde_json::to_string_pretty(&dashboard(ns)).expect("JSON serializes");
    grafana_config_map(
        settings,
        config,
        &format!("chiller-metrics-dashboard-{ns}"),
        ("grafana_dashboard", "1"),
        format!("chiller-metrics-{ns}.json"),
        text,
    )
}

/// Names and data keys include the app namespace: Grafana's sidecar writes
/// every key of every labeled ConfigMap into one folder.
fn grafana_config_map(
    settings: &NamespaceSettings,
    config: &Config,
    name: &str,
    sidecar_label: (&str, &str),
    key: String,
    text: String,
) -> DesiredObject {
    let namespace = grafana_namespace(settings, config);
    desired(
        "v1",
        "ConfigMap",
        "configmaps",
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata_with_labels(settings, config, &namespace, name, &[sidecar_label]),
            "data": { key: text },
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_keeps_a_readable_prefix_and_fits() {
        let short = datasource_uid("chiller");
        assert!(short.starts_with("prom-chiller-"), "{short}");
        let long = datasource_uid(&"a".repeat(63));
        assert_eq!(long.len(), MAX_UID_LEN, "{long}");
        assert_ne!(
            datasource_uid(&format!("{}x", "a".repeat(62))),
            datasource_uid(&format!("{}y", "a".repeat(62)))
        );
    }

    #[test]
    fn every_datasource_reference_is_replaced() {
        let text = dashboard("chiller").to_string();
        assert!(!text.contains(r#""uid":"""#), "{text}");
        assert!(text.contains(&datasource_uid("chiller")));
    }
}
