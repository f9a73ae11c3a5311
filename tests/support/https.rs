//! The real webhook over real HTTPS, for integration tests:
//!
//! - [`TestServer`]: the HTTPS webhook and the admin port in-process on
//!   127.0.0.1:0, with a generated CA and serving certificate.
//! - [`HttpsClient`]: HTTP/1.1 or HTTP/2 over TLS, the ALPN chosen by the test.
//! - [`admin_get`]: plain HTTP/1.1 for the admin port.
//! - [`ServeProcess`]: the real binary running `serve`, stopped with SIGTERM.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use chiller_metrics::{
    admin::{self, AdminState, Metrics, Readiness},
    certs::{self, GeneratedCerts},
    config::Config,
    inject::{Injector, ResolvedMode},
    webhook::{
        self, NamespacePolicies, NoCluster, WebhookState,
        router::DEFAULT_BODY_LIMIT,
        server::{Limits, serve_https},
        tls::{MinTlsVersion, ReloadingCert, server_config},
    },
};
use http::{HeaderMap, Request, StatusCode, Version, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{net::TcpStream, sync::oneshot, task::JoinHandle};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// Names the generated serving certificate is valid for.
pub const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];
/// The name clients verify the certificate against.
pub const SERVER_NAME: &str = "localhost";

/// A request or a connection that failed below HTTP status codes.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server negotiated ALPN {got:?}, the client asked for {wanted:?}")]
    Alpn { wanted: String, got: Option<String> },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

/// The HTTP version a client speaks, announced with ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

impl HttpVersion {
    pub const ALL: [HttpVersion; 2] = [HttpVersion::Http1, HttpVersion::Http2];

    pub fn alpn(self) -> &'static str {
        match self {
            Self::Http1 => "http/1.1",
            Self::Http2 => "h2",
        }
    }

    pub fn version(self) -> Version {
        match self {
            Self::Http1 => Version::HTTP_11,
            Self::Http2 => Version::HTTP_2,
        }
    }
}

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The ALPN protocol of the connection (None for plain HTTP).
    pub alpn: Option<String>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "response ({}) is not JSON: {error}: {}",
                self.status,
                self.text()
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How [`TestServer::start`] builds the server. Defaults match `serve`'s.
pub struct ServerOptions {
    pub config: Config,
    pub mode: ResolvedMode,
    pub namespaces: Arc<dyn NamespacePolicies>,
    pub body_limit: usize,
    pub limits: Limits,
    pub tls_min_version: MinTlsVersion,
    /// Poll the certificate files this often (as `serve` does); None: never.
    pub cert_reload: Option<Duration>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            config: Config::default(),
            mode: ResolvedMode::Native,
            namespaces: Arc::new(NoCluster),
            body_limit: DEFAULT_BODY_LIMIT,
            limits: Limits::default(),
            tls_min_version: MinTlsVersion::default(),
            cert_reload: None,
        }
    }
}

/// Generates a CA and a serving certificate for [`SERVER_NAMES`] and writes
/// `ca.crt`, `tls.crt` and `tls.key` into `dir`.
pub fn write_certs(dir: &Path) -> GeneratedCerts {
    let names: Vec<String> = SERVER_NAMES.iter().map(|n| n.to_string()).collect();
    let generated = certs::generate(&names).expect("generating test certificates");
    certs::write(dir, &generated).expect("writing test certificates");
    generated
}

