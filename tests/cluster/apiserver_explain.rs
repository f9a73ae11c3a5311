//! `chiller-metrics explain` against a real kube-apiserver: the chart
//! installed with helm, `serve` answering the API server's admission calls,
//! the real binary run with the admin kubeconfig. Each step is broken on
//! purpose and must be the one that decides; where pods are really created,
//! explain's verdict must agree with what the webhook did to them.

use crate::support::controlplane;
use crate::support::failed_steps;
use crate::support::install;

use std::time::{Duration, Instant};

use controlplane::ControlPlane;
use install::{
    DOMAIN, Install, Ran, ensure_namespace, injected, run, run_with_input, user_command,
};
use serde_json::{Value, json};

/// Only guards against hangs.
const CONVERGE: Duration = Duration::from_secs(90);
const IMAGE: &str = "ghcr.io/chiller-demo/chiller-api:1.4.2";

fn explain(plane: &ControlPlane, args: &[&str]) -> Ran {
    Ran::of("explain", user_command(plane, "explain").args(args))
}

/// `explain KIND NS/NAME -o json`, which must succeed.
fn explain_json(plane: &ControlPlane, kind: &str, target: &str) -> Value {
    let explained = explain(plane, &[kind, target, "-o", "json"]);
    assert_eq!(explained.code, 0, "explain failed: {}", explained.stderr);
    explained.json()
}

fn step_detail(explanation: &Value, number: u64) -> String {
    explanation["steps"][(number - 1) as usize]["detail"]
        .as_str()
        .unwrap()
        .to_string()
}

fn assert_outcome(explanation: &Value, outcome: &str, failed: &[u64]) {
    assert_eq!(explanation["outcome"], outcome, "{explanation:#}");
    assert_eq!(failed_steps(explanation), failed, "{explanation:#}");
}

fn apply(plane: &ControlPlane, object: &Value) {
    run_with_input(
        plane.kubectl().args(["apply", "-f", "-"]),
        &object.to_string(),
    );
}

fn pod(name: &str, labels: Value, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": IMAGE}]},
    })
}

fn template(app: &str) -> Value {
    json!({
        "metadata": {"labels": {"app": app}},
        "spec": {"containers": [{"name": "app", "image": IMAGE}]},
    })
}

