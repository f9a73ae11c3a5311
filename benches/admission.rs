//! `make bench-admission`: what a pod create pays for the webhook, through the
//! real API server of the tests (`tests/controlplane`: etcd, kube-apiserver,
//! kube-controller-manager; no node, so pods stay Pending).
//!
//! Pods are created at a fixed rate (RATE per second, default 100) for
//! SECONDS (default 60), in four setups, one after the other in one run
//! (SETUPS=none,ours,alone,go picks some):
//!
//! 1. no webhook (before the chart is installed);
//! 2. our webhook: the chart installed with helm, `serve` out of cluster as
//!    its ServiceAccount, the chart's webhook pointed at it (as the API server
//!    tests do);
//! 3. our webhook alone (`serve --no-reconcile`), as the Go webhook is;
//! 4. the controller-runtime webhook of `benches/go-webhook`, with the same
//!    certificate, registered by the same configuration (its URL changed);
//!    `serve` is stopped first.
//!
//! For each: p50/p99 of the create call as the client sees it, and the API
//! server's `apiserver_admission_webhook_admission_duration_seconds`
//! histogram over the setup (from its `/metrics`). The table goes to stdout and
//! to `target/bench-admission/results.md`. `cargo test` builds this file but
//! does not run it (it runs only with `--bench`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::Value;
use support::controlplane::process::cpu_seconds;
use support::controlplane::{self, ControlPlane, free_port};
use support::crate_dir;
use support::https::ServeProcess;
use support::install::{self, DOMAIN, Install, ensure_namespace, kubectl_json};

