//! Certificate rotation the way cert-manager and the kubelet do it: the Secret
//! volume holds a timestamped directory, `..data` links to it, and `tls.crt`
//! and `tls.key` link into `..data`; a rotation writes a new directory and
//! swaps `..data` atomically. Under load (h2load), new connections must get
//! the new certificate and no request may fail. A half-written or mismatched
//! pair never replaces the good one.

use crate::support::{self, KubeletVolume};

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use chiller_metrics::{
    certs::{self, GeneratedCerts},
    webhook::tls::{MinTlsVersion, ReloadingCert, server_config},
};
use support::https::{HttpVersion, HttpsClient, SERVER_NAMES, ServeProcess, chiller_api_review};
use tokio_rustls::TlsAcceptor;

/// A Secret volume mount: `..data` → timestamped dir; `tls.*` → `..data/tls.*`.
struct SecretVolume(KubeletVolume);

impl SecretVolume {
    fn new(dir: &Path, pair: &GeneratedCerts) -> Self {
        Self(KubeletVolume::new(
            dir,
            &[
                ("tls.crt", pair.cert.as_bytes()),
                ("tls.key", pair.key.as_bytes()),
            ],
        ))
    }

    /// Publishes a new pair the way the kubelet does (see [`KubeletVolume`]).
    fn publish(&mut self, cert: &[u8], key: &[u8]) {
        self.0.publish(&[("tls.crt", cert), ("tls.key", key)]);
    }

    fn cert(&self) -> PathBuf {
        self.0.dir.join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.0.dir.join("tls.key")
    }
}

fn new_pair() -> GeneratedCerts {
    let names: Vec<String> = SERVER_NAMES.iter().map(|n| n.to_string()).collect();
    certs::generate(&names).expect("generating a certificate")
}

/// The DER of the leaf certificate a fresh handshake trusting `ca_pem` gets,
/// or None when the handshake fails (e.g. the server presents another CA's cert).
async fn served_leaf(addr: std::net::SocketAddr, ca_pem: &str) -> Option<Vec<u8>> {
    let client = HttpsClient::new(addr, ca_pem);
    let stream = client.tls_connect(HttpVersion::Http1).await.ok()?;
    let certs = stream.get_ref().1.peer_certificates()?;
    Some(certs.first()?.as_ref().to_vec())
}

fn leaf_der(pair: &GeneratedCerts) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_slice_iter(pair.cert.as_bytes())
        .next()
        .expect("a certificate")
        .expect("valid PEM")
        .as_ref()
        .to_vec()
}

/// Half-written and mismatched pairs, as a reload can catch them mid-write.
fn broken_pairs(
    good: &GeneratedCerts,
    other: &GeneratedCerts,
) -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let cert = good.cert.as_bytes();
    let key = good.key.as_bytes();
    vec![
        ("empty certificate", Vec::new(), key.to_vec()),
        (
            "truncated certificate",
            cert[..cert.len() / 2].to_vec(),
            key.to_vec(),
        ),
        ("empty key", cert.to_vec(), Vec::new()),
        (
            "truncated key",
            cert.to_vec(),
            key[..key.len() / 2].to_vec(),
        ),
        (
            "new certificate with the old key",
            cert.to_vec(),
            other.key.as_bytes().to_vec(),
        ),
    ]
}

/// A TLS-only server that completes handshakes with `cert`'s current pair.
async fn handshake_server(cert: Arc<ReloadingCert>) -> std::net::SocketAddr {
    let acceptor = TlsAcceptor::from(server_config(cert, MinTlsVersion::Tls12).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut stream) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 16];
                    let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_broken_pair_never_replaces_the_good_one() {
    let scratch = tempfile::tempdir().unwrap();
    let first = new_pair();
    let second = new_pair();
    let mut volume = SecretVolume::new(scratch.path(), &first);
    let cert = ReloadingCert::load(&volume.cert(), &volume.key()).unwrap();
    let addr = handshake_server(cert.clone()).await;
    assert!(!cert.reload_if_changed().unwrap(), "nothing changed yet");
    assert_eq!(
        served_leaf(addr, &first.ca_cert).await,
        Some(leaf_der(&first))
    );

    for (case, bad_cert, bad_key) in broken_pairs(&second, &first) {
        volume.publish(&bad_cert, &bad_key);
        let result = cert.reload_if_changed();
        assert!(result.is_err(), "{case}: loaded as {result:?}");
        assert_eq!(
            served_leaf(addr, &first.ca_cert).await,
            Some(leaf_der(&first)),
            "{case}: the good certificate was replaced"
        );
    }
    volume.publish(second.cert.as_bytes(), second.key.as_bytes());
    assert!(
        cert.reload_if_changed().unwrap(),
        "the good pair was not loaded"
    );
    assert_eq!(
        served_leaf(addr, &second.ca_cert).await,
        Some(leaf_der(&second))
    );
    assert_eq!(
        served_leaf(addr, &first.ca_cert).await,
        None,
        "old CA still trusted"
    );
    assert!(!cert.reload_if_changed().unwrap(), "same files again");
}

