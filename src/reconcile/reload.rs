//! A changed mapping reaches running exporters without a restart. The
//! mapping ConfigMap is mounted, and the kubelet refreshes mounted
//! ConfigMaps after a delay (its sync period plus its cache); statsd_exporter
//! never re-reads the file by itself. So once the mapping has been current for
//! `reconcile.mappingReloadDelaySeconds`, each pod whose sidecar is current
//! but whose mapping is not gets `POST /-/reload` (the sidecar runs with
//! `--web.enable-lifecycle`). The exporter answers 200 whatever the outcome,
//! so success is read from its `statsd_exporter_config_reloads_total`
//! counter; then the pod's status annotation records the current config hash.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::context::{Context, FIELD_MANAGER};
use crate::admin::metrics_labels::ResultLabels;

/// Time allowed for one HTTP exchange with an exporter.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response read from an exporter.
const MAX_RESPONSE: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("pod has no IP yet")]
    NoPodIp,
    #[error("{0}: {1}")]
    Io(SocketAddr, #[source] std::io::Error),
    #[error("{0}: no answer within {EXCHANGE_TIMEOUT:?}")]
    Timeout(SocketAddr),
    #[error("{addr}: {path} answered {status}")]
    Status {
        addr: SocketAddr,
        path: &'static str,
        status: String,
    },
    #[error("{0}: the exporter did not count a successful reload (is the mapping valid?)")]
    NotReloaded(SocketAddr),
}

/// One request with `Connection: close`; returns the status line and body.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &'static str,
) -> Result<(String, String), ReloadError> {
    let io = |e| ReloadError::Io(addr, e);
    let run = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut response = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut response)
            .await
            .map_err(io)?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.lines().next().unwrap_or("").to_string();
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(ReloadError::Status { addr, path, status });
        }
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, run)
        .await
        .map_err(|_| ReloadError::Timeout(addr))?
}

/// `statsd_exporter_config_reloads_total{outcome="success"}` in an exposition.
pub fn successful_reloads(exposition: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| {
            let rest =
                line.strip_prefix("statsd_exporter_config_reloads_total{outcome=\"success\"}")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0.0)
}

/// Makes the exporter at `addr` re-read its mapping; fails unless it
/// counted a successful reload.
pub async fn reload_exporter(addr: SocketAddr) -> Result<(), ReloadError> {
    let (_, before) = exchange(addr, "GET", "/metrics").await?;
    exchange(addr, "POST", "/-/reload").await?;
    let (_, after) = exchange(addr, "GET", "/metrics").await?;
    if successful_reloads(&after) > successful_reloads(&before) {
        Ok(())
    } else {
        Err(ReloadError::NotReloaded(addr))
    }
}

fn exporter_addr(pod: &Pod, port: u16) -> Result<SocketAddr, ReloadError> {
    let ip: IpAddr = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .ok_or(ReloadError::NoPodIp)?;
    Ok(SocketAddr::new(ip, port))
}

/// Reloads the exporters of `pods` (their mapping is all that is outdated)
/// once the current mapping has had time to reach their volumes; returns
/// when to look again if it has not yet.
pub async fn reload_stale_mappings(
    namespace: &str,
    pods: &[Pod],
    ctx: &Context,
) -> Option<Duration> {
    let injector = ctx.injector();
    let hashes = injector.hashes();
    let delay = Duration::from_secs(injector.config().reconcile.mapping_reload_delay_seconds);
    let since = ctx.mapping_current_since(namespace, &hashes.mapping, Instant::now());
    if pods.is_empty() {
        return None;
    }
    let waited = since.elapsed();
    if waited < delay {
        return Some(delay - waited);
    }
    let port = injector.config().sidecar.metrics_port;
    let status_key = &ctx.keys.status;
    for pod in pods {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if !running {
            continue;
        }
        let result = match exporter_addr(pod, port) {
            Ok(addr) => reload_exporter(addr).await,
            Err(error) => Err(error),
        };
        let label = |result| ResultLabels { result };
        if let Err(error) = result {
            ctx.metrics
                .mapping_reloads
                .get_or_create(&label("failure"))
                .inc();
            tracing::warn!(%namespace, pod = %pod.name_any(), %error, "cannot reload the exporter's mapping");
            continue;
        }
        ctx.metrics
            .mapping_reloads
            .get_or_create(&label("success"))
            .inc();
        tracing::info!(%namespace, pod = %pod.name_any(), mapping = %hashes.mapping, "exporter reloaded its mapping");
        let mut status: Value = pod
            .annotations()
            .get(status_key)
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_else(|| json!({}));
        status["configHash"] = json!(hashes.config);
        let patch = json!({"metadata": {"annotations": {status_key.clone(): status.to_string()}}});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        if let Err(error) = Api::<Pod>::namespaced(ctx.client.clone(), namespace)
            .patch(&pod.name_any(), &params, &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(%namespace, pod = %pod.name_any(), %error, "cannot record the reload on the pod");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successful_reloads_are_read_from_the_exporters_counter() {
        let exposition = "# TYPE statsd_exporter_config_reloads_total counter\nstatsd_exporter_config_reloads_total{outcome=\"failure\"} 4\nstatsd_exporter_config_reloads_total{outcome=\"success\"} 2\n";
        assert_eq!(successful_reloads(exposition), 2.0);
        assert_eq!(successful_reloads("up 1\n"), 0.0);
    }
}
