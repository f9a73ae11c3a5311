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
    BTreeMap::from([
        (
            // Dockerfile: ENTRYPOINT the binary, CMD serve.
            "chiller-metrics".to_string(),
            Launch {
                entrypoint: vec![support::https::ServeProcess::BINARY.to_string()],
                default_args: vec!["serve".into(), "--log-format".into(), "json".into()],
                workdir: None,
                path: vec![],
            },
        ),
        (
            "prom/statsd-exporter".to_string(),
            Launch {
                entrypoint: vec![statsd.display().to_string()],
                default_args: vec![],
                workdir: None,
                path: vec![],
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

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + CONVERGE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {CONVERGE:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
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
    wait_for("the webhook pods inject through the Service", || {
        let errors = runner.errors();
        assert!(errors.is_empty(), "pod runner: {errors:#?}");
        let pod = install::dry_run_pod(plane, namespace, &install::probe_pod("probe"));
        (pod["metadata"]["labels"][format!("{DOMAIN}/injected")] == "true").then_some(())
    });
    // The reconcile loop, in those pods, made the namespace's statsd mapping.
    wait_for("the statsd mapping ConfigMap", || {
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
    let pods: Vec<Value> = wait_for("two Running pods with IPs", || {
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
        wait_for(&format!("gunicorn of {name} answers on {ip}"), || {
            let errors = runner.errors();
            assert!(errors.is_empty(), "pod runner: {errors:#?}");
            http_get(&format!("http://{ip}:8000/healthz"))
        });
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
        let count = wait_for(&format!("{name}'s exporter counts its requests"), || {
            let metrics = http_get(&format!("http://{ip}:9102/metrics"))?;
            let count = support::https::sample(&metrics, &series)?;
            (count >= *expected as f64).then_some((count, metrics))
        });
        assert_eq!(count.0, *expected as f64, "{name}: {series}");
        for (other, _) in sent.iter().filter(|(other, _)| *other != name) {
            assert!(
                !count.1.contains(&format!("prefix=\"{other}\"")),
                "{name}'s exporter saw {other}'s statsd lines"
            );
        }
    }
    drop(runner);
}
