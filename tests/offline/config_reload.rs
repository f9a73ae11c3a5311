//! `serve` follows its config file the way a mounted ConfigMap changes: the
//! kubelet writes a new timestamped directory and swaps the `..data` symlink.
//! The next admission uses the new config; a config that does not load is
//! rejected with an error log and a metric, and the running one stays.

use crate::support::{self, KubeletVolume};

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::https::{
    HttpVersion, ServeProcess, chiller_api_review, decoded_patch, sample, write_certs,
};

/// A ConfigMap volume: `..data` → timestamped dir; `config.yaml` → `..data/config.yaml`.
struct ConfigMapVolume(KubeletVolume);

impl ConfigMapVolume {
    fn new(dir: &Path, text: &str) -> Self {
        Self(KubeletVolume::new(dir, &[("config.yaml", text.as_bytes())]))
    }

    fn file(&self) -> PathBuf {
        self.0.dir.join("config.yaml")
    }

    fn publish(&mut self, text: &str) {
        self.0.publish(&[("config.yaml", text.as_bytes())]);
    }
}

const WAIT: Duration = Duration::from_secs(30);

/// The image of the sidecar the webhook injects now.
async fn injected_image(serve: &ServeProcess, ca: &str) -> String {
    let response = serve
        .client(ca)
        .post_json(
            "/mutate",
            serde_json::to_vec(&chiller_api_review()).unwrap(),
            HttpVersion::Http1,
        )
        .await
        .unwrap();
    let patch = serde_json::to_value(decoded_patch(&response.json())).unwrap();
    patch
        .as_array()
        .unwrap()
        .iter()
        .find_map(|op| {
            let value = &op["value"];
            let sidecar = if value.is_array() { &value[0] } else { value };
            (sidecar["name"] == "statsd-exporter").then(|| sidecar["image"].as_str().unwrap())
        })
        .expect("the patch adds the sidecar")
        .to_string()
}

async fn reloads(serve: &ServeProcess, result: &str) -> f64 {
    let metrics = support::https::admin_get(serve.admin_addr, "/metrics")
        .await
        .unwrap()
        .text();
    sample(
        &metrics,
        &format!("chiller_metrics_config_reloads_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn serve_follows_its_config_file_and_keeps_the_last_good_one() {
    let scratch = tempfile::tempdir().unwrap();
    let certs = write_certs(scratch.path());
    let mut volume = ConfigMapVolume::new(
        &scratch.path().join("config"),
        "sidecar:\n  image: registry.example/statsd-exporter:v1\n",
    );
    let mut command = ServeProcess::command(scratch.path());
    command
        .env("CHILLER_METRICS_TLS_CERT", scratch.path().join("tls.crt"))
        .env("CHILLER_METRICS_TLS_KEY", scratch.path().join("tls.key"))
        .env("CHILLER_METRICS_CONFIG", volume.file())
        .args(["--cert-reload-seconds", "1"]);
    let serve = ServeProcess::start(command).unwrap();
    serve.wait_ready().await.unwrap();
    let ca = certs.ca_cert.as_str();
    assert_eq!(
        injected_image(&serve, ca).await,
        "registry.example/statsd-exporter:v1"
    );

    volume.publish("sidecar:\n  image: registry.example/statsd-exporter:v2\n");
    let deadline = Instant::now() + WAIT;
    while injected_image(&serve, ca).await != "registry.example/statsd-exporter:v2" {
        assert!(Instant::now() < deadline, "the new config was not used");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reloads(&serve, "success").await, 1.0);

    // Not valid: an unknown field, then a bad value. Each is rejected with
    // an error log and counted once; the webhook keeps injecting v2.
    for (generation, bad) in [
        "sidecar:\n  imagee: registry.example/statsd-exporter:v3\n",
        "sidecar:\n  image: registry.example/statsd-exporter:v3\n  statsdPort: 0\n",
    ]
    .into_iter()
    .enumerate()
    {
        volume.publish(bad);
        let deadline = Instant::now() + WAIT;
        while reloads(&serve, "failure").await < (generation + 1) as f64 {
            assert!(
                Instant::now() < deadline,
                "{bad:?} was not rejected:\n{}",
                serve.log().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            injected_image(&serve, ca).await,
            "registry.example/statsd-exporter:v2",
            "{bad:?} replaced the running config"
        );
    }
    let rejections: Vec<Value> = serve
        .json_log()
        .into_iter()
        .filter(|entry| {
            entry["level"] == "ERROR"
                && entry["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("changed config rejected"))
        })
        .collect();
    assert_eq!(rejections.len(), 2, "{}", serve.log().join("\n"));

    // A good config after bad ones is picked up.
    volume.publish("sidecar:\n  image: registry.example/statsd-exporter:v4\n");
    let deadline = Instant::now() + WAIT;
    while injected_image(&serve, ca).await != "registry.example/statsd-exporter:v4" {
        assert!(
            Instant::now() < deadline,
            "recovery: the good config was not used"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reloads(&serve, "success").await, 2.0);
    let (status, log) = serve.terminate();
    assert!(
        status.success(),
        "serve exited with {status}:\n{}",
        log.join("\n")
    );
}
