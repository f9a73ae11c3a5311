//! The pods of every namespace and the owners of every ReplicaSet, as
//! kube-runtime reflector stores fed by watches: a reconcile reads them
//! instead of listing pods or getting ReplicaSets.
//!
//! A pod is stored stripped to what `pod_state::classify` and the injector's
//! decision read (see `inject::view`): its identity, labels, owner
//! references, deletion mark, the annotations of ours the decision reads,
//! the containers' names, command, args, env, ports and mounts, volume
//! names, `hostNetwork`, `os`, `restartPolicy` and the phase, and held as
//! compact JSON ([`StoredPod`]). An injected pod keeps no spec, and of its
//! status annotation only the config hash: nothing reads more of it.
//! ReplicaSets are watched as metadata only and stored as their owner
//! references.

use std::borrow::Cow;

use k8s_openapi::{
    api::{
        apps::v1::ReplicaSet,
        core::v1::{Container, EnvFromSource, EnvVarSource, Pod, PodSpec, PodStatus, Volume},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Resource,
    core::PartialObjectMeta,
    runtime::{reflector::ObjectRef, watcher},
};

use super::{live::Reflected, pod_state::recorded_config_hash_of};
use crate::keys::{self, Keys};

/// Objects per page of a watch's list: the list never holds many full
/// objects in memory at once.
pub const LIST_PAGE_SIZE: u32 = 100;

/// Pods and ReplicaSet owners; shared by every reconcile.
#[derive(Debug)]
pub struct PodCache {
    pub pods: Reflected<StoredPod>,
    pub replica_sets: Reflected<PartialObjectMeta<ReplicaSet>>,
    /// Pod annotations kept: those the decision reads.
    annotations: Vec<String>,
    /// The injected label and the status annotation (see `strip_pod`).
    injected_label: String,
    status_annotation: String,
}

impl PodCache {
    pub fn new(keys: &Keys) -> Self {
        Self {
            pods: Reflected::new(()),
            replica_sets: Reflected::new(()),
            annotations: vec![
                keys.status.clone(),
                keys.skipped.clone(),
                keys.inject.clone(),
                keys.containers.clone(),
                keys.statsd_prefix.clone(),
                keys::DEFAULT_CONTAINER.to_string(),
            ],
            injected_label: keys.injected.clone(),
            status_annotation: keys.status.clone(),
        }
    }

    /// The pods of `namespace`, sorted by name.
    pub fn pods_in(&self, namespace: &str) -> Vec<Pod> {
        let mut pods: Vec<Pod> = self
            .pods
            .store()
            .state_filter(|pod| pod.metadata.namespace.as_deref() == Some(namespace))
            .iter()
            .map(|stored| stored.pod())
            .collect();
        pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        pods
    }

    /// Applies one event of the (stripped) pod watch to the store.
    pub fn apply(&self, event: &watcher::Event<Pod>) {
        let stored = match event {
            watcher::Event::Apply(pod) => watcher::Event::Apply(StoredPod::new(pod)),
            watcher::Event::InitApply(pod) => watcher::Event::InitApply(StoredPod::new(pod)),
            watcher::Event::Delete(pod) => watcher::Event::Delete(StoredPod::new(pod)),
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitDone => watcher::Event::InitDone,
        };
        self.pods.apply(&stored);
    }

    /// The controller of a ReplicaSet, `None` if it has none or is unknown.
    pub fn replica_set_controller(&self, namespace: &str, name: &str) -> Option<OwnerReference> {
        let replica_set = self
            .replica_sets
            .store()
            .get(&ObjectRef::new(name).within(namespace))?;
        replica_set
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true))
            .cloned()
    }

    /// Strips a pod to what is read of it (see the module docs).
    pub fn strip_pod(&self, pod: &mut Pod) {
        let meta = std::mem::take(&mut pod.metadata);
        let annotations = meta.annotations.map(|mut all| {
            all.retain(|key, _| self.annotations.contains(key));
            all
        });
        pod.metadata = ObjectMeta {
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            resource_version: meta.resource_version,
            labels: meta.labels,
            annotations: annotations.filter(|a| !a.is_empty()),
            owner_references: meta.owner_references,
            deletion_timestamp: meta.deletion_timestamp,
            ..Default::default()
        };
        pod.spec = pod.spec.take().map(|spec| PodSpec {
            containers: spec.containers.into_iter().map(strip_container).collect(),
            init_containers: spec
                .init_containers
                .map(|all| all.into_iter().map(strip_container).collect()),
            volumes: spec.volumes.map(|all| {
                all.into_iter()
                    .map(|volume| Volume {
                        name: volume.name,
                        ..Default::default()
                    })
                    .collect()
            }),
            host_network: spec.host_network,
            os: spec.os,
            restart_policy: spec.restart_policy,
            ..Default::default()
        });
        pod.status = pod.status.take().map(|status| PodStatus {
            phase: status.phase,
            ..Default::default()
        });
        let injected = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(&self.injected_label))
            .is_some_and(|value| value == "true");
        if injected {
            // Classified by its label, config hash, phase and deletion, and
            // reported by its owners (`pod_state::classify`): an injected
            // pod keeps no spec, and of its status only the config hash.
            pod.spec = None;
            if let Some(status) = pod
                .metadata
                .annotations
                .as_mut()
                .and_then(|all| all.get_mut(&self.status_annotation))
                && let Some(hash) = recorded_config_hash_of(status)
            {
                *status = serde_json::json!({ "configHash": hash }).to_string();
            }
        }
    }
}

