//! `make e2e-local`: the kind journey of `make e2e` on a real node. The
//! control plane, kube-scheduler, a kubelet with containerd, runc and the
//! CNI bridge, kube-proxy and CoreDNS all run (tests/controlplane/node.rs),
//! with images built locally and imported, nothing pulled: the Prometheus
//! Operator (as its upstream Deployment), chiller-metrics (the chart's pods,
//! generated certificates, called through the chart's Service), the test
//! app under gunicorn, the injected statsd_exporter sidecars, Prometheus with
//! its config reloader, Postgres and postgres_exporter. Then it runs the
//! same scenario script as `make e2e` (tests/e2e/scenario.sh). The test
//! runs in network and mount namespaces it creates itself, as root.

mod controlplane;
mod install;
mod support;

use std::{path::PathBuf, process::Command};

use controlplane::{
    ControlPlane,
    images::{self, Entry, Image, ImageConfig, Layer, Source},
    node::{Node, isolated},
    nodes::{build, module_dir},
};
use install::{RELEASE, RELEASE_NAMESPACE, WEBHOOK_CONFIGURATION, kubectl_json, run, run_with_input};

const OPERATOR_MODULE: &str = "github.com/prometheus-operator/prometheus-operator";
/// Where kube-prometheus-stack puts the operator.
const OPERATOR_NAMESPACE: &str = "monitoring";
/// Bounds the whole scenario (each of its waits is bounded too).
const SCENARIO_TIMEOUT_SECONDS: u32 = 2400;
/// Unprivileged users of the upstream images.
const NOBODY: &str = "65534";

/// Where [`build_images`] writes the archive the isolated run imports.
fn images_archive() -> PathBuf {
    controlplane::crate_dir().join("target/node-images/e2e.tar")
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
    build_images();
}

/// One entry: a host file at `path` in the image.
fn file(path: &str, source: PathBuf, mode: u32) -> Entry {
    Entry {
        path: path.to_string(),
        source: Source::File(source),
        mode,
    }
}

/// An image of `base` plus one layer of `entries`.
fn image(name: &str, mut layers: Vec<Layer>, entries: Vec<Entry>, config: ImageConfig) -> Image {
    layers.push(Layer::Files(entries));
    Image {
        name: name.to_string(),
        layers,
        config,
    }
}

