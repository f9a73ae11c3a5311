//! The reconcile loop against a real kube-apiserver, under the chart's real
//! RBAC: every call is judged by the chart's ClusterRole and Role, every
//! object is validated (CRD OpenAPI and CEL rules included), and the audit
//! log shows what the loop did.
//!
//! One scenario, in steps, because the last steps judge the whole run: no
//! forbidden call, and no permission that no step used.

use crate::support::controlplane;
use crate::support::install;
use crate::support::{self, wait_until};

use std::{collections::BTreeSet, time::Duration};

use controlplane::ControlPlane;
use install::{
    DOMAIN, Install, kubectl_json, list, managed_objects, opt_in, reconcile_status, rendered, run,
    run_with_input,
};
use serde_json::{Value, json};
use support::https::ServeProcess;

/// Only guards against hangs; nothing asserts on speed except "within
/// seconds" for drift, which the resync of 5 s bounds.
const CONVERGE: Duration = Duration::from_secs(90);
const RESYNC_SECONDS: u64 = 5;
const ROLLOUT_TIMEOUT: u64 = 15;
const SERVICE_ACCOUNT: &str = "system:serviceaccount:chiller-metrics:chiller-metrics";

struct Scenario {
    plane: &'static ControlPlane,
    install: Install,
    serve: ServeProcess,
}

impl Scenario {
    fn logs_on_failure(&self) -> controlplane::LogsOnFailure<'static> {
        self.plane
            .logs_on_failure()
            .with("chiller-metrics serve", self.serve.log_tail(60))
    }

    fn metrics(&self) -> String {
        install::metrics_of(&self.serve)
    }

    /// Our ServiceAccount's audit events since `from`.
    fn our_calls(&self, from: usize) -> Vec<Value> {
        self.plane.audit_events()[from..]
            .iter()
            .filter(|e| e["user"]["username"] == SERVICE_ACCOUNT)
            .cloned()
            .collect()
    }
}

#[test]
fn the_reconcile_loop_under_the_charts_rbac() {
    let plane = ControlPlane::shared();
    let _plane_logs = plane.logs_on_failure();
    let install = Install::chart(
        plane,
        &[
            &format!("config.reconcile.resyncSeconds={RESYNC_SECONDS}"),
            &format!("config.reconcile.rolloutTimeoutSeconds={ROLLOUT_TIMEOUT}"),
        ],
    );
    // Opted in before the loop starts: reconciled while its caches sync.
    opt_in(plane, "early");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let serve = runtime.block_on(install.serve("chiller-metrics-0"));
    install.point_webhook_at(&serve);
    let mut s = Scenario {
        plane,
        install,
        serve,
    };
    let _logs = s.logs_on_failure();

    let early = rendered("early", false);
    wait_until(CONVERGE, "the early namespace is reconciled", || {
        managed_objects(s.plane, "early") == early
    });
    creates_every_object(&s, "shop");
    stays_quiet_at_steady_state(&s, "shop");
    repairs_drift(&s, "shop");
    opt_out_deletes_exactly_what_we_created(&s, "shop");
    namespace_deletion_leaves_no_error_loop(&s, "doomed");
    webhook_down_pods_are_reported_and_restarted(&s, "outage");
    a_failing_namespace_gets_one_event_series(&s, "broken");
    skipped_pods_are_reported_on_their_owner(&s, "skips");
    config_changes_reach_running_pods(&s, "operate");
    a_new_config_reconciles_every_namespace_without_waiting_for_the_resync(
        &s,
        &["config-a", "config-b", "config-c"],
    );
    a_new_replica_counts_on_in_the_event_series(&mut s, &runtime, "broken");
    no_call_was_forbidden(&s);
    every_permission_was_used(&s);
}

fn creates_every_object(s: &Scenario, namespace: &str) {
    opt_in(s.plane, namespace);
    install::annotate_namespace(
        s.plane,
        namespace,
        &[
            &format!("{DOMAIN}/postgres=db:5432/chiller"),
            &format!("{DOMAIN}/postgres-secret=db-auth"),
        ],
    );
    let want = rendered(namespace, true);
    assert!(
        want.iter().any(|(kind, _)| kind == "Prometheus"),
        "{want:?}"
    );
    wait_until(CONVERGE, "every rendered object exists", || {
        managed_objects(s.plane, namespace) == want
    });
    wait_until(CONVERGE, "the namespace status says ready", || {
        reconcile_status(s.plane, namespace).is_some_and(|status| status["ready"] == true)
    });
}

