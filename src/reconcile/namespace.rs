//! One namespace's reconcile: apply what an opted-in namespace needs (writing
//! only what differs), remove what it no longer needs, report its status.

use std::{collections::HashSet, sync::Arc, time::Duration};

use futures::future;

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions},
    runtime::{
        controller::Action,
        events::{Event, EventType},
        watcher,
    },
};
use serde_json::{Value, json};

use super::{
    compare::{applied_value, digest_long_strings, is_subset},
    context::{Context, FIELD_MANAGER, NamespaceStatus, ReconcileError, is_not_found, truncate},
    desired::{self, DesiredObject, NamespaceSettings},
    live::{MANAGED_KINDS, ManagedKind, PROMETHEUS_OPERATOR_GROUP, api_resource, managed_kind},
    outdated,
    pod_state::PodCounts,
    uninjected,
};
use crate::{admin::metrics_labels::ReconcileFailureLabels, keys};

/// Reconciles one namespace. Writes nothing unless this replica leads.
pub async fn reconcile(
    namespace: Arc<Namespace>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if !ctx.is_leading() {
        return Ok(Action::await_change());
    }
    let name = namespace.name_any();
    let started = std::time::Instant::now();
    ctx.metrics.reconcile_runs.inc();
    let result = if namespace.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove our objects.
        uninjected::forget(&name, &ctx);
        Ok(Action::await_change())
    } else if is_opted_in(&namespace, &ctx.keys) {
        reconcile_opted_in(&namespace, &ctx).await
    } else {
        clean_up(&namespace, &ctx).await
    };
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => ctx.record_success(&name),
        Err(error) => {
            ctx.metrics
                .reconcile_failures
                .get_or_create(&ReconcileFailureLabels {
                    reason: error.metric_reason().to_string(),
                })
                .inc();
        }
    }
    result
}

/// Whether the namespace carries `<domain>/inject=enabled`.
pub fn is_opted_in(namespace: &Namespace, keys: &keys::Keys) -> bool {
    namespace
        .labels()
        .get(&keys.inject)
        .is_some_and(|v| v == crate::keys::ENABLED)
}

fn resync_interval(ctx: &Context) -> Duration {
    Duration::from_secs(ctx.injector().config().reconcile.resync_seconds)
}

fn resync(ctx: &Context) -> Action {
    Action::requeue(resync_interval(ctx))
}

async fn reconcile_opted_in(
    namespace: &Namespace,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let name = namespace.name_any();
    let settings = match NamespaceSettings::from_namespace(namespace, &ctx.keys) {
        Ok(settings) => settings,
        Err(source) => {
            let error = ReconcileError::Settings {
                namespace: name,
                source,
            };
            report_failure(namespace, &error, ctx).await;
            return Err(error);
        }
    };
    let objects = desired::desired_objects(&settings, ctx.injector().config());
    let keep: HashSet<_> = objects
        .iter()
        .map(|o| {
            (
                o.api_version.to_string(),
                o.kind.to_string(),
                o.namespace.clone(),
                o.name.clone(),
            )
        })
        .collect();
    let mut outcome = apply_all(&objects, ctx).await;
    outcome.errors.extend(prune(&name, &keep, ctx).await);
    let config_hash = ctx.injector().hashes().config.clone();
    let mut look_again: Option<Duration> = None;
    let counts = match uninjected::check(namespace, ctx).await {
        Ok(survey) => {
            let rollout = namespace
                .annotations()
                .get(&ctx.keys.rollout_outdated)
                .is_some_and(|v| v == "true");
            if rollout {
                match outdated::roll(&name, &survey.outdated, ctx).await {
                    Ok(poll) => look_again = look_again.into_iter().chain(poll).min(),
                    Err(error) => outcome.errors.insert(0, error),
                }
            }
            survey.counts
        }
        Err(error) => {
            outcome.errors.push(error);
            current_status(namespace, ctx)
                .map(|s| counts_of(&s))
                .unwrap_or_default()
        }
    };

    let error = if outcome.crd_missing.is_empty() {
        outcome.errors.into_iter().next()
    } else {
        Some(ReconcileError::PrometheusOperatorMissing {
            namespace: name.clone(),
            kinds: outcome.crd_missing.join(", "),
        })
    };
    let status = match &error {
        None => NamespaceStatus {
            ready: true,
            reason: "Ready".into(),
            message: format!("{} monitoring objects in sync", objects.len()),
            ..status_counts(&counts, config_hash)
        },
        Some(error) => failed_status(error, &counts, config_hash),
    };
    if let Err(status_error) = set_status(namespace, Some(&status), ctx).await {
        tracing::warn!(namespace = %name, error = %status_error, "cannot record the namespace status");
    }
    match error {
        None => Ok(match look_again {
            Some(delay) => Action::requeue(delay.min(resync_interval(ctx))),
            None => resync(ctx),
        }),
        Some(error) => {
            if matches!(error, ReconcileError::PrometheusOperatorMissing { .. }) {
                tracing::error!(namespace = %name, %error, "install the Prometheus Operator (monitoring.coreos.com/v1 CRDs); retrying with backoff");
            }
            publish_warning(namespace, &error, ctx).await;
            Err(error)
        }
    }
}

