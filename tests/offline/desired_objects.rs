//! The per-namespace objects: valid against the real Kubernetes schemas and
//! prometheus-operator CRDs, and wired to each other (selectors, ports, uids).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use chiller_metrics::{
    config::{Config, is_dns_label},
    inject::{Decision, Injector, PodContext, ResolvedMode, SkipReason},
    keys::{self, Keys},
    reconcile::desired::{
        self, DesiredObject, NamespaceSettings, PostgresTarget, datasource_uid, desired_objects,
        grafana_uid, render_yaml,
    },
};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};
use serde_json::{Value, json};

use crate::support::{self, yaml_documents};

fn config(grafana_namespace: Option<&str>) -> Config {
    let mut config = Config::default();
    config.reconcile.grafana_namespace = grafana_namespace.map(str::to_string);
    config.validate().expect("test config is valid");
    config
}

fn chiller_postgres() -> PostgresTarget {
    PostgresTarget::parse("db:5432/chiller", "db-auth").expect("chiller's address parses")
}

fn settings(name: &str, uid: Option<&str>, postgres: bool) -> NamespaceSettings {
    NamespaceSettings {
        name: name.to_string(),
        uid: uid.map(str::to_string),
        postgres: postgres.then(chiller_postgres),
    }
}

/// Every combination the loop and `render` produce.
fn variants() -> Vec<(NamespaceSettings, Config)> {
    let mut out = Vec::new();
    for postgres in [false, true] {
        for grafana in [None, Some("monitoring")] {
            for uid in [None, Some("6f1d8e2a-3b4c-4d5e-8f60-718293a4b5c6")] {
                out.push((settings("chiller", uid, postgres), config(grafana)));
            }
        }
    }
    out
}

fn find<'a>(objects: &'a [DesiredObject], kind: &str, name: &str) -> &'a DesiredObject {
    objects
        .iter()
        .find(|o| o.kind == kind && o.name == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {:?}", summary(objects)))
}

fn of_kind<'a>(objects: &'a [DesiredObject], kind: &str) -> Vec<&'a DesiredObject> {
    objects.iter().filter(|o| o.kind == kind).collect()
}

fn summary(objects: &[DesiredObject]) -> Vec<String> {
    objects
        .iter()
        .map(|o| format!("{} {}/{}", o.kind, o.namespace, o.name))
        .collect()
}

fn labels(value: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(value.clone()).unwrap_or_default()
}

fn selector(value: &Value) -> Selector {
    let selector: LabelSelector = serde_json::from_value(value.clone()).expect("a LabelSelector");
    Selector::try_from(selector).expect("selector expressions are valid")
}

fn namespace_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name.to_string())])
}

/// The chiller API pod from the golden AdmissionReview.
fn chiller_api_pod() -> Pod {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/requests/chiller-api.json"
    ))
    .expect("golden request exists");
    let review: Value = serde_json::from_str(&text).expect("golden request is JSON");
    serde_json::from_value(review["request"]["object"].clone()).expect("a Pod")
}

fn injected_pod(pod: &Pod, config: &Config) -> Value {
    let injector = Injector::new(config.clone(), ResolvedMode::Native);
    let Decision::Inject { patch, .. } = injector.mutate(pod, PodContext::default()) else {
        panic!("the chiller API pod is injected");
    };
    let mut value = serde_json::to_value(pod).expect("pod serializes");
    json_patch::patch(&mut value, &patch.to_json_patch()).expect("the patch applies");
    value
}

