//! The per-namespace monitoring reconcile loop.

use std::sync::Arc;

use crate::{admin::Metrics, cli::RenderArgs, config::Config};

/// Leader-election settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
}

impl Options {
    pub fn from_env(lease_namespace: Option<String>, lease_name: String) -> Self {
        Self {
            lease_namespace: lease_namespace
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "chiller-metrics".into()),
            lease_name,
            identity: std::env::var("POD_NAME").unwrap_or_else(|_| "chiller-metrics".into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("render is not available yet")]
    NotYet,
}

pub async fn run(
    _client: kube::Client,
    _config: Config,
    _metrics: Arc<Metrics>,
    _options: Options,
) {
    tracing::warn!("reconcile loop not yet available");
}

pub fn render(_args: &RenderArgs) -> Result<String, ReconcileError> {
    Err(ReconcileError::NotYet)
}
