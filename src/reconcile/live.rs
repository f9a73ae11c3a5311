//! What exists in the cluster: a cache of every object we manage, fed by one
//! label-filtered watch per kind, read by the reconciler instead of GETs.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, RwLock},
};

use kube::{
    ResourceExt,
    api::{ApiResource, DynamicObject},
    runtime::watcher,
};

use crate::keys::{self, Keys};

/// The one field manager of every write.
pub const FIELD_MANAGER: &str = "chiller-metrics";

/// A kind the reconciler creates, and therefore watches and cleans up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ManagedKind {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

impl ManagedKind {
    pub fn api_resource(&self) -> ApiResource {
        api_resource(self.api_version, self.kind, self.plural)
    }

    /// Served by the Prometheus Operator CRDs rather than the API server itself.
    pub fn is_prometheus_operator(&self) -> bool {
        self.api_version.starts_with(PROMETHEUS_OPERATOR_GROUP)
    }
}

/// API group of the Prometheus Operator CRDs.
pub const PROMETHEUS_OPERATOR_GROUP: &str = "monitoring.coreos.com";

/// Every kind `desired::desired_objects` can produce.
pub const MANAGED_KINDS: &[ManagedKind] = &[
    ManagedKind {
        api_version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
    },
    ManagedKind {
        api_version: "v1",
        kind: "Service",
        plural: "services",
    },
    ManagedKind {
        api_version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
    },
    ManagedKind {
        api_version: "rbac.authorization.k8s.io/v1",
        kind: "Role",
        plural: "roles",
    },
    ManagedKind {
        api_version: "rbac.authorization.k8s.io/v1",
        kind: "RoleBinding",
        plural: "rolebindings",
    },
    ManagedKind {
        api_version: "apps/v1",
        kind: "Deployment",
        plural: "deployments",
    },
    ManagedKind {
        api_version: "monitoring.coreos.com/v1",
        kind: "Prometheus",
        plural: "prometheuses",
    },
    ManagedKind {
        api_version: "monitoring.coreos.com/v1",
        kind: "ServiceMonitor",
        plural: "servicemonitors",
    },
];

/// The managed kind with this apiVersion and kind.
pub fn managed_kind(api_version: &str, kind: &str) -> Option<&'static ManagedKind> {
    MANAGED_KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.kind == kind)
}

/// An [`ApiResource`] from apiVersion (`group/version` or `v1`), kind and plural.
pub fn api_resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        plural: plural.to_string(),
    }
}

/// Whether our field manager applied (server-side) some of the object's fields.
pub fn applied_by_us(object: &DynamicObject) -> bool {
    object
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|entry| {
            entry.manager.as_deref() == Some(FIELD_MANAGER)
                && entry.operation.as_deref() == Some("Apply")
        })
}

/// The label selector of every watch: only objects we manage.
pub fn managed_selector() -> String {
    format!("{}={}", keys::MANAGED_BY_KEY, keys::MANAGED_BY)
}

type Objects = HashMap<(String, String), Arc<DynamicObject>>;

#[derive(Debug, Default)]
struct KindCache {
    objects: Objects,
    /// Objects of a relist in progress (between `Init` and `InitDone`).
    relisting: Option<Objects>,
    /// The first list completed: a missing object is really missing.
    synced: bool,
}

/// The cache; clones share it.
#[derive(Debug, Clone)]
pub struct LiveCache {
    owner_label: String,
    kinds: Arc<RwLock<HashMap<ManagedKind, KindCache>>>,
}

fn key(object: &DynamicObject) -> (String, String) {
    (object.namespace().unwrap_or_default(), object.name_any())
}

impl LiveCache {
    pub fn new(keys: &Keys) -> Self {
        Self {
            owner_label: keys.owner_namespace.clone(),
            kinds: Arc::default(),
        }
    }

    /// The app namespace an object of ours serves, from its owner-namespace label,
    /// if it is also labeled managed-by us and was applied by us. Labels
    /// alone can be copied: a look-alike someone else made is never ours.
    pub fn owner_namespace(&self, object: &DynamicObject) -> Option<String> {
        let labels = object.labels();
        (labels.get(keys::MANAGED_BY_KEY).map(String::as_str) == Some(keys::MANAGED_BY)
            && applied_by_us(object))
        .then(|| labels.get(&self.owner_label).cloned())
        .flatten()
    }

    /// Applies one watch event; returns the owner namespaces it concerns,
    /// which need a reconcile.
    pub fn apply_event(
        &self,
        kind: ManagedKind,
        event: watcher::Event<DynamicObject>,
    ) -> BTreeSet<String> {
        let mut kinds = self.kinds.write().expect("live cache lock poisoned");
        let cache = kinds.entry(kind).or_default();
        let mut touched = BTreeSet::new();
        match event {
            watcher::Event::Apply(object) => {
                touched.extend(self.owner_namespace(&object));
                let previous = cache.objects.insert(key(&object), Arc::new(object));
                touched.extend(previous.and_then(|p| self.owner_namespace(&p)));
            }
            watcher::Event::Delete(object) => {
                touched.extend(self.owner_namespace(&object));
                cache.objects.remove(&key(&object));
            }
            watcher::Event::Init => cache.relisting = Some(Objects::new()),
            watcher::Event::InitApply(object) => {
                cache
                    .relisting
                    .get_or_insert_with(Objects::new)
                    .insert(key(&object), Arc::new(object));
            }
            watcher::Event::InitDone => {
                let fresh = cache.relisting.take().unwrap_or_default();
                let old = std::mem::replace(&mut cache.objects, fresh);
                cache.synced = true;
                touched.extend(
                    old.values()
                        .chain(cache.objects.values())
                        .filter_map(|o| self.owner_namespace(o)),
                );
            }
        }
        touched
    }