#[test]
fn every_object_validates_against_the_real_schemas() {
    let mut kinds = BTreeSet::new();
    for (settings, config) in variants() {
        for object in desired_objects(&settings, &config) {
            if let Err(errors) = support::validate(&object.value) {
                panic!(
                    "{} {}/{} is invalid:\n{errors}",
                    object.kind, object.namespace, object.name
                );
            }
            assert_eq!(object.value["apiVersion"], object.api_version);
            assert_eq!(object.value["kind"], object.kind);
            assert_eq!(object.value["metadata"]["name"], object.name.as_str());
            assert_eq!(
                object.value["metadata"]["namespace"],
                object.namespace.as_str()
            );
            kinds.insert(object.kind);
        }
    }
    let expected: BTreeSet<_> = [
        "ConfigMap",
        "Deployment",
        "Prometheus",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]
    .into();
    assert_eq!(kinds, expected);
}

#[test]
fn the_validator_rejects_unknown_and_mistyped_fields() {
    let objects = desired_objects(&settings("chiller", None, true), &config(None));
    let mut monitor = find(&objects, "ServiceMonitor", desired::STATSD_SERVICE)
        .value
        .clone();
    monitor["spec"]["podTargetLabel"] = json!(["app"]);
    assert!(support::validate(&monitor).is_err(), "typo in a CRD spec");

    let mut prometheus = find(&objects, "Prometheus", desired::PROMETHEUS)
        .value
        .clone();
    prometheus["spec"]["retentionSize"] = json!("4 gigabytes");
    assert!(support::validate(&prometheus).is_err(), "bad retentionSize");
    let mut prometheus = find(&objects, "Prometheus", desired::PROMETHEUS)
        .value
        .clone();
    prometheus["metadata"]["lables"] = json!({});
    assert!(support::validate(&prometheus).is_err(), "typo in metadata");

    let mut deployment = find(&objects, "Deployment", desired::POSTGRES_EXPORTER)
        .value
        .clone();
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] =
        json!(true);
    assert!(
        support::validate(&deployment).is_err(),
        "typo in a core kind"
    );
}

#[test]
fn plural_names_match_the_kinds() {
    let objects = desired_objects(&settings("chiller", None, true), &config(None));
    for object in &objects {
        let expected = match object.kind {
            "ConfigMap" => "configmaps",
            "Service" => "services",
            "ServiceAccount" => "serviceaccounts",
            "Role" => "roles",
            "RoleBinding" => "rolebindings",
            "ServiceMonitor" => "servicemonitors",
            "Prometheus" => "prometheuses",
            "Deployment" => "deployments",
            other => panic!("unexpected kind {other}"),
        };
        assert_eq!(object.plural, expected, "{}", object.kind);
    }
}