/// The webhook (HTTPS) and admin port (HTTP), wired as `serve` wires them.
pub struct TestServer {
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ca_pem: String,
    /// Holds `ca.crt`, `tls.crt` and `tls.key`; the server reads the latter two.
    pub cert_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    _cert_tempdir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    webhook_task: Option<JoinHandle<std::io::Result<()>>>,
    admin_task: JoinHandle<()>,
    cert_task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(options: ServerOptions) -> Self {
        let tempdir = tempfile::tempdir().expect("creating a temp dir");
        let cert_dir = tempdir.path().to_path_buf();
        let generated = write_certs(&cert_dir);
        let cert = ReloadingCert::load(&cert_dir.join("tls.crt"), &cert_dir.join("tls.key"))
            .expect("loading the generated certificate");
        let tls = server_config(cert.clone(), options.tls_min_version).expect("TLS config");

        let webhook_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let webhook_addr = webhook_listener.local_addr().unwrap();
        let admin_addr = admin_listener.local_addr().unwrap();

        let metrics = Arc::new(Metrics::new());
        let readiness = Arc::new(Readiness::new(false));
        let state = Arc::new(WebhookState {
            injector: Injector::new(options.config, options.mode).into(),
            namespaces: options.namespaces,
            metrics: metrics.clone(),
            body_limit: options.body_limit,
        });
        let (shutdown, stopped) = oneshot::channel::<()>();
        let webhook_task = tokio::spawn(serve_https(
            webhook_listener,
            tls,
            webhook::router(state),
            options.limits,
            async {
                let _ = stopped.await;
            },
        ));
        let admin_app = admin::router(AdminState {
            metrics: metrics.clone(),
            readiness: readiness.clone(),
        });
        let admin_task = tokio::spawn(async move {
            axum::serve(admin_listener, admin_app)
                .await
                .expect("admin server");
        });
        let cert_task = options
            .cert_reload
            .map(|every| tokio::spawn(cert.watch(every, metrics.clone())));
        Self {
            webhook_addr,
            admin_addr,
            ca_pem: generated.ca_cert,
            cert_dir,
            metrics,
            readiness,
            _cert_tempdir: tempdir,
            shutdown: Some(shutdown),
            webhook_task: Some(webhook_task),
            admin_task,
            cert_task,
        }
    }

    /// A client for the webhook that trusts this server's CA.
    pub fn client(&self) -> HttpsClient {
        HttpsClient::new(self.webhook_addr, &self.ca_pem)
    }

    pub async fn admin_get(&self, path: &str) -> HttpResponse {
        admin_get(self.admin_addr, path)
            .await
            .unwrap_or_else(|error| panic!("GET {path} on the admin port: {error}"))
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn trigger_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Shuts down and waits for the HTTPS server to return (stops accepting,
    /// then lets in-flight requests finish within `Limits::shutdown_timeout`).
    pub async fn stop(mut self) -> std::io::Result<()> {
        self.trigger_shutdown();
        let task = self.webhook_task.take().expect("stop runs once");
        task.await.expect("the HTTPS server task panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.trigger_shutdown();
        self.admin_task.abort();
        if let Some(task) = &self.cert_task {
            task.abort();
        }
    }
}

/// Speaks HTTP/1.1 or HTTP/2 over TLS to one address, trusting one CA.
#[derive(Clone)]
pub struct HttpsClient {
    pub addr: SocketAddr,
    pub server_name: String,
    roots: Arc<rustls::RootCertStore>,
}

impl HttpsClient {
    pub fn new(addr: SocketAddr, ca_pem: &str) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA certificate");
        }
        Self {
            addr,
            server_name: SERVER_NAME.to_string(),
            roots: Arc::new(roots),
        }
    }

    /// A rustls client config offering exactly `alpn`.
    pub fn tls_config(&self, alpn: &[&str]) -> rustls::ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        config
    }

    /// TCP connect and TLS handshake with `config`: the raw stream.
    pub async fn tls_connect_with(
        &self,
        config: rustls::ClientConfig,
    ) -> Result<TlsStream<TcpStream>, ClientError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr,
                source,
            })?;
        let name = ServerName::try_from(self.server_name.clone()).expect("valid server name");
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|source| ClientError::Handshake {
                addr: self.addr,
                source,
            })
    }

    /// A TLS stream offering only `version`'s ALPN protocol.
    pub async fn tls_connect(
        &self,
        version: HttpVersion,
    ) -> Result<TlsStream<TcpStream>, ClientError> {
        self.tls_connect_with(self.tls_config(&[version.alpn()]))
            .await
    }

    /// An HTTP connection; fails unless the server agreed to `version` by ALPN.
    pub async fn connect(&self, version: HttpVersion) -> Result<Connection, ClientError> {
        let stream = self.tls_connect(version).await?;
        let alpn = alpn_of(&stream);
        if alpn.as_deref() != Some(version.alpn()) {
            return Err(ClientError::Alpn {
                wanted: version.alpn().to_string(),
                got: alpn,
            });
        }
        let io = TokioIo::new(stream);
        let sender = match version {
            HttpVersion::Http1 => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(connection);
                Sender::Http1(sender)
            }
            HttpVersion::Http2 => {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(connection);
                Sender::Http2(sender)
            }
        };
        Ok(Connection {
            sender,
            alpn,
            authority: format!("{}:{}", self.server_name, self.addr.port()),
        })
    }

    /// One request on a new connection.
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
        version: HttpVersion,
    ) -> Result<HttpResponse, ClientError> {
        let mut connection = self.connect(version).await?;
        connection.request(method, path, headers, body).await
    }

    /// POSTs `body` with `content-type: application/json` on a new connection.
    pub async fn post_json(
        &self,
        path: &str,
        body: impl Into<Bytes>,
        version: HttpVersion,
    ) -> Result<HttpResponse, ClientError> {
        let mut connection = self.connect(version).await?;
        connection.post_json(path, body).await
    }
}

