//! Injected pods really run: chiller-metrics itself runs as the pods of the
//! chart's Deployment (generated-certificate mode, the in-cluster
//! service-account token) and the API server calls it through the chart's
//! `clientConfig.service`. kube-scheduler binds pods to kwok nodes; the pod
//! runner starts gunicorn and the injected statsd_exporter sidecar in each
//! pod's own network namespace; each exporter counts exactly its own pod's
//! requests. The test runs in network namespaces it creates itself.

mod controlplane;
mod install;
mod support;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use controlplane::{
    ControlPlane,
    nodes::build,
    runner::{ImageTable, Launch, PodRunner, isolated},
};
use install::{DOMAIN, Install, ensure_namespace, kubectl_json, run_with_input};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(120);

fn table() -> ImageTable {
    let app = controlplane::crate_dir().join("tests/e2e/app");
    let venv = controlplane::crate_dir().join(".tools/venv/bin");
    let statsd = build("statsd-exporter").join("statsd_exporter");
    let prometheus = build("prometheus").join("prometheus");
    let reloader = build("prometheus-operator").join("prometheus-config-reloader");
    BTreeMap::from([
        (
            // The version prometheus-operator v0.93.0 deploys.
            "quay.io/prometheus/prometheus".to_string(),
            Launch {
                entrypoint: vec![prometheus.display().to_string()],
                default_args: vec![],
                workdir: None,
                path: vec![],
                programs: vec![],
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
            },
        ),
    ])
}

fn deployment(name: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": name,
                    "image": "chiller-e2e-app:e2e",
                    "env": [{"name": "ROLE", "value": "api"}],
                    "ports": [{"name": "http", "containerPort": 8000}],
                }]},
            },
        },
    })
}

fn kubectl_text(plane: &ControlPlane, args: &[&str]) -> String {
    plane
        .kubectl()
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn http_get(url: &str) -> Option<String> {
    let output = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "3", url])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Polls `probe` until it gives a value; on timeout the pod runner's errors