#[test]
fn the_object_set_with_and_without_postgres() {
    let names = |objects: &[DesiredObject]| -> BTreeSet<String> {
        objects
            .iter()
            .map(|o| format!("{} {}/{}", o.kind, o.namespace, o.name))
            .collect()
    };
    let base = desired_objects(&settings("chiller", None, false), &config(None));
    let expected: BTreeSet<String> = [
        "ConfigMap chiller/chiller-metrics-statsd-mapping",
        "ServiceAccount chiller/chiller-metrics-prometheus",
        "Role chiller/chiller-metrics-prometheus",
        "RoleBinding chiller/chiller-metrics-prometheus",
        "Service chiller/chiller-metrics-statsd",
        "ServiceMonitor chiller/chiller-metrics-statsd",
        "Prometheus chiller/chiller-metrics",
        "ConfigMap chiller/chiller-metrics-datasource-chiller",
        "ConfigMap chiller/chiller-metrics-dashboard-chiller",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names(&base), expected);
    assert_eq!(base.len(), expected.len(), "no duplicates");

    let with_postgres = desired_objects(&settings("chiller", None, true), &config(None));
    let added: BTreeSet<String> = names(&with_postgres)
        .difference(&expected)
        .cloned()
        .collect();
    assert_eq!(
        added,
        [
            "Deployment chiller/chiller-metrics-postgres-exporter",
            "Service chiller/chiller-metrics-postgres-exporter",
            "ServiceMonitor chiller/chiller-metrics-postgres-exporter",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    );
    assert_eq!(with_postgres.len(), expected.len() + 3);
}

#[test]
fn every_object_is_labeled_and_owned_by_its_namespace() {
    let keys = Keys::default();
    for (settings, config) in variants() {
        for object in desired_objects(&settings, &config) {
            let meta = &object.value["metadata"];
            let what = format!("{} {}", object.kind, object.name);
            assert_eq!(
                meta["labels"][keys::MANAGED_BY_KEY],
                keys::MANAGED_BY,
                "{what}"
            );
            assert_eq!(meta["labels"][&keys.owner_namespace], "chiller", "{what}");
            match &settings.uid {
                Some(uid) => assert_eq!(
                    meta["ownerReferences"],
                    json!([{"apiVersion": "v1", "kind": "Namespace", "name": "chiller", "uid": uid}]),
                    "{what}"
                ),
                None => assert!(meta.get("ownerReferences").is_none(), "{what}"),
            }
        }
    }
}

#[test]
fn prometheus_selects_exactly_this_namespaces_service_monitors() {
    let config = config(None);
    let here = desired_objects(&settings("chiller", Some("u1"), true), &config);
    let there = desired_objects(&settings("chiller-staging", Some("u2"), true), &config);
    let prometheus = &find(&here, "Prometheus", desired::PROMETHEUS).value["spec"];
    let monitors = selector(&prometheus["serviceMonitorSelector"]);
    let namespaces = selector(&prometheus["serviceMonitorNamespaceSelector"]);

    let selected: Vec<String> = here
        .iter()
        .chain(&there)
        .filter(|o| o.kind == "ServiceMonitor")
        .filter(|o| namespaces.matches(&namespace_labels(&o.namespace)))
        .filter(|o| monitors.matches(&labels(&o.value["metadata"]["labels"])))
        .map(|o| format!("{}/{}", o.namespace, o.name))
        .collect();
    assert_eq!(
        selected,
        [
            "chiller/chiller-metrics-statsd",
            "chiller/chiller-metrics-postgres-exporter"
        ]
    );

    // Even in one namespace, the other namespace's monitors carry other labels.
    for other in of_kind(&there, "ServiceMonitor") {
        assert!(!monitors.matches(&labels(&other.value["metadata"]["labels"])));
    }
    assert!(!namespaces.matches(&namespace_labels("chiller-staging")));

    // Other kinds of scrape objects: a null selector selects none, and their
    // namespace selectors stay on this namespace.
    for field in [
        "podMonitorSelector",
        "probeSelector",
        "ruleSelector",
        "scrapeConfigSelector",
    ] {
        assert!(prometheus.get(field).is_none(), "{field} must stay null");
    }
    for field in [
        "podMonitorNamespaceSelector",
        "probeNamespaceSelector",
        "ruleNamespaceSelector",
        "scrapeConfigNamespaceSelector",
    ] {
        let only = selector(&prometheus[field]);
        assert!(only.matches(&namespace_labels("chiller")), "{field}");
        assert!(
            !only.matches(&namespace_labels("chiller-staging")),
            "{field}"
        );
    }
}

#[test]
fn prometheus_runs_as_its_own_account_with_namespace_scoped_read_access() {
    let objects = desired_objects(&settings("chiller", None, false), &config(None));
    let prometheus = &find(&objects, "Prometheus", desired::PROMETHEUS).value["spec"];
    let account = prometheus["serviceAccountName"].as_str().unwrap();
    find(&objects, "ServiceAccount", account);
    let binding = &find(&objects, "RoleBinding", account).value;
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": account, "namespace": "chiller"}])
    );
    assert_eq!(binding["roleRef"]["kind"], "Role");
    let role = &find(
        &objects,
        "Role",
        binding["roleRef"]["name"].as_str().unwrap(),
    )
    .value;
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        assert_eq!(rule["verbs"], json!(["get", "list", "watch"]));
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                granted.insert(format!(
                    "{}/{}",
                    group.as_str().unwrap(),
                    resource.as_str().unwrap()
                ));
            }
        }
    }
    let expected: BTreeSet<String> = [
        "/services",
        "/endpoints",
        "/pods",
        "discovery.k8s.io/endpointslices",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(granted, expected);

    let config = config(None);
    assert_eq!(
        prometheus["retention"],
        config.reconcile.prometheus.retention
    );
    assert_eq!(
        prometheus["retentionSize"],
        config.reconcile.prometheus.retention_size
    );
    assert_eq!(prometheus["replicas"], config.reconcile.prometheus.replicas);
    assert_eq!(
        prometheus["resources"],
        serde_json::to_value(&config.reconcile.prometheus.resources).unwrap()
    );
    assert_eq!(prometheus["securityContext"]["runAsNonRoot"], true);
    assert_ne!(prometheus["securityContext"]["runAsUser"], 0);
}

