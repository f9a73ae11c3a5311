//! Talking to the API server for the webhook: finding the cluster, its
//! version, and the watched namespace cache.

mod namespaces;

use std::time::Duration;

pub use namespaces::{NamespaceCache, policy_from_namespace};

/// Connects to the cluster (in-cluster config or kubeconfig) and checks that it
/// answers. `None` means no cluster: the webhook then serves alone.
pub async fn connect() -> Option<(kube::Client, (u32, u32))> {
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(error) => {
            // Expected outside a cluster: one clear line; the causes at debug.
            tracing::info!(
                "no Kubernetes cluster configured (no in-cluster service account, no kubeconfig): the webhook serves alone"
            );
            tracing::debug!(%error, "why no cluster configuration was found");
            return None;
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
        Ok(Ok(info)) => match parse_version(&info.major, &info.minor) {
            Some(version) => Some((client, version)),
            None => {
                tracing::warn!(
                    major = info.major,
                    minor = info.minor,
                    "cannot parse the API server version"
                );
                Some((client, (1, 0)))
            }
        },
        Ok(Err(error)) => {
            tracing::warn!(%error, "cluster configured but not reachable");
            None
        }
        Err(_) => {
            tracing::warn!("cluster configured but did not answer within 10s");
            None
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
}
