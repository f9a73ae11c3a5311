//! The images a cluster of ours runs, under exactly the names that pods
//! reference, so `imagePullPolicy: IfNotPresent` finds them and nothing is
//! pulled: what the chart, the Prometheus Operator, our sidecar and
//! postgres_exporter defaults and the test app chart name, plus the pause
//! image and CoreDNS. Go binaries come from the modules pinned in `tools/`.

use std::path::{Path, PathBuf};

use chiller_metrics::config::{DEFAULT_POSTGRES_EXPORTER_IMAGE, DEFAULT_SIDECAR_IMAGE};

use super::{
    images::{self, Entry, Image, ImageConfig, Layer, Source},
    nodes::build,
};

const OPERATOR_MODULE: &str = "github.com/prometheus-operator/prometheus-operator";
/// Unprivileged users of the upstream images.
const NOBODY: &str = "65534";

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
pub fn write(archive: &Path, release_binary: &Path) {
    let started = std::time::Instant::now();
    let crate_dir = super::crate_dir();
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
            vec![file(
                "/usr/local/bin/chiller-metrics",
                release_binary.to_path_buf(),
                0o755,
            )],
            ImageConfig {
                entrypoint: vec!["/usr/local/bin/chiller-metrics".into()],
                cmd: vec!["serve".into(), "--log-format".into(), "json".into()],
                user: Some("65532:65532".into()),
                ..ImageConfig::default()
            },
        ),
        image(
            DEFAULT_SIDECAR_IMAGE,
            debian(),
            vec![file(
                "/bin/statsd_exporter",
                bin("statsd-exporter", "statsd_exporter"),
                0o755,
            )],
            entry("/bin/statsd_exporter"),
        ),
        image(
            DEFAULT_POSTGRES_EXPORTER_IMAGE,
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
            vec![file(
                "/bin/operator",
                bin("prometheus-operator", "operator"),
                0o755,
            )],
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
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
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
            vec![file(
                "/app/app.py",
                crate_dir.join("tests/e2e/app/app.py"),
                0o644,
            )],
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
    std::fs::create_dir_all(archive.parent().unwrap()).unwrap();
    images::write_archive(archive, &images).expect("writing the image archive");
    eprintln!(
        "{} images written in {:.1} s",
        images.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The version of a module in a `tools/` go.mod.
fn pinned(tools_module: &str, module: &str) -> String {
    let go_mod = std::fs::read_to_string(
        super::crate_dir()
            .join("tools")
            .join(tools_module)
            .join("go.mod"),
    )
    .unwrap_or_else(|e| panic!("reading tools/{tools_module}/go.mod: {e}"));
    go_mod
        .lines()
        .find_map(|line| {
            let mut words = line
                .split_whitespace()
                .skip_while(|word| *word == "require");
            (words.next() == Some(module)).then(|| words.next().map(str::to_string))?
        })
        .unwrap_or_else(|| panic!("tools/{tools_module}/go.mod does not require {module}"))
}

fn operator_version() -> String {
    pinned("prometheus-operator", OPERATOR_MODULE)
}

pub fn coredns_version() -> String {
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
        super::crate_dir().join("manifests/chart/chiller-metrics/Chart.yaml"),
    )
    .expect("reading Chart.yaml");
    chart
        .lines()
        .find_map(|line| line.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("Chart.yaml has an appVersion")
}