#[test]
fn service_monitors_select_their_services_by_labels_and_port_name() {
    let objects = desired_objects(&settings("chiller", None, true), &config(None));
    let monitors = of_kind(&objects, "ServiceMonitor");
    assert_eq!(monitors.len(), 2);
    for monitor in monitors {
        let spec = &monitor.value["spec"];
        assert_eq!(spec["namespaceSelector"]["matchNames"], json!(["chiller"]));
        let by_labels = selector(&spec["selector"]);
        let services: Vec<_> = of_kind(&objects, "Service")
            .into_iter()
            .filter(|s| s.namespace == "chiller")
            .filter(|s| by_labels.matches(&labels(&s.value["metadata"]["labels"])))
            .collect();
        assert_eq!(
            services.len(),
            1,
            "{} selects {:?}",
            monitor.name,
            services.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        assert_eq!(services[0].name, monitor.name);
        let port_names: Vec<&Value> = services[0].value["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| &p["name"])
            .collect();
        for endpoint in spec["endpoints"].as_array().unwrap() {
            assert!(
                port_names.contains(&&endpoint["port"]),
                "{}: endpoint port {} not in {port_names:?}",
                monitor.name,
                endpoint["port"]
            );
            assert_eq!(endpoint["interval"], "15s");
        }
    }
    let statsd = find(&objects, "ServiceMonitor", desired::STATSD_SERVICE);
    assert_eq!(
        statsd.value["spec"]["podTargetLabels"],
        json!([
            "app",
            "app.kubernetes.io/name",
            "app.kubernetes.io/component",
            "app.kubernetes.io/instance"
        ])
    );
}

#[test]
fn statsd_service_selects_injected_pods_and_targets_the_sidecar_port() {
    let config = config(None);
    let objects = desired_objects(&settings("chiller", None, false), &config);
    let service = &find(&objects, "Service", desired::STATSD_SERVICE).value["spec"];
    let pod = chiller_api_pod();
    let service_selector = labels(&service["selector"]);
    let matches = |pod: &Value| {
        let pod_labels = labels(&pod["metadata"]["labels"]);
        service_selector
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    assert!(!service_selector.is_empty());
    assert!(
        !matches(&serde_json::to_value(&pod).unwrap()),
        "an uninjected pod has no sidecar to scrape"
    );
    let pod = injected_pod(&pod, &config);
    assert!(matches(&pod), "Service selector {service_selector:?}");

    let port = &service["ports"][0];
    assert_eq!(port["name"], config.sidecar.metrics_port_name);
    let sidecar = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == config.sidecar.name)
        .expect("the sidecar is a native sidecar");
    let metrics_port = sidecar["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == config.sidecar.metrics_port_name)
        .expect("sidecar has the metrics port");
    assert!(port["targetPort"].is_u64(), "targetPort must be numeric");
    assert_eq!(port["targetPort"], metrics_port["containerPort"]);
}

#[test]
fn our_own_pods_are_never_injected() {
    let config = config(None);
    let objects = desired_objects(&settings("chiller", None, true), &config);
    let injector = Injector::new(config.clone(), ResolvedMode::Native);
    let prometheus = &find(&objects, "Prometheus", desired::PROMETHEUS).value;
    let exporter = &find(&objects, "Deployment", desired::POSTGRES_EXPORTER).value;
    for pod_labels in [
        &prometheus["spec"]["podMetadata"]["labels"],
        &exporter["spec"]["template"]["metadata"]["labels"],
    ] {
        let mut pod = chiller_api_pod();
        pod.metadata
            .labels
            .get_or_insert_default()
            .extend(labels(pod_labels));
        match injector.mutate(&pod, PodContext::default()) {
            Decision::Skip(SkipReason::OptedOutByLabel(key)) => {
                assert_eq!(key, config.keys().inject)
            }
            other => panic!("labels {pod_labels} do not opt out: {other:?}"),
        }
    }
}

#[test]
fn postgres_exporter_is_wired_to_its_secret_service_and_monitor() {
    let config = config(None);
    let objects = desired_objects(&settings("chiller", None, true), &config);
    let deployment = &find(&objects, "Deployment", desired::POSTGRES_EXPORTER).value["spec"];
    let template_labels = labels(&deployment["template"]["metadata"]["labels"]);
    assert!(selector(&deployment["selector"]).matches(&template_labels));
    let service = &find(&objects, "Service", desired::POSTGRES_EXPORTER).value["spec"];
    let service_selector = labels(&service["selector"]);
    assert!(
        service_selector
            .iter()
            .all(|(k, v)| template_labels.get(k) == Some(v))
    );

    let pod = &deployment["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], config.reconcile.postgres_exporter.image);
    assert!(
        container["image"]
            .as_str()
            .unwrap()
            .rsplit_once(':')
            .is_some(),
        "image is pinned"
    );
    let env: BTreeMap<String, Value> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    assert_eq!(
        env["DATA_SOURCE_URI"]["value"],
        "db:5432/chiller?sslmode=disable"
    );
    for (name, key) in [
        ("DATA_SOURCE_USER", "username"),
        ("DATA_SOURCE_PASS", "password"),
    ] {
        assert_eq!(
            env[name]["valueFrom"]["secretKeyRef"],
            json!({"name": "db-auth", "key": key}),
            "{name}"
        );
    }
    let container_port = &container["ports"][0];
    let service_port = &service["ports"][0];
    assert_eq!(service_port["targetPort"], container_port["name"]);
    assert_eq!(service_port["port"], container_port["containerPort"]);
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["httpGet"]["port"], container_port["name"],
            "{probe}"
        );
    }
    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert!(container["resources"]["limits"]["memory"].is_string());
}

fn datasource(objects: &[DesiredObject]) -> Value {
    let config_map = objects
        .iter()
        .find(|o| o.value["metadata"]["labels"]["grafana_datasource"] == "1")
        .expect("a datasource ConfigMap");
    let data = config_map.value["data"].as_object().unwrap();
    assert_eq!(data.len(), 1);
    let text = data.values().next().unwrap().as_str().unwrap();
    let provisioning: Value = serde_norway::from_str(text).expect("datasource YAML");
    assert_eq!(provisioning["apiVersion"], 1);
    provisioning["datasources"][0].clone()
}

fn dashboard(objects: &[DesiredObject]) -> Value {
    let config_map = objects
        .iter()
        .find(|o| o.value["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("a dashboard ConfigMap");
    let data = config_map.value["data"].as_object().unwrap();
    assert_eq!(data.len(), 1);
    serde_json::from_str(data.values().next().unwrap().as_str().unwrap()).expect("dashboard JSON")
}

fn datasource_uids(value: &Value, out: &mut Vec<Value>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "datasource" {
                    out.push(child["uid"].clone());
                } else {
                    datasource_uids(child, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| datasource_uids(i, out)),
        _ => {}
    }
}

#[test]
fn dashboard_panels_use_the_namespace_datasource() {
    for (settings, config) in variants() {
        let objects = desired_objects(&settings, &config);
        let source = datasource(&objects);
        assert_eq!(source["type"], "prometheus");
        assert_eq!(source["url"], "http://prometheus-operated.chiller.svc:9090");
        assert_eq!(source["uid"], datasource_uid("chiller"));
        let dashboard = dashboard(&objects);
        let mut uids = Vec::new();
        datasource_uids(&dashboard, &mut uids);
        let panels = dashboard["panels"].as_array().unwrap();
        assert!(uids.len() > panels.len(), "every panel names a datasource");
        assert!(uids.iter().all(|uid| *uid == source["uid"]), "{uids:?}");
        assert_ne!(dashboard["uid"], source["uid"]);
        assert!(dashboard["uid"].as_str().unwrap().len() <= 40);
    }
}

#[test]
fn dashboard_has_the_promised_panels() {
    let objects = desired_objects(&settings("chiller", None, false), &config(None));
    let dashboard = dashboard(&objects);
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    let has = |needle: &str| exprs.iter().any(|e| e.contains(needle));
    assert!(has("gunicorn_responses_total"));
    assert!(has("gunicorn_workers"));
    assert!(has("status=~\"5..\""));
    assert!(has("pg_stat_database_tup_fetched"));
    assert!(has("pg_stat_database_tup_inserted"));
    for quantile in ["0.5", "0.9", "0.99"] {
        assert!(
            has(&format!(
                "histogram_quantile({quantile}, sum by (le, prefix) (rate(gunicorn_request_duration_seconds_bucket"
            )),
            "p{quantile}"
        );
    }
}

/// Namespace names as people pick them: long shared prefixes, numbered
/// series, and the 63-character maximum.
fn namespace_names() -> Vec<String> {
    let mut names = Vec::new();
    let long = "chiller-feature-branch-preview-environment-for-team-";
    for i in 0..400 {
        names.push(format!("{long}{i:011}")); // 63 characters
    }
    for i in 0..300 {
        names.push(format!("chiller-{i}"));
    }
    for i in 0..200 {
        names.push(format!("{}{i}", "a".repeat(63 - i.to_string().len())));
    }
    for i in 0..100 {
        names.push(format!("{i}"));
    }
    names
}

#[test]
fn grafana_uids_are_short_valid_and_distinct() {
    let names = namespace_names();
    assert_eq!(names.len(), 1000);
    assert!(
        names.iter().all(|n| is_dns_label(n)),
        "legal namespace names"
    );
    assert!(names.iter().any(|n| n.len() == 63));
    let mut seen = BTreeSet::new();
    for name in &names {
        let objects = desired_objects(&settings(name, None, false), &config(None));
        let uids = [
            datasource(&objects)["uid"].as_str().unwrap().to_string(),
            dashboard(&objects)["uid"].as_str().unwrap().to_string(),
        ];
        for uid in uids {
            assert!(uid.len() <= 40, "{uid} is {} characters", uid.len());
            assert!(
                uid.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{uid}"
            );
            assert!(seen.insert(uid.clone()), "{uid} repeats (namespace {name})");
        }
    }
    assert_eq!(seen.len(), 2000);
    assert!(
        grafana_uid("prom", "chiller").contains("chiller"),
        "readable"
    );
}

#[test]
fn grafana_namespace_moves_only_the_grafana_config_maps() {
    let config = config(Some("monitoring"));
    let a = desired_objects(&settings("chiller", Some("u1"), true), &config);
    let b = desired_objects(&settings("chiller-staging", Some("u2"), true), &config);
    let mut grafana_names = BTreeSet::new();
    let mut data_keys = BTreeSet::new();
    let mut datasource_names = BTreeSet::new();
    for (ns, objects) in [("chiller", &a), ("chiller-staging", &b)] {
        for object in objects.iter() {
            let object_labels = &object.value["metadata"]["labels"];
            let for_grafana = object_labels.get("grafana_dashboard").is_some()
                || object_labels.get("grafana_datasource").is_some();
            if for_grafana {
                assert_eq!(object.namespace, "monitoring");
                assert!(object.name.contains(ns), "{} names {ns}", object.name);
                assert!(grafana_names.insert(object.name.clone()), "{}", object.name);
                for key in object.value["data"].as_object().unwrap().keys() {
                    assert!(key.contains(ns), "data key {key} names {ns}");
                    assert!(data_keys.insert(key.clone()), "data key {key} repeats");
                }
            } else {
                assert_eq!(object.namespace, ns, "{} {}", object.kind, object.name);
            }
            assert_eq!(object_labels[&config.keys().owner_namespace], ns);
        }
        datasource_names.insert(datasource(objects)["name"].as_str().unwrap().to_string());
    }
    assert_eq!(grafana_names.len(), 4);
    assert_eq!(datasource_names.len(), 2, "datasource names differ");
}

#[test]
fn settings_come_from_the_namespace_annotations() {
    let keys = Keys::default();
    let namespace = |annotations: &[(&str, &str)]| -> Namespace {
        serde_json::from_value(json!({
            "metadata": {
                "name": "chiller",
                "uid": "u1",
                "annotations": annotations.iter().cloned().collect::<BTreeMap<_, _>>(),
            }
        }))
        .unwrap()
    };
    let plain = NamespaceSettings::from_namespace(&namespace(&[]), &keys).unwrap();
    assert_eq!(plain, settings("chiller", Some("u1"), false));
    let with_db = NamespaceSettings::from_namespace(
        &namespace(&[
            (&keys.postgres, "db:5432/chiller"),
            (&keys.postgres_secret, "db-auth"),
        ]),
        &keys,
    )
    .unwrap();
    assert_eq!(with_db, settings("chiller", Some("u1"), true));
    let half = NamespaceSettings::from_namespace(
        &namespace(&[(&keys.postgres, "db:5432/chiller")]),
        &keys,
    )
    .unwrap_err();
    assert!(half.to_string().contains(&keys.postgres_secret), "{half}");
}

#[test]
fn postgres_addresses_parse() {
    let target = PostgresTarget::parse("db/chiller", "db-auth").unwrap();
    assert_eq!((target.host.as_str(), target.port), ("db", 5432));
    let target = PostgresTarget::parse("pg.data.svc:6543/app", "s").unwrap();
    assert_eq!(
        (target.host.as_str(), target.port, target.database.as_str()),
        ("pg.data.svc", 6543, "app")
    );
    for bad in [
        "db:5432",
        "db:port/chiller",
        ":5432/chiller",
        "db:5432/",
        "",
    ] {
        assert!(PostgresTarget::parse(bad, "db-auth").is_err(), "{bad:?}");
    }
    assert!(PostgresTarget::parse("db:5432/chiller", " ").is_err());
}

fn render(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chiller-metrics"))
        .arg("render")
        .args(args)
        .env_remove("CHILLER_METRICS_CONFIG")
        .env_remove("CHILLER_METRICS_GRAFANA_NAMESPACE")
        .output()
        .expect("the binary runs")
}

#[test]
fn render_prints_the_desired_objects() {
    let output = render(&[
        "--namespace",
        "chiller",
        "--postgres",
        "db:5432/chiller",
        "--postgres-secret",
        "db-auth",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "render failed: {stderr}");
    let printed = yaml_documents(&String::from_utf8(output.stdout).unwrap());
    let expected: Vec<Value> = desired_objects(&settings("chiller", None, true), &config(None))
        .into_iter()
        .map(|o| o.value)
        .collect();
    assert_eq!(printed, expected);
    for document in &printed {
        support::validate(document).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn render_follows_the_grafana_namespace_flag() {
    let output = render(&[
        "--namespace",
        "chiller",
        "--grafana-namespace",
        "monitoring",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = yaml_documents(&String::from_utf8(output.stdout).unwrap());
    let in_monitoring: Vec<&str> = printed
        .iter()
        .filter(|d| d["metadata"]["namespace"] == "monitoring")
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        in_monitoring,
        [
            "chiller-metrics-datasource-chiller",
            "chiller-metrics-dashboard-chiller"
        ]
    );
}

#[test]
fn render_yaml_round_trips() {
    let objects = desired_objects(&settings("chiller", Some("u1"), true), &config(None));
    let yaml = render_yaml(&objects).unwrap();
    let back = yaml_documents(&yaml);
    assert_eq!(back.len(), objects.len());
    for (doc, object) in back.iter().zip(&objects) {
        assert_eq!(doc, &object.value);
    }
}

#[test]
fn render_rejects_bad_input_with_a_clear_message() {
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "--namespace",
                "chiller",
                "--postgres",
                "db:5432",
                "--postgres-secret",
                "db-auth",
            ],
            "invalid Postgres address \"db:5432\"",
        ),
        (
            &[
                "--namespace",
                "chiller",
                "--postgres",
                "db:fivefourthreetwo/chiller",
                "--postgres-secret",
                "db-auth",
            ],
            "expected host:port/database",
        ),
        (
            &["--namespace", "chiller", "--postgres", "db:5432/chiller"],
            "--postgres-secret",
        ),
        (&["--namespace", "Chiller_Prod"], "invalid namespace name"),
    ];
    for (args, message) in cases {
        let output = render(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?} printed objects");
    }
}

#[test]
fn dashboard_panels_and_queries_have_unique_ids() {
    let objects = desired_objects(&settings("chiller", None, false), &config(None));
    let dashboard = dashboard(&objects);
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{}", panel["id"]);
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        let mut ref_ids = BTreeSet::new();
        for target in panel["targets"].as_array().unwrap() {
            assert!(ref_ids.insert(target["refId"].as_str().unwrap()));
            assert!(target["expr"].as_str().is_some_and(|e| !e.is_empty()));
        }
        assert!(!ref_ids.is_empty(), "{} has no query", panel["title"]);
    }
}

#[test]
fn render_reads_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        "reconcile:\n  grafanaNamespace: grafana\n  prometheus:\n    retention: 30d\n    scrapeInterval: 30s\n",
    )
    .unwrap();
    let output = render(&["--namespace", "chiller", "--config", path.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = yaml_documents(&String::from_utf8(output.stdout).unwrap());
    let prometheus = printed
        .iter()
        .find(|d| d["kind"] == "Prometheus")
        .expect("a Prometheus");
    assert_eq!(prometheus["spec"]["retention"], "30d");
    assert_eq!(prometheus["spec"]["scrapeInterval"], "30s");
    let monitor = printed
        .iter()
        .find(|d| d["kind"] == "ServiceMonitor")
        .expect("a ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "30s");
    assert_eq!(
        printed
            .iter()
            .filter(|d| d["metadata"]["namespace"] == "grafana")
            .count(),
        2
    );
}

#[test]
fn the_reconciler_watches_and_cleans_up_every_kind_we_create() {
    use chiller_metrics::reconcile::live::MANAGED_KINDS;
    for (settings, config) in variants() {
        for object in desired_objects(&settings, &config) {
            assert!(
                MANAGED_KINDS
                    .iter()
                    .any(|k| k.api_version == object.api_version
                        && k.kind == object.kind
                        && k.plural == object.plural),
                "{} {} is not in MANAGED_KINDS, so opting out would leave it behind",
                object.api_version,
                object.kind
            );
        }
    }
}