/// The pods of a workload's selector, once the controller created one.
fn pods_of(plane: &ControlPlane, namespace: &str, app: &str) -> Vec<Value> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let items = install::list(
            plane,
            "pods",
            &["-n", namespace, "-l", &format!("app={app}")],
        );
        if !items.is_empty() {
            return items;
        }
        assert!(
            Instant::now() < deadline,
            "no pod of app={app} within {CONVERGE:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Prints the text form (the README shows it; see it with --nocapture).
fn show(plane: &ControlPlane, kind: &str, target: &str) {
    let text = explain(plane, &[kind, target]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    println!("$ chiller-metrics explain {kind} {target}\n{}", text.stdout);
}

fn label_namespace(plane: &ControlPlane, namespace: &str, label: &str) {
    run(plane
        .kubectl()
        .args(["label", "--overwrite", "namespace", namespace, label]));
}

#[test]
fn explain_names_the_step_that_decides_and_agrees_with_the_webhook() {
    let plane = ControlPlane::shared();
    let _plane_logs = plane.logs_on_failure();
    let install = Install::chart(plane, &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut command = install.serve_command("chiller-metrics-0");
    command.env("CHILLER_METRICS_NO_RECONCILE", "true");
    let serve = install::start_serve(command);
    if let Err(error) = runtime.block_on(serve.wait_ready()) {
        panic!("{error}; log:\n{}", serve.log().join("\n"));
    }
    install.point_webhook_at(&serve);
    let _serve_logs = plane
        .logs_on_failure()
        .with("chiller-metrics serve", serve.log_tail(60));
    let inject_label = format!("{DOMAIN}/inject");

    // An opted-in namespace that excludes its database.
    ensure_namespace(plane, "shop", &[(&inject_label, "enabled")]);
    install::annotate_namespace(plane, "shop", &[&format!("{DOMAIN}/pod-selector=app!=db")]);

    // An injected pod: steps all pass, and what was injected is reported.
    run_with_input(
        plane.kubectl().args(["create", "-n", "shop", "-f", "-"]),
        &pod("api", json!({"app": "api"}), json!({})).to_string(),
    );
    assert!(injected(plane, "shop", "api"));
    let api = explain_json(plane, "pod", "shop/api");
    assert_outcome(&api, "injected", &[]);
    assert_eq!(api["existing"]["injected"], true);
    assert_eq!(api["existing"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(api["existing"]["prefix"], "api");
    assert_eq!(api["existing"]["containers"], json!(["app"]));
    assert_eq!(
        api["sources"][0],
        "webhook configuration: MutatingWebhookConfiguration chiller-metrics"
    );
    assert_eq!(
        api["sources"][2],
        "config: ConfigMap chiller-metrics/chiller-metrics-config"
    );
    // The text form: a one-line verdict, then one line per step.
    let text = explain(plane, &["pod", "shop/api"]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    let first = text.stdout.lines().next().unwrap();
    assert!(
        first.starts_with("pod shop/api: injected (chiller-metrics "),
        "{}",
        text.stdout
    );
    assert_eq!(
        text.stdout.lines().filter(|l| l.contains(" ✔ ")).count(),
        6,
        "{}",
        text.stdout
    );

    // Step 5: the namespace's pod-selector; the webhook skipped it too.
    run_with_input(
        plane.kubectl().args(["create", "-n", "shop", "-f", "-"]),
        &pod("db", json!({"app": "db"}), json!({})).to_string(),
    );
    assert!(!injected(plane, "shop", "db"));
    let db = explain_json(plane, "pod", "shop/db");
    assert_outcome(&db, "skipped", &[5]);
    assert!(step_detail(&db, 5).contains("app!=db"), "{db:#}");
    assert_eq!(db["existing"]["injected"], false);
    show(plane, "pod", "shop/api");
    show(plane, "pod", "shop/db");

    // Step 3: the objectSelector keeps the API server from calling the webhook.
    run_with_input(
        plane.kubectl().args(["create", "-n", "shop", "-f", "-"]),
        &pod(
            "legacy",
            json!({"app": "legacy", &inject_label: "disabled"}),
            json!({}),
        )
        .to_string(),
    );
    assert!(!injected(plane, "shop", "legacy"));
    let legacy = explain_json(plane, "pod", "shop/legacy");
    // Were it called, the webhook would stop at its opt-outs (step 4).
    assert_outcome(&legacy, "not-called", &[3, 4]);
    assert!(
        step_detail(&legacy, 3).contains("notin (disabled)"),
        "{legacy:#}"
    );

    // Step 4: the opt-out annotation is the webhook's own decision.
    run_with_input(
        plane.kubectl().args(["create", "-n", "shop", "-f", "-"]),
        &pod(
            "manual",
            json!({"app": "manual"}),
            json!({&inject_label: "false"}),
        )
        .to_string(),
    );
    assert!(!injected(plane, "shop", "manual"));
    assert_outcome(&explain_json(plane, "pod", "shop/manual"), "skipped", &[4]);

    // Every workload kind: explain says its pods would be injected, and the
    // pods the controllers create are.
    let workloads = [
        (
            "deployment",
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}}, "template": template("web")}}),
        ),
        (
            "statefulset",
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "ws", "namespace": "shop"},
            "spec": {"replicas": 1, "serviceName": "ws", "selector": {"matchLabels": {"app": "ws"}}, "template": template("ws")}}),
        ),
        (
            "daemonset",
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": template("agent")}}),
        ),
        (
            "job",
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "migrate", "namespace": "shop"},
            "spec": {"template": {"metadata": {"labels": {"app": "migrate"}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "app", "image": IMAGE}]}}}}),
        ),
        (
            "cronjob",
            json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "report", "namespace": "shop"},
            "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {"metadata": {"labels": {"app": "report"}},
                "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "app", "image": IMAGE}]}}}}}}),
        ),
    ];
    for (kind, object) in &workloads {
        apply(plane, object);
        let name = object["metadata"]["name"].as_str().unwrap();
        let explanation = explain_json(plane, kind, &format!("shop/{name}"));
        assert_outcome(&explanation, "would-inject", &[]);
        assert_eq!(explanation["verdict"], "its pods would be injected");
        assert!(
            explanation.get("existing").is_none(),
            "a template is not a pod"
        );
        assert!(
            step_detail(&explanation, 6).contains(&format!("--statsd-prefix={name}")),
            "{explanation:#}"
        );
    }
    // A DaemonSet needs nodes for pods, and a CronJob its schedule: the
    // Deployment, StatefulSet and Job controllers create theirs now.
    for app in ["web", "ws", "migrate"] {
        for pod in pods_of(plane, "shop", app) {
            assert_eq!(
                pod["metadata"]["labels"][format!("{DOMAIN}/injected")],
                "true",
                "explain said the pods of {app} would be injected: {pod:#}"
            );
        }
    }

    // Step 1: a namespace that has not opted in; the hint says how.
    ensure_namespace(plane, "plain", &[]);
    apply(
        plane,
        &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "site", "namespace": "plain"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "site"}}, "template": template("site")}}),
    );
    let site = explain_json(plane, "deployment", "plain/site");
    assert_outcome(&site, "not-called", &[1]);
    show(plane, "deployment", "plain/site");
    assert!(
        step_detail(&site, 1).contains(&format!(
            "kubectl label namespace plain {inject_label}=enabled"
        )),
        "{site:#}"
    );
    for pod in pods_of(plane, "plain", "site") {
        assert!(
            pod["metadata"]["labels"]
                .get(format!("{DOMAIN}/injected"))
                .is_none()
        );
    }
    // Its existing pod missed injection once the namespace opts in.
    let site_pod = pods_of(plane, "plain", "site")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    label_namespace(plane, "plain", &format!("{inject_label}=enabled"));
    let missed = explain_json(plane, "pod", &format!("plain/{site_pod}"));
    assert_outcome(&missed, "missed", &[]);
    assert_eq!(missed["existing"]["injected"], false);
    assert_outcome(
        &explain_json(plane, "deployment", "plain/site"),
        "would-inject",
        &[],
    );

    // Step 2: the release namespace is excluded, whatever its labels.
    label_namespace(
        plane,
        install::RELEASE_NAMESPACE,
        &format!("{inject_label}=enabled"),
    );
    let own = explain_json(plane, "deployment", "chiller-metrics/chiller-metrics");
    assert_eq!(own["outcome"], "not-called", "{own:#}");
    // Its pods also opt out with the label (steps 3 and 4); step 2 comes first.
    assert_eq!(failed_steps(&own).first(), Some(&2), "{own:#}");
    assert!(
        step_detail(&own, 2).contains("chiller-metrics is excluded"),
        "{own:#}"
    );

    // Step 3: matchConditions on the pod's spec and the request are
    // evaluated, and agree with the API server's.
    install::patch_webhook_configuration(
        plane,
        &json!([{"op": "add", "path": "/webhooks/0/matchConditions/-", "value":
            {"name": "one-container", "expression":
                "object.spec.containers.size() < 2 && request.operation == 'CREATE' && request.kind.kind == 'Pod'"}}]),
    );
    let mut pair = pod("pair", json!({"app": "pair"}), json!({}));
    pair["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "worker", "image": IMAGE}));
    run_with_input(
        plane.kubectl().args(["create", "-n", "shop", "-f", "-"]),
        &pair.to_string(),
    );
    assert!(!injected(plane, "shop", "pair"));
    let pair = explain_json(plane, "pod", "shop/pair");
    assert_outcome(&pair, "not-called", &[3]);
    assert!(
        step_detail(&pair, 3).contains("matchCondition one-container is false"),
        "{pair:#}"
    );
    run_with_input(
        plane.kubectl().args(["create", "-n", "shop", "-f", "-"]),
        &pod("solo", json!({"app": "solo"}), json!({})).to_string(),
    );
    assert!(injected(plane, "shop", "solo"));
    let solo = explain_json(plane, "pod", "shop/solo");
    assert_outcome(&solo, "injected", &[]);
    assert!(
        step_detail(&solo, 3).contains("matchCondition one-container is true"),
        "{solo:#}"
    );

    // Step 3: a matchCondition explain cannot evaluate is said to be so.
    install::patch_webhook_configuration(
        plane,
        &json!([{"op": "add", "path": "/webhooks/0/matchConditions/-", "value":
            {"name": "not-admin", "expression": "request.userInfo.username != 'admin'"}}]),
    );
    let unknown = explain_json(plane, "deployment", "shop/web");
    assert_eq!(unknown["outcome"], "undetermined", "{unknown:#}");
    assert_eq!(unknown["steps"][2]["status"], "unknown");
    assert!(
        step_detail(&unknown, 3).contains("not-admin cannot be evaluated"),
        "{unknown:#}"
    );

    // Step 1: no webhook configuration, no call.
    run(plane.kubectl().args([
        "delete",
        "mutatingwebhookconfiguration",
        install::WEBHOOK_CONFIGURATION,
    ]));
    let gone = explain_json(plane, "deployment", "shop/web");
    assert_outcome(&gone, "not-called", &[1, 2, 3]);
    assert!(step_detail(&gone, 1).contains("not found"), "{gone:#}");

    // Objects that do not exist, and a malformed target, are errors.
    let missing = explain(plane, &["pod", "shop/nope"]);
    assert_ne!(missing.code, 0);
    assert!(
        missing.stderr.contains("Pod shop/nope not found"),
        "{}",
        missing.stderr
    );
    let malformed = explain(plane, &["pod", "nope"]);
    assert_ne!(malformed.code, 0);
    assert!(
        malformed.stderr.contains("NAMESPACE/NAME"),
        "{}",
        malformed.stderr
    );
}