fn stays_quiet_at_steady_state(s: &Scenario, namespace: &str) {
    // Let the last writes of creation settle, then watch two resyncs.
    std::thread::sleep(Duration::from_secs(RESYNC_SECONDS));
    let from = s.plane.audit_events().len();
    let runs_before =
        support::https::sample(&s.metrics(), "chiller_metrics_reconcile_runs_total").unwrap();
    std::thread::sleep(Duration::from_secs(2 * RESYNC_SECONDS + 2));
    let runs_after =
        support::https::sample(&s.metrics(), "chiller_metrics_reconcile_runs_total").unwrap();
    assert!(
        runs_after >= runs_before + 2.0,
        "at least two reconciles ran ({runs_before} -> {runs_after})"
    );
    let writes = install::writes_but_lease_renewals(s.our_calls(from));
    assert!(
        writes.is_empty(),
        "writes at steady state in {namespace}: {:#?}",
        writes
            .iter()
            .map(|e| (&e["verb"], &e["requestURI"]))
            .collect::<Vec<_>>()
    );
}

fn repairs_drift(s: &Scenario, namespace: &str) {
    let want = managed_objects(s.plane, namespace);
    let monitor = want
        .iter()
        .find(|(kind, _)| kind == "ServiceMonitor")
        .expect("a ServiceMonitor")
        .1
        .clone();
    run(s
        .plane
        .kubectl()
        .args(["delete", "servicemonitor", &monitor, "-n", namespace]));
    let prometheus = want
        .iter()
        .find(|(kind, _)| kind == "Prometheus")
        .unwrap()
        .1
        .clone();
    let replicas = |plane: &ControlPlane| {
        kubectl_json(plane, &["get", "prometheus", &prometheus, "-n", namespace])["spec"]["replicas"].clone()
    };
    let original = replicas(s.plane);
    run(s.plane.kubectl().args([
        "patch",
        "prometheus",
        &prometheus,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":3}}"#,
    ]));
    wait_until(
        CONVERGE,
        "the deleted ServiceMonitor is back and the Prometheus repaired",
        || managed_objects(s.plane, namespace) == want && replicas(s.plane) == original,
    );
}

fn opt_out_deletes_exactly_what_we_created(s: &Scenario, namespace: &str) {
    // A look-alike: our labels, made by someone else.
    let look_alike = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "look-alike",
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "chiller-metrics",
                format!("{DOMAIN}/owner-namespace"): namespace,
            },
        },
        "data": {"note": "not made by chiller-metrics"},
    });
    run_with_input(
        s.plane.kubectl().args(["create", "-f", "-"]),
        &look_alike.to_string(),
    );
    run(s.plane.kubectl().args([
        "label",
        "namespace",
        namespace,
        &format!("{DOMAIN}/inject-"),
    ]));
    wait_until(CONVERGE, "everything we made is deleted", || {
        managed_objects(s.plane, namespace)
            .into_iter()
            .collect::<Vec<_>>()
            == [("ConfigMap".to_string(), "look-alike".to_string())]
    });
    wait_until(CONVERGE, "the status annotation is removed", || {
        reconcile_status(s.plane, namespace).is_none()
    });
    // And it stays that way over a resync.
    std::thread::sleep(Duration::from_secs(RESYNC_SECONDS + 1));
    assert_eq!(
        managed_objects(s.plane, namespace).len(),
        1,
        "the look-alike survives a resync"
    );
}

