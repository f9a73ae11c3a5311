//! How the CLI's cluster commands (`check`, `explain`, `uninstall`) reach the
//! cluster: one client from the user's kubeconfig, every call under a time
//! limit, and the release's config as the webhook reads it.

use std::{future::Future, path::Path, time::Duration};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use crate::config::{Config, Overrides};

/// The limit on each connection and each API call.
pub const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("no usable kubeconfig: {0}")]
    Kubeconfig(#[source] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot {action} {what}: {source}")]
    Api {
        action: &'static str,
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: no answer within {seconds} s")]
    Timeout { what: String, seconds: u64 },
}

impl AccessError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Api { source: kube::Error::Api(status), .. } if status.is_not_found())
    }
}

/// A client from the kubeconfig (as kubectl finds it), with [`TIMEOUT`] on
/// connecting, reading and writing.
pub async fn client() -> Result<Client, AccessError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(AccessError::Kubeconfig)?;
    config.connect_timeout = Some(TIMEOUT);
    config.read_timeout = Some(TIMEOUT);
    config.write_timeout = Some(TIMEOUT);
    Client::try_from(config).map_err(AccessError::Client)
}

/// One API call, `action` on `what` (for the message), bounded by [`TIMEOUT`].
pub async fn call<T>(
    action: &'static str,
    what: impl Into<String>,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, AccessError> {
    let what = what.into();
    match tokio::time::timeout(TIMEOUT, call).await {
        Ok(result) => result.map_err(|source| AccessError::Api {
            action,
            what,
            source,
        }),
        Err(_) => Err(AccessError::Timeout {
            what: format!("{action} {what}"),
            seconds: TIMEOUT.as_secs(),
        }),
    }
}

/// The config of the release `name` in `namespace` (its ConfigMap
/// `NAME-config`), so that a decision is the webhook's; the defaults when
/// there is none or it is invalid. The note says which it is.
pub async fn release_config(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(Config, String), AccessError> {
    let map_name = format!("{name}-config");
    let where_ = format!("ConfigMap {namespace}/{map_name}");
    let map = call(
        "get",
        where_.clone(),
        Api::<ConfigMap>::namespaced(client.clone(), namespace).get_opt(&map_name),
    )
    .await?;
    let Some(map) = map else {
        return Ok((
            Config::default(),
            format!("config: defaults ({where_} not found)"),
        ));
    };
    let data = map.data.unwrap_or_default();
    let text = data
        .get("config.yaml")
        .or_else(|| data.values().next())
        .cloned()
        .unwrap_or_default();
    let parsed = Config::from_text(&text, Path::new(&where_), &Overrides::default());
    Ok(match parsed {
        Ok(config) => (config, format!("config: {where_}")),
        Err(error) => (
            Config::default(),
            format!("config: defaults ({where_} is invalid: {error})"),
        ),
    })
}
