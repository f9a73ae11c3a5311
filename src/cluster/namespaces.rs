//! The watched cache of opted-in namespaces that the webhook reads per request.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};

use crate::{
    admin::Readiness,
    inject::NamespacePolicy,
    keys::{ENABLED, Keys},
    webhook::NamespacePolicies,
};

/// Reads namespace policies from a kube-runtime reflector store.
#[derive(Clone)]
pub struct NamespaceCache {
    store: reflector::Store<Namespace>,
    keys: Keys,
}

impl NamespaceCache {
    /// Starts watching opted-in namespaces. The returned future drives the
    /// watch and must be spawned. Readiness follows the watch: ready once the
    /// cache has synced, not ready while the watch fails (the API server or
    /// etcd is down), ready again once a fresh list has synced.
    pub fn watch(
        client: Client,
        keys: Keys,
        readiness: Arc<Readiness>,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (store, writer) = reflector::store();
        let config = watcher::Config::default().labels(&format!("{}={ENABLED}", keys.inject));
        let stream =
            reflector(writer, watcher(Api::<Namespace>::all(client), config)).default_backoff();
        let driver = async move {
            stream
                .for_each(|event| {
                    match event {
                        Ok(watcher::Event::InitDone) => {
                            if !readiness.namespaces_connected() {
                                tracing::info!("namespace cache synced");
                            }
                            readiness.mark_namespaces_synced();
                        }
                        Ok(_) => {}
                        Err(error) => {
                            if readiness.namespaces_connected() {
                                tracing::warn!(%error, "namespace watch failed: not ready until it recovers");
                            }
                            readiness.mark_namespaces_disconnected();
                        }
                    }
                    std::future::ready(())
                })
                .await;
        };
        (Self { store, keys }, driver)
    }
}

impl NamespacePolicies for NamespaceCache {
    fn policy(&self, namespace: &str) -> Option<NamespacePolicy> {
        let key = reflector::ObjectRef::new(namespace);
        self.store
            .get(&key)
            .map(|ns| policy_from_namespace(&ns, &self.keys))
    }
}

/// The webhook-relevant settings of a namespace.
pub fn policy_from_namespace(namespace: &Namespace, keys: &Keys) -> NamespacePolicy {
    NamespacePolicy {
        pod_selector: namespace
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(&keys.pod_selector))
            .filter(|s| !s.trim().is_empty())
            .cloned(),
    }
}