fn namespace_deletion_leaves_no_error_loop(s: &Scenario, namespace: &str) {
    opt_in(s.plane, namespace);
    let want = rendered(namespace, false);
    wait_until(CONVERGE, "the doomed namespace is reconciled", || {
        managed_objects(s.plane, namespace) == want
    });
    run(s.plane.kubectl().args([
        "delete",
        "namespace",
        namespace,
        "--wait=true",
        "--timeout=90s",
    ]));
    let failures = |s: &Scenario| {
        s.metrics()
            .lines()
            .filter(|l| l.starts_with("chiller_metrics_reconcile_failures_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = failures(s);
    std::thread::sleep(Duration::from_secs(2 * RESYNC_SECONDS));
    assert_eq!(
        failures(s),
        before,
        "no reconcile failures after the namespace is gone"
    );
    let errors: Vec<String> = s
        .serve
        .log()
        .into_iter()
        .filter(|l| l.contains(namespace) && l.contains("\"ERROR\""))
        .collect();
    assert!(errors.is_empty(), "errors about {namespace}: {errors:#?}");
}

fn webhook_down_pods_are_reported_and_restarted(s: &Scenario, namespace: &str) {
    opt_in(s.plane, namespace);
    // The webhook is unreachable; failurePolicy Ignore admits pods uninjected.
    let unreachable = format!("https://127.0.0.1:{}/mutate", controlplane::free_port());
    install::patch_webhook_configuration(
        s.plane,
        &json!([{"op": "replace", "path": "/webhooks/0/clientConfig/url", "value": unreachable}]),
    );
    std::thread::sleep(Duration::from_secs(3));
    let app = |kind: &str, name: &str| {
        let mut object = json!({
            "apiVersion": "apps/v1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "app", "image": "ghcr.io/chiller-demo/chiller-api:1.4.2"}]},
                },
            },
        });
        if kind == "StatefulSet" {
            object["spec"]["serviceName"] = json!(name);
        }
        object
    };
    for (kind, name) in [("Deployment", "api"), ("StatefulSet", "ws")] {
        run_with_input(
            s.plane
                .kubectl()
                .args(["apply", "-n", namespace, "-f", "-"]),
            &app(kind, name).to_string(),
        );
    }
    let pods = |plane: &ControlPlane| -> Vec<Value> {
        kubectl_json(plane, &["get", "pods", "-n", namespace])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let injected = |pod: &Value| pod["metadata"]["labels"][format!("{DOMAIN}/injected")] == "true";
    wait_until(CONVERGE, "two uninjected pods", || {
        let pods = pods(s.plane);
        pods.len() == 2 && !pods.iter().any(injected)
    });
    wait_until(CONVERGE, "the namespace status counts them", || {
        reconcile_status(s.plane, namespace).is_some_and(|status| status["uninjectedPods"] == 2)
    });
    wait_until(CONVERGE, "the metric counts them", || {
        support::https::sample(
            &s.metrics(),
            &format!("chiller_metrics_uninjected_pods{{namespace=\"{namespace}\"}}"),
        ) == Some(2.0)
    });
    wait_until(CONVERGE, "a Warning event names the Deployment", || {
        let events = kubectl_json(s.plane, &["get", "events.events.k8s.io", "-n", namespace]);
        events["items"].as_array().unwrap().iter().any(|e| {
            e["type"] == "Warning"
                && e["regarding"]["kind"] == "Deployment"
                && e["regarding"]["name"] == "api"
        })
    });

    // The webhook is back; with restart-uninjected the workloads roll.
    install_webhook_again(s);
    install::annotate_namespace(
        s.plane,
        namespace,
        &[&format!("{DOMAIN}/restart-uninjected=true")],
    );
    wait_until(CONVERGE, "the Deployment's new pod is injected", || {
        pods(s.plane)
            .iter()
            .any(|p| p["metadata"]["name"].as_str().unwrap().starts_with("api-") && injected(p))
    });
    // No kubelet: the StatefulSet controller replaces ws-0 only once it is gone.
    wait_until(CONVERGE, "the StatefulSet was restarted", || {
        let set = kubectl_json(s.plane, &["get", "statefulset", "ws", "-n", namespace]);
        set["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
            .is_string()
    });
}

/// A reconcile that keeps failing reports one Warning event, whose series
/// counts the repeats, and a status that says why.
fn a_failing_namespace_gets_one_event_series(s: &Scenario, namespace: &str) {
    opt_in(s.plane, namespace);
    install::annotate_namespace(
        s.plane,
        namespace,
        &[
            &format!("{DOMAIN}/postgres=db:not-a-port/chiller"),
            &format!("{DOMAIN}/postgres-secret=db-auth"),
        ],
    );
    wait_until(CONVERGE, "the status says why", || {
        reconcile_status(s.plane, namespace).is_some_and(|status| status["ready"] == false)
    });
    let warnings = |plane: &ControlPlane| namespace_warnings(plane, namespace);
    wait_until(
        CONVERGE,
        "the repeated failure is counted in one event series",
        || {
            let warnings = warnings(s.plane);
            warnings.len() == 1 && warnings[0]["series"]["count"].as_i64().unwrap_or(0) >= 2
        },
    );
}

/// The Warning events about Namespace `namespace` (a Namespace is
/// cluster-scoped: its events live in "default", where `kubectl describe
/// namespace` finds them).
fn namespace_warnings(plane: &ControlPlane, namespace: &str) -> Vec<Value> {
    let events = kubectl_json(plane, &["get", "events.events.k8s.io", "-A"]);
    events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["type"] == "Warning"
                && e["regarding"]["kind"] == "Namespace"
                && e["regarding"]["name"] == namespace
        })
        .cloned()
        .collect()
}

/// A replica that takes over (nothing in its memory) finds the series the
/// old one left on the API server and counts on in it.
fn a_new_replica_counts_on_in_the_event_series(
    s: &mut Scenario,
    runtime: &tokio::runtime::Runtime,
    namespace: &str,
) {
    let count = |plane| -> Vec<i64> {
        namespace_warnings(plane, namespace)
            .iter()
            .map(|e| e["series"]["count"].as_i64().unwrap_or(1))
            .collect()
    };
    let before = count(s.plane);
    assert_eq!(before.len(), 1, "one series before the takeover");
    let new = runtime.block_on(s.install.serve("chiller-metrics-1"));
    let _new_logs = s
        .plane
        .logs_on_failure()
        .with("the new replica", new.log_tail(60));
    let old = std::mem::replace(&mut s.serve, new);
    let (status, _) = old.terminate();
    assert!(status.success(), "the old replica exits cleanly");
    s.install.point_webhook_at(&s.serve);
    wait_until(
        CONVERGE,
        "the new leader counts on in the same series",
        || {
            let now = count(s.plane);
            assert!(now.len() <= 1, "a second Event for the same cause: {now:?}");
            now.len() == 1 && now[0] > before[0]
        },
    );
}

fn pods_of(plane: &ControlPlane, namespace: &str) -> Vec<Value> {
    list(plane, "pods", &["-n", namespace])
}

fn events_of(plane: &ControlPlane, namespace: &str) -> Vec<Value> {
    list(plane, "events.events.k8s.io", &["-n", namespace])
}

fn deployment(name: &str, host_network: bool) -> Value {
    let mut spec =
        json!({"containers": [{"name": "app", "image": "ghcr.io/chiller-demo/chiller-api:1.4.2"}]});
    if host_network {
        spec["hostNetwork"] = json!(true);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    })
}

