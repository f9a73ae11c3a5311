//! Sends an AdmissionReview to a running webhook over HTTPS and shows the answer:
//! first a short summary (what was injected into which container, with the
//! statsd prefix), then the decoded JSONPatch and the pod with the patch
//! applied (as YAML).
//!
//! cargo run --example admission_client -- URL CA_FILE REQUEST_FILE

use std::sync::Arc;

use anyhow::{Context, bail};
use base64::{Engine, engine::general_purpose::STANDARD};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, ca, request] = args.as_slice() else {
        bail!("usage: admission_client URL CA_FILE REQUEST_FILE");
    };
    let uri: hyper::Uri = url.parse().context("URL")?;
    let host = uri.host().context("URL has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(443);
    let body = std::fs::read(request).with_context(|| format!("reading {request}"))?;
    let review: Value = serde_json::from_slice(&body)?;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).context("CA file")? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    let stream = TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from(host.clone())?, tcp)
        .await
        .context("TLS handshake")?;
    let alpn = stream
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let request = hyper::Request::post(uri.path())
        .header("content-type", "application/json")
        .header("host", &host)
        .body(Full::new(Bytes::from(body)))?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let response = if alpn.as_deref() == Some("h2") {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    };
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let transport = format!(
        "# HTTP {status} over TLS, ALPN {}",
        alpn.as_deref().unwrap_or("none")
    );
    if !status.is_success() {
        println!("{transport}");
        bail!(
            "webhook answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let answer: Value = serde_json::from_slice(&bytes)?;
    let mut response = answer["response"].clone();
    let patch = response.as_object_mut().and_then(|r| r.remove("patch"));
    let Some(patch) = patch else {
        println!("# not injected: the pod is admitted unchanged");
        for warning in response["warnings"].as_array().into_iter().flatten() {
            println!("#   {}", warning.as_str().unwrap_or_default());
        }
        println!("{transport}");
        return Ok(());
    };
    let patch: json_patch::Patch =
        serde_json::from_slice(&STANDARD.decode(patch.as_str().context("patch")?)?)?;
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch)?;
    for line in summary(&pod) {
        println!("{line}");
    }
    println!("{transport}");
    println!(
        "# AdmissionReview response (patch shown below)\n{}",
        serde_norway::to_string(&response)?
    );
    println!(
        "# decoded JSONPatch ({} operations)\n{}",
        patch.0.len(),
        serde_norway::to_string(&patch)?
    );
    println!(
        "# the pod after the patch\n{}",
        serde_norway::to_string(&pod)?
    );
    Ok(())
}

/// What was injected, read from the patched pod's status annotation and env.
fn summary(pod: &Value) -> Vec<String> {
    let status: Value = pod["metadata"]["annotations"]["metrics.chiller.io/status"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let sidecar = status["sidecar"].as_str().unwrap_or("?");
    let how = match status["mode"].as_str() {
        Some("native") => "a native sidecar (init container, restartPolicy: Always)",
        Some("container") => "a regular container",
        _ => "?",
    };
    let mut lines = vec![format!(
        "# summary: injected {sidecar} as {how}, statsd prefix {:?}",
        status["prefix"].as_str().unwrap_or("?")
    )];
    for name in status["containers"].as_array().into_iter().flatten() {
        let container = pod["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| &c["name"] == name);
        let args = container
            .and_then(|c| c["env"].as_array())
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "GUNICORN_CMD_ARGS")
            .and_then(|e| e["value"].as_str())
            .unwrap_or("?");
        lines.push(format!(
            "#   container {}: GUNICORN_CMD_ARGS={args:?}",
            name.as_str().unwrap_or("?")
        ));
    }
    lines
}
