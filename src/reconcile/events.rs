//! Events whose series lives on the API server, not in this replica's memory.
//!
//! One `events.k8s.io/v1` Event per regarding object, reason, type and action
//! of our controller: a repeat patches its `series` (count and last observed
//! time). A replica that has not published an Event yet finds it with one
//! field-selected list, so a new leader after a failover continues the series
//! the old one started instead of opening a new one.

use std::{collections::HashMap, sync::Mutex};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType},
};
use serde_json::json;

/// Where cluster-scoped objects' events go, as `kubectl describe` expects.
const CLUSTER_SCOPED_EVENTS_NAMESPACE: &str = "default";

/// What makes two events one series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    namespace: String,
    api_version: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    uid: Option<String>,
    reason: String,
    type_: &'static str,
    action: String,
}

/// A series this replica published or found: its Event's name and count.
#[derive(Debug, Clone)]
struct KnownSeries {
    name: String,
    count: i32,
}

/// Publishes events as server-side series (see the module docs).
pub struct EventSeries {
    client: Client,
    controller: String,
    instance: String,
    known: Mutex<HashMap<SeriesKey, KnownSeries>>,
}

fn type_name(type_: EventType) -> &'static str {
    match type_ {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

impl EventSeries {
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        Self {
            client,
            controller: controller.to_string(),
            instance: instance.to_string(),
            known: Mutex::default(),
        }
    }

    fn key(event: &Event, regarding: &ObjectReference) -> SeriesKey {
        SeriesKey {
            namespace: regarding
                .namespace
                .clone()
                .unwrap_or_else(|| CLUSTER_SCOPED_EVENTS_NAMESPACE.into()),
            api_version: regarding.api_version.clone(),
            kind: regarding.kind.clone(),
            name: regarding.name.clone(),
            uid: regarding.uid.clone(),
            reason: event.reason.clone(),
            type_: type_name(event.type_),
            action: event.action.clone(),
        }
    }

    fn remembered(&self, key: &SeriesKey) -> Option<KnownSeries> {
        self.known.lock().ok()?.get(key).cloned()
    }

    fn remember(&self, key: SeriesKey, series: Option<KnownSeries>) {
        if let Ok(mut known) = self.known.lock() {
            match series {
                Some(series) => known.insert(key, series),
                None => known.remove(&key),
            };
        }
    }

    /// Publishes `event` about `regarding`: a repeat of a series on the server
    /// counts in it, anything else is a new Event.
    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let key = Self::key(event, regarding);
        let api = Api::<K8sEvent>::namespaced(self.client.clone(), &key.namespace);
        let existing = match self.remembered(&key) {
            Some(series) => Some(series),
            None => self.find(&api, &key).await?,
        };
        if let Some(series) = existing {
            let count = series.count.saturating_add(1);
            let patch = json!({"series": {
                "count": count,
                "lastObservedTime": MicroTime(Timestamp::now()),
            }});
            match api
                .patch(&series.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.remember(
                        key,
                        Some(KnownSeries {
                            name: series.name,
                            count,
                        }),
                    );
                    return Ok(());
                }
                // Expired (the API server's event TTL) or deleted: start anew.
                Err(kube::Error::Api(status)) if status.is_not_found() => {
                    self.remember(key.clone(), None);
                }
                Err(error) => return Err(error),
            }
        }
        let created = api
            .create(
                &PostParams::default(),
                &self.new_event(event, regarding, &key),
            )
            .await?;
        self.remember(
            key,
            Some(KnownSeries {
                name: created.name_any(),
                count: 1,
            }),
        );
        Ok(())
    }

    /// The series on the server for `key`, if any: the one counted furthest.
    async fn find(
        &self,
        api: &Api<K8sEvent>,
        key: &SeriesKey,
    ) -> Result<Option<KnownSeries>, kube::Error> {
        let mut selector = vec![
            format!("reportingController={}", self.controller),
            format!("reason={}", key.reason),
            format!("type={}", key.type_),
        ];
        for (field, value) in [
            ("regarding.kind", &key.kind),
            ("regarding.name", &key.name),
            ("regarding.uid", &key.uid),
        ] {
            if let Some(value) = value {
                selector.push(format!("{field}={value}"));
            }
        }
        let list = api
            .list(&ListParams::default().fields(&selector.join(",")))
            .await?;
        Ok(list
            .items
            .into_iter()
            .filter(|found| {
                found.action.as_deref() == Some(key.action.as_str())
                    && found
                        .regarding
                        .as_ref()
                        .and_then(|r| r.api_version.as_ref())
                        == key.api_version.as_ref()
            })
            .map(|found| KnownSeries {
                count: found.series.as_ref().map_or(1, |series| series.count),
                name: found.name_any(),
            })
            .max_by_key(|series| series.count))
    }

    fn new_event(&self, event: &Event, regarding: &ObjectReference, key: &SeriesKey) -> K8sEvent {
        let now = Timestamp::now();
        K8sEvent {
            metadata: ObjectMeta {
                namespace: Some(key.namespace.clone()),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(&self.controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            type_: Some(key.type_.into()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }
}