/// Every image a pod of the journey names, under that exact name, over one
/// shared Debian layer (the binaries need its glibc): what the chart, the
/// operator, our sidecar and postgres_exporter defaults, and the test app's
/// chart reference.
fn build_images() {
    let started = std::time::Instant::now();
    let crate_dir = controlplane::crate_dir();
    let debian = || vec![Layer::Tar(images::debian_rootfs())];
    let bin = |module: &str, name: &str| build(module).join(name);
    let entry = |binary: &str| ImageConfig {
        entrypoint: vec![binary.to_string()],
        user: Some(NOBODY.to_string()),
        ..ImageConfig::default()
    };
    let operator = operator_version();
    let chart_version = chart_app_version();
    let images = vec![
        images::pause_image(),
        // Dockerfile: distroless's nonroot user, ENTRYPOINT the binary, CMD serve.
        image(
            &format!("chiller-metrics:{chart_version}"),
            debian(),
            vec![file("/usr/local/bin/chiller-metrics", support::release_binary(), 0o755)],
            ImageConfig {
                entrypoint: vec!["/usr/local/bin/chiller-metrics".into()],
                cmd: vec!["serve".into(), "--log-format".into(), "json".into()],
                user: Some("65532:65532".into()),
                ..ImageConfig::default()
            },
        ),
        image(
            chiller_metrics::config::DEFAULT_SIDECAR_IMAGE,
            debian(),
            vec![file("/bin/statsd_exporter", bin("statsd-exporter", "statsd_exporter"), 0o755)],
            entry("/bin/statsd_exporter"),
        ),
        image(
            chiller_metrics::config::DEFAULT_POSTGRES_EXPORTER_IMAGE,
            debian(),
            vec![file(
                "/bin/postgres_exporter",
                bin("postgres-exporter", "postgres_exporter"),
                0o755,
            )],
            entry("/bin/postgres_exporter"),
        ),
        image(
            &format!("quay.io/prometheus-operator/prometheus-operator:{operator}"),
            debian(),
            vec![file("/bin/operator", bin("prometheus-operator", "operator"), 0o755)],
            entry("/bin/operator"),
        ),
        image(
            &format!("quay.io/prometheus-operator/prometheus-config-reloader:{operator}"),
            debian(),
            vec![file(
                "/bin/prometheus-config-reloader",
                bin("prometheus-operator", "prometheus-config-reloader"),
                0o755,
            )],
            entry("/bin/prometheus-config-reloader"),
        ),
        image(
            &format!("quay.io/prometheus/prometheus:{}", prometheus_version()),
            debian(),
            vec![
                file("/bin/prometheus", bin("prometheus", "prometheus"), 0o755),
                Entry {
                    path: "/prometheus".into(),
                    source: Source::Dir,
                    mode: 0o777,
                },
            ],
            ImageConfig {
                working_dir: Some("/prometheus".into()),
                ..entry("/bin/prometheus")
            },
        ),
        // The official image's entrypoint, with Debian's PostgreSQL.
        image(
            "postgres:17-alpine",
            debian(),
            vec![file(
                "/usr/local/bin/docker-entrypoint.sh",
                crate_dir.join("tests/e2e/local/postgres-entrypoint.sh"),
                0o755,
            )],
            ImageConfig {
                entrypoint: vec!["docker-entrypoint.sh".into()],
                cmd: vec!["postgres".into()],
                env: vec![
                    "PATH=/usr/local/bin:/usr/lib/postgresql/15/bin:/usr/bin:/bin".into(),
                    "PGDATA=/var/lib/postgresql/data".into(),
                ],
                ..ImageConfig::default()
            },
        ),
        // tests/e2e/app/Dockerfile: gunicorn from a shell-form ENTRYPOINT.
        image(
            "chiller-e2e-app:e2e",
            vec![
                Layer::Tar(images::debian_rootfs()),
                images::app_packages_layer(),
            ],
            vec![file("/app/app.py", crate_dir.join("tests/e2e/app/app.py"), 0o644)],
            ImageConfig {
                entrypoint: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "gunicorn app:app --bind 0.0.0.0:8000 --workers 2".into(),
                ],
                working_dir: Some("/app".into()),
                user: Some("10001".into()),
                env: vec![images::app_pythonpath(), "HOME=/tmp".into()],
                ..ImageConfig::default()
            },
        ),
        image(
            &format!("coredns/coredns:{}", coredns_version()),
            vec![],
            vec![file("/coredns", bin("coredns", "coredns"), 0o755)],
            ImageConfig {
                entrypoint: vec!["/coredns".into()],
                ..ImageConfig::default()
            },
        ),
    ];
    let archive = images_archive();
    std::fs::create_dir_all(archive.parent().unwrap()).unwrap();
    images::write_archive(&archive, &images).expect("writing the image archive");
    eprintln!(
        "{} images written in {:.1} s",
        images.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The version of a module in a `tools/` go.mod.
fn pinned(tools_module: &str, module: &str) -> String {
    let go_mod = std::fs::read_to_string(
        controlplane::crate_dir().join("tools").join(tools_module).join("go.mod"),
    )
    .unwrap_or_else(|e| panic!("reading tools/{tools_module}/go.mod: {e}"));
    go_mod
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(module)).then(|| words.next().map(str::to_string))?
        })
        .unwrap_or_else(|| panic!("tools/{tools_module}/go.mod does not require {module}"))
}

fn operator_version() -> String {
    pinned("prometheus-operator", OPERATOR_MODULE)
}

fn coredns_version() -> String {
    pinned("coredns", "github.com/coredns/coredns")
}

/// Module v0.3MM.P is Prometheus v3.MM.P, the version the operator deploys.
fn prometheus_version() -> String {
    let module = pinned("prometheus", "github.com/prometheus/prometheus");
    let (minor, patch) = module
        .trim_start_matches("v0.")
        .split_once('.')
        .expect("a v0.3MM.P module version");
    format!("v3.{}.{patch}", minor.parse::<u32>().unwrap() - 300)
}

/// The chart's appVersion: its default image tag.
fn chart_app_version() -> String {
    let chart = std::fs::read_to_string(
        controlplane::crate_dir().join("manifests/chart/chiller-metrics/Chart.yaml"),
    )
    .expect("reading Chart.yaml");
    chart
        .lines()
        .find_map(|line| line.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("Chart.yaml has an appVersion")
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
fn the_kind_journey_on_a_real_node() {
    if !isolated("the_kind_journey_on_a_real_node", build_tools_and_images) {
        return;
    }
    let plane = ControlPlane::shared();
    let node = Node::start(plane, &[&images_archive()]);
    // On failure: the pods, the events, each Prometheus's targets, the
    // node's daemons and its containers.
    let _dump = plane
        .logs_on_failure()
        .with("pods", || {
            kubectl_text(plane, &["get", "pods", "-A", "-o", "wide"])
        })
        .with("events", || kubectl_text(plane, &["get", "events", "-A"]))
        .with("Prometheus targets", || prometheus_targets(plane))
        .with("node", || node.diagnostics(40));

    install_prometheus_operator(plane);
    install_chiller_metrics(plane);

    let status = scenario(plane)
        .status()
        .expect("running tests/e2e/scenario.sh");
    assert!(status.success(), "tests/e2e/scenario.sh failed ({status})");
}
