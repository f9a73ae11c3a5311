//! `make e2e-local`: the kind journey of `make e2e` with every component
//! real except the container runtime. The control plane, kube-scheduler,
//! two kwok nodes, kube-proxy, the Prometheus Operator (as the pod of its
//! upstream Deployment), chiller-metrics (the chart's pods, generated
//! certificates, called through the chart's `clientConfig.service`), the
//! test app's gunicorn, the injected statsd_exporter sidecars, Prometheus
//! with its config reloader, Postgres and postgres_exporter all run; the pod
//! runner starts each Running pod's processes in the pod's own network
//! namespace and reports their readiness. Then it runs the same scenario
//! script as `make e2e` (tests/e2e/scenario.sh). The test runs in network
//! namespaces it creates itself.

mod controlplane;
mod install;
mod support;

use std::{collections::BTreeMap, process::Command};

use controlplane::{
    ControlPlane,
    nodes::{PodReadiness, build, module_dir},
    runner::{ImageTable, Launch, PodRunner, isolated},
};
use install::{
    RELEASE, RELEASE_NAMESPACE, WEBHOOK_CONFIGURATION, kubectl_json, run, run_with_input,
};

const OPERATOR_MODULE: &str = "github.com/prometheus-operator/prometheus-operator";
/// Where kube-prometheus-stack puts the operator.
const OPERATOR_NAMESPACE: &str = "monitoring";
/// Bounds the whole scenario (each of its waits is bounded too).
const SCENARIO_TIMEOUT_SECONDS: u32 = 2400;

/// Builds and downloads, from the Go module proxy, everything the scenario
/// runs; only possible before [`isolated`] enters its network namespace.
fn build_and_download_tools() {
    controlplane::binaries();
    for module in [
        "kwok",
        "statsd-exporter",
        "prometheus",
        "prometheus-operator",
        "postgres-exporter",
    ] {
        build(module);
    }
    module_dir("kwok", "sigs.k8s.io/kwok");
    module_dir("prometheus-operator", OPERATOR_MODULE);
}

fn table() -> ImageTable {
    let app = controlplane::crate_dir().join("tests/e2e/app");
    let venv = controlplane::crate_dir().join(".tools/venv/bin");
    let statsd = build("statsd-exporter").join("statsd_exporter");
    let prometheus = build("prometheus").join("prometheus");
    let operator = build("prometheus-operator");
    let reloader = operator.join("prometheus-config-reloader");
    let postgres_exporter = build("postgres-exporter").join("postgres_exporter");
    let postgres = controlplane::crate_dir().join("tests/e2e/local/postgres-entrypoint.sh");
    BTreeMap::from([
        (
            "quay.io/prometheus-operator/prometheus-operator".to_string(),
            Launch {
                entrypoint: vec![operator.join("operator").display().to_string()],
                default_args: vec![],
                workdir: None,
                path: vec![],
                programs: vec![],
                private_dirs: vec![],
            },
        ),
        (
            "quay.io/prometheuscommunity/postgres-exporter".to_string(),
            Launch {
                entrypoint: vec![postgres_exporter.display().to_string()],
                default_args: vec![],
                workdir: None,
                path: vec![],
                programs: vec![],
                private_dirs: vec![],
            },
        ),
        (
            // The official image's entrypoint, with Debian's PostgreSQL.
            "postgres".to_string(),
            Launch {
                entrypoint: vec![postgres.display().to_string()],
                default_args: vec![],
                workdir: None,
                path: vec![],
                programs: vec![],
                private_dirs: vec!["/run/postgresql".to_string()],
            },
        ),
        (
            // The version prometheus-operator v0.93.0 deploys.
            "quay.io/prometheus/prometheus".to_string(),
            Launch {
                entrypoint: vec![prometheus.display().to_string()],
                default_args: vec![],
                workdir: None,
                path: vec![],
                programs: vec![],
                private_dirs: vec![],
            },
        ),
        (
            "quay.io/prometheus-operator/prometheus-config-reloader".to_string(),
            Launch {
                entrypoint: vec![reloader.display().to_string()],
                default_args: vec![],
                workdir: None,
                path: vec![],
                programs: vec![(
                    "/bin/prometheus-config-reloader".to_string(),
                    reloader.clone(),
                )],
                private_dirs: vec![],
            },
        ),
        (
            // Dockerfile: ENTRYPOINT the binary, CMD serve.
            "chiller-metrics".to_string(),
            Launch {
                entrypoint: vec![support::https::ServeProcess::BINARY.to_string()],
                default_args: vec!["serve".into(), "--log-format".into(), "json".into()],
                workdir: None,
                path: vec![],
                programs: vec![],
                private_dirs: vec![],
            },
        ),
        (
            "prom/statsd-exporter".to_string(),
            Launch {
                entrypoint: vec![statsd.display().to_string()],
                default_args: vec![],
                workdir: None,
                path: vec![],
                programs: vec![],
                private_dirs: vec![],
            },
        ),
        (
            // tests/e2e/app/Dockerfile: a shell-form ENTRYPOINT.
            "chiller-e2e-app".to_string(),
            Launch {
                entrypoint: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "gunicorn app:app --bind 0.0.0.0:8000 --workers 2".into(),
                ],
                default_args: vec![],
                workdir: Some(app),
                path: vec![venv],
                programs: vec![],
                private_dirs: vec![],
            },
        ),
    ])
}

fn kubectl_text(plane: &ControlPlane, args: &[&str]) -> String {
    plane
        .kubectl()
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default()
}

