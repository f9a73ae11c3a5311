//! `make e2e-local`: the kind journey of `make e2e` on a real node. The
//! control plane, kube-scheduler, a kubelet with containerd, runc and the
//! CNI bridge, kube-proxy and CoreDNS all run (tests/support/controlplane/node.rs),
//! with images built locally and imported, nothing pulled: the Prometheus
//! Operator (as its upstream Deployment), chiller-metrics (the chart's pods,
//! generated certificates, called through the chart's Service), the test
//! app under gunicorn, the injected statsd_exporter sidecars, Prometheus with
//! its config reloader, Postgres and postgres_exporter. Then it runs the
//! same scenario script as `make e2e` (tests/e2e/scenario.sh). The test
//! runs in network and mount namespaces it creates itself, as root.

use crate::support;
use crate::support::controlplane;
use crate::support::install;

use std::{path::PathBuf, process::Command};

use controlplane::{
    ControlPlane, LogsOnFailure, cluster_images,
    node::{Node, isolated},
    nodes::{build, module_dir},
};
use install::{
    RELEASE, RELEASE_NAMESPACE, WEBHOOK_CONFIGURATION, kubectl_json, run, run_with_input,
};

const OPERATOR_MODULE: &str = "github.com/prometheus-operator/prometheus-operator";
/// Where kube-prometheus-stack puts the operator.
const OPERATOR_NAMESPACE: &str = "monitoring";
/// Bounds the whole scenario (each of its waits is bounded too).
const SCENARIO_TIMEOUT_SECONDS: u32 = 2400;

/// Where [`build_images`] writes the archive the isolated run imports.
fn images_archive() -> PathBuf {
    support::crate_dir().join("target/node-images/e2e.tar")
}

/// Builds and downloads everything the journey runs, from the Go module
/// proxy, PyPI and the Debian archive; only possible before [`isolated`]
/// enters its network namespace.
fn build_tools_and_images() {
    controlplane::binaries();
    for module in [
        "containerd",
        "runc",
        "cni-plugins",
        "crictl",
        "coredns",
        "statsd-exporter",
        "prometheus",
        "prometheus-operator",
        "postgres-exporter",
    ] {
        build(module);
    }
    module_dir("prometheus-operator", OPERATOR_MODULE);
    cluster_images::write(&images_archive(), &support::release_binary());
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
        .arg(support::crate_dir().join("manifests/chart/chiller-metrics"))
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

/// A script of tests/e2e against this cluster, bounded in time, with `dirs`
/// and then the tools first on PATH.
fn e2e_script(plane: &ControlPlane, script: &str, dirs: &[PathBuf]) -> Command {
    let tools = support::crate_dir().join(".tools");
    let path = std::env::join_paths(
        dirs.iter()
            .cloned()
            .chain([tools.join("bin"), tools.join("venv/bin")])
            .chain(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            )),
    )
    .unwrap();
    let helm_home = plane.dir.join("helm");
    let mut command = Command::new("timeout");
    command
        .arg(SCENARIO_TIMEOUT_SECONDS.to_string())
        .arg(support::crate_dir().join("tests/e2e").join(script))
        .env("PATH", path)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_DATA_HOME", helm_home.join("data"));
    // The documented quick start runs `cargo build --release`.
    support::as_a_user_runs_it(&mut command);
    command
}

/// tests/e2e/scenario.sh against this cluster.
fn scenario(plane: &ControlPlane) -> Command {
    let mut command = e2e_script(plane, "scenario.sh", &[]);
    command
        .env("APP_IMAGE", "chiller-e2e-app:e2e")
        .env("APP_PULL_POLICY", "IfNotPresent")
        .env("CHILLER_NAMESPACE", RELEASE_NAMESPACE)
        .env("NAMESPACES", "shop-a shop-b");
    command
}

fn prometheus_targets(plane: &ControlPlane, namespaces: &[&str]) -> String {
    namespaces
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

/// On failure: the pods, the events, each namespace's Prometheus targets,
/// the node's daemons and its containers.
fn dump_on_failure<'a>(
    plane: &'a ControlPlane,
    node: &'a Node,
    namespaces: &'a [&'a str],
) -> LogsOnFailure<'a> {
    plane
        .logs_on_failure()
        .with("pods", || {
            kubectl_text(plane, &["get", "pods", "-A", "-o", "wide"])
        })
        .with("events", || kubectl_text(plane, &["get", "events", "-A"]))
        .with("Prometheus targets", || {
            prometheus_targets(plane, namespaces)
        })
        .with("node", || node.diagnostics(40))
}

#[test]
fn the_kind_journey_on_a_real_node() {
    if !isolated(
        "e2e_pods::the_kind_journey_on_a_real_node",
        build_tools_and_images,
    ) {
        return;
    }
    let plane = ControlPlane::shared();
    let node = Node::start(plane, &[&images_archive()]);
    let _dump = dump_on_failure(plane, &node, &["shop-a", "shop-b"]);

    install_prometheus_operator(plane);
    install_chiller_metrics(plane);

    let status = scenario(plane)
        .status()
        .expect("running tests/e2e/scenario.sh");
    assert!(status.success(), "tests/e2e/scenario.sh failed ({status})");
}

/// The README's quick start and the upgrade and uninstall of
/// docs/install.md, their lines run as written (tests/e2e/documented.sh);
/// only `kind`, `docker build` and the kube-prometheus-stack install are
/// stood in for (tests/e2e/local/shims), as this machine has no Docker and
/// no chart repositories.
#[test]
fn the_documented_quick_start_upgrade_and_uninstall_work_as_written() {
    let name = "e2e_pods::the_documented_quick_start_upgrade_and_uninstall_work_as_written";
    if !isolated(name, build_tools_and_images) {
        return;
    }
    let plane = ControlPlane::shared();
    let node = Node::start(plane, &[&images_archive()]);
    let _dump = dump_on_failure(plane, &node, &["chiller"]);

    install_prometheus_operator(plane);

    let shims = support::crate_dir().join("tests/e2e/local/shims");
    let status = e2e_script(plane, "documented.sh", &[shims])
        .env("CRICTL", build("crictl").join("crictl"))
        .env("CRI_CONFIG_FILE", node.crictl_config())
        .status()
        .expect("running tests/e2e/documented.sh");
    assert!(
        status.success(),
        "tests/e2e/documented.sh failed ({status})"
    );
}
