//! `chiller-metrics explain KIND NAMESPACE/NAME`: would the webhook be called
//! for this pod (or this workload's pods), and what would it decide? Step by
//! step, as the API server and the webhook decide, read through the user's
//! kubeconfig, or offline from `-f FILE` with `--namespace-labels`.
//!
//! [`decide`] is pure; [`fetch`] reads the cluster; [`input`] reads files.

pub mod cel;
pub mod decide;
mod fetch;
pub mod input;
pub mod selector;

use std::{fmt::Write as _, path::PathBuf};

use clap::{Args, ValueEnum};

pub use decide::{Explanation, Outcome, Step, StepStatus};

use crate::{cli::check::OutputFormat, config::SidecarMode};

/// The kinds `explain` reads from the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ObjectKind {
    Pod,
    Deployment,
    Statefulset,
    Daemonset,
    Job,
    Cronjob,
}

impl ObjectKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::Deployment => "deployment",
            Self::Statefulset => "statefulset",
            Self::Daemonset => "daemonset",
            Self::Job => "job",
            Self::Cronjob => "cronjob",
        }
    }
}

const OFFLINE: &str = "Offline (with -f)";

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// What to explain: pod, deployment, statefulset, daemonset, job or cronjob.
    #[arg(
        value_name = "KIND",
        required_unless_present = "file",
        requires = "target"
    )]
    pub kind: Option<ObjectKind>,
    /// The object, as NAMESPACE/NAME.
    #[arg(value_name = "NAMESPACE/NAME")]
    pub target: Option<String>,
    /// Offline: explain the first pod or workload in this file (- for standard input).
    #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "target"])]
    pub file: Option<PathBuf>,
    /// Offline: the namespace's labels, as KEY=VALUE,...
    #[arg(long, value_delimiter = ',', value_name = "KEY=VALUE", requires = "file", help_heading = OFFLINE)]
    pub namespace_labels: Vec<String>,
    /// Offline: the namespace's pod-selector annotation.
    #[arg(long, value_name = "SELECTOR", requires = "file", help_heading = OFFLINE)]
    pub pod_selector: Option<String>,
    /// Offline: the namespace, when the file names none (default: default).
    #[arg(short = 'n', long, requires = "file", help_heading = OFFLINE)]
    pub namespace: Option<String>,
    /// Offline: a file with the MutatingWebhookConfiguration, e.g. `helm
    /// template` output (default: the chart's, with the config's domain).
    #[arg(long, value_name = "FILE", requires = "file", help_heading = OFFLINE)]
    pub webhook_file: Option<PathBuf>,
    /// Offline: the config file (online, the release's ConfigMap is read).
    #[arg(long, requires = "file", help_heading = OFFLINE)]
    pub config: Option<PathBuf>,
    /// Offline: sidecar mode (auto means native; online, the server version decides).
    #[arg(long, requires = "file", help_heading = OFFLINE)]
    pub sidecar_mode: Option<SidecarMode>,
    /// Name of the MutatingWebhookConfiguration and the release (its ConfigMap is NAME-config).
    #[arg(long, default_value = "chiller-metrics")]
    pub name: String,
    /// Namespace chiller-metrics is installed in.
    #[arg(long, default_value = "chiller-metrics")]
    pub install_namespace: String,
    /// Output format: text or json.
    #[arg(short = 'o', long = "output", default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Access(#[from] crate::cli::cluster_access::AccessError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0:?} is not NAMESPACE/NAME")]
    Target(String),
    #[error(transparent)]
    Input(#[from] input::InputError),
}

/// [`run`] to completion on `runtime`. `main` calls this and not `run`: a
/// future polled in the binary is compiled again there, a minute of every
/// release build.
pub fn run_blocking(
    runtime: &tokio::runtime::Runtime,
    args: &ExplainArgs,
) -> Result<Explanation, ExplainError> {
    runtime.block_on(run(args))
}

/// Explains the object named on the command line, or the file's.
pub async fn run(args: &ExplainArgs) -> Result<Explanation, ExplainError> {
    if args.file.is_some() {
        return Ok(input::explain_offline(args)?);
    }
    let (kind, target) = match (args.kind, &args.target) {
        (Some(kind), Some(target)) => (kind, target),
        _ => unreachable!("clap requires KIND and NAMESPACE/NAME without -f"),
    };
    let (namespace, name) = target
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| ExplainError::Target(target.clone()))?;
    fetch::explain_live(args, kind, namespace, name).await
}

/// The explanation in the requested format.
pub fn render(explanation: &Explanation, format: OutputFormat) -> String {
    match format {
        OutputFormat::Json => {
            serde_json::to_string_pretty(explanation).expect("an explanation serializes")
        }
        OutputFormat::Text => to_text(explanation),
    }
}

fn to_text(explanation: &Explanation) -> String {
    let mut out = format!("{}: {}\n", explanation.object, explanation.verdict);
    for step in &explanation.steps {
        let mark = match step.status {
            StepStatus::Pass => '✔',
            StepStatus::Fail => '✘',
            StepStatus::Unknown => '?',
            StepStatus::NotReached => '·',
        };
        let _ = writeln!(
            out,
            "  {} {mark} {}: {}",
            step.number, step.title, step.detail
        );
    }
    if let Some(existing) = &explanation.existing {
        if existing.injected {
            let _ = writeln!(
                out,
                "  injected: chiller-metrics {}, config hash {}, {} sidecar, prefix {}, containers {}",
                existing.version.as_deref().unwrap_or("?"),
                existing.config_hash.as_deref().unwrap_or("not recorded"),
                existing.mode.as_deref().unwrap_or("?"),
                existing.prefix.as_deref().unwrap_or("?"),
                existing.containers.join(","),
            );
        } else {
            out.push_str("  injected: no\n");
        }
        if let Some(reason) = &existing.skipped {
            let _ = writeln!(out, "  the webhook recorded on the pod: skipped, {reason}");
        }
    }
    for source in &explanation.sources {
        let _ = writeln!(out, "  {source}");
    }
    out
}
