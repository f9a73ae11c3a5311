//! Command-line interface: flags (with `CHILLER_METRICS_*` env overrides) and
//! the commands. `main.rs` only parses and dispatches.

pub mod check;
pub mod cluster_access;
pub mod explain;
pub mod offline;
pub mod serve;
pub mod uninstall;

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    config::{Config, ConfigError, Overrides, SidecarMode},
    webhook::tls::MinTlsVersion,
};

#[derive(Debug, Parser)]
#[command(
    name = "chiller-metrics",
    version,
    about = "Prometheus metrics for gunicorn apps, without touching them"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTPS webhook, the admin port and the reconcile loop.
    Serve(ServeArgs),
    /// Inject into rendered manifests (multi-document YAML), like `istioctl kube-inject`.
    Inject(InjectArgs),
    /// Remove what `inject` or the webhook added from manifests (multi-document YAML).
    Uninject(UninjectArgs),
    /// Print the objects the reconcile loop applies for a namespace.
    Render(RenderArgs),
    /// Generate a CA and a serving certificate for the webhook.
    Certs(CertsArgs),
    /// Print the statsd_exporter mapping the sidecar loads.
    Mapping(ConfigFileArgs),
    /// Print the effective configuration (defaults, file and overrides merged).
    Config(ConfigArgs),
    /// Check the install on the cluster of the current kubeconfig, like `linkerd check`.
    Check(check::CheckArgs),
    /// Explain, step by step, whether the webhook injects a pod or a workload's pods.
    Explain(explain::ExplainArgs),
    /// Remove what the reconcile loop made everywhere, before `helm uninstall`.
    Uninstall(uninstall::UninstallArgs),
}

/// Only the config file, for commands no override applies to.
#[derive(Debug, Clone, Args, Default)]
pub struct ConfigFileArgs {
    /// YAML config file; every setting has a default.
    #[arg(long, env = "CHILLER_METRICS_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigFileArgs {
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.load_with(&Overrides::default())
    }

    /// The config file with these overrides applied.
    pub fn load_with(&self, overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::load(self.config.as_deref(), overrides)
    }
}

/// The config file and the sidecar overrides, for commands that inject.
#[derive(Debug, Clone, Args, Default)]
pub struct SidecarConfigArgs {
    #[command(flatten)]
    pub file: ConfigFileArgs,
    /// Sidecar mode: auto, native or container (offline, auto means native).
    #[arg(long, env = "CHILLER_METRICS_SIDECAR_MODE")]
    pub sidecar_mode: Option<SidecarMode>,
    /// statsd_exporter image.
    #[arg(long, env = "CHILLER_METRICS_SIDECAR_IMAGE")]
    pub sidecar_image: Option<String>,
}

impl SidecarConfigArgs {
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.file.load_with(&Overrides {
            sidecar_mode: self.sidecar_mode,
            sidecar_image: self.sidecar_image.clone(),
            grafana_namespace: None,
        })
    }
}

/// The config file and the Grafana override, for `render`.
#[derive(Debug, Clone, Args, Default)]
pub struct RenderConfigArgs {
    #[command(flatten)]
    pub file: ConfigFileArgs,
    /// Namespace for Grafana dashboard and datasource ConfigMaps (default: the app namespace).
    #[arg(long, env = "CHILLER_METRICS_GRAFANA_NAMESPACE")]
    pub grafana_namespace: Option<String>,
}

impl RenderConfigArgs {
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.file.load_with(&Overrides {
            grafana_namespace: self.grafana_namespace.clone(),
            ..Default::default()
        })
    }
}

/// Where the configuration comes from.
#[derive(Debug, Clone, Args, Default)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub file: ConfigFileArgs,
    /// Sidecar mode: auto, native or container.
    #[arg(long, env = "CHILLER_METRICS_SIDECAR_MODE")]
    pub sidecar_mode: Option<SidecarMode>,
    /// statsd_exporter image.
    #[arg(long, env = "CHILLER_METRICS_SIDECAR_IMAGE")]
    pub sidecar_image: Option<String>,
    /// Namespace for Grafana dashboard and datasource ConfigMaps (default: the app namespace).
    #[arg(long, env = "CHILLER_METRICS_GRAFANA_NAMESPACE")]
    pub grafana_namespace: Option<String>,
    /// Print the config file's JSON Schema instead (the chart's values schema embeds it).
    #[arg(long)]
    pub schema: bool,
}

