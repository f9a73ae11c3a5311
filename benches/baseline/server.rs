//! The floor for the load benchmark: axum over rustls (same crypto provider
//! and ALPN as the webhook) that only parses the AdmissionReview and answers
//! "allowed" with no patch. No limits, no metrics, no mutation.
//!
//! `cargo run --release --example baseline_server -- --listen 127.0.0.1:8444
//!  --admin-listen 127.0.0.1:9091 --tls-cert tls.crt --tls-key tls.key`

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use axum::{Json, Router, body::Bytes, http::StatusCode, response::IntoResponse, routing::post};
use clap::Parser;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The same allocator as the webhook binary, so the floor is measured on equal terms.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8444")]
    listen: SocketAddr,
    /// Plain HTTP `/readyz`, so start-up is measured the same way as the webhook's.
    #[arg(long, default_value = "127.0.0.1:9091")]
    admin_listen: SocketAddr,
    #[arg(long)]
    tls_cert: PathBuf,
    #[arg(long)]
    tls_key: PathBuf,
}

async fn mutate(body: Bytes) -> axum::response::Response {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(error) => return (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(error) => return (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
    };
    Json(AdmissionResponse::from(&request).into_review()).into_response()
}

fn tls_config(args: &Args) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(&args.tls_cert)
        .context("reading the certificate")?
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the certificate")?;
    let key = PrivateKeyDer::from_pem_file(&args.tls_key).context("reading the key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let acceptor = TlsAcceptor::from(tls_config(&args)?);
    let listener = TcpListener::bind(args.listen).await?;
    let admin = TcpListener::bind(args.admin_listen).await?;
    tokio::spawn(async move {
        let app = Router::new().route("/readyz", axum::routing::get(|| async { "ok\n" }));
        axum::serve(admin, app).await
    });
    let app = Router::new().route("/mutate", post(mutate));
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            if let Ok(stream) = acceptor.accept(tcp).await {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
    }
}