/// A create that takes longer counts as failed. Only guards against hangs.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
const ADMISSION_HISTOGRAM: &str = "apiserver_admission_webhook_admission_duration_seconds";

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("benches/admission.rs runs with `make bench-admission`");
        return;
    }
    let rate: u32 = env_or("RATE", 100);
    let seconds: u64 = env_or("SECONDS", 60);
    let go_webhook = build_go_webhook();

    let plane = ControlPlane::shared();
    let _logs = plane.logs_on_failure();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let client = runtime.block_on(plane.client());
    let pod = bench_pod();
    let run = |namespace: &str, labels: &[(&str, &str)], webhook_port: Option<u16>| {
        ensure_namespace(plane, namespace, labels);
        wait_for_default_service_account(plane, namespace);
        let before = admission_histogram(plane);
        let cpu_before = plane_cpu_seconds(plane);
        let latencies = runtime.block_on(create_at_rate(
            client.clone(),
            namespace,
            &pod,
            rate,
            Duration::from_secs(seconds),
        ));
        let webhook = admission_histogram(plane).minus(&before);
        eprintln!(
            "CPU seconds over the setup: {}",
            plane_cpu_seconds(plane)
                .iter()
                .zip(&cpu_before)
                .map(|((name, after), (_, before))| format!("{name} {:.1}", after - before))
                .collect::<Vec<_>>()
                .join(", ")
        );
        eprintln!("{}", by_window(&latencies, rate));
        if let Some(port) = webhook_port {
            eprintln!(
                "connections to the webhook now: {}",
                connection_states(port)
            );
        }
        let setup = Setup {
            latencies,
            webhook,
            injected: last_pod_injected(plane, namespace),
        };
        // Each setup's row as soon as it is measured.
        eprintln!("{}", table(rate, seconds, &[(namespace, &setup)]));
        setup
    };
    let inject = [(format!("{DOMAIN}/inject"), "enabled".to_string())];
    let inject: Vec<(&str, &str)> = inject
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();

    // SETUPS picks some of them, for a quicker look (default: all four).
    let setups = std::env::var("SETUPS").unwrap_or_else(|_| "none,ours,alone,go".into());
    let wanted = |name: &str| setups.split(',').any(|s| s.trim() == name);
    let mut measured: Vec<(&str, Setup)> = Vec::new();

    if wanted("none") {
        eprintln!("no webhook: {rate} creates/s for {seconds} s");
        let none = run("bench-admission-none", &[], None);
        assert!(!none.injected, "pods are not injected without a webhook");
        measured.push(("no webhook", none));
    }

    // A setup through a webhook process: its run, and the CPU the process used.
    let through = |namespace: &str, who: &str, pid: u32, port: u16| {
        eprintln!("{who}: {rate} creates/s for {seconds} s");
        let cpu_before = cpu_seconds(pid);
        let setup = run(namespace, &inject, Some(port));
        eprintln!(
            "{who} used {:.1} CPU seconds",
            cpu_seconds(pid) - cpu_before
        );
        assert!(setup.injected, "{who} injects");
        setup
    };

    let install = Install::chart(plane, &[]);
    // A setup through a `serve` of ours, stopped afterwards.
    let through_serve = |serve: ServeProcess, namespace: &str, who: &str| {
        install.point_webhook_at(&serve);
        let setup = through(namespace, who, serve.pid(), serve.webhook_addr.port());
        let _ = serve.terminate();
        setup
    };
    if wanted("ours") {
        let serve = runtime.block_on(install.serve("chiller-metrics-0"));
        let ours = through_serve(
            serve,
            "bench-admission-ours",
            "serve (webhook and reconcile loop)",
        );
        measured.push(("ours", ours));
    }

    if wanted("alone") {
        // The webhook alone, as the Go webhook is: no reconcile loop, no
        // watches but the Namespaces'.
        let mut command = install.serve_command("chiller-metrics-1");
        command.arg("--no-reconcile");
        let serve = install::start_serve(command);
        if let Err(error) = runtime.block_on(serve.wait_ready()) {
            panic!("{error}; log:\n{}", serve.log().join("\n"));
        }
        let alone = through_serve(
            serve,
            "bench-admission-alone",
            "serve --no-reconcile (the webhook alone)",
        );
        measured.push(("ours, webhook alone (`--no-reconcile`)", alone));
    }

    if wanted("go") {
        let mut go = start_go_webhook(&go_webhook, &install);
        install.point_webhook_at_url(&format!("https://127.0.0.1:{}/mutate", go.port));
        let go_run = through(
            "bench-admission-go",
            "the Go webhook",
            go.child.id(),
            go.port,
        );
        go.stop();
        measured.push(("Go (controller-runtime)", go_run));
    }

    let rows: Vec<(&str, &Setup)> = measured
        .iter()
        .map(|(name, setup)| (*name, setup))
        .collect();
    let table = table(rate, seconds, &rows);
    println!("{table}");
    let out = crate_dir().join("target/bench-admission");
    std::fs::create_dir_all(&out).expect("creating target/bench-admission");
    std::fs::write(out.join("results.md"), &table).expect("writing the results");
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one setup measured.
struct Setup {
    /// Each create's time as the client saw it; `None` for a failed one.
    latencies: Vec<Option<Duration>>,
    webhook: Histogram,
    injected: bool,
}

/// The chiller API pod of the golden files and `make bench`, as a Deployment
/// would create it, without its owner (which does not exist here).
fn bench_pod() -> Pod {
    let review: Value = serde_json::from_str(
        &std::fs::read_to_string(crate_dir().join("tests/golden/requests/chiller-api.json"))
            .expect("reading the chiller API review"),
    )
    .expect("the chiller API review is JSON");
    let mut pod = review["request"]["object"].clone();
    let metadata = pod["metadata"]
        .as_object_mut()
        .expect("the pod has metadata");
    metadata.remove("ownerReferences");
    metadata.remove("namespace");
    serde_json::from_value(pod).expect("the chiller API pod is a Pod")
}

