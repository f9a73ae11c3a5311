//! The pods of an opted-in namespace. Those that should carry the sidecar
//! but do not (created while the webhook was down, or before the namespace
//! opted in) are reported as events, a metric and a count, and optionally
//! fixed by restarting their Deployment or StatefulSet. Those the webhook
//! skipped with a warning are reported on their owner, once per workload
//! and reason. Bare pods (no controller) are reported on their Namespace,
//! all of a namespace's in one Event per cause. Outdated ones are counted.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::{Namespace, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{DynamicObject, Patch, PatchParams},
    runtime::events::{Event, EventType},
};
use serde_json::json;

use super::{
    context::{Context, FIELD_MANAGER, ReconcileError, Workload, is_not_found, truncate},
    live::api_resource,
    pod_state::{PodCounts, PodState, classify},
};
use crate::{
    admin::metrics_labels::NamespaceLabels,
    cluster::policy_from_namespace,
    inject::{Decision, Injector, NamespacePolicy, PodContext},
};

/// The pod-template annotation `kubectl rollout restart` sets.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

/// Workload annotation recording our last restart, for the cooldown.
pub fn restarted_for_injection_key(domain: &str) -> String {
    format!("{domain}/restarted-for-injection-at")
}

/// Skip events published per namespace and reconcile, at most; the rest
/// follow at the next reconciles.
const SKIP_EVENTS_PER_RECONCILE: usize = 10;

/// How long a reconcile waits for the pod and ReplicaSet watches' first list.
const CACHE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the pods of a namespace amount to.
#[derive(Debug, Default)]
pub struct Survey {
    pub counts: PodCounts,
    /// Outdated pods by owning workload.
    pub outdated: BTreeMap<Workload, BTreeSet<String>>,
}

/// Surveys the namespace's pods: reports uninjected pods (and restarts their
/// workloads if the namespace asks), reports skipped pods on their owners;
/// bare pods on their Namespace.
pub async fn check(namespace: &Namespace, ctx: &Context) -> Result<Survey, ReconcileError> {
    let ns = namespace.name_any();
    let keys = &ctx.keys;
    let injector = ctx.injector();
    for (what, synced) in [
        ("pods", ctx.pods.pods.wait_synced(CACHE_WAIT).await),
        (
            "replicasets",
            ctx.pods.replica_sets.wait_synced(CACHE_WAIT).await,
        ),
    ] {
        if !synced {
            return Err(ReconcileError::NotSynced {
                namespace: ns.clone(),
                what,
            });
        }
    }
    let pods = ctx.pods.pods_in(&ns);
    let policy = policy_from_namespace(namespace, keys);
    let mut survey = Survey::default();
    let mut by_workload: BTreeMap<Workload, BTreeSet<String>> = BTreeMap::new();
    let mut skipped: BTreeMap<(Workload, String), Vec<&Pod>> = BTreeMap::new();
    for pod in &pods {
        let state = classify(pod, &injector, &policy);
        survey.counts.add(&state);
        match state {
            PodState::Uninjected => {
                let workload = reported_on(pod, namespace, ctx);
                by_workload
                    .entry(workload)
                    .or_default()
                    .insert(pod.name_any());
            }
            PodState::Skipped(reason) => {
                let workload = reported_on(pod, namespace, ctx);
                skipped.entry((workload, reason)).or_default().push(pod);
            }
            PodState::Outdated { .. } => {
                let workload = owning_workload(pod, &ns, ctx);
                survey
                    .outdated
                    .entry(workload)
                    .or_default()
                    .insert(pod.name_any());
            }
            PodState::Injected | PodState::Ignored => {}
        }
    }
    let labels = NamespaceLabels {
        namespace: ns.clone(),
    };
    ctx.metrics
        .uninjected_pods
        .get_or_create(&labels)
        .set(survey.counts.uninjected as i64);
    ctx.metrics
        .outdated_pods
        .get_or_create(&labels)
        .set(survey.counts.outdated as i64);

    let restart = namespace
        .annotations()
        .get(&keys.restart_uninjected)
        .is_some_and(|v| v == "true");
    let changed = ctx.update_reported(&ns, by_workload.clone());
    for (workload, pods) in &by_workload {
        if changed.contains(workload) {
            report(&ns, workload, pods, restart, ctx).await;
        }
        if restart && matches!(workload.kind.as_str(), "Deployment" | "StatefulSet") {
            restart_workload(&ns, workload, ctx).await?;
        }
    }
    let seen = skipped.keys().cloned().collect();
    for (workload, reason) in ctx.skips_to_report(&ns, &seen, SKIP_EVENTS_PER_RECONCILE) {
        let pods = &skipped[&(workload.clone(), reason.clone())];
        report_skip(&ns, &workload, &reason, pods, &injector, &policy, ctx).await;
    }
    Ok(survey)
}

