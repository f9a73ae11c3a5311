//! Events whose series lives on the API server, not in this replica's memory.
//!
//! One `events.k8s.io/v1` Event per cause: regarding object, reason, type
//! and action of our controller. Its name is derived from the cause, so any
//! replica finds it: a repeat patches its `series` (count and last observed
//! time), and a new leader after a failover, whose create of that name is
//! refused as existing, reads it and counts on instead of opening a second
//! Event.

use std::{collections::HashMap, sync::Mutex};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType},
};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Where cluster-scoped objects' events go, as `kubectl describe` expects.
const CLUSTER_SCOPED_EVENTS_NAMESPACE: &str = "default";
/// Room left in a name for the cause's digest.
const NAME_PREFIX_MAX: usize = 200;

/// One cause: what makes two events one series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Cause {
    namespace: String,
    regarding: String,
    reason: String,
    type_: &'static str,
    action: String,
}

impl Cause {
    fn new(event: &Event, regarding: &ObjectReference) -> Self {
        let field = |value: &Option<String>| value.clone().unwrap_or_default();
        Self {
            namespace: regarding
                .namespace
                .clone()
                .unwrap_or_else(|| CLUSTER_SCOPED_EVENTS_NAMESPACE.into()),
            regarding: [
                field(&regarding.api_version),
                field(&regarding.kind),
                field(&regarding.namespace),
                field(&regarding.name),
                field(&regarding.uid),
            ]
            .join("/"),
            reason: event.reason.clone(),
            type_: type_name(event.type_),
            action: event.action.clone(),
        }
    }

    /// `<regarding name>.<digest of the cause>`: the same on every replica
    /// and in every version of this binary.
    fn event_name(&self, regarding_name: Option<&str>, controller: &str) -> String {
        let digest = Sha256::digest(
            [
                self.regarding.as_str(),
                &self.reason,
                self.type_,
                &self.action,
                controller,
            ]
            .join("\n"),
        );
        let prefix: String = regarding_name
            .unwrap_or(controller)
            .chars()
            .take(NAME_PREFIX_MAX)
            .collect();
        let prefix = prefix.trim_end_matches(['-', '.']);
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("{prefix}.{hex}")
    }
}

fn type_name(type_: EventType) -> &'static str {
    match type_ {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

/// Publishes events as server-side series (see the module docs).
pub struct EventSeries {
    client: Client,
    controller: String,
    instance: String,
    /// Count last written per cause, by this replica.
    counts: Mutex<HashMap<Cause, i32>>,
}

impl EventSeries {
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        Self {
            client,
            controller: controller.to_string(),
            instance: instance.to_string(),
            counts: Mutex::default(),
        }
    }

    fn remembered(&self, cause: &Cause) -> Option<i32> {
        self.counts.lock().ok()?.get(cause).copied()
    }

    fn remember(&self, cause: Cause, count: Option<i32>) {
        if let Ok(mut counts) = self.counts.lock() {
            match count {
                Some(count) => counts.insert(cause, count),
                None => counts.remove(&cause),
            };
        }
    }

    /// Publishes `event` about `regarding`: the first of its cause creates the
    /// Event, a repeat counts in its series, whoever published before.
    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let cause = Cause::new(event, regarding);
        let name = cause.event_name(regarding.name.as_deref(), &self.controller);
        let api = Api::<K8sEvent>::namespaced(self.client.clone(), &cause.namespace);
        let count = match self.remembered(&cause) {
            Some(count) => count,
            None => {
                let new = self.new_event(event, regarding, &cause, &name);
                match api.create(&PostParams::default(), &new).await {
                    Ok(_) => {
                        self.remember(cause, Some(1));
                        return Ok(());
                    }
                    // Published before, by us or a replica before us.
                    Err(kube::Error::Api(status)) if status.is_already_exists() => {
                        let existing = api.get(&name).await?;
                        existing.series.map_or(1, |series| series.count)
                    }
                    Err(error) => return Err(error),
                }
            }
        };
        let count = count.saturating_add(1);
        let mut patch = json!({
            "series": {"count": count, "lastObservedTime": MicroTime(Timestamp::now())},
        });
        if let Some(note) = &event.note {
            patch["note"] = json!(note);
        }
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.remember(cause, Some(count));
                Ok(())
            }
            // Expired (the API server's event TTL) or deleted: start anew.
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                let new = self.new_event(event, regarding, &cause, &name);
                api.create(&PostParams::default(), &new).await?;
                self.remember(cause, Some(1));
                Ok(())
            }
            Err(error) => {
                self.remember(cause, None);
                Err(error)
            }
        }
    }

    fn new_event(
        &self,
        event: &Event,
        regarding: &ObjectReference,
        cause: &Cause,
        name: &str,
    ) -> K8sEvent {
        K8sEvent {
            metadata: ObjectMeta {
                namespace: Some(cause.namespace.clone()),
                name: Some(name.to_string()),
                ..Default::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            type_: Some(cause.type_.into()),
            event_time: Some(MicroTime(Timestamp::now())),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause(reason: &str, uid: &str) -> Cause {
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: None,
            action: "Inject".into(),
            secondary: None,
        };
        let regarding = ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some("Deployment".into()),
            namespace: Some("shop".into()),
            name: Some("api".into()),
            uid: Some(uid.into()),
            ..Default::default()
        };
        Cause::new(&event, &regarding)
    }

    #[test]
    fn each_cause_has_its_own_stable_event_name() {
        let name = cause("PodsNotInjected", "u1").event_name(Some("api"), "chiller-metrics");
        assert_eq!(
            name,
            cause("PodsNotInjected", "u1").event_name(Some("api"), "chiller-metrics")
        );
        assert!(name.starts_with("api."), "{name}");
        assert_eq!(name.len(), "api.".len() + 16);
        assert_ne!(
            name,
            cause("PodsSkipped", "u1").event_name(Some("api"), "chiller-metrics")
        );
        assert_ne!(
            name,
            cause("PodsNotInjected", "u2").event_name(Some("api"), "chiller-metrics"),
            "a recreated Deployment is another object"
        );
    }

    #[test]
    fn long_names_stay_valid_object_names() {
        let long = format!("{}-x", "a".repeat(NAME_PREFIX_MAX - 1));
        let name = cause("PodsNotInjected", "u1").event_name(Some(&long), "chiller-metrics");
        assert!(name.len() <= 253);
        assert!(!name.contains("-."), "{name}");
    }
}