/// Creates `pod` `rate` times a second for `duration`, each create on its
/// own task (an open loop: a slow create does not delay the next).
async fn create_at_rate(
    client: kube::Client,
    namespace: &str,
    pod: &Pod,
    rate: u32,
    duration: Duration,
) -> Vec<Option<Duration>> {
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
    let count = (duration.as_secs_f64() * f64::from(rate)) as usize;
    let mut creates = Vec::with_capacity(count);
    for _ in 0..count {
        ticks.tick().await;
        let (pods, pod) = (pods.clone(), pod.clone());
        creates.push(tokio::spawn(async move {
            let started = Instant::now();
            match tokio::time::timeout(CREATE_TIMEOUT, pods.create(&PostParams::default(), &pod))
                .await
            {
                Ok(Ok(_)) => Some(started.elapsed()),
                Ok(Err(error)) => {
                    eprintln!("create failed: {error}");
                    None
                }
                Err(_) => None,
            }
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for create in creates {
        latencies.push(create.await.expect("a create task does not panic"));
    }
    latencies
}

fn wait_for_default_service_account(plane: &ControlPlane, namespace: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !plane
        .kubectl()
        .args(["get", "serviceaccount", "default", "-n", namespace])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(
            Instant::now() < deadline,
            "no default ServiceAccount in {namespace} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the last pod created in `namespace` carries our injected label.
fn last_pod_injected(plane: &ControlPlane, namespace: &str) -> bool {
    let pods = kubectl_json(plane, &["get", "pods", "-n", namespace, "--chunk-size=0"]);
    let items = pods["items"].as_array().expect("a pod list");
    items
        .iter()
        .max_by_key(|pod| {
            pod["metadata"]["creationTimestamp"]
                .as_str()
                .map(str::to_owned)
        })
        .is_some_and(|pod| pod["metadata"]["labels"][format!("{DOMAIN}/injected")] == "true")
}

/// The admission histogram of all webhooks, summed over its labels.
#[derive(Default)]
struct Histogram {
    /// Cumulative counts by upper bound in microseconds (`u64::MAX`: +Inf).
    buckets: BTreeMap<u64, f64>,
    sum: f64,
    count: f64,
}

/// A bucket's bound in seconds as its key.
fn bound_key(seconds: f64) -> u64 {
    if seconds.is_finite() {
        (seconds * 1e6).round() as u64
    } else {
        u64::MAX
    }
}

impl Histogram {
    fn minus(&self, before: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| (*le, n - before.buckets.get(le).unwrap_or(&0.0)))
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// The share of calls within `bound` seconds.
    fn share_within(&self, bound: f64) -> f64 {
        self.buckets.get(&bound_key(bound)).unwrap_or(&0.0) / self.count
    }

    /// As Prometheus' `histogram_quantile`: linear within the bucket.
    fn quantile(&self, q: f64) -> f64 {
        let rank = q * self.count;
        let mut lower = (0.0, 0.0);
        for (le, &n) in &self.buckets {
            if n >= rank {
                if *le == u64::MAX {
                    return lower.0;
                }
                let le = *le as f64 / 1e6;
                return lower.0 + (le - lower.0) * (rank - lower.1) / (n - lower.1);
            }
            lower = (*le as f64 / 1e6, n);
        }
        f64::NAN
    }
}

fn admission_histogram(plane: &ControlPlane) -> Histogram {
    // An API server behind on its creates may take a while to answer.
    let deadline = Instant::now() + Duration::from_secs(180);
    let text = loop {
        let (status, text) = plane.get("/metrics");
        if status == 200 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the API server's /metrics: {status} {text}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let mut histogram = Histogram::default();
    for line in text.lines().filter(|l| l.starts_with(ADMISSION_HISTOGRAM)) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        let name = series.split('{').next().unwrap_or(series);
        match name.strip_prefix(ADMISSION_HISTOGRAM) {
            Some("_bucket") => {
                let le = series
                    .split("le=\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .map(|le| {
                        if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse().unwrap_or(f64::NAN)
                        }
                    })
                    .expect("a bucket has le");
                *histogram.buckets.entry(bound_key(le)).or_default() += value;
            }
            Some("_sum") => histogram.sum += value,
            Some("_count") => histogram.count += value,
            _ => {}
        }
    }
    histogram
}

/// The Go webhook, built from its pinned module (a warm build takes seconds).
fn build_go_webhook() -> std::path::PathBuf {
    let out = crate_dir().join("target/go-webhook");
    let status = Command::new(crate_dir().join("benches/go-webhook/build.sh"))
        .arg(&out)
        .status()
        .expect("running benches/go-webhook/build.sh");
    assert!(status.success(), "building the Go webhook failed");
    out.join("go-webhook")
}

struct GoWebhook {
    child: Child,
    port: u16,
}

impl GoWebhook {
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Go webhook on the chart's certificate, ready.
fn start_go_webhook(binary: &std::path::Path, install: &Install) -> GoWebhook {
    let (port, admin) = (free_port(), free_port());
    let mut command = Command::new(binary);
    command
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .arg("--cert-dir")
        .arg(&install.certs)
        .arg("--mapping")
        .arg(crate_dir().join("src/inject/statsd-mapping.yaml"))
        .stdout(Stdio::null());
    let child = controlplane::process::spawn_tied_to_this_process(command)
        .expect("starting the Go webhook");
    let mut go = GoWebhook { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = Command::new("curl")
            .args(["-fsS", "--max-time", "2", "-o", "/dev/null"])
            .arg(format!("http://127.0.0.1:{admin}/readyz"))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return go;
        }
        if Instant::now() > deadline || go.child.try_wait().ok().flatten().is_some() {
            go.stop();
            panic!("the Go webhook did not become ready within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// TCP connections to `port` on loopback by state (`ss`), e.g. "ESTAB 4,
/// TIME-WAIT 120": connections closed within the last minute linger in
/// TIME-WAIT on the side that closed first.
fn connection_states(port: u16) -> String {
    let output = Command::new("ss")
        .args(["-Htan", &format!("( sport = :{port} or dport = :{port} )")])
        .output();
    let Ok(output) = output else {
        return "ss is missing".into();
    };
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Some(state) = line.split_whitespace().next() {
            *states.entry(state.to_string()).or_default() += 1;
        }
    }
    states
        .iter()
        .map(|(state, n)| format!("{state} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// CPU seconds each control-plane process has used so far.
fn plane_cpu_seconds(plane: &ControlPlane) -> Vec<(&'static str, f64)> {
    let mut pids = plane.pids();
    pids.push(("bench client", std::process::id()));
    pids.into_iter()
        .map(|(name, pid)| (name, cpu_seconds(pid)))
        .collect()
}

/// p50 and p99 of the creates started in each 10-second window: shows
/// whether slow creates cluster (start-up, a burst) or spread.
fn by_window(latencies: &[Option<Duration>], rate: u32) -> String {
    let per_window = (rate as usize * 10).max(1);
    latencies
        .chunks(per_window)
        .enumerate()
        .map(|(i, window)| {
            let mut ok: Vec<Duration> = window.iter().flatten().copied().collect();
            ok.sort();
            format!(
                "{:>3}-{:<3} s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                i * 10,
                i * 10 + 10,
                percentile(&ok, 0.5),
                percentile(&ok, 0.99),
                percentile(&ok, 1.0),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let index = ((q * sorted.len() as f64) as usize).min(sorted.len().saturating_sub(1));
    sorted
        .get(index)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

fn table(rate: u32, seconds: u64, setups: &[(&str, &Setup)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{rate} pod creates/s for {seconds} s per setup; create = the client's time (ms); \
         webhook = the API server's admission histogram over the setup"
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| setup | creates ok | failed | create p50 | create p99 | p50 added | p99 added | webhook calls | webhook mean | webhook ≤ 5 ms | ≤ 25 ms | webhook p99 (interpolated) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut base = None;
    for (name, setup) in setups {
        let mut ok: Vec<Duration> = setup.latencies.iter().flatten().copied().collect();
        ok.sort();
        let failed = setup.latencies.len() - ok.len();
        let (p50, p99) = (percentile(&ok, 0.50), percentile(&ok, 0.99));
        let (base50, base99) = *base.get_or_insert((p50, p99));
        let w = &setup.webhook;
        let webhook = if w.count > 0.0 {
            format!(
                "{:.0} | {:.2} ms | {:.1}% | {:.1}% | {:.1} ms",
                w.count,
                w.sum / w.count * 1000.0,
                w.share_within(0.005) * 100.0,
                w.share_within(0.025) * 100.0,
                w.quantile(0.99) * 1000.0
            )
        } else {
            "0 | – | – | – | –".to_string()
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {failed} | {p50:.2} ms | {p99:.2} ms | {:+.2} ms | {:+.2} ms | {webhook} |",
            ok.len(),
            p50 - base50,
            p99 - base99,
        );
    }
    out
}