/// The Prometheus Operator as kube-prometheus-stack runs it: every CRD, and
/// the upstream Deployment, ServiceAccount, ClusterRole and binding from the
/// pinned module, in namespace `monitoring`, watching every namespace (as
/// manifests/kube-prometheus-stack-values.yaml configures it).
fn install_prometheus_operator(plane: &ControlPlane) {
    let module = module_dir("prometheus-operator", OPERATOR_MODULE);
    run(plane
        .kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(module.join("example/prometheus-operator-crd")));
    for crd in ["prometheuses", "servicemonitors", "podmonitors"] {
        run(plane.kubectl().args([
            "wait",
            "--for=condition=Established",
            "--timeout=120s",
            &format!("crd/{crd}.monitoring.coreos.com"),
        ]));
    }
    run(plane
        .kubectl()
        .args(["create", "namespace", OPERATOR_NAMESPACE]));
    let bundle = module.join("example/rbac/prometheus-operator");
    for file in [
        "prometheus-operator-service-account.yaml",
        "prometheus-operator-cluster-role.yaml",
        "prometheus-operator-cluster-role-binding.yaml",
        "prometheus-operator-service.yaml",
        "prometheus-operator-deployment.yaml",
    ] {
        let manifest = std::fs::read_to_string(bundle.join(file)).expect(file);
        run_with_input(
            plane.kubectl().args(["apply", "-f", "-"]),
            &manifest.replace(
                "namespace: default",
                &format!("namespace: {OPERATOR_NAMESPACE}"),
            ),
        );
    }
    run(plane.kubectl().args([
        "rollout",
        "status",
        "deployment/prometheus-operator",
        "-n",
        OPERATOR_NAMESPACE,
        "--timeout=300s",
    ]));
}

/// chiller-metrics as the README installs it, with the chart's
/// generated-certificate mode (no cert-manager here).
fn install_chiller_metrics(plane: &ControlPlane) {
    run(install::helm(plane)
        .args(["install", RELEASE])
        .arg(controlplane::crate_dir().join("manifests/chart/chiller-metrics"))
        .args(["--namespace", RELEASE_NAMESPACE, "--create-namespace"])
        .args(["--set", "certs.mode=generated"])
        .args(["--wait", "--timeout", "5m"]));
    let configuration = kubectl_json(
        plane,
        &["get", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION],
    );
    let client = &configuration["webhooks"][0]["clientConfig"];
    assert!(
        client["service"].is_object() && client["url"].is_null(),
        "the API server calls the chart's Service, no url: {client:#}"
    );
}

/// tests/e2e/scenario.sh against this cluster, with the tools on PATH.
fn scenario(plane: &ControlPlane) -> Command {
    let tools = controlplane::crate_dir().join(".tools");
    let path = std::env::join_paths(
        [tools.join("bin"), tools.join("venv/bin")]
            .into_iter()
            .chain(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            )),
    )
    .unwrap();
    let helm_home = plane.dir.join("helm");
    let mut command = Command::new("timeout");
    command
        .arg(SCENARIO_TIMEOUT_SECONDS.to_string())
        .arg(controlplane::crate_dir().join("tests/e2e/scenario.sh"))
        .env("PATH", path)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_DATA_HOME", helm_home.join("data"))
        .env("APP_IMAGE", "chiller-e2e-app:e2e")
        .env("APP_PULL_POLICY", "IfNotPresent")
        .env("CHILLER_NAMESPACE", RELEASE_NAMESPACE)
        .env("NAMESPACES", "shop-a shop-b");
    command
}

fn prometheus_targets(plane: &ControlPlane) -> String {
    ["shop-a", "shop-b"]
        .iter()
        .map(|ns| {
            format!(
                "{ns}: {}",
                kubectl_text(
                    plane,
                    &[
                        "get",
                        "--raw",
                        &format!(
                            "/api/v1/namespaces/{ns}/services/prometheus-operated:web/proxy/api/v1/targets"
                        ),
                    ],
                )
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_kind_journey_on_kwok_nodes_with_pods_that_really_run() {
    if !isolated(
        "the_kind_journey_on_kwok_nodes_with_pods_that_really_run",
        build_and_download_tools,
    ) {
        return;
    }
    let plane = ControlPlane::shared();
    plane.add_nodes_with(
        &[
            ("kwok-node-a", "10.244.1.0/24"),
            ("kwok-node-b", "10.244.2.0/24"),
        ],
        PodReadiness::PodRunner,
    );
    let runner = PodRunner::start(plane, table());
    // On failure: the pods, the events, each Prometheus's targets and the
    // last lines of every process.
    let _dump = plane
        .logs_on_failure()
        .with("pods", || {
            kubectl_text(plane, &["get", "pods", "-A", "-o", "wide"])
        })
        .with("events", || kubectl_text(plane, &["get", "events", "-A"]))
        .with("Prometheus targets", || prometheus_targets(plane))
        .with("pod runner errors", || runner.errors().join("\n"))
        .with("kube-proxy", || runner.kube_proxy_log(30))
        .with("containers", || runner.container_logs(20));

    install_prometheus_operator(plane);
    install_chiller_metrics(plane);

    let status = scenario(plane)
        .status()
        .expect("running tests/e2e/scenario.sh");
    assert!(
        status.success(),
        "tests/e2e/scenario.sh failed ({status}); pod runner errors: {:#?}",
        runner.errors()
    );
}
