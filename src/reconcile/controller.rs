//! The watches that drive reconciles and feed the stores a reconcile reads
//! (a reconcile lists nothing): every Namespace (only changes to what
//! configures us count: see `configuring_fields`), every object we manage
//! (one label-filtered watch per kind), every pod (stored stripped, see
//! `pods`; a pod without the injected label triggers, see `pod_sightings`)
//! and the metadata of every ReplicaSet. Each managed-object watch both
//! feeds the live cache and triggers its owner namespace, so one watch per kind
//! serves the drift check and the trigger. Built on kube-runtime's `applier`,
//! the engine under `Controller`, because the stable `Controller` builder cannot
//! take a custom trigger stream.

use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use futures::{Stream, StreamExt, future, stream};
use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, ResourceExt,
    api::DynamicObject,
    core::PartialObjectMeta,
    runtime::{
        PredicateConfig, WatchStreamExt,
        controller::{self, applier},
        reflector::{self, ObjectRef, Store, reflector},
        watcher,
    },
};

use super::{
    context::{Context, error_policy},
    live::{MANAGED_KINDS, ManagedKind, managed_selector},
    namespace::{is_opted_in, reconcile},
    pod_sightings::PodSightings,
    pods::{LIST_PAGE_SIZE, strip_replica_set},
};
use crate::{cluster::keep_what_we_read, keys::Keys};

/// Time a burst of triggers for one namespace is collapsed into one reconcile:
/// every trigger in the burst restarts it, so a burst costs one reconcile,
/// and a namespace labeled on its own waits this long before its first.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Namespaces reconciled at the same time.
const CONCURRENCY: u16 = 4;

type Trigger = Result<ObjectRef<Namespace>, watcher::Error>;

/// Owner namespaces of changed managed objects, updating the cache on the way.
fn managed_kind_triggers(
    ctx: &Arc<Context>,
    kind: ManagedKind,
) -> impl Stream<Item = Trigger> + Send + 'static {
    let api = Api::<DynamicObject>::all_with(ctx.client.clone(), &kind.api_resource());
    let config = watcher::Config::default()
        .labels(&managed_selector())
        .page_size(LIST_PAGE_SIZE);
    let live = ctx.live.clone();
    watcher(api, config)
        .default_backoff()
        .filter_map(move |event| {
            let owners = match event {
                Ok(event) => live.apply_event(kind, event),
                Err(error) => {
                    let hint = if kind.is_prometheus_operator() {
                        " (are the Prometheus Operator CRDs installed?)"
                    } else {
                        ""
                    };
                    tracing::warn!(kind = kind.kind, %error, "watch failed{hint}; retrying");
                    Default::default()
                }
            };
            future::ready(Some(stream::iter(
                owners.into_iter().map(|ns| Ok(ObjectRef::new(&ns))),
            )))
        })
        .flatten()
}

/// Feeds the pod store (stripped pods, see `pods`) and yields the namespaces
/// where a pod without the injected label shows up for the first time.
fn pod_triggers(
    ctx: &Arc<Context>,
    namespaces: Store<Namespace>,
) -> impl Stream<Item = Trigger> + Send + 'static {
    let api = Api::<Pod>::all(ctx.client.clone());
    let config = watcher::Config::default().page_size(LIST_PAGE_SIZE);
    let keys = ctx.keys.clone();
    let mut sightings = PodSightings::default();
    let strip = ctx.clone();
    let store = ctx.clone();
    watcher(api, config)
        .default_backoff()
        .modify(move |pod| strip.pods.strip_pod(pod))
        .filter_map(move |event| {
            let trigger = match event {
                Ok(event) => {
                    store.pods.apply(&event);
                    let injected = |pod: &Pod| {
                        pod.labels().get(&keys.injected).map(String::as_str) == Some("true")
                    };
                    let uninjected = match &event {
                        watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                            !injected(pod)
                        }
                        _ => true,
                    };
                    uninjected
                        .then(|| {
                            sightings.observe(event, |name| {
                                namespaces
                                    .get(&ObjectRef::new(name))
                                    .is_some_and(|namespace| is_opted_in(&namespace, &keys))
                            })
                        })
                        .flatten()
                        .map(|name| Ok(ObjectRef::new(&name)))
                }
                Err(error) => {
                    tracing::warn!(%error, "pod watch failed; retrying");
                    None
                }
            };
            future::ready(trigger)
        })
}

/// Feeds the ReplicaSet store (metadata only, stripped to owner references);
/// triggers nothing.
fn replica_set_feed(ctx: &Arc<Context>) -> impl Stream<Item = Trigger> + Send + 'static {
    let api = Api::<PartialObjectMeta<ReplicaSet>>::all(ctx.client.clone());
    let config = watcher::Config::default().page_size(LIST_PAGE_SIZE);
    let ctx = ctx.clone();
    watcher(api, config)
        .default_backoff()
        .modify(strip_replica_set)
        .filter_map(move |event| {
            match event {
                Ok(event) => ctx.pods.replica_sets.apply(&event),
                Err(error) => tracing::warn!(%error, "replicaset watch failed; retrying"),
            }
            future::ready(None)
        })
}