/// Clears what was reported for a namespace that opted out.
pub fn forget(namespace: &str, ctx: &Context) {
    ctx.update_reported(namespace, BTreeMap::new());
    ctx.skips_to_report(namespace, &BTreeSet::new(), 0);
    let labels = NamespaceLabels {
        namespace: namespace.to_string(),
    };
    ctx.metrics.uninjected_pods.remove(&labels);
    ctx.metrics.outdated_pods.remove(&labels);
}

/// The event reason of a skip: `NotInjected` and the reason in CamelCase.
pub fn skip_event_reason(reason: &str) -> String {
    let camel: String = reason
        .split('_')
        .filter(|word| !word.is_empty())
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    format!("NotInjected{camel}")
}

/// One Warning event on the workload for one skip reason. Its note says why,
/// in the webhook's words for the first pod.
async fn report_skip(
    namespace: &str,
    workload: &Workload,
    reason: &str,
    pods: &[&Pod],
    injector: &Injector,
    policy: &NamespacePolicy,
    ctx: &Context,
) {
    let ctx_pod = PodContext {
        namespace: Some(policy),
        ..Default::default()
    };
    let why = pods
        .first()
        .and_then(|pod| match injector.mutate(*pod, ctx_pod) {
            Decision::Skip(skip) if skip.metric_label() == reason => Some(skip.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| reason.replace('_', " "));
    let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    let note = format!(
        "chiller-metrics did not inject {} ({}): {why}",
        pod_count(workload, names.len()),
        names.join(", ")
    );
    tracing::warn!(%namespace, kind = %workload.kind, name = %workload.name, reason, pods = names.len(), "pods skipped by the webhook");
    let event = Event {
        type_: EventType::Warning,
        reason: skip_event_reason(reason),
        note: Some(truncate(&note, 1000)),
        action: "Inject".into(),
        secondary: None,
    };
    if let Err(error) = ctx
        .recorder
        .publish(&event, &reference(namespace, workload))
        .await
    {
        tracing::warn!(%error, "cannot publish the skipped pods event");
    }
}

fn controller_of(references: Option<&Vec<OwnerReference>>) -> Option<&OwnerReference> {
    references?.iter().find(|r| r.controller == Some(true))
}

fn workload_from(reference: &OwnerReference) -> Workload {
    Workload {
        api_version: reference.api_version.clone(),
        kind: reference.kind.clone(),
        name: reference.name.clone(),
        uid: Some(reference.uid.clone()),
    }
}

/// What an uninjected or skipped pod is reported on: its owning workload,
/// or for a bare pod (no controller) its Namespace, so that a namespace's
/// bare pods share one Event per cause instead of one each.
fn reported_on(pod: &Pod, namespace: &Namespace, ctx: &Context) -> Workload {
    if controller_of(pod.metadata.owner_references.as_ref()).is_some() {
        return owning_workload(pod, &namespace.name_any(), ctx);
    }
    Workload {
        api_version: "v1".into(),
        kind: "Namespace".into(),
        name: namespace.name_any(),
        uid: namespace.uid(),
    }
}

fn is_namespace(workload: &Workload) -> bool {
    workload.kind == "Namespace" && workload.api_version == "v1"
}

/// "3 pod(s)", or "3 bare pod(s)" when reported on their Namespace.
fn pod_count(workload: &Workload, count: usize) -> String {
    let bare = if is_namespace(workload) { "bare " } else { "" };
    format!("{count} {bare}pod(s)")
}

/// The Deployment behind a pod's ReplicaSet, else its StatefulSet, DaemonSet,
/// ReplicaSet or other controller, else the pod itself.
fn owning_workload(pod: &Pod, namespace: &str, ctx: &Context) -> Workload {
    let Some(owner) = controller_of(pod.metadata.owner_references.as_ref()) else {
        return Workload {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: pod.name_any(),
            uid: pod.uid(),
        };
    };
    if owner.kind != "ReplicaSet" || !owner.api_version.starts_with("apps/") {
        return workload_from(owner);
    }
    ctx.pods
        .replica_set_controller(namespace, &owner.name)
        .filter(|r| r.kind == "Deployment")
        .map(|deployment| workload_from(&deployment))
        .unwrap_or_else(|| workload_from(owner))
}

/// The Event's regarding object. A Namespace is cluster-scoped: its
/// reference has no namespace, so its Events live in "default", like the
/// reconcile's other Events about a Namespace.
pub(super) fn reference(namespace: &str, workload: &Workload) -> ObjectReference {
    ObjectReference {
        api_version: Some(workload.api_version.clone()),
        kind: Some(workload.kind.clone()),
        name: Some(workload.name.clone()),
        namespace: (!is_namespace(workload)).then(|| namespace.to_string()),
        uid: workload.uid.clone(),
        ..Default::default()
    }
}

async fn report(
    namespace: &str,
    workload: &Workload,
    pods: &BTreeSet<String>,
    restart: bool,
    ctx: &Context,
) {
    let names: Vec<&str> = pods.iter().map(String::as_str).collect();
    let advice = if is_namespace(workload) {
        "a bare pod has no rollout: delete and recreate them".to_string()
    } else if restart {
        "it is restarted (at most once per cooldown) so new pods get the sidecar".to_string()
    } else {
        format!(
            "restart it, or annotate the namespace with {}: \"true\" to let chiller-metrics restart it",
            ctx.keys.restart_uninjected
        )
    };
    let note = format!(
        "{} run without the statsd exporter sidecar ({}): they were created while the injection webhook was unavailable or before the namespace opted in; {advice}",
        pod_count(workload, names.len()),
        names.join(", ")
    );
    tracing::warn!(%namespace, kind = %workload.kind, name = %workload.name, pods = names.len(), "pods without the statsd exporter sidecar");
    let event = Event {
        type_: EventType::Warning,
        reason: "PodsNotInjected".into(),
        note: Some(truncate(&note, 1000)),
        action: "CheckInjection".into(),
        secondary: None,
    };
    if let Err(error) = ctx
        .recorder
        .publish(&event, &reference(namespace, workload))
        .await
    {
        tracing::warn!(%error, "cannot publish the uninjected pods event");
    }
}

/// `kubectl rollout restart`, unless we restarted this workload within the cooldown.
async fn restart_workload(
    namespace: &str,
    workload: &Workload,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let plural = match workload.kind.as_str() {
        "Deployment" => "deployments",
        _ => "statefulsets",
    };
    let resource = api_resource(&workload.api_version, &workload.kind, plural);
    let api = Api::<DynamicObject>::namespaced_with(ctx.client.clone(), namespace, &resource);
    let api_error = |action, source| ReconcileError::Api {
        action,
        kind: workload.kind.clone(),
        namespace: namespace.to_string(),
        name: workload.name.clone(),
        source,
    };
    let Some(live) = api
        .get_opt(&workload.name)
        .await
        .map_err(|e| api_error("get", e))?
    else {
        return Ok(());
    };
    let key = restarted_for_injection_key(&ctx.injector().config().domain);
    let now = Timestamp::now();
    let last = live
        .annotations()
        .get(&key)
        .and_then(|t| t.parse::<Timestamp>().ok());
    if let Some(last) = last {
        let elapsed = now.as_second().saturating_sub(last.as_second());
        if elapsed < ctx.restart_cooldown.as_secs() as i64 {
            tracing::debug!(%namespace, name = %workload.name, "restarted recently; waiting for the cooldown");
            return Ok(());
        }
    }
    let stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let patch = json!({
        "metadata": {"annotations": {key: stamp}},
        "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}},
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api
        .patch(&workload.name, &params, &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        Err(error) if is_not_found(&error) => return Ok(()),
        Err(error) => return Err(api_error("restart", error)),
    }
    ctx.metrics.workload_restarts.inc();
    tracing::info!(%namespace, kind = %workload.kind, name = %workload.name, "restarted so its pods get the sidecar");
    let note = format!(
        "restarted by chiller-metrics so its pods get the statsd exporter sidecar; not again before {} minutes",
        ctx.restart_cooldown.as_secs() / 60
    );
    publish_restart(ctx, namespace, workload, "RestartedForInjection", note).await;
    Ok(())
}

/// A Normal event on `workload` saying chiller-metrics restarted it.
pub(super) async fn publish_restart(
    ctx: &Context,
    namespace: &str,
    workload: &Workload,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note),
        action: "Restart".into(),
        secondary: None,
    };
    if let Err(error) = ctx
        .recorder
        .publish(&event, &reference(namespace, workload))
        .await
    {
        tracing::warn!(%error, "cannot publish the restart event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_event_reasons_are_camel_case() {
        assert_eq!(skip_event_reason("host_network"), "NotInjectedHostNetwork");
        assert_eq!(
            skip_event_reason("job_needs_native_sidecar"),
            "NotInjectedJobNeedsNativeSidecar"
        );
    }
}
