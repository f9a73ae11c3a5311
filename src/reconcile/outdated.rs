//! Rollout of workloads whose pods run an outdated sidecar, for namespaces
//! annotated `<domain>/rollout-outdated: "true"`: like `kubectl rollout
//! restart`, one workload at a time, each only once per config (the workload
//! records the config hash it was restarted for), waiting until the restarted
//! one is available again; a restart that does not become available within
//! the timeout stops the rollout with an error.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, ResourceExt,
    api::{DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};

use super::{
    context::{Context, FIELD_MANAGER, ReconcileError, Workload, is_not_found},
    live::api_resource,
    uninjected::{RESTARTED_AT, publish_restart},
};

/// Kinds a rollout restart applies to.
pub fn restartable(workload: &Workload) -> bool {
    workload.api_version == "apps/v1"
        && matches!(workload.kind.as_str(), "Deployment" | "StatefulSet")
}

/// How often a rollout in progress is looked at again.
pub const ROLLOUT_POLL: Duration = Duration::from_secs(5);

/// A workload with outdated pods, as read from the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub workload: Workload,
    /// The config hash it was last restarted for, and when.
    pub restarted_for: Option<(String, Timestamp)>,
    pub available: bool,
}

/// What to do next in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing left to restart for this config.
    Done,
    /// A restart is rolling out; look again later.
    Wait(Workload),
    /// Restart this one now.
    Restart(Workload),
    /// A restart did not become available in time: stop.
    Stuck {
        workload: Workload,
        since: Timestamp,
    },
}

/// The next step, given the candidates in a stable order. A workload is never
/// restarted twice for the same `config_hash`.
pub fn next_step(
    candidates: &[Candidate],
    config_hash: &str,
    now: Timestamp,
    timeout: Duration,
) -> Step {
    for candidate in candidates {
        if let Some((hash, at)) = &candidate.restarted_for
            && hash == config_hash
            && !candidate.available
        {
            let elapsed = now.as_second().saturating_sub(at.as_second());
            if elapsed > timeout.as_secs() as i64 {
                return Step::Stuck {
                    workload: candidate.workload.clone(),
                    since: *at,
                };
            }
            return Step::Wait(candidate.workload.clone());
        }
    }
    candidates
        .iter()
        .find(|c| {
            c.restarted_for
                .as_ref()
                .is_none_or(|(hash, _)| hash != config_hash)
        })
        .map_or(Step::Done, |c| Step::Restart(c.workload.clone()))
}

/// Whether a Deployment or StatefulSet finished rolling out, as `kubectl
/// rollout status` judges it.
pub fn rolled_out(kind: &str, object: &Value) -> bool {
    let int = |value: &Value| value.as_i64().unwrap_or(0);
    let generation = int(&object["metadata"]["generation"]);
    let status = &object["status"];
    if int(&status["observedGeneration"]) < generation {
        return false;
    }
    let wanted = object["spec"]["replicas"].as_i64().unwrap_or(1);
    let updated = int(&status["updatedReplicas"]);
    match kind {
        "Deployment" => {
            updated == wanted
                && int(&status["replicas"]) == updated
                && int(&status["availableReplicas"]) == updated
        }
        _ => {
            updated == wanted
                && int(&status["readyReplicas"]) == wanted
                && status["currentRevision"] == status["updateRevision"]
        }
    }
}

fn plural(kind: &str) -> &'static str {
    match kind {
        "Deployment" => "deployments",
        _ => "statefulsets",
    }
}

fn api_for(ctx: &Context, namespace: &str, workload: &Workload) -> Api<DynamicObject> {
    let resource = api_resource(
        &workload.api_version,
        &workload.kind,
        plural(&workload.kind),
    );
    Api::namespaced_with(ctx.client.clone(), namespace, &resource)
}

fn api_error(
    action: &'static str,
    namespace: &str,
    workload: &Workload,
    source: kube::Error,
) -> ReconcileError {
    ReconcileError::Api {
        action,
        kind: workload.kind.clone(),
        namespace: namespace.to_string(),
        name: workload.name.clone(),
        source,
    }
}

/// Takes one step of the namespace's rollout; returns when to look again
/// (`None`: nothing in progress).
pub async fn roll(
    namespace: &str,
    outdated: &BTreeMap<Workload, std::collections::BTreeSet<String>>,
    ctx: &Context,
) -> Result<Option<Duration>, ReconcileError> {
    let keys = &ctx.keys;
    let injector = ctx.injector();
    let config_hash = injector.hashes().config.as_str();
    let timeout = Duration::from_secs(injector.config().reconcile.rollout_timeout_seconds);
    let mut candidates = Vec::new();
    for workload in outdated.keys().filter(|w| restartable(w)) {
        let Some(live) = api_for(ctx, namespace, workload)
            .get_opt(&workload.name)
            .await
            .map_err(|e| api_error("get", namespace, workload, e))?
        else {
            continue;
        };
        let annotations = live.annotations();
        let restarted_for = annotations
            .get(&keys.restarted_for_config)
            .zip(
                annotations
                    .get(&keys.restarted_for_config_at)
                    .and_then(|t| t.parse::<Timestamp>().ok()),
            )
            .map(|(hash, at)| (hash.clone(), at));
        let value = serde_json::to_value(&live).unwrap_or(Value::Null);
        candidates.push(Candidate {
            workload: workload.clone(),
            restarted_for,
            available: rolled_out(&workload.kind, &value),
        });
    }
    match next_step(&candidates, config_hash, Timestamp::now(), timeout) {
        Step::Done => Ok(None),
        Step::Wait(workload) => {
            tracing::debug!(%namespace, name = %workload.name, "waiting for the restarted workload");
            Ok(Some(ROLLOUT_POLL))
        }
        Step::Stuck { workload, since } => Err(ReconcileError::RolloutStuck {
            namespace: namespace.to_string(),
            kind: workload.kind,
            name: workload.name,
            since: since.to_string(),
            timeout_seconds: timeout.as_secs(),
        }),
        Step::Restart(workload) => {
            restart(namespace, &workload, config_hash, ctx).await?;
            Ok(Some(ROLLOUT_POLL))
        }
    }
}

