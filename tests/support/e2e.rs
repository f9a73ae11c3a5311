//! What the e2e tests on the real node share (tests/cluster/e2e_*.rs): the
//! tools and images they build beforehand, the Prometheus Operator as
//! kube-prometheus-stack runs it, the scripts of tests/e2e run against the
//! cluster, and what to show when one fails.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use super::controlplane::{
    ControlPlane, LogsOnFailure, cluster_images,
    node::Node,
    nodes::{build, module_dir},
};
use super::install::{run, run_with_input};

pub const OPERATOR_MODULE: &str = "github.com/prometheus-operator/prometheus-operator";
/// Where kube-prometheus-stack puts the operator.
pub const OPERATOR_NAMESPACE: &str = "monitoring";
/// Bounds the whole scenario (each of its waits is bounded too).
pub const SCENARIO_TIMEOUT_SECONDS: u32 = 2400;

/// The image archive of the e2e test `name`, which [`build_tools_and_images`]
/// writes and its node imports.
pub fn images_archive(name: &str) -> PathBuf {
    super::crate_dir().join(format!("target/node-images/{name}.tar"))
}

/// Builds and downloads everything an e2e test runs, from the Go module
/// proxy, PyPI and the Debian archive, and writes the node's images into
/// `archive`, with `chiller_metrics` as the chart's image; only possible
/// before `isolated` enters its network namespace (its `prepare`).
pub fn build_tools_and_images(archive: &Path, chiller_metrics: &Path) {
    super::controlplane::binaries();
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
    cluster_images::write(archive, chiller_metrics);
}

pub fn kubectl_text(plane: &ControlPlane, args: &[&str]) -> String {
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
pub fn install_prometheus_operator(plane: &ControlPlane) {
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

/// A script of tests/e2e against this cluster, bounded in time, with `dirs`
/// and then the tools first on PATH.
pub fn e2e_script(plane: &ControlPlane, script: &str, dirs: &[PathBuf]) -> Command {
    let tools = super::crate_dir().join(".tools");
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
        .arg(super::crate_dir().join("tests/e2e").join(script))
        .env("PATH", path)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_DATA_HOME", helm_home.join("data"));
    // The documented quick start runs `cargo build --release`.
    super::as_a_user_runs_it(&mut command);
    command
}

pub fn prometheus_targets(plane: &ControlPlane, namespaces: &[&str]) -> String {
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
pub fn dump_on_failure<'a>(
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