/// A pod the webhook skips with a warning carries the reason; its
/// Deployment gets one Warning event for it, and the namespace status
/// counts it.
fn skipped_pods_are_reported_on_their_owner(s: &Scenario, namespace: &str) {
    opt_in(s.plane, namespace);
    run_with_input(
        s.plane
            .kubectl()
            .args(["apply", "-n", namespace, "-f", "-"]),
        &deployment("edge", true).to_string(),
    );
    let skipped_key = format!("{DOMAIN}/skipped");
    wait_until(CONVERGE, "the pod records why it was skipped", || {
        pods_of(s.plane, namespace)
            .iter()
            .any(|p| p["metadata"]["annotations"][&skipped_key] == "host_network")
    });
    wait_until(CONVERGE, "the namespace status counts the skip", || {
        reconcile_status(s.plane, namespace).is_some_and(|status| {
            status["skippedPods"] == json!({"host_network": 1})
                && status["uninjectedPods"] == 0
                && status["injectedPods"] == 0
        })
    });
    let skip_events = |plane: &ControlPlane| -> Vec<Value> {
        events_of(plane, namespace)
            .into_iter()
            .filter(|e| {
                e["type"] == "Warning"
                    && e["reason"] == "NotInjectedHostNetwork"
                    && e["regarding"]["kind"] == "Deployment"
                    && e["regarding"]["name"] == "edge"
            })
            .collect()
    };
    wait_until(
        CONVERGE,
        "a Warning event on the Deployment says why",
        || {
            skip_events(s.plane).iter().any(|e| {
                e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("host network"))
            })
        },
    );
    // Later reconciles (every resync) add no event for the same skip.
    std::thread::sleep(Duration::from_secs(2 * RESYNC_SECONDS + 1));
    let events = skip_events(s.plane);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert!(events[0]["series"].is_null(), "repeated: {:#?}", events[0]);
}

