//! Self-tests of the shared test helpers in tests/support: the schema and CRD
//! validators and the tool finder. They live in their own test binary so that
//! each runs once, not once per integration-test binary that has `mod support;`.

use crate::support;

use serde_json::{Value, json};
use support::{install_hint, tool, validate, validate_crd, validate_k8s};

fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "api", "namespace": "chiller", "labels": {"app": "api"}},
        "spec": {
            "containers": [{
                "name": "api",
                "image": "chiller/api:1.4.2",
                "ports": [{"containerPort": 8000, "protocol": "TCP"}],
            }],
        },
    })
}

fn service_monitor() -> Value {
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "gunicorn", "namespace": "chiller", "labels": {"app": "x"}},
        "spec": {
            "selector": {"matchLabels": {"metrics.chiller.io/injected": "true"}},
            "endpoints": [{"port": "statsd-metrics", "interval": "15s", "targetPort": 9102}],
        },
    })
}

#[test]
fn accepts_a_valid_pod_and_service_monitor() {
    validate(&pod()).unwrap();
    validate(&service_monitor()).unwrap();
    validate_k8s(&json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}}, "spec": pod()["spec"]}}}))
    .unwrap();
}

#[test]
fn rejects_a_misspelled_pod_field() {
    let mut pod = pod();
    let containers = pod["spec"]
        .as_object_mut()
        .unwrap()
        .remove("containers")
        .unwrap();
    pod["spec"]["containerss"] = containers;
    let error = validate_k8s(&pod).unwrap_err();
    assert!(error.contains("containerss"), "{error}");
    assert!(error.contains("at /spec"), "{error}");
}

#[test]
fn rejects_a_wrong_type_deep_in_a_pod() {
    let mut pod = pod();
    pod["spec"]["containers"][0]["ports"][0]["containerPort"] = json!("8000");
    let error = validate(&pod).unwrap_err();
    assert!(
        error.contains("/spec/containers/0/ports/0/containerPort"),
        "{error}"
    );
}

#[test]
fn rejects_an_unknown_kind() {
    let error =
        validate_k8s(&json!({"apiVersion": "v1", "kind": "Podd", "metadata": {}})).unwrap_err();
    assert!(error.contains("no schema"), "{error}");
}

#[test]
fn rejects_a_misspelled_crd_field_that_a_cluster_would_prune() {
    let mut monitor = service_monitor();
    monitor["spec"]["endpoints"][0]["intervall"] = json!("30s");
    let error = validate_crd(&monitor).unwrap_err();
    assert!(error.contains("intervall"), "{error}");
    assert!(error.contains("/spec/endpoints/0"), "{error}");
}

#[test]
fn rejects_a_wrong_type_in_a_crd() {
    let mut prometheus = json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "Prometheus",
        "metadata": {"name": "chiller"},
        "spec": {"replicas": 1, "retention": "7d"},
    });
    validate(&prometheus).unwrap();
    prometheus["spec"]["replicas"] = json!("one");
    let error = validate(&prometheus).unwrap_err();
    assert!(error.contains("/spec/replicas"), "{error}");
}

#[test]
fn crd_metadata_is_object_meta() {
    let mut monitor = service_monitor();
    monitor["metadata"]["lables"] = json!({"a": "b"});
    let error = validate(&monitor).unwrap_err();
    assert!(error.contains("lables"), "{error}");
    let mut monitor = service_monitor();
    monitor["metadata"]["labels"] = json!({"a": 1});
    assert!(validate(&monitor).is_err());
}

#[test]
fn int_or_string_accepts_both_and_nothing_else() {
    let mut monitor = service_monitor();
    monitor["spec"]["endpoints"][0]["targetPort"] = json!("statsd-metrics");
    validate_crd(&monitor).unwrap();
    monitor["spec"]["endpoints"][0]["targetPort"] = json!(true);
    assert!(validate_crd(&monitor).is_err());
}

#[test]
fn tool_finds_binaries_on_path_and_names_missing_ones() {
    let sh = tool("sh");
    assert!(sh.ends_with("sh") && sh.is_file(), "{}", sh.display());
    let missing = std::panic::catch_unwind(|| tool("promtool-that-does-not-exist"))
        .expect_err("a missing tool must fail");
    let message = missing
        .downcast_ref::<String>()
        .expect("a formatted panic message");
    assert!(
        message.contains("`promtool-that-does-not-exist` not found"),
        "{message}"
    );
    assert!(message.contains(".tools"), "{message}");
    assert!(
        install_hint("promtool").contains("make tools"),
        "promtool's hint names the target that builds it"
    );
}

#[test]
fn list_items_are_each_validated() {
    let mut bad = pod();
    bad["spec"]["hostNetwork"] = json!("yes");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [pod(), bad]});
    let error = validate(&list).unwrap_err();
    assert!(error.starts_with("items[1]"), "{error}");
}
