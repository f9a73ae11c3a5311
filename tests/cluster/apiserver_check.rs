//! `chiller-metrics check` against a real kube-apiserver: the chart installed
//! with helm, `serve` running as its ServiceAccount, the real binary run
//! with the admin kubeconfig. First everything is healthy (all ✔, exit 0);
//! then each item is broken on purpose and must turn ✘ with its hint, and
//! the exit code non-zero; then it is repaired.
//!
//! No kubelet runs, so pods stay Pending: the Deployments' pods are made
//! Ready through the pod status subresource, after which the real
//! ReplicaSet and Deployment controllers mark the Deployments available.

use crate::support::controlplane;
use crate::support::install;
use crate::support::{self, wait_until};

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use controlplane::ControlPlane;
use install::{
    DOMAIN, Install, Ran, ensure_namespace, injected, kubectl_json, run, run_with_input,
    user_command,
};
use serde_json::{Value, json};
use support::https::ServeProcess;

/// Only guards against hangs.
const CONVERGE: Duration = Duration::from_secs(120);
const OPERATOR_NAMESPACE: &str = "monitoring";
const OPERATOR_IMAGE: &str = "quay.io/prometheus-operator/prometheus-operator:v0.93.0";

struct Scenario {
    plane: &'static ControlPlane,
    install: Install,
    serve: Option<ServeProcess>,
    /// The files serve reads its certificate from.
    cert_dir: PathBuf,
}

/// One run of `chiller-metrics check`.
type Outcome = Ran;

impl Outcome {
    /// Item `id` of a `check -o json` report.
    fn item(&self, id: &str) -> Value {
        let json = self.json();
        json["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no item {id} in {json:#}"))
    }
}

impl Scenario {
    fn serve(&self) -> &ServeProcess {
        self.serve.as_ref().expect("serve runs")
    }

    fn check(&self, extra: &[&str]) -> Outcome {
        let mut command = user_command(self.plane, "check");
        if let Some(serve) = &self.serve {
            command.args(["--admin-address", &serve.admin_addr.to_string()]);
        } else {
            // serve is gone; its old address answers nothing.
            command.args(["--admin-address", "127.0.0.1:1"]);
        }
        command.args(extra);
        Ran::of("check", &mut command)
    }

    fn check_json(&self) -> Outcome {
        self.check(&["-o", "json"])
    }