/// Rewrites serve's config file (renamed over, as a ConfigMap volume swaps),
/// with `change` applied to its YAML.
fn change_config(s: &Scenario, change: impl FnOnce(&mut Value)) {
    let text = std::fs::read_to_string(&s.install.config_file).unwrap();
    let mut config: Value = serde_norway::from_str(&text).unwrap_or(json!({}));
    if config.is_null() {
        config = json!({});
    }
    change(&mut config);
    let staged = s.install.config_file.with_extension("staged");
    std::fs::write(&staged, serde_norway::to_string(&config).unwrap()).unwrap();
    std::fs::rename(&staged, &s.install.config_file).unwrap();
}

/// The mapping the namespace's ConfigMap holds, if it exists yet.
fn mapping_in_namespace(plane: &ControlPlane, namespace: &str) -> Option<String> {
    let output = plane
        .kubectl()
        .args(["get", "configmap", "chiller-metrics-statsd-mapping"])
        .args(["-n", namespace, "-o", "json"])
        .output()
        .ok()?;
    let config_map: Value = serde_json::from_slice(&output.stdout).ok()?;
    config_map["data"]["statsd-mapping.yaml"]
        .as_str()
        .map(str::to_string)
}

fn status_of(pod: &Value) -> Value {
    pod["metadata"]["annotations"][format!("{DOMAIN}/status")]
        .as_str()
        .map(|text| serde_json::from_str(text).unwrap())
        .unwrap_or(Value::Null)
}

/// The mapping with a rule, first, that names `chiller.extra.*` lines
/// `chiller_extra`.
fn mapping_with_extra_rule() -> String {
    let mut mapping: Value =
        serde_norway::from_str(chiller_metrics::config::DEFAULT_MAPPING).unwrap();
    mapping["mappings"].as_array_mut().unwrap().insert(
        0,
        json!({"match": "chiller.extra.*", "name": "chiller_extra"}),
    );
    serde_norway::to_string(&mapping).unwrap()
}