/// Runs h2load batches (each on new connections, HTTP/1.1 and HTTP/2 in turn)
/// until `stop` is set; returns every batch's output.
fn load_until(addr: std::net::SocketAddr, body: PathBuf, stop: Arc<AtomicBool>) -> Vec<Output> {
    let h2load = support::tool("h2load");
    let mut outputs = Vec::new();
    let mut round = 0;
    while !stop.load(Ordering::SeqCst) || outputs.len() < 2 {
        let mut command = Command::new(&h2load);
        command
            .args(["-n", "600", "-c", "4", "-t", "1"])
            .arg("-d")
            .arg(&body)
            .args(["-H", "content-type: application/json"]);
        if round % 2 == 0 {
            command.args(["--h1", "-m", "1"]);
        } else {
            command.args(["-m", "4", "--npn-list=h2"]);
        }
        command.arg(format!("https://127.0.0.1:{}/mutate", addr.port()));
        outputs.push(command.output().expect("running h2load"));
        round += 1;
    }
    outputs
}

/// Polls until a new connection trusting `ca_pem` gets `leaf`.
async fn wait_for_leaf(addr: std::net::SocketAddr, ca_pem: &str, leaf: &[u8], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if served_leaf(addr, ca_pem).await.as_deref() == Some(leaf) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: new connections never got the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_serves_the_new_certificate_and_fails_no_request() {
    let scratch = tempfile::tempdir().unwrap();
    let secret = scratch.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    let first = new_pair();
    let mut volume = SecretVolume::new(&secret, &first);
    let body = scratch.path().join("body.json");
    std::fs::write(&body, serde_json::to_vec(&chiller_api_review()).unwrap()).unwrap();

    let mut command = ServeProcess::command(scratch.path());
    command
        .arg("--tls-cert")
        .arg(volume.cert())
        .arg("--tls-key")
        .arg(volume.key())
        .args(["--cert-reload-seconds", "1"]);
    let server = ServeProcess::start(command).expect("serve starts");
    server.wait_ready().await.unwrap();
    let addr = server.webhook_addr;
    assert_eq!(
        served_leaf(addr, &first.ca_cert).await,
        Some(leaf_der(&first))
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let body = body.clone();
        std::thread::spawn(move || load_until(addr, body, stop))
    };

    // Rotate to a certificate from a new CA.
    let second = new_pair();
    volume.publish(second.cert.as_bytes(), second.key.as_bytes());
    wait_for_leaf(addr, &second.ca_cert, &leaf_der(&second), "rotation").await;
    assert_eq!(
        served_leaf(addr, &first.ca_cert).await,
        None,
        "old CA still trusted"
    );

    // Broken pairs: the server keeps the second certificate through several reloads.
    let third = new_pair();
    for (case, bad_cert, bad_key) in broken_pairs(&third, &second) {
        volume.publish(&bad_cert, &bad_key);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            served_leaf(addr, &second.ca_cert).await,
            Some(leaf_der(&second)),
            "{case}: the good certificate was replaced"
        );
    }
    // And a good pair after broken ones is picked up.
    volume.publish(third.cert.as_bytes(), third.key.as_bytes());
    wait_for_leaf(addr, &third.ca_cert, &leaf_der(&third), "recovery").await;

    stop.store(true, Ordering::SeqCst);
    let outputs = load.join().expect("load thread");
    for (i, output) in outputs.iter().enumerate() {
        support::load::assert_h2load_all_succeeded(output, &format!("h2load batch {i}"));
    }
    let metrics = support::https::admin_get(server.admin_addr, "/metrics")
        .await
        .unwrap()
        .text();
    let reloads = |result: &str| {
        support::https::sample(
            &metrics,
            &format!("chiller_metrics_tls_reloads_total{{result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(reloads("success") >= 2.0, "{metrics}");
    assert!(reloads("failure") >= 1.0, "{metrics}");
    let (status, log) = server.terminate();
    assert!(
        status.success(),
        "serve exited with {status}:\n{}",
        log.join("\n")
    );
}