fn alpn_of(stream: &TlsStream<TcpStream>) -> Option<String> {
    stream
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One TLS connection that can carry several requests.
pub struct Connection {
    sender: Sender,
    pub alpn: Option<String>,
    authority: String,
}

impl Connection {
    pub async fn request(
        &mut self,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<HttpResponse, ClientError> {
        // HTTP/2 carries scheme and authority as pseudo-headers; HTTP/1.1 needs Host.
        let uri = match self.sender {
            Sender::Http1(_) => path.to_string(),
            Sender::Http2(_) => format!("https://{}{path}", self.authority),
        };
        let mut builder = Request::builder().method(method).uri(uri);
        if matches!(self.sender, Sender::Http1(_)) {
            builder = builder.header(header::HOST, &self.authority);
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(body.into()))?;
        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
            Sender::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
        };
        read_response(response, self.alpn.clone()).await
    }

    pub async fn post_json(
        &mut self,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<HttpResponse, ClientError> {
        self.request(
            http::Method::POST,
            path,
            &[("content-type", "application/json")],
            body,
        )
        .await
    }
}

async fn read_response(
    response: http::Response<hyper::body::Incoming>,
    alpn: Option<String>,
) -> Result<HttpResponse, ClientError> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(HttpResponse {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
        alpn,
    })
}

/// GET over plain HTTP/1.1 (the admin port).
pub async fn admin_get(addr: SocketAddr, path: &str) -> Result<HttpResponse, ClientError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    read_response(response, None).await
}

/// The AdmissionReview fixture of the chiller API pod.
pub fn chiller_api_review() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/requests/chiller-api.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_json::from_str(&text).expect("the fixture is JSON")
}

/// Decodes `response.patch` (base64 JSON) of an AdmissionReview answer.
pub fn decoded_patch(review: &serde_json::Value) -> json_patch::Patch {
    use base64::{Engine, engine::general_purpose::STANDARD};
    let encoded = review["response"]["patch"]
        .as_str()
        .unwrap_or_else(|| panic!("response.patch is not a string: {review}"));
    let bytes = STANDARD.decode(encoded).expect("patch is base64");
    serde_json::from_slice(&bytes).expect("patch is a JSON Patch array")
}

/// The value of one sample line of an OpenMetrics text, e.g.
/// `chiller_metrics_admissions_total{outcome="injected",reason="injected"}`.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// The real binary running `serve`, with stderr (its log) collected.
pub struct ServeProcess {
    child: Child,
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    /// Reads stderr until the process closes it.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Why the binary did not come up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serve exited with {status} before serving; log:\n{log}")]
    Exited { status: ExitStatus, log: String },
    #[error("serve did not log \"serving\" within {0:?}; log:\n{1}")]
    NoServingLine(Duration, String),
}

