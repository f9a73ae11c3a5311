//! What a pod of an opted-in namespace is, as far as injection goes: a pure
//! decision, counted in the namespace status.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde::Serialize;
use serde_json::Value;

use crate::inject::{Decision, Injector, NamespacePolicy, PodContext};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Injected with the current config.
    Injected,
    /// Injected with another config (hash differs, or none recorded).
    Outdated { recorded: Option<String> },
    /// Skipped by the webhook for a reason worth a warning (the pod's
    /// `…/skipped` annotation).
    Skipped(String),
    /// Should carry the sidecar and does not.
    Uninjected,
    /// Not our business: opted out, not selected, finished or going away.
    Ignored,
}

/// The config hash recorded in a pod's status annotation.
pub fn recorded_config_hash(pod: &Pod, status_key: &str) -> Option<String> {
    recorded_config_hash_of(pod.annotations().get(status_key)?)
}

/// The config hash in the text of a status annotation.
pub fn recorded_config_hash_of(status: &str) -> Option<String> {
    let status: Value = serde_json::from_str(status).ok()?;
    status
        .get("configHash")
        .and_then(Value::as_str)
        .map(str::to_string)
}

pub fn classify(pod: &Pod, injector: &Injector, policy: &NamespacePolicy) -> PodState {
    let keys = injector.keys();
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| matches!(phase, "Succeeded" | "Failed"));
    if finished || pod.metadata.deletion_timestamp.is_some() {
        return PodState::Ignored;
    }
    if pod
        .labels()
        .get(&keys.injected)
        .is_some_and(|v| v == "true")
    {
        let recorded = recorded_config_hash(pod, &keys.status);
        return if recorded.as_deref() == Some(injector.hashes().config.as_str()) {
            PodState::Injected
        } else {
            PodState::Outdated { recorded }
        };
    }
    if let Some(reason) = pod.annotations().get(&keys.skipped) {
        return PodState::Skipped(reason.clone());
    }
    let ctx = PodContext {
        namespace: Some(policy),
        ..Default::default()
    };
    match injector.mutate(pod, ctx) {
        Decision::Inject { .. } => PodState::Uninjected,
        Decision::Skip(_) => PodState::Ignored,
    }
}

/// The pod counts of the namespace status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PodCounts {
    pub injected: usize,
    pub outdated: usize,
    pub uninjected: usize,
    pub skipped: BTreeMap<String, usize>,
}

impl PodCounts {
    pub fn add(&mut self, state: &PodState) {
        match state {
            PodState::Injected => self.injected += 1,
            PodState::Outdated { .. } => {
                self.injected += 1;
                self.outdated += 1;
            }
            PodState::Skipped(reason) => *self.skipped.entry(reason.clone()).or_default() += 1,
            PodState::Uninjected => self.uninjected += 1,
            PodState::Ignored => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{config::Config, inject::ResolvedMode};

    fn pod(labels: Value, annotations: Value, extra_spec: Value) -> Pod {
        let mut spec = json!({"containers": [{"name": "app", "image": "app:1"}]});
        spec.as_object_mut()
            .unwrap()
            .extend(extra_spec.as_object().unwrap().clone());
        serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": labels, "annotations": annotations},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn pods_are_told_apart() {
        let injector = Injector::new(Config::default(), ResolvedMode::Native);
        let policy = NamespacePolicy::default();
        let current = injector.hashes().config.clone();
        let status = |hash: &str| json!({"metrics.chiller.io/status": json!({"version": "0.1.0", "configHash": hash}).to_string()});
        let injected = json!({"metrics.chiller.io/injected": "true"});
        let classify = |pod: &Pod| classify(pod, &injector, &policy);

        assert_eq!(
            classify(&pod(injected.clone(), status(&current), json!({}))),
            PodState::Injected
        );
        assert_eq!(
            classify(&pod(injected.clone(), status("0123456789"), json!({}))),
            PodState::Outdated {
                recorded: Some("0123456789".into())
            }
        );
        assert_eq!(
            classify(&pod(
                injected,
                json!({"metrics.chiller.io/status": "{\"version\":\"0.0.9\"}"}),
                json!({})
            )),
            PodState::Outdated { recorded: None },
            "injected before hashes existed"
        );
        assert_eq!(
            classify(&pod(
                json!({}),
                json!({"metrics.chiller.io/skipped": "host_network"}),
                json!({"hostNetwork": true})
            )),
            PodState::Skipped("host_network".into())
        );
        assert_eq!(
            classify(&pod(json!({}), json!({}), json!({}))),
            PodState::Uninjected
        );
        assert_eq!(
            classify(&pod(
                json!({}),
                json!({"metrics.chiller.io/inject": "false"}),
                json!({})
            )),
            PodState::Ignored
        );
        let mut finished = pod(json!({}), json!({}), json!({}));
        finished.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        assert_eq!(classify(&finished), PodState::Ignored);
    }

    #[test]
    fn outdated_pods_count_as_injected_too() {
        let mut counts = PodCounts::default();
        for state in [
            PodState::Injected,
            PodState::Outdated { recorded: None },
            PodState::Skipped("host_network".into()),
            PodState::Skipped("host_network".into()),
            PodState::Skipped("windows_pod".into()),
            PodState::Uninjected,
            PodState::Ignored,
        ] {
            counts.add(&state);
        }
        assert_eq!(
            counts,
            PodCounts {
                injected: 2,
                outdated: 1,
                uninjected: 1,
                skipped: [("host_network".into(), 2), ("windows_pod".into(), 1)].into(),
            }
        );
    }
}
