//! postgres_exporter for the namespace's database: Deployment, Service, ServiceMonitor.

use serde_json::{Value, json};

use super::{
    DesiredObject, NON_ROOT_ID, NamespaceSettings, POSTGRES_COMPONENT, POSTGRES_EXPORTER,
    POSTGRES_EXPORTER_PORT, POSTGRES_EXPORTER_PORT_NAME, PostgresTarget, desired, headless_service,
    metadata_with_labels, prometheus,
};
use crate::{
    config::Config,
    keys::{self, Keys},
};

const COMPONENT: &str = "app.kubernetes.io/component";
const NAME: &str = "app.kubernetes.io/name";

/// Labels of the exporter's pods; its Deployment and Service select on them.
pub fn postgres_exporter_pod_labels(settings: &NamespaceSettings, keys: &Keys) -> Value {
    json!({
        NAME: "postgres-exporter",
        keys::MANAGED_BY_KEY: keys::MANAGED_BY,
        keys.owner_namespace.clone(): settings.name,
    })
}

fn service_labels(settings: &NamespaceSettings, keys: &Keys) -> Value {
    let mut labels = prometheus::prometheus_selector_labels(settings, keys);
    labels[COMPONENT] = json!(POSTGRES_COMPONENT);
    labels
}

/// Deployment, Service and ServiceMonitor, in apply order.
pub fn postgres_exporter_objects(
    settings: &NamespaceSettings,
    config: &Config,
    target: &PostgresTarget,
) -> Vec<DesiredObject> {
    let keys = config.keys();
    vec![
        deployment(settings, config, target),
        service(settings, config),
        prometheus::service_monitor(
            settings,
            config,
            POSTGRES_EXPORTER,
            POSTGRES_COMPONENT,
            service_labels(settings, &keys),
            POSTGRES_EXPORTER_PORT_NAME,
            &[],
        ),
    ]
}

fn deployment(
    settings: &NamespaceSettings,
    config: &Config,
    target: &PostgresTarget,
) -> DesiredObject {
    let keys = config.keys();
    let selector = postgres_exporter_pod_labels(settings, &keys);
    let mut pod_labels = selector.clone();
    pod_labels[COMPONENT] = json!(POSTGRES_COMPONENT);
    pod_labels[keys.inject.as_str()] = json!(keys::DISABLED);
    let secret = |key: &str| json!({ "secretKeyRef": { "name": target.secret, "key": key } });
    let probe = |period: i32| {
        json!({
            "httpGet": { "path": "/", "port": POSTGRES_EXPORTER_PORT_NAME },
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        })
    };
    let container = json!({
        "name": "postgres-exporter",
        "image": config.reconcile.postgres_exporter.image,
        "imagePullPolicy": "IfNotPresent",
        "args": [format!("--web.listen-address=:{POSTGRES_EXPORTER_PORT}")],
        "env": [
            {
                "name": "DATA_SOURCE_URI",
                "value": format!("{}:{}/{}?sslmode=disable", target.host, target.port, target.database),
            },
            { "name": "DATA_SOURCE_USER", "valueFrom": secret("username") },
            { "name": "DATA_SOURCE_PASS", "valueFrom": secret("password") },
        ],
        "ports": [{
            "name": POSTGRES_EXPORTER_PORT_NAME,
            "containerPort": POSTGRES_EXPORTER_PORT,
            "protocol": "TCP",
        }],
        "readinessProbe": probe(10),
        "livenessProbe": probe(20),
        "resources": config.reconcile.postgres_exporter.resources,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": NON_ROOT_ID,
            "runAsGroup": NON_ROOT_ID,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    desired(
        "apps/v1",
        "Deployment",
        "deployments",
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata_with_labels(settings, config, &settings.name, POSTGRES_EXPORTER, &[(COMPONENT, POSTGRES_COMPONENT)]),
            "spec": {
                "replicas": 1,
                "selector": { "matchLabels": selector },
                "template": {
                    "metadata": { "labels": pod_labels },
                    "spec": {
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "securityContext": {
                            "runAsNonRoot": true,
                            "seccompProfile": { "type": "RuntimeDefault" },
                        },
                        "containers": [container],
                    },
                },
            },
        }),
    )
}

fn service(settings: &NamespaceSettings, config: &Config) -> DesiredObject {
    let keys = config.keys();
    let mut meta = super::metadata(settings, config, &settings.name, POSTGRES_EXPORTER);
    meta["labels"] = service_labels(settings, &keys);
    headless_service(
        meta,
        postgres_exporter_pod_labels(settings, &keys),
        POSTGRES_EXPORTER_PORT_NAME,
        POSTGRES_EXPORTER_PORT,
        json!(POSTGRES_EXPORTER_PORT_NAME),
    )
}
