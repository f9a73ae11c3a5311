//! The watched cache of opted-in namespaces that the webhook reads per request.

use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Namespace, apimachinery::pkg::apis::meta::v1::ObjectMeta};
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

/// Reads namespace policies from a kube-runtime reflector store. A namespace
/// the watch has not delivered in time (it may be backing off after an API
/// server outage) is read once from the API server and kept briefly.
#[derive(Clone)]
pub struct NamespaceCache {
    store: reflector::Store<Namespace>,
    keys: Keys,
    lookup: Option<Lookup>,
}

/// Namespaces read directly from the API server, while the watch lags.
#[derive(Clone)]
struct Lookup {
    api: Api<Namespace>,
    fetched: Arc<Mutex<HashMap<String, (NamespacePolicy, Instant)>>>,
}

/// How long a looked-up namespace stands in for the watch's copy.
const LOOKED_UP_FOR: Duration = Duration::from_secs(30);
/// How long a lookup may take: with the 2 s catch-up wait before it, the
/// answer (and its warning, if the lookup fails) stays within the chart's
/// 5 s webhook timeout.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

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
        let lookup = Lookup {
            api: Api::all(client.clone()),
            fetched: Arc::default(),
        };
        let compact = keys.clone();
        let stream = reflector(
            writer,
            watcher(Api::<Namespace>::all(client), config)
                .modify(move |namespace| keep_what_we_read(namespace, &compact)),
        )
        .backoff(watcher::ExponentialBackoff::from(
            super::api_server_backoff(),
        ));
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
        (
            Self {
                store,
                keys,
                lookup: Some(lookup),
            },
            driver,
        )
    }

    /// The policy of a namespace looked up lately, while the watch lagged.
    fn looked_up(&self, namespace: &str) -> Option<NamespacePolicy> {
        let lookup = self.lookup.as_ref()?;
        let mut fetched = lookup.fetched.lock().unwrap_or_else(|p| p.into_inner());
        fetched.retain(|_, (_, at)| at.elapsed() < LOOKED_UP_FOR);
        fetched.get(namespace).map(|(policy, _)| policy.clone())
    }

    /// Reads `namespace` from the API server; true if it is opted in, and
    /// then its policy stands in for the watch's copy for a while.
    async fn look_up(&self, namespace: &str) -> bool {
        let Some(lookup) = &self.lookup else {
            return false;
        };
        let found = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup.api.get_opt(namespace)).await
        {
            Ok(Ok(found)) => found,
            Ok(Err(error)) => {
                tracing::warn!(namespace, %error, "namespace lookup failed");
                return false;
            }
            Err(_) => {
                tracing::warn!(namespace, "namespace lookup timed out");
                return false;
            }
        };
        let opted_in = found.filter(|ns| {
            ns.metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(&self.keys.inject))
                .is_some_and(|value| value == ENABLED)
        });
        let Some(ns) = opted_in else {
            return false;
        };
        tracing::info!(
            namespace,
            "namespace read from the API server: the watch has not delivered it yet"
        );
        let policy = policy_from_namespace(&ns, &self.keys);
        lookup
            .fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(namespace.to_string(), (policy, Instant::now()));
        true
    }
}

/// How often a review waiting for a namespace looks at the cache again.
const CATCH_UP_POLL: Duration = Duration::from_millis(10);

impl NamespacePolicies for NamespaceCache {
    fn policy(&self, namespace: &str) -> Option<NamespacePolicy> {
        let key = reflector::ObjectRef::new(namespace);
        self.store
            .get(&key)
            .map(|ns| policy_from_namespace(&ns, &self.keys))
            .or_else(|| self.looked_up(namespace))
    }

    fn is_missing(&self, namespace: &str) -> bool {
        self.store
            .get(&reflector::ObjectRef::new(namespace))
            .is_none()
            && self.looked_up(namespace).is_none()
    }

    fn wait_for<'a>(
        &'a self,
        namespace: &'a str,
        within: Duration,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + within;
            while self.is_missing(namespace) {
                if tokio::time::Instant::now() >= deadline {
                    return self.look_up(namespace).await;
                }
                tokio::time::sleep(CATCH_UP_POLL).await;
            }
            true
        })
    }
}

/// Reduces a watched Namespace to what chiller-metrics reads of it: name,
/// uid, resourceVersion, deletion, and the labels and annotations under our
/// domain. Both Namespace stores (the webhook's and the reconcile loop's)
/// hold Namespaces so; managed fields and other tools' annotations were most
/// of their size.
pub fn keep_what_we_read(namespace: &mut Namespace, keys: &Keys) {
    let metadata = std::mem::take(&mut namespace.metadata);
    let ours = |all: Option<BTreeMap<String, String>>| {
        all.map(|mut all| {
            all.retain(|key, _| keys.is_ours(key));
            all
        })
        .filter(|ours| !ours.is_empty())
    };
    namespace.metadata = ObjectMeta {
        name: metadata.name,
        uid: metadata.uid,
        resource_version: metadata.resource_version,
        deletion_timestamp: metadata.deletion_timestamp,
        labels: ours(metadata.labels),
        annotations: ours(metadata.annotations),
        ..ObjectMeta::default()
    };
    namespace.spec = None;
    namespace.status = None;
}

