//! `chiller-metrics check`: is the install healthy? Like `linkerd check`, each
//! item gets ✔ or ✘ (– when it cannot be judged), a failed item a hint, and
//! the exit code is non-zero when any item fails. `-o json` gives the same
//! report as JSON.
//!
//! The cluster is read through the user's kubeconfig. The checks are pure
//! functions over what was fetched ([`items`]); [`fetch`] is the thin layer
//! that talks to the API server and to the webhook.

mod fetch;
pub mod items;
pub mod report;
pub mod tls;

use clap::{Args, ValueEnum};

pub use report::{Item, Report, Status};

use super::cluster_access::{self, AccessError};

/// How long one API call, TLS handshake or `/readyz` may take.
pub use super::cluster_access::TIMEOUT;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Namespace chiller-metrics is installed in.
    #[arg(long, default_value = "chiller-metrics")]
    pub namespace: String,
    /// Name of the release's Deployment, Service and MutatingWebhookConfiguration.
    #[arg(long, default_value = "chiller-metrics")]
    pub name: String,
    /// Name of the leader-election Lease in --namespace.
    #[arg(long, default_value = "chiller-metrics-reconciler")]
    pub lease_name: String,
    /// Output format: text or json.
    #[arg(short = 'o', long = "output", default_value = "text")]
    pub output: OutputFormat,
    /// Connect to the webhook at HOST:PORT instead of the address its
    /// configuration names (URL host, or a ready endpoint of its Service),
    /// e.g. through `kubectl port-forward`. The name verified stays the
    /// configuration's.
    #[arg(long, value_name = "HOST:PORT")]
    pub webhook_address: Option<String>,
    /// Ask HOST:PORT for /readyz instead of each pod through the API
    /// server's pod proxy.
    #[arg(long, value_name = "HOST:PORT")]
    pub admin_address: Option<String>,
}

/// Why something could not be fetched or reached. A failure of the cluster
/// under check becomes a failed item; only an unusable kubeconfig ends the
/// command with an error.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("{what}: no answer within {seconds} s")]
    Timeout { what: String, seconds: u64 },
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {address} failed: {message}")]
    Tls { address: String, message: String },
    #[error("{address}: {message}")]
    Http { address: String, message: String },
    #[error("{message}")]
    Resolve { message: String },
}

/// [`run`] to completion on `runtime`. `main` calls this and not `run`: a
/// future polled in the binary is compiled again there, a minute of every
/// release build.
pub fn run_blocking(
    runtime: &tokio::runtime::Runtime,
    args: &CheckArgs,
) -> Result<Report, CheckError> {
    runtime.block_on(run(args))
}

/// Reads the cluster and checks every item.
pub async fn run(args: &CheckArgs) -> Result<Report, CheckError> {
    let client = cluster_access::client().await?;
    Ok(fetch::check_all(&client, args).await)
}

/// The report in the requested format.
pub fn render(report: &Report, format: OutputFormat) -> String {
    match format {
        OutputFormat::Text => report.to_text(),
        OutputFormat::Json => report.to_json(),
    }
}