/// Every opted-in namespace, each time a new config replaces the running
/// one: its objects, sidecar and mapping may all differ now.
fn config_change_triggers(
    ctx: &Arc<Context>,
    namespaces: Store<Namespace>,
) -> impl Stream<Item = Trigger> + Send + 'static {
    let keys = ctx.keys.clone();
    stream::unfold(ctx.config_changes(), |mut changes| async move {
        changes.changed().await.ok()?;
        Some(((), changes))
    })
    .flat_map(move |()| {
        let opted_in: Vec<Trigger> = namespaces
            .state()
            .iter()
            .filter(|namespace| is_opted_in(namespace, &keys))
            .map(|namespace| Ok(ObjectRef::from_obj(namespace.as_ref())))
            .collect();
        tracing::info!(
            namespaces = opted_in.len(),
            "config changed: reconciling every opted-in namespace"
        );
        stream::iter(opted_in)
    })
}

/// A hash of what in a Namespace configures us: our labels, our annotations
/// but the status annotation, and whether it is being deleted (the store
/// keeps no others: `keep_what_we_read`). Writing the status leaves it
/// unchanged, so our own writes never trigger a reconcile.
pub fn configuring_fields(keys: &Keys) -> impl Fn(&Namespace) -> Option<u64> + 'static {
    let status_key = keys.reconcile_status.clone();
    move |namespace| {
        let annotations: BTreeMap<_, _> = namespace
            .annotations()
            .iter()
            .filter(|(key, _)| **key != status_key)
            .collect();
        let mut hasher = DefaultHasher::new();
        namespace.labels().hash(&mut hasher);
        annotations.hash(&mut hasher);
        namespace
            .metadata
            .deletion_timestamp
            .is_some()
            .hash(&mut hasher);
        Some(hasher.finish())
    }
}

/// Runs the controller until the watches end (they do not, normally); the
/// caller drops it to stop.
pub async fn run(ctx: Arc<Context>) {
    let (store, writer) = reflector::store::<Namespace>();
    let keys = ctx.keys.clone();
    let namespaces = reflector(
        writer,
        watcher(
            Api::<Namespace>::all(ctx.client.clone()),
            Default::default(),
        )
        .modify(move |namespace| keep_what_we_read(namespace, &keys)),
    )
    .default_backoff()
    .touched_objects()
    .predicate_filter(configuring_fields(&ctx.keys), PredicateConfig::default())
    .filter_map(|namespace| {
        future::ready(match namespace {
            Ok(namespace) => Some(Ok(ObjectRef::from_obj(&namespace))),
            Err(error) => {
                tracing::warn!(%error, "namespace watch failed; retrying");
                None
            }
        })
    });
    let mut triggers: Vec<stream::BoxStream<'static, Trigger>> = vec![
        namespaces.boxed(),
        pod_triggers(&ctx, store.clone()).boxed(),
        replica_set_feed(&ctx).boxed(),
        config_change_triggers(&ctx, store.clone()).boxed(),
    ];
    triggers.extend(
        MANAGED_KINDS
            .iter()
            .map(|kind| managed_kind_triggers(&ctx, *kind).boxed()),
    );
    let config = controller::Config::default()
        .debounce(DEBOUNCE)
        .concurrency(CONCURRENCY);
    applier(
        |namespace, ctx| Box::pin(reconcile(namespace, ctx)),
        error_policy,
        ctx,
        store,
        stream::select_all(triggers),
        config,
    )
    .for_each(|result| {
        match result {
            Ok((namespace, action)) => {
                tracing::debug!(namespace = %namespace.name, ?action, "reconciled");
            }
            Err(controller::Error::ReconcilerFailed(..)) => {} // logged by the error policy
            Err(error) => tracing::debug!(%error, "controller event"),
        }
        future::ready(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn namespace(labels: serde_json::Value, annotations: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({
            "metadata": {"name": "shop", "labels": labels, "annotations": annotations},
        }))
        .unwrap()
    }

    #[test]
    fn only_what_configures_us_changes_the_namespace_trigger() {
        let keys = Keys::new("metrics.chiller.io");
        let hash = configuring_fields(&keys);
        let opted_in = json!({"metrics.chiller.io/inject": "enabled"});
        let plain = hash(&namespace(opted_in.clone(), json!({})));
        let with_status = namespace(
            opted_in.clone(),
            json!({"metrics.chiller.io/reconcile-status": "{\"ready\":true}"}),
        );
        assert_eq!(hash(&with_status), plain, "our status is not a change");
        assert_ne!(
            hash(&namespace(json!({}), json!({}))),
            plain,
            "a label is a change"
        );
        assert_ne!(
            hash(&namespace(
                opted_in,
                json!({"metrics.chiller.io/postgres": "db:5432/app"})
            )),
            plain,
            "a setting is a change"
        );
        let mut deleting = namespace(json!({"metrics.chiller.io/inject": "enabled"}), json!({}));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert_ne!(hash(&deleting), plain, "a deletion is a change");
    }
}
