//! Talking to the API server for the webhook: finding the cluster, waiting
//! for it to answer, its version, and the watched namespace cache.

mod namespaces;

use std::{
    pin::Pin,
    sync::{Arc, OnceLock},
    time::Duration,
};

pub use namespaces::{NamespaceCache, keep_what_we_read, policy_from_namespace};

use crate::{admin::Readiness, inject::NamespacePolicy, webhook::NamespacePolicies};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no Kubernetes cluster configured (no in-cluster service account, no kubeconfig): {0}; \
         pass --standalone to serve the webhook without a cluster"
    )]
    NotConfigured(#[source] kube::Error),
}

/// The client of the cluster `serve` runs in (in-cluster config or
/// kubeconfig). Builds it only: nothing is sent yet.
pub async fn client() -> Result<kube::Client, ClusterError> {
    kube::Client::try_default()
        .await
        .map_err(ClusterError::NotConfigured)
}

/// How long one version request may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff between attempts: doubling from the first to the last.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);

/// Asks the API server for its version until it answers, retrying with
/// backoff and logging each retry; never gives up (a control-plane upgrade
/// or a slow network policy only delays the start).
pub async fn wait_for_api_server(client: &kube::Client) -> (u32, u32) {
    let mut delay = FIRST_RETRY;
    for attempt in 1u64.. {
        let error = match tokio::time::timeout(ATTEMPT_TIMEOUT, client.apiserver_version()).await {
            Ok(Ok(info)) => {
                return parse_version(&info.major, &info.minor).unwrap_or_else(|| {
                    tracing::warn!(
                        major = info.major,
                        minor = info.minor,
                        "cannot parse the API server version"
                    );
                    (1, 0)
                });
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {ATTEMPT_TIMEOUT:?}"),
        };
        tracing::warn!(
            attempt,
            %error,
            retry_in = ?delay,
            "cannot reach the API server; not ready, retrying"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(LAST_RETRY);
    }
    unreachable!("the attempts never run out")
}

/// The webhook's view of the namespaces: unknown until the API server has
/// answered and the namespace cache has synced once.
pub struct ClusterNamespaces {
    cache: OnceLock<NamespaceCache>,
    readiness: Arc<Readiness>,
}

impl ClusterNamespaces {
    pub fn new(readiness: Arc<Readiness>) -> Self {
        Self {
            cache: OnceLock::new(),
            readiness,
        }
    }

    /// Set once, when the cache starts watching.
    pub fn connect(&self, cache: NamespaceCache) {
        let _ = self.cache.set(cache);
    }
}

impl NamespacePolicies for ClusterNamespaces {
    fn policy(&self, namespace: &str) -> Option<NamespacePolicy> {
        self.cache.get()?.policy(namespace)
    }

    fn known(&self) -> bool {
        self.cache.get().is_some() && self.readiness.namespaces_known()
    }

    fn is_missing(&self, namespace: &str) -> bool {
        self.cache
            .get()
            .is_some_and(|cache| cache.is_missing(namespace))
    }

    fn wait_for<'a>(
        &'a self,
        namespace: &'a str,
        within: Duration,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        match self.cache.get() {
            Some(cache) => cache.wait_for(namespace, within),
            None => Box::pin(std::future::ready(false)),
        }
    }
}

/// `("1", "29+")` → `(1, 29)`; managed clusters append `+` to the minor.
pub fn parse_version(major: &str, minor: &str) -> Option<(u32, u32)> {
    let digits = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    Some((digits(major)?, digits(minor)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("1", "29"), Some((1, 29)));
        assert_eq!(parse_version("1", "28+"), Some((1, 28)));
        assert_eq!(parse_version("", "28"), None);
    }

    #[test]
    fn namespaces_are_unknown_until_the_cache_has_synced() {
        let readiness = Arc::new(Readiness::new(true));
        let namespaces = ClusterNamespaces::new(readiness.clone());
        assert!(!namespaces.known());
        readiness.mark_namespaces_synced();
        assert!(!namespaces.known(), "no cache connected yet");
    }
}