/// The webhook-relevant settings of a namespace.
pub fn policy_from_namespace(namespace: &Namespace, keys: &Keys) -> NamespacePolicy {
    NamespacePolicy::from_annotations(namespace.metadata.annotations.as_ref(), keys)
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use super::*;
    use crate::{
        admin::Metrics,
        config::Config,
        inject::{Injector, ResolvedMode},
        webhook::{self, WebhookState},
    };

    /// The chiller API pod's review, in namespace `chiller`, labeled `app=api`.
    fn review_body() -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/requests/chiller-api.json"
        );
        std::fs::read(path).expect("the review fixture")
    }

    /// `chiller`, opted in, with a pod selector that leaves the API pod out.
    fn chiller_namespace(keys: &Keys) -> Namespace {
        serde_json::from_value(json!({
            "metadata": {
                "name": "chiller",
                "labels": {keys.inject.as_str(): ENABLED},
                "annotations": {keys.pod_selector.as_str(): "app=frontend"},
            },
        }))
        .unwrap()
    }

    /// Reviews the API pod through the router with `cache`; the patch, if
    /// any, and the metrics text.
    async fn review(cache: NamespaceCache) -> (Option<Value>, String) {
        let metrics = Arc::new(Metrics::new());
        let state = Arc::new(WebhookState {
            injector: Injector::new(Config::default(), ResolvedMode::Native).into(),
            namespaces: Arc::new(cache),
            metrics: metrics.clone(),
            body_limit: 1 << 20,
        });
        let request = Request::post("/mutate")
            .header("content-type", "application/json")
            .body(Body::from(review_body()))
            .unwrap();
        let response = webhook::router(state).oneshot(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let answer: Value = serde_json::from_slice(&body).unwrap();
        let patch = answer["response"].get("patch").cloned();
        (patch, metrics.encode())
    }

    fn synced_cache() -> (NamespaceCache, reflector::store::Writer<Namespace>) {
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let keys = Keys::new("metrics.chiller.io");
        let cache = NamespaceCache {
            store,
            keys,
            lookup: None,
        };
        (cache, writer)
    }

    #[tokio::test]
    async fn a_review_waits_for_a_namespace_the_watch_has_not_delivered_yet() {
        let (cache, mut writer) = synced_cache();
        let namespace = chiller_namespace(&cache.keys);
        let arrives = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            writer.apply_watcher_event(&watcher::Event::Apply(namespace));
            writer
        });
        let (patch, metrics) = review(cache).await;
        arrives.await.unwrap();
        assert!(
            patch.is_none(),
            "the namespace's pod selector leaves the pod out: {patch:?}"
        );
        assert!(
            metrics.contains(r#"outcome="skipped",reason="not_selected""#),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn a_namespace_that_never_reaches_the_cache_gets_no_injection() {
        let (cache, _writer) = synced_cache();
        let (patch, metrics) = review(cache).await;
        assert!(patch.is_none(), "injected without the namespace's settings");
        assert!(
            metrics.contains(
                r#"chiller_metrics_admissions_total{outcome="error",reason="namespace_not_cached"} 1"#
            ),
            "{metrics}"
        );
    }

    #[test]
    fn a_stored_namespace_keeps_only_what_we_read() {
        let keys = Keys::new("metrics.chiller.io");
        let mut namespace: Namespace = serde_json::from_value(json!({
            "metadata": {
                "name": "chiller",
                "uid": "7c1e2d3f-4a5b-6c7d-8e9f-000000000001",
                "resourceVersion": "42",
                "deletionTimestamp": "2026-12-06T08:00:00Z",
                "labels": {
                    keys.inject.as_str(): ENABLED,
                    "kubernetes.io/metadata.name": "chiller",
                },
                "annotations": {
                    keys.pod_selector.as_str(): "app=frontend",
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}],
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }))
        .unwrap();
        keep_what_we_read(&mut namespace, &keys);
        assert_eq!(
            serde_json::to_value(&namespace).unwrap(),
            json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": "chiller",
                    "uid": "7c1e2d3f-4a5b-6c7d-8e9f-000000000001",
                    "resourceVersion": "42",
                    "deletionTimestamp": "2026-12-06T08:00:00Z",
                    "labels": {keys.inject.as_str(): ENABLED},
                    "annotations": {keys.pod_selector.as_str(): "app=frontend"},
                },
            })
        );
        assert_eq!(
            policy_from_namespace(&namespace, &keys)
                .pod_selector
                .as_deref(),
            Some("app=frontend")
        );
    }
}