    /// Runs check until item `id` has `status`; returns that run.
    fn wait_for_item(&self, id: &str, status: &str) -> Outcome {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let outcome = self.check_json();
            if outcome.item(id)["status"] == status {
                return outcome;
            }
            assert!(
                Instant::now() < deadline,
                "item {id} not {status} within {CONVERGE:?}; last report:\n{}",
                outcome.stdout
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Runs check until nothing fails; returns that run.
    fn wait_healthy(&self) -> Outcome {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let outcome = self.check_json();
            if outcome.code == 0 {
                return outcome;
            }
            assert!(
                Instant::now() < deadline,
                "check did not pass within {CONVERGE:?}; last report:\n{}",
                outcome.stdout
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Asserts that item `id` failed with a hint containing `hint` and that
    /// the exit code says so.
    fn assert_fails(&self, outcome: &Outcome, id: &str, detail: &str, hint: &str) {
        let item = outcome.item(id);
        assert_eq!(item["status"], "fail", "{item:#}");
        assert!(
            item["detail"].as_str().unwrap().contains(detail),
            "detail of {id} lacks {detail:?}: {item:#}"
        );
        assert!(
            item["hint"].as_str().unwrap_or("").contains(hint),
            "hint of {id} lacks {hint:?}: {item:#}"
        );
        assert_ne!(outcome.code, 0, "a failed item gives a non-zero exit");
        assert_eq!(outcome.json()["ok"], false);
    }

    fn ca_bundle(&self) -> String {
        let configuration = kubectl_json(
            self.plane,
            &[
                "get",
                "mutatingwebhookconfiguration",
                install::WEBHOOK_CONFIGURATION,
            ],
        );
        configuration["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn set_webhook(&self, path: &str, value: &str) {
        install::patch_webhook_configuration(
            self.plane,
            &json!([{"op": "replace", "path": format!("/webhooks/0/clientConfig/{path}"), "value": value}]),
        );
    }
}

fn base64(pem: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(pem)
}

/// Marks every pod of `deployment` Ready through the status subresource and
/// waits until the Deployment controller reports it available.
fn make_available(plane: &ControlPlane, namespace: &str, deployment: &str) {
    let spec = kubectl_json(plane, &["get", "deployment", deployment, "-n", namespace]);
    let selector: Vec<String> = spec["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect();
    let selector = selector.join(",");
    wait_until(
        CONVERGE,
        &format!("{namespace}/{deployment} is available"),
        || {
            let pods = kubectl_json(plane, &["get", "pods", "-n", namespace, "-l", &selector]);
            let now = "2020-01-01T00:00:00Z";
            for pod in pods["items"].as_array().unwrap() {
                let name = pod["metadata"]["name"].as_str().unwrap();
                let ready = pod["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                if ready {
                    continue;
                }
                let status = json!({"status": {
                    "phase": "Running",
                    "conditions": [
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                        {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                        {"type": "Ready", "status": "True", "lastTransitionTime": now},
                    ],
                }});
                // A pod replaced meanwhile is not an error; the next round sees the new one.
                let _ = plane
                    .kubectl()
                    .args([
                        "patch",
                        "pod",
                        name,
                        "-n",
                        namespace,
                        "--subresource=status",
                    ])
                    .args(["--type=merge", "-p", &status.to_string()])
                    .output();
            }
            let live = kubectl_json(plane, &["get", "deployment", deployment, "-n", namespace]);
            live["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Available" && c["status"] == "True")
        },
    );
}

/// A Deployment that looks like the Prometheus Operator's (no kubelet runs it).
fn create_fake_operator(plane: &ControlPlane) {
    ensure_namespace(plane, OPERATOR_NAMESPACE, &[]);
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "kube-prometheus-stack-operator", "namespace": OPERATOR_NAMESPACE},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "kube-prometheus-stack-operator"}},
            "template": {
                "metadata": {"labels": {"app": "kube-prometheus-stack-operator"}},
                "spec": {"containers": [{"name": "kube-prometheus-stack", "image": OPERATOR_IMAGE}]},
            },
        },
    });
    run_with_input(
        plane.kubectl().args(["apply", "-f", "-"]),
        &deployment.to_string(),
    );
    make_available(plane, OPERATOR_NAMESPACE, "kube-prometheus-stack-operator");
}

fn create_pod(plane: &ControlPlane, namespace: &str, name: &str, labels: Value) {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "ghcr.io/chiller-demo/chiller-api:1.4.2"}]},
    });
    run_with_input(
        plane.kubectl().args(["create", "-n", namespace, "-f", "-"]),
        &pod.to_string(),
    );
}

