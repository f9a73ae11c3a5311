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
/// Retry delays of the webhook's own API-server requests: doubling from the
/// first to the last, each plus up to as much again of jitter.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LAST_RETRY: Duration = Duration::from_secs(4);

/// Backoff for what the webhook needs of the API server: its version at
/// start and the namespace watch. While they fail the replica is not ready
/// and pods in opted-in namespaces go uninjected, so it retries within
/// seconds of the API server's return, not after kube-runtime's default of
/// up to a minute. One cheap request per replica every few seconds.
pub fn api_server_backoff() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(FIRST_RETRY)
        .with_max_delay(LAST_RETRY)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// Asks the API server for its version until it answers, retrying with
/// backoff and logging each retry; never gives up (a control-plane upgrade
/// or a slow network policy only delays the start).
pub async fn wait_for_api_server(client: &kube::Client) -> (u32, u32) {
    use backon::BackoffBuilder;
    let mut delays = api_server_backoff().build();
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
        let delay = delays.next().unwrap_or(LAST_RETRY);
        tracing::warn!(
            attempt,
            %error,
            retry_in = ?delay,
            "cannot reach the API server; not ready, retrying"
        );
        tokio::time::sleep(delay).await;
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

    #[test]
    fn the_webhook_retries_the_api_server_within_seconds_and_never_gives_up() {
        use backon::BackoffBuilder;
        let delays: Vec<Duration> = api_server_backoff().build().take(50).collect();
        assert_eq!(delays.len(), 50, "the retries ran out");
        assert!(delays[0] <= Duration::from_secs(1), "{delays:?}");
        // Never more than 10 s without a try, and no tighter than every 4 s
        // once backed off.
        assert!(delays.iter().all(|d| d.as_secs_f64() <= 10.0), "{delays:?}");
        assert!(
            delays[10..].iter().all(|d| d.as_secs_f64() >= 4.0),
            "{delays:?}"
        );
    }
}