impl ServeProcess {
    /// The binary cargo built for the integration tests (`make cluster-up`
    /// includes these helpers in an example, for which cargo names none).
    pub const BINARY: &'static str = match option_env!("CARGO_BIN_EXE_chiller-metrics") {
        Some(binary) => binary,
        None => "chiller-metrics",
    };

    /// `chiller-metrics serve --standalone` (KUBECONFIG names a missing
    /// file, no in-cluster env), ports 0 on 127.0.0.1, JSON logs and no drain.
    /// Settings come from env so that flags added by the caller win.
    pub fn command(scratch: &Path) -> Command {
        let mut command = Command::new(Self::BINARY);
        command.arg("serve");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CHILLER_METRICS_") {
                command.env_remove(name);
            }
        }
        command
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env("KUBECONFIG", scratch.join("no-such-kubeconfig"))
            .env("RUST_LOG", "info")
            .env("CHILLER_METRICS_LISTEN", "127.0.0.1:0")
            .env("CHILLER_METRICS_ADMIN_LISTEN", "127.0.0.1:0")
            .env("CHILLER_METRICS_LOG_FORMAT", "json")
            .env("CHILLER_METRICS_STANDALONE", "true")
            .env("CHILLER_METRICS_DRAIN_SECONDS", "0");
        command
    }

    /// Spawns `command` and waits for its "serving" log line, which names the
    /// bound addresses.
    pub fn start(command: Command) -> Result<Self, StartError> {
        Self::start_with(command, |mut command| command.spawn())
    }

    /// [`Self::start`] with the spawning done by `spawn`, e.g. one that ties
    /// the process's life to the test binary's.
    pub fn start_with(
        mut command: Command,
        spawn: impl FnOnce(Command) -> std::io::Result<Child>,
    ) -> Result<Self, StartError> {
        const STARTUP: Duration = Duration::from_secs(60);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn(command).map_err(|source| StartError::Spawn {
            binary: Self::BINARY.to_string(),
            source,
        })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line.clone());
                    let _ = lines_tx.send(line);
                }
            })
        };
        let deadline = Instant::now() + STARTUP;
        let joined = |log: &Arc<Mutex<Vec<String>>>| log.lock().unwrap().join("\n");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    if let Some((webhook_addr, admin_addr)) = serving_addresses(&line) {
                        return Ok(Self {
                            child,
                            webhook_addr,
                            admin_addr,
                            log,
                            reader: Some(reader),
                        });
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // stderr closed: the process is exiting.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
            }
            if let Some(status) = child.try_wait().expect("waiting for serve") {
                let _ = reader.join();
                return Err(StartError::Exited {
                    status,
                    log: joined(&log),
                });
            }
            if left.is_zero() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StartError::NoServingLine(STARTUP, joined(&log)));
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client for the webhook trusting `ca_pem`.
    pub fn client(&self, ca_pem: &str) -> HttpsClient {
        HttpsClient::new(self.webhook_addr, ca_pem)
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self) -> Result<(), ClientError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match admin_get(self.admin_addr, "/readyz").await {
                Ok(response) if response.status == StatusCode::OK => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(ClientError::Timeout(format!(
                        "/readyz on {} to answer 200",
                        self.admin_addr
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// A function giving the last `lines` log lines, usable after the
    /// process is moved or gone (for printing on failure).
    pub fn log_tail(&self, lines: usize) -> impl Fn() -> String + 'static {
        let log = self.log.clone();
        move || {
            let log = log.lock().unwrap_or_else(|p| p.into_inner());
            log[log.len().saturating_sub(lines)..].join("\n")
        }
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The log lines parsed as JSON (the command sets the JSON log format).
    pub fn json_log(&self) -> Vec<serde_json::Value> {
        self.log()
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Sends SIGTERM (the process keeps running while it drains).
    pub fn send_sigterm(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -TERM {} failed", self.child.id());
    }

    /// Sends SIGTERM, waits for the exit, and returns the status and the whole log.
    pub fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        self.send_sigterm();
        let status = self.wait_exit(Duration::from_secs(60));
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status, self.log())
    }

    /// Waits for the process to exit; kills it and panics after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for serve") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "serve did not exit within {within:?} of SIGTERM; log:\n{}",
                    self.log().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `webhook` and `admin` of the JSON "serving" log line.
fn serving_addresses(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let entry: BTreeMap<String, serde_json::Value> = serde_json::from_str(line).ok()?;
    if entry.get("message")?.as_str()? != "serving" {
        return None;
    }
    let address = |key: &str| entry.get(key)?.as_str()?.parse().ok();
    Some((address("webhook")?, address("admin")?))
}