fn copy_certs(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

/// Writes a certificate pair atomically (serve must never read half a file).
fn write_pair(dir: &Path, cert: &str, key: &str) {
    for (file, text) in [("tls.key.new", key), ("tls.crt.new", cert)] {
        std::fs::write(dir.join(file), text).unwrap();
    }
    std::fs::rename(dir.join("tls.key.new"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("tls.crt.new"), dir.join("tls.crt")).unwrap();
}

/// A CA and a serving certificate for 127.0.0.1 that expires in `days`.
fn short_lived_pair(days: i64) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let now = time::OffsetDateTime::now_utc();
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "short-lived test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::days(3650);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    leaf.subject_alt_names = vec![
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
        SanType::DnsName("chiller-metrics.chiller-metrics.svc".try_into().unwrap()),
    ];
    leaf.not_before = now - time::Duration::hours(1);
    leaf.not_after = now + time::Duration::days(days);
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn check_reports_each_broken_item_with_its_hint() {
    let plane = ControlPlane::shared();
    let _plane_logs = plane.logs_on_failure();
    let install = Install::chart(plane, &["config.reconcile.resyncSeconds=5"]);
    let cert_dir = plane.dir.join("check-certs");
    copy_certs(&install.certs, &cert_dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut command = install.serve_command("chiller-metrics-0");
    command
        .env("CHILLER_METRICS_TLS_CERT", cert_dir.join("tls.crt"))
        .env("CHILLER_METRICS_TLS_KEY", cert_dir.join("tls.key"))
        .env("CHILLER_METRICS_CERT_RELOAD_SECONDS", "1");
    let serve = install::start_serve(command);
    if let Err(error) = runtime.block_on(serve.wait_ready()) {
        panic!("{error}; log:\n{}", serve.log().join("\n"));
    }
    install.point_webhook_at(&serve);
    let mut s = Scenario {
        plane,
        install,
        serve: Some(serve),
        cert_dir,
    };
    let _serve_logs = plane
        .logs_on_failure()
        .with("chiller-metrics serve", s.serve().log_tail(60));

    // The install's pods "run", and an operator Deployment exists.
    make_available(plane, install::RELEASE_NAMESPACE, install::RELEASE);
    create_fake_operator(plane);

    // An opted-in namespace: one pod injected, one not selected, one opted out.
    ensure_namespace(plane, "shop", &[(&format!("{DOMAIN}/inject"), "enabled")]);
    install::annotate_namespace(plane, "shop", &[&format!("{DOMAIN}/pod-selector=app!=db")]);
    create_pod(plane, "shop", "api", json!({"app": "api"}));
    create_pod(plane, "shop", "db", json!({"app": "db"}));
    create_pod(
        plane,
        "shop",
        "legacy",
        json!({"app": "legacy", format!("{DOMAIN}/inject"): "disabled"}),
    );
    assert!(injected(plane, "shop", "api"));
    assert!(!injected(plane, "shop", "db"));

    healthy(&s);
    no_webhook_configuration(&s);
    ca_bundle_of_another_ca(&s);
    certificate_expiring_soon(&s);
    operator_not_running(&s);
    crds_missing(&s);
    broken_reconcile(&s);
    uninjected_pod(&s);
    outdated_pod(&s);
    service_addressed_webhook(&s);
    lease_expires_when_serve_stops(&mut s);
}

fn healthy(s: &Scenario) {
    let outcome = s.wait_healthy();
    let json = outcome.json();
    assert_eq!(json["ok"], true);
    for item in json["items"].as_array().unwrap() {
        // pods-up-to-date included: the reconcile loop records the config
        // hash in the namespace status, injected pods carry theirs.
        assert_eq!(item["status"], "pass", "{item:#}");
        assert!(item.get("hint").is_none(), "{item:#}");
    }
    let ids: Vec<&str> = json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "kubernetes-api",
            "webhook-configuration",
            "webhook-ca-bundle",
            "webhook-certificate",
            "deployment-available",
            "pods-ready",
            "prometheus-operator-crds",
            "prometheus-operator-running",
            "leader-lease",
            "namespaces-reconciled",
            "pods-injected",
            "pods-up-to-date",
        ]
    );
    assert!(
        outcome.item("prometheus-operator-running")["detail"]
            .as_str()
            .unwrap()
            .contains(&format!(
                "Deployment {OPERATOR_NAMESPACE}/kube-prometheus-stack-operator runs {OPERATOR_IMAGE}"
            ))
    );
    assert!(
        outcome.item("webhook-ca-bundle")["detail"]
            .as_str()
            .unwrap()
            .contains("for 127.0.0.1 is signed by a CA in the caBundle")
    );

    // The same in text, as a user sees it.
    let text = s.check(&[]);
    assert_eq!(text.code, 0, "{}{}", text.stdout, text.stderr);
    assert!(!text.stdout.contains('✘'), "{}", text.stdout);
    assert!(
        text.stdout
            .contains("✔ the MutatingWebhookConfiguration chiller-metrics exists"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("Status check results are ✔\n"),
        "{}",
        text.stdout
    );
    eprintln!("----- healthy report -----\n{}", text.stdout);
}

fn no_webhook_configuration(s: &Scenario) {
    let mut saved = kubectl_json(
        s.plane,
        &[
            "get",
            "mutatingwebhookconfiguration",
            install::WEBHOOK_CONFIGURATION,
        ],
    );
    for field in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
        "generation",
    ] {
        saved["metadata"].as_object_mut().unwrap().remove(field);
    }
    run(s.plane.kubectl().args([
        "delete",
        "mutatingwebhookconfiguration",
        install::WEBHOOK_CONFIGURATION,
    ]));
    let outcome = s.check_json();
    s.assert_fails(
        &outcome,
        "webhook-configuration",
        "MutatingWebhookConfiguration chiller-metrics not found",
        "helm upgrade --install chiller-metrics",
    );
    assert_eq!(outcome.item("webhook-ca-bundle")["status"], "skipped");
    let text = s.check(&[]);
    assert_ne!(text.code, 0);
    assert!(
        text.stdout
            .contains("✘ the MutatingWebhookConfiguration chiller-metrics exists"),
        "{}",
        text.stdout
    );
    eprintln!(
        "----- without the webhook configuration -----\n{}",
        text.stdout
    );

    run_with_input(
        s.plane.kubectl().args(["create", "-f", "-"]),
        &saved.to_string(),
    );
    s.wait_healthy();
}