    /// Replaces everything known about `kind` with `objects`, as a completed list.
    pub fn sync_kind(&self, kind: ManagedKind, objects: Vec<DynamicObject>) {
        self.apply_event(kind, watcher::Event::Init);
        for object in objects {
            self.apply_event(kind, watcher::Event::InitApply(object));
        }
        self.apply_event(kind, watcher::Event::InitDone);
    }

    /// Whether the first list of `kind` completed.
    pub fn is_synced(&self, kind: ManagedKind) -> bool {
        self.kinds
            .read()
            .expect("live cache lock poisoned")
            .get(&kind)
            .is_some_and(|c| c.synced)
    }

    /// The cached object, `None` if absent (meaningful only when synced).
    pub fn get(
        &self,
        kind: ManagedKind,
        namespace: &str,
        name: &str,
    ) -> Option<Arc<DynamicObject>> {
        self.kinds
            .read()
            .expect("live cache lock poisoned")
            .get(&kind)
            .and_then(|c| {
                c.objects
                    .get(&(namespace.to_string(), name.to_string()))
                    .cloned()
            })
    }

    /// Objects of `kind` labeled managed-by us and owned by `owner_namespace`,
    /// wherever they live.
    pub fn owned_by(&self, kind: ManagedKind, owner_namespace: &str) -> Vec<Arc<DynamicObject>> {
        let mut found: Vec<_> = self
            .kinds
            .read()
            .expect("live cache lock poisoned")
            .get(&kind)
            .map(|c| {
                c.objects
                    .values()
                    .filter(|o| self.owner_namespace(o).as_deref() == Some(owner_namespace))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        found.sort_by_key(|o| key(o));
        found
    }

    /// Forgets everything (on losing leadership).
    pub fn clear(&self) {
        self.kinds
            .write()
            .expect("live cache lock poisoned")
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(name: &str, owner: Option<&str>, managed: bool) -> DynamicObject {
        let keys = Keys::default();
        let mut labels = serde_json::Map::new();
        if managed {
            labels.insert(keys::MANAGED_BY_KEY.into(), json!(keys::MANAGED_BY));
        }
        if let Some(owner) = owner {
            labels.insert(keys.owner_namespace.clone(), json!(owner));
        }
        let managed_fields = if managed {
            json!([{"manager": "chiller-metrics", "operation": "Apply", "apiVersion": "v1"}])
        } else {
            json!([{"manager": "kubectl-create", "operation": "Update", "apiVersion": "v1"}])
        };
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "ns", "labels": labels,
                         "managedFields": managed_fields},
        }))
        .unwrap()
    }

    const CONFIG_MAP: ManagedKind = MANAGED_KINDS[0];

    #[test]
    fn a_relist_replaces_the_kind_and_triggers_old_and_new_owners() {
        let cache = LiveCache::new(&Keys::default());
        assert!(!cache.is_synced(CONFIG_MAP));
        cache.sync_kind(CONFIG_MAP, vec![object("a", Some("one"), true)]);
        assert!(cache.is_synced(CONFIG_MAP));
        assert!(cache.get(CONFIG_MAP, "ns", "a").is_some());

        cache.apply_event(CONFIG_MAP, watcher::Event::Init);
        cache.apply_event(
            CONFIG_MAP,
            watcher::Event::InitApply(object("b", Some("two"), true)),
        );
        // Until the relist completes, the old contents stay visible.
        assert!(cache.get(CONFIG_MAP, "ns", "a").is_some());
        let touched = cache.apply_event(CONFIG_MAP, watcher::Event::InitDone);
        assert_eq!(touched, BTreeSet::from(["one".into(), "two".into()]));
        assert!(cache.get(CONFIG_MAP, "ns", "a").is_none());
        assert!(cache.get(CONFIG_MAP, "ns", "b").is_some());
    }

    #[test]
    fn a_look_alike_with_our_labels_but_not_applied_by_us_is_not_ours() {
        let cache = LiveCache::new(&Keys::default());
        let mut look_alike = object("look-alike", Some("shop"), true);
        look_alike.metadata.managed_fields = object("x", None, false).metadata.managed_fields;
        let touched = cache.apply_event(CONFIG_MAP, watcher::Event::Apply(look_alike));
        assert!(touched.is_empty());
        assert!(cache.owned_by(CONFIG_MAP, "shop").is_empty());
    }

    #[test]
    fn only_objects_with_both_labels_belong_to_an_owner() {
        let cache = LiveCache::new(&Keys::default());
        let touched = cache.apply_event(
            CONFIG_MAP,
            watcher::Event::Apply(object("mine", Some("shop"), true)),
        );
        assert_eq!(touched, BTreeSet::from(["shop".into()]));
        let touched = cache.apply_event(
            CONFIG_MAP,
            watcher::Event::Apply(object("theirs", Some("shop"), false)),
        );
        assert!(touched.is_empty());
        let owned: Vec<String> = cache
            .owned_by(CONFIG_MAP, "shop")
            .iter()
            .map(|o| o.name_any())
            .collect();
        assert_eq!(owned, ["mine"]);
        let touched = cache.apply_event(
            CONFIG_MAP,
            watcher::Event::Delete(object("mine", Some("shop"), true)),
        );
        assert_eq!(touched, BTreeSet::from(["shop".into()]));
        assert!(cache.owned_by(CONFIG_MAP, "shop").is_empty());
    }
}