/// A stripped pod as the store holds it: its identity, for the store's key,
/// and the whole stripped pod as compact JSON, decoded when a reconcile
/// reads its namespace. A typed `Pod` is mostly empty fields held inline
/// (a `Container` is over 2 KB before any of its values): the injected
/// chiller API pod took 18.8 KB stored typed, and 2.7 KB so
/// (`cargo bench --bench cache_memory`).
#[derive(Debug, Clone)]
pub struct StoredPod {
    /// Name, namespace, resourceVersion and uid only.
    pub metadata: ObjectMeta,
    json: Box<str>,
}

impl StoredPod {
    pub fn new(pod: &Pod) -> Self {
        Self {
            metadata: ObjectMeta {
                name: pod.metadata.name.clone(),
                namespace: pod.metadata.namespace.clone(),
                resource_version: pod.metadata.resource_version.clone(),
                uid: pod.metadata.uid.clone(),
                ..Default::default()
            },
            json: serde_json::to_string(pod)
                .expect("a Pod serializes")
                .into_boxed_str(),
        }
    }

    /// The stripped pod.
    pub fn pod(&self) -> Pod {
        serde_json::from_str(&self.json).expect("a stored pod is a Pod")
    }
}

impl Resource for StoredPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Pod::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        Pod::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        Pod::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        Pod::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Strips a ReplicaSet to its identity and owner references.
pub fn strip_replica_set(replica_set: &mut PartialObjectMeta<ReplicaSet>) {
    let meta = std::mem::take(&mut replica_set.metadata);
    replica_set.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        resource_version: meta.resource_version,
        owner_references: meta.owner_references,
        ..Default::default()
    };
}