fn ca_bundle_of_another_ca(s: &Scenario) {
    let original = s.ca_bundle();
    let other = chiller_metrics::certs::generate(&["127.0.0.1".to_string()]).unwrap();
    s.set_webhook("caBundle", &base64(&other.ca_cert));
    let outcome = s.check_json();
    s.assert_fails(
        &outcome,
        "webhook-ca-bundle",
        "the certificate is not signed by a CA in the caBundle",
        "the caBundle must hold the CA that signed the serving certificate",
    );
    s.set_webhook("caBundle", &original);
    s.wait_healthy();
}

fn certificate_expiring_soon(s: &Scenario) {
    let original = s.ca_bundle();
    let (ca, cert, key) = short_lived_pair(10);
    s.set_webhook("caBundle", &base64(&ca));
    write_pair(&s.cert_dir, &cert, &key);
    // serve reloads the files within a second or two.
    let outcome = s.wait_for_item("webhook-certificate", "fail");
    s.assert_fails(&outcome, "webhook-certificate", "expires at", "renew it");
    let detail = outcome.item("webhook-certificate")["detail"].to_string();
    assert!(
        detail.contains("(in 9 days)") || detail.contains("(in 10 days)"),
        "{detail}"
    );
    // Only the lifetime is wrong: the new caBundle verifies the new certificate.
    assert_eq!(outcome.item("webhook-ca-bundle")["status"], "pass");

    let original_dir = s.install.certs.clone();
    write_pair(
        &s.cert_dir,
        &std::fs::read_to_string(original_dir.join("tls.crt")).unwrap(),
        &std::fs::read_to_string(original_dir.join("tls.key")).unwrap(),
    );
    s.set_webhook("caBundle", &original);
    s.wait_healthy();
}

fn operator_not_running(s: &Scenario) {
    run(s.plane.kubectl().args([
        "delete",
        "deployment",
        "kube-prometheus-stack-operator",
        "-n",
        OPERATOR_NAMESPACE,
        "--wait=true",
        "--timeout=60s",
    ]));
    let outcome = s.check_json();
    s.assert_fails(
        &outcome,
        "prometheus-operator-running",
        "no Deployment in the cluster runs a prometheus-operator image",
        "helm install monitoring kube-prometheus-stack",
    );
    create_fake_operator(s.plane);
    s.wait_healthy();
}