async fn restart(
    namespace: &str,
    workload: &Workload,
    config_hash: &str,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let keys = &ctx.keys;
    let stamp = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let patch = json!({
        "metadata": {"annotations": {
            keys.restarted_for_config.clone(): config_hash,
            keys.restarted_for_config_at.clone(): stamp,
        }},
        "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}},
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api_for(ctx, namespace, workload)
        .patch(&workload.name, &params, &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        Err(error) if is_not_found(&error) => return Ok(()),
        Err(error) => return Err(api_error("restart", namespace, workload, error)),
    }
    ctx.metrics.outdated_restarts.inc();
    tracing::info!(%namespace, kind = %workload.kind, name = %workload.name, config_hash, "restarted so its pods get the current sidecar config");
    let note = format!(
        "restarted by chiller-metrics ({}=true) so its pods get the statsd exporter sidecar of config {config_hash}; not restarted again for this config",
        keys.rollout_outdated
    );
    publish_restart(ctx, namespace, workload, "RestartedForConfig", note).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(name: &str) -> Workload {
        Workload {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: name.into(),
            uid: None,
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn candidate(name: &str, restarted_for: Option<(&str, i64)>, available: bool) -> Candidate {
        Candidate {
            workload: deployment(name),
            restarted_for: restarted_for.map(|(hash, second)| (hash.to_string(), at(second))),
            available,
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(600);

    #[test]
    fn one_workload_at_a_time_and_never_twice_for_a_config() {
        let step = |candidates: &[Candidate], now| next_step(candidates, "new", at(now), TIMEOUT);
        // Nothing restarted yet: the first one.
        let fresh = [
            candidate("a", None, true),
            candidate("b", Some(("old", 0)), true),
        ];
        assert_eq!(step(&fresh, 1000), Step::Restart(deployment("a")));
        // a rolls out: wait, b is not touched meanwhile.
        let rolling = [
            candidate("a", Some(("new", 1000)), false),
            candidate("b", None, true),
        ];
        assert_eq!(step(&rolling, 1100), Step::Wait(deployment("a")));
        // a is available: b next (restarted for an older config only).
        let next = [
            candidate("a", Some(("new", 1000)), true),
            candidate("b", Some(("old", 0)), true),
        ];
        assert_eq!(step(&next, 1200), Step::Restart(deployment("b")));
        // Both restarted for this config: never again, even with outdated pods left.
        let done = [
            candidate("a", Some(("new", 1000)), true),
            candidate("b", Some(("new", 1200)), true),
        ];
        assert_eq!(step(&done, 5000), Step::Done);
        assert_eq!(step(&[], 5000), Step::Done);
    }

    #[test]
    fn a_restart_that_does_not_become_available_stops_the_rollout() {
        let stuck = [
            candidate("a", Some(("new", 1000)), false),
            candidate("b", None, true),
        ];
        assert_eq!(
            next_step(&stuck, "new", at(1000 + 601), TIMEOUT),
            Step::Stuck {
                workload: deployment("a"),
                since: at(1000)
            }
        );
        assert_eq!(
            next_step(&stuck, "new", at(1000 + 600), TIMEOUT),
            Step::Wait(deployment("a"))
        );
        // Not available but restarted for an older config: restarted again.
        let old = [candidate("a", Some(("old", 1000)), false)];
        assert_eq!(
            next_step(&old, "new", at(99_999), TIMEOUT),
            Step::Restart(deployment("a"))
        );
    }

    #[test]
    fn rolled_out_follows_kubectl_rollout_status() {
        let deployment = |observed: i64, updated: i64, replicas: i64, available: i64| {
            json!({
                "metadata": {"generation": 3},
                "spec": {"replicas": 2},
                "status": {"observedGeneration": observed, "updatedReplicas": updated, "replicas": replicas, "availableReplicas": available},
            })
        };
        assert!(rolled_out("Deployment", &deployment(3, 2, 2, 2)));
        assert!(
            !rolled_out("Deployment", &deployment(2, 2, 2, 2)),
            "not observed yet"
        );
        assert!(
            !rolled_out("Deployment", &deployment(3, 1, 2, 2)),
            "not all updated"
        );
        assert!(
            !rolled_out("Deployment", &deployment(3, 2, 3, 2)),
            "an old pod remains"
        );
        assert!(
            !rolled_out("Deployment", &deployment(3, 2, 2, 1)),
            "not all available"
        );
        let set = |current: &str, ready: i64| {
            json!({
                "metadata": {"generation": 1},
                "spec": {"replicas": 1},
                "status": {"observedGeneration": 1, "updatedReplicas": 1, "readyReplicas": ready, "currentRevision": current, "updateRevision": "r2"},
            })
        };
        assert!(rolled_out("StatefulSet", &set("r2", 1)));
        assert!(!rolled_out("StatefulSet", &set("r1", 1)));
        assert!(!rolled_out("StatefulSet", &set("r2", 0)));
    }
}