fn strip_container(container: Container) -> Container {
    Container {
        name: container.name,
        restart_policy: container.restart_policy,
        command: container.command,
        args: container.args,
        env: container.env.map(|env| {
            env.into_iter()
                .map(|mut var| {
                    // Only whether it is set is read.
                    var.value_from = var.value_from.map(|_| EnvVarSource::default());
                    var
                })
                .collect()
        }),
        env_from: container
            .env_from
            .map(|all| all.into_iter().map(|_| EnvFromSource::default()).collect()),
        ports: container.ports,
        volume_mounts: container.volume_mounts.map(|all| {
            all.into_iter()
                .map(|mount| k8s_openapi::api::core::v1::VolumeMount {
                    name: mount.name,
                    mount_path: mount.mount_path,
                    ..Default::default()
                })
                .collect()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        config::Config,
        inject::{Injector, NamespacePolicy, ResolvedMode},
        reconcile::pod_state::{classify, recorded_config_hash},
    };

    fn pod(
        labels: serde_json::Value,
        annotations: serde_json::Value,
        spec: serde_json::Value,
    ) -> Pod {
        let mut full_spec = json!({"containers": [{
            "name": "app", "image": "app:1", "imagePullPolicy": "Always",
            "command": ["gunicorn"], "args": ["app:app"],
            "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            "envFrom": [{"configMapRef": {"name": "settings"}}],
            "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
            "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": true}],
            "resources": {"limits": {"memory": "128Mi"}},
        }],
        "volumes": [{"name": "data", "emptyDir": {}}],
        "nodeName": "node-1"});
        full_spec
            .as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "shop", "uid": "u1",
                         "labels": labels, "annotations": annotations,
                         "managedFields": [{"manager": "kubectl", "operation": "Update"}]},
            "spec": full_spec,
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]},
        }))
        .unwrap()
    }

    #[test]
    fn a_stripped_pod_is_classified_as_the_full_pod_and_keeps_nothing_else() {
        let keys = Keys::default();
        let cache = PodCache::new(&keys);
        let injector = Injector::new(Config::default(), ResolvedMode::Native);
        let policy = NamespacePolicy::default();
        let current = injector.hashes().config.clone();
        let status = json!({"version": "0.1.0", "configHash": current}).to_string();
        let pods = [
            pod(json!({}), json!({}), json!({})),
            pod(
                json!({"metrics.chiller.io/injected": "true"}),
                json!({"metrics.chiller.io/status": status, "metrics.chiller.io/mapping": "mappings: []"}),
                json!({}),
            ),
            pod(
                json!({"metrics.chiller.io/injected": "true"}),
                json!({"metrics.chiller.io/status": json!({"version": "0.1.0", "configHash": "older"}).to_string()}),
                json!({}),
            ),
            pod(
                json!({"metrics.chiller.io/injected": "true"}),
                json!({}),
                json!({}),
            ),
            pod(
                json!({}),
                json!({"metrics.chiller.io/skipped": "host_network"}),
                json!({"hostNetwork": true}),
            ),
            pod(json!({}), json!({}), json!({"hostNetwork": true})),
            pod(
                json!({}),
                json!({"metrics.chiller.io/inject": "false"}),
                json!({}),
            ),
            pod(
                json!({}),
                json!({"metrics.chiller.io/containers": "missing"}),
                json!({}),
            ),
            pod(
                json!({}),
                json!({}),
                json!({"restartPolicy": "Never", "os": {"name": "windows"}}),
            ),
        ];
        for full in pods {
            let mut stripped = full.clone();
            cache.strip_pod(&mut stripped);
            assert_eq!(
                StoredPod::new(&stripped).pod(),
                stripped,
                "stored as it was"
            );
            assert_eq!(
                classify(&stripped, &injector, &policy),
                classify(&full, &injector, &policy),
                "{full:?}"
            );
            assert!(stripped.metadata.managed_fields.is_none());
            let annotations = stripped.metadata.annotations.unwrap_or_default();
            assert!(!annotations.contains_key("metrics.chiller.io/mapping"));
            let injected = stripped
                .metadata
                .labels
                .as_ref()
                .is_some_and(|labels| labels.contains_key("metrics.chiller.io/injected"));
            if injected {
                assert!(stripped.spec.is_none(), "an injected pod keeps no spec");
                let recorded = recorded_config_hash(&full, "metrics.chiller.io/status");
                assert_eq!(
                    annotations.get("metrics.chiller.io/status"),
                    recorded
                        .map(|hash| json!({"configHash": hash}).to_string())
                        .as_ref(),
                    "of the status only the config hash"
                );
                continue;
            }
            let spec = stripped.spec.unwrap();
            assert!(spec.node_name.is_none());
            assert!(spec.containers[0].image.is_none());
            assert!(spec.containers[0].resources.is_none());
            assert!(stripped.status.unwrap().conditions.is_none());
        }
    }
}