fn counts_of(status: &NamespaceStatus) -> PodCounts {
    PodCounts {
        injected: status.injected_pods,
        outdated: status.outdated_pods,
        uninjected: status.uninjected_pods,
        skipped: status.skipped_pods.clone(),
    }
}

fn status_counts(counts: &PodCounts, config_hash: String) -> NamespaceStatus {
    NamespaceStatus {
        uninjected_pods: counts.uninjected,
        injected_pods: counts.injected,
        outdated_pods: counts.outdated,
        skipped_pods: counts.skipped.clone(),
        config_hash,
        ..Default::default()
    }
}

fn failed_status(
    error: &ReconcileError,
    counts: &PodCounts,
    config_hash: String,
) -> NamespaceStatus {
    NamespaceStatus {
        ready: false,
        reason: error.status_reason().into(),
        message: error.to_string(),
        ..status_counts(counts, config_hash)
    }
}

/// Event and status for a reconcile that failed before applying anything.
async fn report_failure(namespace: &Namespace, error: &ReconcileError, ctx: &Context) {
    let counts = current_status(namespace, ctx)
        .map(|s| counts_of(&s))
        .unwrap_or_default();
    let config_hash = ctx.injector().hashes().config.clone();
    if let Err(status_error) = set_status(
        namespace,
        Some(&failed_status(error, &counts, config_hash)),
        ctx,
    )
    .await
    {
        tracing::warn!(error = %status_error, "cannot record the namespace status");
    }
    publish_warning(namespace, error, ctx).await;
}