/// The two CRDs the reconcile loop writes go away. (kube-apiserver v1.37.2
/// could leave an untouched CRD, podmonitors, terminating for minutes: its
/// finalizer failed with "storage is (re)initializing" and did not retry in
/// time.)
fn crds_missing(s: &Scenario) {
    run(s.plane.kubectl().args([
        "delete",
        "crd",
        "prometheuses.monitoring.coreos.com",
        "servicemonitors.monitoring.coreos.com",
        "--wait=true",
        // Deleting a CRD first removes its custom resources.
        "--timeout=240s",
    ]));
    let outcome = s.check_json();
    s.assert_fails(
        &outcome,
        "prometheus-operator-crds",
        "missing: prometheuses.monitoring.coreos.com, servicemonitors.monitoring.coreos.com",
        "install the Prometheus Operator CRDs",
    );
    install::apply_monitoring_crds(s.plane);
    // The reconcile loop puts the Prometheus and ServiceMonitors back.
    s.wait_healthy();
}

fn broken_reconcile(s: &Scenario) {
    let namespace = "broken";
    ensure_namespace(
        s.plane,
        namespace,
        &[(&format!("{DOMAIN}/inject"), "enabled")],
    );
    install::annotate_namespace(
        s.plane,
        namespace,
        &[
            &format!("{DOMAIN}/postgres=db:not-a-port/x"),
            &format!("{DOMAIN}/postgres-secret=db-auth"),
        ],
    );
    let outcome = s.wait_for_item("namespaces-reconciled", "fail");
    // It may first be seen before its first reconcile; wait for the verdict.
    let outcome = if outcome.item("namespaces-reconciled")["detail"]
        .as_str()
        .unwrap()
        .contains("broken: not ready")
    {
        outcome
    } else {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let outcome = s.check_json();
            if outcome.item("namespaces-reconciled")["detail"]
                .as_str()
                .unwrap()
                .contains("broken: not ready")
            {
                break outcome;
            }
            assert!(Instant::now() < deadline, "{}", outcome.stdout);
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    s.assert_fails(
        &outcome,
        "namespaces-reconciled",
        "broken: not ready: InvalidSettings",
        "involvedObject.name=broken",
    );
    run(s.plane.kubectl().args([
        "label",
        "namespace",
        namespace,
        &format!("{DOMAIN}/inject-"),
    ]));
    s.wait_healthy();
}

fn uninjected_pod(s: &Scenario) {
    let unreachable = format!("https://127.0.0.1:{}/mutate", controlplane::free_port());
    s.set_webhook("url", &unreachable);
    // The API server picks the change up asynchronously.
    wait_until(CONVERGE, "pods are admitted without the webhook", || {
        let pod = install::dry_run_pod(s.plane, "shop", &install::probe_pod("probe"));
        pod["metadata"]["labels"][format!("{DOMAIN}/injected")].is_null()
    });
    create_pod(s.plane, "shop", "late", json!({"app": "late"}));
    assert!(!injected(s.plane, "shop", "late"));
    s.install.point_webhook_at(s.serve());

    let outcome = s.check_json();
    s.assert_fails(
        &outcome,
        "pods-injected",
        "shop: late without the sidecar (pod late)",
        "delete and recreate pod shop/late",
    );
    run(s.plane.kubectl().args([
        "delete",
        "pod",
        "late",
        "-n",
        "shop",
        "--wait=true",
        "--timeout=60s",
    ]));
    s.wait_healthy();
}

/// Another sidecar image in the config file serve runs with: serve reloads
/// it, the namespace status records the new config hash, and the injected
/// pod `api` is outdated until its config is current again.
fn outdated_pod(s: &Scenario) {
    let config_file = &s.install.config_file;
    let original = std::fs::read_to_string(config_file).unwrap();
    let changed = format!("{original}\nsidecar:\n  image: prom/statsd-exporter:v0.28.0-rebuilt\n");
    write_atomically(config_file, &changed);
    let outcome = s.wait_for_item("pods-up-to-date", "fail");
    s.assert_fails(
        &outcome,
        "pods-up-to-date",
        "shop: api (pod api) injected with config",
        "delete and recreate pod shop/api",
    );
    write_atomically(config_file, &original);
    s.wait_healthy();
}

/// Replaces `file` through a rename (serve must never read half a file).
fn write_atomically(file: &Path, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// The chart's own clientConfig (a Service): check resolves a ready endpoint
/// from the Service's EndpointSlices and verifies the certificate for
/// `SERVICE.NAMESPACE.svc`; `--webhook-address` overrides the address only.
/// (Endpoints may not be loopback addresses, so the resolved one is
/// unreachable here and the forwarded address is what verifies.)
fn service_addressed_webhook(s: &Scenario) {
    // TEST-NET-1: the API server rejects loopback endpoints.
    const ENDPOINT: &str = "192.0.2.10";
    let port = s.serve().webhook_addr.port();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "chiller-metrics-local",
            "namespace": install::RELEASE_NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": install::RELEASE,
                "endpointslice.kubernetes.io/managed-by": "chiller-tests",
            },
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["192.0.2.9"], "conditions": {"ready": false}},
            {"addresses": [ENDPOINT], "conditions": {"ready": true}},
        ],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    });
    run_with_input(
        s.plane.kubectl().args(["apply", "-f", "-"]),
        &slice.to_string(),
    );
    install::patch_webhook_configuration(
        s.plane,
        &json!([
            {"op": "remove", "path": "/webhooks/0/clientConfig/url"},
            {"op": "add", "path": "/webhooks/0/clientConfig/service", "value": {
                "namespace": install::RELEASE_NAMESPACE, "name": install::RELEASE,
                "path": "/mutate", "port": 443,
            }},
        ]),
    );
    // The endpoint is not reachable from here (no pod runs there).
    let outcome = s.check_json();
    s.assert_fails(
        &outcome,
        "webhook-ca-bundle",
        &format!("cannot connect to {ENDPOINT}:{port}"),
        "--webhook-address 127.0.0.1:8443",
    );
    // Forwarded: the certificate is verified for the Service's DNS name.
    let forwarded = s.check(&[
        "-o",
        "json",
        "--webhook-address",
        &format!("127.0.0.1:{port}"),
    ]);
    let item = forwarded.item("webhook-ca-bundle");
    assert_eq!(item["status"], "pass", "{}", forwarded.stdout);
    assert!(
        item["detail"].as_str().unwrap().contains(&format!(
            "presented at 127.0.0.1:{port} for chiller-metrics.chiller-metrics.svc"
        )),
        "{item:#}"
    );
    run(s.plane.kubectl().args([
        "delete",
        "endpointslice",
        "chiller-metrics-local",
        "-n",
        install::RELEASE_NAMESPACE,
    ]));
    let outcome = s.check_json();
    s.assert_fails(
        &outcome,
        "webhook-ca-bundle",
        "Service chiller-metrics has no ready endpoint for port 443",
        "--webhook-address 127.0.0.1:8443",
    );
    s.install.point_webhook_at(s.serve());
    s.wait_healthy();
}

fn lease_expires_when_serve_stops(s: &mut Scenario) {
    // Killed, not terminated: the lease is not released and must expire.
    drop(s.serve.take());
    let outcome = s.wait_for_item("leader-lease", "fail");
    s.assert_fails(
        &outcome,
        "leader-lease",
        "last renewed at",
        "kubectl -n chiller-metrics logs deploy/chiller-metrics",
    );
    assert_eq!(outcome.item("pods-ready")["status"], "fail");
    assert_eq!(outcome.item("webhook-ca-bundle")["status"], "fail");
    let text = s.check(&[]);
    assert_ne!(text.code, 0);
    eprintln!("----- serve stopped -----\n{}", text.stdout);
}
