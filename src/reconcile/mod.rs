//! The per-namespace monitoring reconcile loop.

use std::sync::Arc;

pub mod desired;

use crate::{admin::Metrics, config::Config};

pub use desired::render;

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

pub async fn run(
    _client: kube::Client,
    _config: Config,
    _metrics: Arc<Metrics>,
    _options: Options,
) {
    tracing::warn!("reconcile loop not yet available");
}