impl ConfigArgs {
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.file.load_with(&self.overrides())
    }

    /// The overrides given on the command line.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            sidecar_mode: self.sidecar_mode,
            sidecar_image: self.sidecar_image.clone(),
            grafana_namespace: self.grafana_namespace.clone(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// HTTPS address of the webhook.
    #[arg(long, env = "CHILLER_METRICS_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Plain-HTTP address of /livez, /readyz and /metrics.
    #[arg(
        long,
        env = "CHILLER_METRICS_ADMIN_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub admin_listen: SocketAddr,
    /// PEM certificate chain; reloaded when it changes.
    #[arg(
        long,
        env = "CHILLER_METRICS_TLS_CERT",
        default_value = "/etc/chiller-metrics/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// PEM private key; reloaded when it changes.
    #[arg(
        long,
        env = "CHILLER_METRICS_TLS_KEY",
        default_value = "/etc/chiller-metrics/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// Lowest TLS version: 1.2 or 1.3.
    #[arg(long, env = "CHILLER_METRICS_TLS_MIN_VERSION", default_value = "1.2")]
    pub tls_min_version: MinTlsVersion,
    /// Seconds between checks of the certificate files.
    #[arg(long, env = "CHILLER_METRICS_CERT_RELOAD_SECONDS", default_value_t = 2)]
    pub cert_reload_seconds: u64,
    /// Serve the webhook without a cluster: pod-level settings only, no
    /// namespace settings, no reconcile loop (demos and benchmarks). Without
    /// it, `serve` needs a cluster and waits for its API server.
    #[arg(long, env = "CHILLER_METRICS_STANDALONE")]
    pub standalone: bool,
    /// Do not run the reconcile loop (webhook only).
    #[arg(long, env = "CHILLER_METRICS_NO_RECONCILE")]
    pub no_reconcile: bool,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "CHILLER_METRICS_MAX_BODY_BYTES", default_value_t = crate::webhook::router::DEFAULT_BODY_LIMIT)]
    pub max_body_bytes: usize,
    /// Most open connections.
    #[arg(long, env = "CHILLER_METRICS_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has for the TLS handshake and for sending request headers.
    #[arg(
        long,
        env = "CHILLER_METRICS_HEADER_TIMEOUT_SECONDS",
        default_value_t = 10
    )]
    pub header_timeout_seconds: u64,
    /// Seconds to read a request body and answer it.
    #[arg(
        long,
        env = "CHILLER_METRICS_REQUEST_TIMEOUT_SECONDS",
        default_value_t = 10
    )]
    pub request_timeout_seconds: u64,
    /// Seconds an idle connection stays open.
    #[arg(
        long,
        env = "CHILLER_METRICS_IDLE_TIMEOUT_SECONDS",
        default_value_t = 120
    )]
    pub idle_timeout_seconds: u64,
    /// On SIGTERM: seconds to keep serving while not ready, so endpoints update.
    #[arg(long, env = "CHILLER_METRICS_DRAIN_SECONDS", default_value_t = 5)]
    pub drain_seconds: u64,
    /// After the drain: seconds in-flight requests get to finish.
    #[arg(
        long,
        env = "CHILLER_METRICS_SHUTDOWN_TIMEOUT_SECONDS",
        default_value_t = 15
    )]
    pub shutdown_timeout_seconds: u64,
    /// Namespace of the leader-election Lease (default: this pod's namespace).
    #[arg(long, env = "CHILLER_METRICS_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "CHILLER_METRICS_LEASE_NAME",
        default_value = "chiller-metrics-reconciler"
    )]
    pub lease_name: String,
    /// Log format.
    #[arg(long, env = "CHILLER_METRICS_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// `serve` cannot start without its certificate: which file is missing and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} {path} does not exist: set its path with {flag} or {env}; `chiller-metrics certs --out DIR --dns NAME` makes a pair"
)]
pub struct MissingCertError {
    pub what: &'static str,
    pub path: String,
    pub flag: &'static str,
    pub env: &'static str,
}

impl ServeArgs {
    /// Fails with a hint when the certificate or key file does not exist.
    pub fn require_cert_files(&self) -> Result<(), MissingCertError> {
        let files = [
            (
                &self.tls_cert,
                "certificate",
                "--tls-cert",
                "CHILLER_METRICS_TLS_CERT",
            ),
            (
                &self.tls_key,
                "private key",
                "--tls-key",
                "CHILLER_METRICS_TLS_KEY",
            ),
        ];
        for (path, what, flag, env) in files {
            if !path.exists() {
                return Err(MissingCertError {
                    what,
                    path: path.display().to_string(),
                    flag,
                    env,
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    #[command(flatten)]
    pub config: SidecarConfigArgs,
    /// Manifest file, or - for standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct UninjectArgs {
    /// YAML config file (its domain and sidecar names say what to remove).
    #[arg(long, env = "CHILLER_METRICS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Manifest file, or - for standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub config: RenderConfigArgs,
    /// Namespace to render the monitoring objects for.
    #[arg(long)]
    pub namespace: String,
    /// Postgres to export, as host:port/db (as the namespace annotation).
    #[arg(long, requires = "postgres_secret")]
    pub postgres: Option<String>,
    /// Secret with `username` and `password` keys for Postgres.
    #[arg(long, requires = "postgres")]
    pub postgres_secret: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct CertsArgs {
    /// Directory to write ca.crt, tls.crt and tls.key into.
    #[arg(long)]
    pub out: PathBuf,
    /// DNS names and IP addresses of the serving certificate.
    #[arg(long = "dns", required = true, num_args = 1..)]
    pub dns: Vec<String>,
}