/// A mapping change makes running pods outdated (their mapping is their
/// own annotation); so does a sidecar change, and with
/// `rollout-outdated` their Deployment is restarted once for that config,
/// and the rollout stops with an error when it does not become available
/// (no kubelet runs pods here).
fn config_changes_reach_running_pods(s: &Scenario, namespace: &str) {
    let original_config = std::fs::read_to_string(&s.install.config_file).unwrap();
    opt_in(s.plane, namespace);
    run_with_input(
        s.plane
            .kubectl()
            .args(["apply", "-n", namespace, "-f", "-"]),
        &deployment("api", false).to_string(),
    );
    let injected = |pod: &Value| pod["metadata"]["labels"][format!("{DOMAIN}/injected")] == "true";
    wait_until(CONVERGE, "the pod is injected", || {
        pods_of(s.plane, namespace).iter().any(injected)
    });
    let pod = pods_of(s.plane, namespace)
        .into_iter()
        .find(injected)
        .unwrap();
    assert_eq!(
        pod["metadata"]["annotations"][format!("{DOMAIN}/statsd-mapping")],
        json!(chiller_metrics::config::DEFAULT_MAPPING),
        "the pod carries its mapping"
    );
    let first = status_of(&pod);
    let first_hash = first["configHash"].as_str().unwrap().to_string();
    assert!(first["sidecarHash"].is_string(), "{first}");
    wait_until(CONVERGE, "the namespace status has the pod current", || {
        reconcile_status(s.plane, namespace).is_some_and(|status| {
            status["configHash"] == first_hash.as_str()
                && status["injectedPods"] == 1
                && status["outdatedPods"] == 0
        })
    });

    // The mapping changes. It travels in each pod's own annotation, so the
    // running pod is outdated now; the namespace's ConfigMap follows.
    let new_mapping = mapping_with_extra_rule();
    change_config(s, |config| config["mapping"] = json!(new_mapping));
    wait_until(
        CONVERGE,
        "the status counts the pod outdated by the new mapping",
        || {
            reconcile_status(s.plane, namespace).is_some_and(|status| {
                status["configHash"] != first_hash.as_str() && status["outdatedPods"] == 1
            })
        },
    );
    assert_eq!(
        mapping_in_namespace(s.plane, namespace).as_deref(),
        Some(new_mapping.as_str())
    );

    // The sidecar image changes: the pod is outdated, and nothing is
    // restarted without the namespace annotation.
    change_config(s, |config| {
        config["sidecar"]["image"] = json!("prom/statsd-exporter:v0.28.0-rebuilt")
    });
    wait_until(CONVERGE, "the status counts the outdated pod", || {
        reconcile_status(s.plane, namespace).is_some_and(|status| status["outdatedPods"] == 1)
    });
    wait_until(CONVERGE, "the metric counts it", || {
        support::https::sample(
            &s.metrics(),
            &format!("chiller_metrics_outdated_pods{{namespace=\"{namespace}\"}}"),
        ) == Some(1.0)
    });
    let restarted_at = |plane: &ControlPlane| {
        let deployment = kubectl_json(plane, &["get", "deployment", "api", "-n", namespace]);
        (
            deployment["spec"]["template"]["metadata"]["annotations"]
                ["kubectl.kubernetes.io/restartedAt"]
                .clone(),
            deployment["metadata"]["annotations"][format!("{DOMAIN}/restarted-for-config")]
                .clone(),
        )
    };
    std::thread::sleep(Duration::from_secs(RESYNC_SECONDS + 1));
    assert_eq!(
        restarted_at(s.plane),
        (Value::Null, Value::Null),
        "restarted without the annotation"
    );

    install::annotate_namespace(
        s.plane,
        namespace,
        &[&format!("{DOMAIN}/rollout-outdated=true")],
    );
    wait_until(
        CONVERGE,
        "the Deployment is restarted for the current config",
        || {
            let current = reconcile_status(s.plane, namespace)
                .map(|status| status["configHash"].clone())
                .unwrap_or(Value::Null);
            let (at, config) = restarted_at(s.plane);
            at.is_string() && config == current
        },
    );
    let first_restart = restarted_at(s.plane);
    // No kubelet: the new pod never becomes available, so after the timeout
    // the rollout stops with an error, and it was never restarted again.
    wait_until(CONVERGE, "the status reports the stuck rollout", || {
        reconcile_status(s.plane, namespace).is_some_and(|status| {
            status["ready"] == false
                && status["reason"] == "RolloutStuck"
                && status["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("Deployment api"))
        })
    });
    assert_eq!(
        restarted_at(s.plane),
        first_restart,
        "restarted twice for one config"
    );

    // Back to the install's config; the annotation goes away.
    run(s.plane.kubectl().args([
        "annotate",
        "namespace",
        namespace,
        &format!("{DOMAIN}/rollout-outdated-"),
    ]));
    let staged = s.install.config_file.with_extension("staged");
    std::fs::write(&staged, original_config).unwrap();
    std::fs::rename(&staged, &s.install.config_file).unwrap();
}

/// A new config reaches every opted-in namespace as soon as the file
/// changes. The resync is first set to an hour, so only the config change
/// itself can trigger the reconciles that carry the new mapping.
fn a_new_config_reconciles_every_namespace_without_waiting_for_the_resync(
    s: &Scenario,
    namespaces: &[&str],
) {
    let original_config = std::fs::read_to_string(&s.install.config_file).unwrap();
    for namespace in namespaces {
        opt_in(s.plane, namespace);
    }
    for namespace in namespaces {
        wait_until(CONVERGE, &format!("{namespace} has its mapping"), || {
            mapping_in_namespace(s.plane, namespace).as_deref()
                == Some(chiller_metrics::config::DEFAULT_MAPPING)
        });
    }
    change_config(s, |config| {
        config["reconcile"]["resyncSeconds"] = json!(3600)
    });
    // Resyncs already queued with the old period run out.
    std::thread::sleep(Duration::from_secs(RESYNC_SECONDS * 2));
    let new_mapping = mapping_with_extra_rule();
    change_config(s, |config| config["mapping"] = json!(new_mapping));
    for namespace in namespaces {
        wait_until(
            CONVERGE,
            &format!("{namespace} has the new mapping"),
            || mapping_in_namespace(s.plane, namespace).as_deref() == Some(new_mapping.as_str()),
        );
    }
    let staged = s.install.config_file.with_extension("staged");
    std::fs::write(&staged, original_config).unwrap();
    std::fs::rename(&staged, &s.install.config_file).unwrap();
}

fn install_webhook_again(s: &Scenario) {
    s.install.point_webhook_at(&s.serve);
}

/// No request of ours was forbidden, in the whole run.
fn no_call_was_forbidden(s: &Scenario) {
    let forbidden: Vec<Value> = s
        .our_calls(0)
        .into_iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .map(|e| json!([e["verb"], e["requestURI"]]))
        .collect();
    assert!(forbidden.is_empty(), "forbidden calls: {forbidden:#?}");
    let secrets: Vec<Value> = s
        .our_calls(0)
        .into_iter()
        .filter(|e| e["objectRef"]["resource"] == "secrets")
        .map(|e| json!([e["verb"], e["requestURI"]]))
        .collect();
    assert!(secrets.is_empty(), "we never touch Secrets: {secrets:#?}");
}

/// Every (group, resource, verb) the ClusterRole and Role grant was used by
/// a call in this run, or is required to create the Role we grant Prometheus
/// (RBAC's escalation check: one can only grant what one holds).
fn every_permission_was_used(s: &Scenario) {
    let mut used = BTreeSet::new();
    for event in s.our_calls(0) {
        let field = |key: &str| event["objectRef"][key].as_str().unwrap_or("").to_string();
        let (group, resource) = (field("apiGroup"), field("resource"));
        let verb = event["verb"].as_str().unwrap_or("").to_string();
        // A server-side apply that made a new object (201) was also
        // authorized as a create.
        if verb == "patch" && event["responseStatus"]["code"] == 201 {
            used.insert((group.clone(), resource.clone(), "create".to_string()));
        }
        used.insert((group, resource, verb));
    }
    // Until a kind's watch cache has synced (at start-up, or while the
    // Prometheus Operator CRDs are missing) the loop reads objects one by one.
    // Whether that window is hit in this run is a race, so `get` on the
    // managed kinds counts as used; the mocked-server test
    // `before_the_caches_sync_live_objects_are_read_and_still_not_written`
    // pins that path, and `no_call_was_forbidden` checks every get made here.
    for (group, resource) in [
        ("", "configmaps"),
        ("", "services"),
        ("", "serviceaccounts"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
        ("apps", "deployments"),
        ("monitoring.coreos.com", "prometheuses"),
        ("monitoring.coreos.com", "servicemonitors"),
    ] {
        used.insert((group.to_string(), resource.to_string(), "get".to_string()));
    }
    // Likewise the webhook reads a Namespace only when its watch has not
    // delivered it within 2 s; the offline test
    // `a_namespace_the_watch_has_not_delivered_is_read_once_from_the_api_server`
    // pins that path.
    used.insert((String::new(), "namespaces".to_string(), "get".to_string()));
    let roles = kubectl_json(
        s.plane,
        &[
            "get",
            "roles",
            "-A",
            "-l",
            "app.kubernetes.io/managed-by=chiller-metrics",
        ],
    );
    for role in roles["items"].as_array().unwrap() {
        if role["metadata"]["namespace"] == install::RELEASE_NAMESPACE {
            continue;
        }
        for rule in role["rules"].as_array().unwrap() {
            for (group, resource, verb) in expand(rule) {
                used.insert((group, resource, verb));
            }
        }
    }
    let mut unused = Vec::new();
    let cluster_role = kubectl_json(s.plane, &["get", "clusterrole", install::RELEASE]);
    let role = kubectl_json(
        s.plane,
        &[
            "get",
            "role",
            "chiller-metrics-leader-election",
            "-n",
            install::RELEASE_NAMESPACE,
        ],
    );
    for rule in cluster_role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .chain(role["rules"].as_array().unwrap())
    {
        for permission in expand(rule) {
            if !used.contains(&permission) {
                unused.push(permission);
            }
        }
    }
    assert!(unused.is_empty(), "granted but never used: {unused:#?}");
}

fn expand(rule: &Value) -> Vec<(String, String, String)> {
    let strings = |key: &str| -> Vec<String> {
        rule[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    };
    let mut out = Vec::new();
    for group in strings("apiGroups") {
        for resource in strings("resources") {
            for verb in strings("verbs") {
                out.push((group.clone(), resource.clone(), verb));
            }
        }
    }
    out
}