/// are part of the message.
fn wait_for<T>(runner: Option<&PodRunner>, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + CONVERGE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {CONVERGE:?}; pod runner errors: {:#?}",
            runner.map(PodRunner::errors).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The Prometheus pod's IP in `namespace`.
fn prometheus_ip(plane: &ControlPlane, namespace: &str) -> String {
    let pods = kubectl_json(
        plane,
        &[
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            "app.kubernetes.io/name=prometheus",
        ],
    );
    pods["items"][0]["status"]["podIP"]
        .as_str()
        .expect("a Prometheus pod IP")
        .to_string()
}

/// Scrapes the Prometheus at `ip` has recorded so far (one `up` sample each).
fn scraped_samples(ip: &str) -> f64 {
    http_get(&format!(
        "http://{ip}:9090/api/v1/query?query=sum(count_over_time(up%5B1h%5D))"
    ))
    .and_then(|text| serde_json::from_str::<Value>(&text).ok())
    .and_then(|answer| {
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    })
    .unwrap_or(0.0)
}

#[test]
fn injected_pods_run_with_their_own_exporter_in_their_own_network_namespace() {
    if !isolated("injected_pods_run_with_their_own_exporter_in_their_own_network_namespace") {
        return;
    }
    let plane = ControlPlane::shared();
    let _logs = plane.logs_on_failure();
    plane.add_nodes(&[
        ("kwok-node-a", "10.244.1.0/24"),
        ("kwok-node-b", "10.244.2.0/24"),
    ]);
    Install::chart(plane, &["certs.mode=generated"]);
    let runner = PodRunner::start(plane, table());
    // On failure: the pods, the events, each Prometheus's targets and the
    // last lines of every container.
    let _dump = plane
        .logs_on_failure()
        .with("pods", || {
            kubectl_text(plane, &["get", "pods", "-A", "-o", "wide"])
        })
        .with("events", || kubectl_text(plane, &["get", "events", "-A"]))
        .with("Prometheus targets", || {
            ["shop", "shop-b"]
                .iter()
                .map(|ns| {
                    let pods = kubectl_json(
                        plane,
                        &[
                            "get",
                            "pods",
                            "-n",
                            ns,
                            "-l",
                            "app.kubernetes.io/name=prometheus",
                        ],
                    );
                    let ip = pods["items"][0]["status"]["podIP"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    format!(
                        "{ns}: {}",
                        http_get(&format!("http://{ip}:9090/api/v1/targets")).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .with("containers", || runner.container_logs(20));
    let configuration = kubectl_json(
        plane,
        &["get", "mutatingwebhookconfiguration", "chiller-metrics"],
    );
    assert!(
        configuration["webhooks"][0]["clientConfig"]["service"].is_object(),
        "the chart's clientConfig.service, not rewritten: {configuration:#}"
    );

    let namespace = "shop";
    ensure_namespace(
        plane,
        namespace,
        &[(&format!("{DOMAIN}/inject"), "enabled")],
    );
    // The webhook pods answer once they run and their namespace cache synced.
    wait_for(
        Some(&runner),
        "the webhook pods inject through the Service",
        || {
            let pod = install::dry_run_pod(plane, namespace, &install::probe_pod("probe"));
            (pod["metadata"]["labels"][format!("{DOMAIN}/injected")] == "true").then_some(())
        },
    );
    // The reconcile loop, in those pods, made the namespace's statsd mapping.
    wait_for(Some(&runner), "the statsd mapping ConfigMap", || {
        let output = plane
            .kubectl()
            .args([
                "get",
                "configmap",
                "chiller-metrics-statsd-mapping",
                "-n",
                namespace,
            ])
            .output()
            .ok()?;
        output.status.success().then_some(())
    });
    for name in ["alpha", "beta"] {
        run_with_input(
            plane.kubectl().args(["apply", "-n", namespace, "-f", "-"]),
            &deployment(name).to_string(),
        );
    }
    let pods: Vec<Value> = wait_for(Some(&runner), "two Running pods with IPs", || {
        let pods = kubectl_json(plane, &["get", "pods", "-n", namespace]);
        let pods: Vec<Value> = pods["items"].as_array().cloned().unwrap_or_default();
        (pods.len() == 2
            && pods
                .iter()
                .all(|p| p["status"]["podIP"].is_string() && p["status"]["phase"] == "Running"))
        .then_some(pods)
    });
    let mut sent = BTreeMap::new();
    for (pod, requests) in pods.iter().zip([3usize, 7]) {
        let ip = pod["status"]["podIP"].as_str().unwrap();
        let name = pod["metadata"]["labels"]["app"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            pod["metadata"]["labels"][format!("{DOMAIN}/injected")],
            "true"
        );
        wait_for(
            Some(&runner),
            &format!("gunicorn of {name} answers on {ip}"),
            || http_get(&format!("http://{ip}:8000/healthz")),
        );
        for _ in 0..requests {
            assert_eq!(
                http_get(&format!("http://{ip}:8000/")).as_deref(),
                Some("api\n")
            );
        }
        sent.insert(name, (ip.to_string(), requests + 1));
    }
    // Each exporter counts its own pod's requests (the health check included), under its prefix.
    for (name, (ip, expected)) in &sent {
        let series = format!("gunicorn_requests_total{{prefix=\"{name}\"}}");
        let count = wait_for(
            Some(&runner),
            &format!("{name}'s exporter counts its requests"),
            || {
                let metrics = http_get(&format!("http://{ip}:9102/metrics"))?;
                let count = support::https::sample(&metrics, &series)?;
                (count >= *expected as f64).then_some((count, metrics))
            },
        );
        assert_eq!(count.0, *expected as f64, "{name}: {series}");
        for (other, _) in sent.iter().filter(|(other, _)| *other != name) {
            assert!(
                !count.1.contains(&format!("prefix=\"{other}\"")),
                "{name}'s exporter saw {other}'s statsd lines"
            );
        }
    }

    // Every CRD of the operator (kube-prometheus-stack installs them all),
    // from the pinned module.
    let crds = controlplane::nodes::module_dir(
        "prometheus-operator",
        "github.com/prometheus-operator/prometheus-operator",
    )
    .join("example/prometheus-operator-crd");
    install::run(
        plane
            .kubectl()
            .args(["apply", "--server-side", "--force-conflicts", "-f"])
            .arg(&crds),
    );
    // The Prometheus Operator, watching every namespace as the
    // kube-prometheus-stack values run it (here as a process).
    let operator_log = plane.dir.join("prometheus-operator.log");
    let mut operator = std::process::Command::new(build("prometheus-operator").join("operator"));
    operator
        .args([
            &format!(
                "--web.listen-address=127.0.0.1:{}",
                controlplane::free_port()
            ),
            "--log-level=info",
        ])
        .env("KUBECONFIG", &plane.kubeconfig)
        .stdout(std::fs::File::create(&operator_log).unwrap())
        .stderr(std::fs::File::create(operator_log.with_extension("err.log")).unwrap());
    let mut operator =
        controlplane::process::spawn_tied_to_this_process(operator).expect("operator starts");

    // A second install of the app, in its own opted-in namespace.
    let other = "shop-b";
    ensure_namespace(plane, other, &[(&format!("{DOMAIN}/inject"), "enabled")]);
    run_with_input(
        plane.kubectl().args(["apply", "-n", other, "-f", "-"]),
        &deployment("gamma").to_string(),
    );
    let gamma_ip: String = wait_for(Some(&runner), "gamma runs", || {
        let pods = kubectl_json(plane, &["get", "pods", "-n", other, "-l", "app=gamma"]);
        let ip = pods["items"][0]["status"]["podIP"].as_str()?.to_string();
        http_get(&format!("http://{ip}:8000/healthz")).map(|_| ip)
    });
    for _ in 0..5 {
        http_get(&format!("http://{gamma_ip}:8000/"));
    }
    let mut app_ips: BTreeMap<String, String> = sent
        .iter()
        .map(|(name, (ip, _))| (name.clone(), ip.clone()))
        .collect();
    app_ips.insert("gamma".into(), gamma_ip.clone());

    // Each namespace's Prometheus comes from the operator's StatefulSet,
    // discovers its targets through the API server, and holds only its own
    // namespace's gunicorn series.
    for (namespace, own, foreign) in [
        (namespace, vec!["alpha", "beta"], "gamma"),
        (other, vec!["gamma"], "alpha"),
    ] {
        let ip: String = wait_for(
            Some(&runner),
            &format!("the Prometheus pod of {namespace}"),
            || {
                let pods = kubectl_json(
                    plane,
                    &[
                        "get",
                        "pods",
                        "-n",
                        namespace,
                        "-l",
                        "app.kubernetes.io/name=prometheus",
                    ],
                );
                pods["items"][0]["status"]["podIP"]
                    .as_str()
                    .map(String::from)
            },
        );
        wait_for(
            Some(&runner),
            &format!("{namespace}'s Prometheus has its statsd targets up"),
            || {
                let targets: Value = serde_json::from_str(&http_get(&format!(
                    "http://{ip}:9090/api/v1/targets?state=active"
                ))?)
                .ok()?;
                let active = targets["data"]["activeTargets"].as_array()?;
                (!active.is_empty() && active.iter().all(|t| t["health"] == "up")).then_some(())
            },
        );
        let result: Vec<Value> = wait_for(
            Some(&runner),
            &format!("{namespace}'s Prometheus holds gunicorn series"),
            || {
                // Traffic while waiting: statsd is UDP, and a line sent while
                // an exporter (re)started is gone, as in a cluster.
                for app in &own {
                    if let Some(app_ip) = app_ips.get(*app) {
                        http_get(&format!("http://{app_ip}:8000/"));
                    }
                }
                let answer: Value = serde_json::from_str(&http_get(&format!(
                    "http://{ip}:9090/api/v1/query?query=gunicorn_requests_total"
                ))?)
                .ok()?;
                let result = answer["data"]["result"].as_array()?.clone();
                let prefixes: Vec<&str> = result
                    .iter()
                    .filter_map(|r| r["metric"]["prefix"].as_str())
                    .collect();
                own.iter()
                    .all(|app| prefixes.contains(app))
                    .then_some(result)
            },
        );
        for series in &result {
            assert_eq!(series["metric"]["namespace"], namespace, "{series}");
            assert_ne!(
                series["metric"]["prefix"], foreign,
                "{namespace} sees {foreign}: {series}"
            );
        }
    }

    // The datasource ConfigMap's URL is the Service that serves that
    // namespace's Prometheus: its EndpointSlice leads to the Prometheus pod.
    for namespace in [namespace, other] {
        let datasource = kubectl_json(
            plane,
            &[
                "get",
                "configmap",
                &format!("chiller-metrics-datasource-{namespace}"),
                "-n",
                namespace,
            ],
        );
        let text = datasource["data"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        let url = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("url: "))
            .expect("the datasource has a url")
            .to_string();
        let host = url
            .trim_start_matches("http://")
            .split(':')
            .next()
            .unwrap()
            .to_string();
        let (service, service_namespace) = host
            .split_once('.')
            .map(|(s, rest)| (s.to_string(), rest.trim_end_matches(".svc").to_string()))
            .unwrap();
        assert_eq!(service_namespace, namespace, "{url}");
        let prometheus_ip = prometheus_ip(plane, namespace);
        let slices = kubectl_json(
            plane,
            &[
                "get",
                "endpointslices",
                "-n",
                namespace,
                "-l",
                &format!("kubernetes.io/service-name={service}"),
            ],
        );
        let addresses: Vec<String> = slices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(String::from))
            .collect();
        assert_eq!(
            addresses,
            std::slice::from_ref(&prometheus_ip),
            "{url} leads to the Prometheus pod"
        );
        let port = url.rsplit(':').next().unwrap();
        assert!(
            http_get(&format!("http://{prometheus_ip}:{port}/-/ready")).is_some(),
            "{url} serves"
        );
    }

    // Repair: a deleted ServiceMonitor comes back, and so do its targets.
    install::run(plane.kubectl().args([
        "delete",
        "servicemonitor",
        "chiller-metrics-statsd",
        "-n",
        namespace,
    ]));
    let ip = prometheus_ip(plane, namespace);
    wait_for(
        Some(&runner),
        "the ServiceMonitor and its targets are back",
        || {
            let targets: Value = serde_json::from_str(&http_get(&format!(
                "http://{ip}:9090/api/v1/targets?state=active"
            ))?)
            .ok()?;
            let active = targets["data"]["activeTargets"].as_array()?;
            (active.len() >= 2 && active.iter().all(|t| t["health"] == "up")).then_some(())
        },
    );

    // Opt-out: shop-b's Prometheus and objects go away, shop keeps scraping.
    install::run(
        plane
            .kubectl()
            .args(["label", "namespace", other, &format!("{DOMAIN}/inject-")]),
    );
    wait_for(Some(&runner), "shop-b's Prometheus is gone", || {
        let pods = kubectl_json(
            plane,
            &[
                "get",
                "pods",
                "-n",
                other,
                "-l",
                "app.kubernetes.io/name=prometheus",
            ],
        );
        let prometheuses = kubectl_json(plane, &["get", "prometheuses", "-n", other]);
        (pods["items"].as_array()?.is_empty() && prometheuses["items"].as_array()?.is_empty())
            .then_some(())
    });
    let before = scraped_samples(&ip);
    wait_for(Some(&runner), "shop keeps scraping", || {
        (scraped_samples(&ip) > before).then_some(())
    });

    drop(_dump);
    drop(runner);
    let _ = operator.kill();
    let _ = operator.wait();
}