async fn publish_warning(namespace: &Namespace, error: &ReconcileError, ctx: &Context) {
    let event = Event {
        type_: EventType::Warning,
        reason: error.status_reason().into(),
        note: Some(truncate(&error.to_string(), 1000)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(publish_error) = ctx
        .recorder
        .publish(&event, &namespace.object_ref(&()))
        .await
    {
        tracing::warn!(error = %publish_error, "cannot publish the namespace event");
    }
}

#[derive(Default)]
struct ApplyOutcome {
    crd_missing: Vec<String>,
    errors: Vec<ReconcileError>,
}

/// Applies every desired object whose live version differs, at the same
/// time: a namespace waits for its slowest write, not for the sum of them.
/// RoleBindings go last: the API server's escalation check reads the Role a
/// binding names, and refuses the binding while that Role is missing. One
/// object failing does not stop the others.
async fn apply_all(objects: &[DesiredObject], ctx: &Context) -> ApplyOutcome {
    let (bindings, others): (Vec<_>, Vec<_>) = objects
        .iter()
        .partition(|object| object.kind == "RoleBinding");
    let mut results = future::join_all(others.into_iter().map(|o| apply_one(o, ctx))).await;
    results.extend(future::join_all(bindings.into_iter().map(|o| apply_one(o, ctx))).await);
    let mut outcome = ApplyOutcome::default();
    for result in results {
        match result {
            Ok(()) => {}
            Err(ApplyFailure::CrdMissing(kind)) => outcome.crd_missing.push(kind),
            Err(ApplyFailure::Api(error)) => outcome.errors.push(error),
        }
    }
    outcome.crd_missing.dedup();
    outcome
}

enum ApplyFailure {
    /// `apiVersion/kind` of a Prometheus Operator kind the API server lacks.
    CrdMissing(String),
    Api(ReconcileError),
}

/// Applies one desired object unless the live one already matches it.
async fn apply_one(object: &DesiredObject, ctx: &Context) -> Result<(), ApplyFailure> {
    let resource = api_resource(object.api_version, object.kind, object.plural);
    let api =
        Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &object.namespace, &resource);
    let api_error = |action, source| {
        ApplyFailure::Api(ReconcileError::Api {
            action,
            kind: object.kind.to_string(),
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            source,
        })
    };
    let value = applied_value(&object.value, &ctx.injector().config().domain);
    let kind = managed_kind(object.api_version, object.kind).copied();
    let mut live: Option<Value> = match kind.filter(|k| ctx.live.is_synced(*k)) {
        Some(kind) => ctx
            .live
            .get(kind, &object.namespace, &object.name)
            .map(|o| to_value(&o)),
        None => match api.get_opt(&object.name).await {
            Ok(found) => found.map(|o| to_value(&o)),
            Err(source) if is_not_found(&source) => None,
            Err(source) => return Err(api_error("get", source)),
        },
    };
    let compared = |live: &mut Value| {
        let mut desired = value.clone();
        digest_long_strings(&mut desired);
        digest_long_strings(live);
        is_subset(&desired, live)
    };
    if live.as_mut().is_some_and(compared) {
        return Ok(());
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api
        .patch(&object.name, &params, &Patch::Apply(&value))
        .await
    {
        Ok(applied) => {
            tracing::info!(kind = object.kind, namespace = %object.namespace, name = %object.name, "applied");
            if let Some(kind) = kind {
                ctx.live.apply_event(kind, watcher::Event::Apply(applied));
            }
            Ok(())
        }
        Err(source) if is_not_found(&source) && resource.group == PROMETHEUS_OPERATOR_GROUP => Err(
            ApplyFailure::CrdMissing(format!("{}/{}", resource.api_version, resource.kind)),
        ),
        Err(source) => Err(api_error("apply", source)),
    }
}

fn to_value(object: &DynamicObject) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

type ObjectId = (String, String, String, String);

/// Deletes objects labeled managed-by us and owned by `owner` that are not in
/// `keep`. Objects without both labels are never touched.
async fn prune(owner: &str, keep: &HashSet<ObjectId>, ctx: &Context) -> Vec<ReconcileError> {
    let mut errors = Vec::new();
    for kind in MANAGED_KINDS {
        let owned = match owned_objects(*kind, owner, ctx).await {
            Ok(owned) => owned,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        for object in owned {
            let namespace = object.namespace().unwrap_or_default();
            let name = object.name_any();
            let id = (
                kind.api_version.to_string(),
                kind.kind.to_string(),
                namespace.clone(),
                name.clone(),
            );
            if keep.contains(&id) {
                continue;
            }
            let api = Api::<DynamicObject>::namespaced_with(
                ctx.client.clone(),
                &namespace,
                &kind.api_resource(),
            );
            let params = DeleteParams {
                preconditions: object.uid().map(|uid| Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::background()
            };
            match api.delete(&name, &params).await {
                Ok(_) => {
                    tracing::info!(kind = kind.kind, %namespace, %name, owner, "deleted");
                    ctx.live.apply_event(*kind, watcher::Event::Delete(object));
                }
                // Gone already, or replaced by a different object since we looked.
                Err(error) if is_not_found(&error) || is_conflict(&error) => {}
                Err(source) => errors.push(ReconcileError::Api {
                    action: "delete",
                    kind: kind.kind.to_string(),
                    namespace,
                    name,
                    source,
                }),
            }
        }
    }
    errors
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_conflict())
}

/// Our objects for `owner`: from the cache once it synced, else listed from
/// the owner's namespace and the Grafana namespace.
async fn owned_objects(
    kind: ManagedKind,
    owner: &str,
    ctx: &Context,
) -> Result<Vec<DynamicObject>, ReconcileError> {
    if ctx.live.is_synced(kind) {
        return Ok(ctx.live.owned_by(kind, owner));
    }
    let selector = format!(
        "{}={},{}={owner}",
        keys::MANAGED_BY_KEY,
        keys::MANAGED_BY,
        ctx.keys.owner_namespace
    );
    let mut namespaces = vec![owner.to_string()];
    namespaces.extend(
        ctx.injector()
            .config()
            .reconcile
            .grafana_namespace
            .clone()
            .filter(|g| g != owner),
    );
    let mut found = Vec::new();
    for namespace in namespaces {
        let api = Api::<DynamicObject>::namespaced_with(
            ctx.client.clone(),
            &namespace,
            &kind.api_resource(),
        );
        match api.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => found.extend(
                list.items
                    .into_iter()
                    .filter(|o| ctx.live.owner_namespace(&o.metadata).as_deref() == Some(owner)),
            ),
            // The kind is not served (no Prometheus Operator): nothing of it exists.
            Err(error) if is_not_found(&error) => {}
            Err(source) => {
                return Err(ReconcileError::Api {
                    action: "list",
                    kind: kind.kind.to_string(),
                    namespace,
                    name: String::new(),
                    source,
                });
            }
        }
    }
    Ok(found)
}

/// A namespace that is not opted in: remove everything we made for it.
async fn clean_up(namespace: &Namespace, ctx: &Context) -> Result<Action, ReconcileError> {
    let name = namespace.name_any();
    let errors = prune(&name, &HashSet::new(), ctx).await;
    uninjected::forget(&name, ctx);
    if let Err(error) = set_status(namespace, None, ctx).await {
        tracing::warn!(namespace = %name, %error, "cannot remove the namespace status");
    }
    match errors.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(resync(ctx)),
    }
}

fn current_status(namespace: &Namespace, ctx: &Context) -> Option<NamespaceStatus> {
    namespace
        .annotations()
        .get(&ctx.keys.reconcile_status)
        .and_then(|text| serde_json::from_str(text).ok())
}

/// Writes the status annotation (or removes it for `None`) unless it already says that.
async fn set_status(
    namespace: &Namespace,
    status: Option<&NamespaceStatus>,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let present = namespace
        .annotations()
        .contains_key(&ctx.keys.reconcile_status);
    // The namespace may be the watch's copy from before our last patch:
    // what we wrote over that very version counts as written.
    let unchanged = match status {
        Some(status) => {
            current_status(namespace, ctx).as_ref() == Some(status)
                || ctx.status_in_flight(namespace, status)
        }
        None => !present,
    };
    if unchanged {
        return Ok(());
    }
    let value = match status {
        Some(status) => json!(serde_json::to_string(status).expect("status serializes")),
        None => Value::Null,
    };
    let patch = json!({"metadata": {"annotations": {ctx.keys.reconcile_status.clone(): value}}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let name = namespace.name_any();
    Api::<Namespace>::all(ctx.client.clone())
        .patch(&name, &params, &Patch::Merge(&patch))
        .await
        .map(|_| ctx.remember_status(namespace, status))
        .map_err(|source| ReconcileError::Api {
            action: "patch status of",
            kind: "Namespace".into(),
            namespace: String::new(),
            name,
            source,
        })
}
