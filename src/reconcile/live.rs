//! What exists in the cluster: kube-runtime reflector stores of every object
//! we manage, fed by one label-filtered watch per kind, read by the
//! reconciler instead of GETs. What nothing reads is stripped before it is
//! stored (`strip_managed`), and the rest is held as [`StoredObject`]s.

use std::{
    borrow::Cow,
    collections::{BTreeSet, HashMap},
    hash::Hash,
    sync::{Arc, RwLock},
};

use futures::FutureExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Resource, ResourceExt,
    api::{ApiResource, DynamicObject},
    core::DynamicResourceScope,
    runtime::{
        reflector::{Lookup, ObjectRef, Store, store::Writer},
        watcher,
    },
};

use super::compare::digest_long_strings;
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
pub fn applied_by_us(metadata: &ObjectMeta) -> bool {
    metadata.managed_fields.iter().flatten().any(|entry| {
        entry.manager.as_deref() == Some(FIELD_MANAGER)
            && entry.operation.as_deref() == Some("Apply")
    })
}

/// The label selector of every watch: only objects we manage.
pub fn managed_selector() -> String {
    format!("{}={}", keys::MANAGED_BY_KEY, keys::MANAGED_BY)
}

/// Strips what nothing here reads from a cached object: managed fields but
/// our own Apply entry (without its field set, which `applied_by_us` does not
/// need), `kubectl apply`'s copy of the last configuration, and the status.
/// Desired objects never hold a status, so the drift check is unchanged.
pub fn strip_managed(object: &mut DynamicObject) {
    if let Some(entries) = object.metadata.managed_fields.as_mut() {
        entries.retain(|entry| {
            entry.manager.as_deref() == Some(FIELD_MANAGER)
                && entry.operation.as_deref() == Some("Apply")
        });
        for entry in entries.iter_mut() {
            entry.fields_v1 = None;
        }
    }
    if let Some(annotations) = object.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
    if let Some(data) = object.data.as_object_mut() {
        data.remove("status");
    }
}

/// An object of ours as the live cache holds it: its identity, for the
/// store's key, the app namespace it serves (read on every lookup), and the
/// whole stripped object as compact JSON (long strings as their digests, see
/// `compare::digest_long_strings`), decoded only for the drift check. As
/// `DynamicObject`s, the 9 objects of a namespace took 63 KB; stored so,
/// 17 KB (`cargo bench --bench cache_memory`).
#[derive(Debug, Clone)]
pub struct StoredObject {
    /// Name, namespace, resourceVersion and uid only.
    pub metadata: ObjectMeta,
    /// See [`LiveCache::owner_namespace`].
    pub owner: Option<String>,
    json: Box<str>,
}

impl StoredObject {
    fn new(object: &DynamicObject, owner: Option<String>) -> Self {
        Self {
            metadata: ObjectMeta {
                name: object.metadata.name.clone(),
                namespace: object.metadata.namespace.clone(),
                resource_version: object.metadata.resource_version.clone(),
                uid: object.metadata.uid.clone(),
                ..Default::default()
            },
            owner,
            json: {
                let mut value = serde_json::to_value(object).expect("an object serializes");
                digest_long_strings(&mut value);
                value.to_string().into_boxed_str()
            },
        }
    }

    /// The object as it was stored (long strings digested).
    pub fn object(&self) -> DynamicObject {
        serde_json::from_str(&self.json).expect("a stored object is JSON")
    }
}

impl Resource for StoredObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        <DynamicObject as Resource>::kind(dt)
    }

    fn group(dt: &ApiResource) -> Cow<'_, str> {
        <DynamicObject as Resource>::group(dt)
    }

    fn version(dt: &ApiResource) -> Cow<'_, str> {
        <DynamicObject as Resource>::version(dt)
    }

    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        <DynamicObject as Resource>::api_version(dt)
    }

    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        <DynamicObject as Resource>::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The annotation `kubectl apply` (client side) keeps its input in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// One kube-runtime reflector store whose writer can be replaced (a new
/// leader starts from an empty, unsynced store).
pub struct Reflected<K>
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    dyntype: K::DynamicType,
    writer: RwLock<Writer<K>>,
}

impl<K> Reflected<K>
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    pub fn new(dyntype: K::DynamicType) -> Self {
        Self {
            writer: RwLock::new(Writer::new(dyntype.clone())),
            dyntype,
        }
    }

    /// Applies one watch event (or one of our own writes, as `Apply`/`Delete`).
    pub fn apply(&self, event: &watcher::Event<K>) {
        self.writer
            .write()
            .expect("store lock poisoned")
            .apply_watcher_event(event);
    }

    /// The store as it is now; clones share it.
    pub fn store(&self) -> Store<K> {
        self.writer.read().expect("store lock poisoned").as_reader()
    }

    /// Whether the first list completed: a missing object is really missing.
    pub fn is_synced(&self) -> bool {
        self.store()
            .wait_until_ready()
            .now_or_never()
            .is_some_and(|ready| ready.is_ok())
    }

    /// Waits (at most `limit`) for the first list; whether it completed.
    pub async fn wait_synced(&self, limit: std::time::Duration) -> bool {
        let store = self.store();
        matches!(
            tokio::time::timeout(limit, store.wait_until_ready()).await,
            Ok(Ok(()))
        )
    }

    /// Forgets everything, synced included.
    pub fn clear(&self) {
        *self.writer.write().expect("store lock poisoned") = Writer::new(self.dyntype.clone());
    }
}

impl<K> std::fmt::Debug for Reflected<K>
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reflected")
            .field("objects", &self.store().len())
            .finish()
    }
}

/// The cache; clones share it.
#[derive(Debug, Clone)]
pub struct LiveCache {
    owner_label: String,
    kinds: Arc<HashMap<ManagedKind, Reflected<StoredObject>>>,
}

impl LiveCache {
    pub fn new(keys: &Keys) -> Self {
        Self {
            owner_label: keys.owner_namespace.clone(),
            kinds: Arc::new(
                MANAGED_KINDS
                    .iter()
                    .map(|kind| (*kind, Reflected::new(kind.api_resource())))
                    .collect(),
            ),
        }
    }

    fn kind(&self, kind: ManagedKind) -> &Reflected<StoredObject> {
        &self.kinds[&kind]
    }

    /// The app namespace an object of ours serves, from its owner-namespace label,
    /// if it is also labeled managed-by us and was applied by us. Labels
    /// alone can be copied: a look-alike someone else made is never ours.
    pub fn owner_namespace(&self, metadata: &ObjectMeta) -> Option<String> {
        let labels = metadata.labels.as_ref()?;
        (labels.get(keys::MANAGED_BY_KEY).map(String::as_str) == Some(keys::MANAGED_BY)
            && applied_by_us(metadata))
        .then(|| labels.get(&self.owner_label).cloned())
        .flatten()
    }

    /// Applies one watch event (stripped, see [`strip_managed`]); returns the
    /// owner namespaces it concerns, which need a reconcile.
    pub fn apply_event(
        &self,
        kind: ManagedKind,
        mut event: watcher::Event<DynamicObject>,
    ) -> BTreeSet<String> {
        let cache = self.kind(kind);
        let store = cache.store();
        let resource = kind.api_resource();
        let mut touched = BTreeSet::new();
        let stored = |object: &DynamicObject| {
            StoredObject::new(object, self.owner_namespace(&object.metadata))
        };
        let event = match &mut event {
            watcher::Event::Apply(object) => {
                strip_managed(object);
                watcher::Event::Apply(stored(object))
            }
            watcher::Event::InitApply(object) => {
                strip_managed(object);
                watcher::Event::InitApply(stored(object))
            }
            watcher::Event::Delete(object) => watcher::Event::Delete(stored(object)),
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitDone => watcher::Event::InitDone,
        };
        match &event {
            watcher::Event::Apply(object) | watcher::Event::Delete(object) => {
                touched.extend(object.owner.clone());
                let previous = store.get(&ObjectRef::from_obj_with(object, resource.clone()));
                touched.extend(previous.and_then(|p| p.owner.clone()));
                cache.apply(&event);
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => cache.apply(&event),
            watcher::Event::InitDone => {
                let old = store.state();
                cache.apply(&event);
                touched.extend(
                    old.iter()
                        .chain(store.state().iter())
                        .filter_map(|o| o.owner.clone()),
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
        self.kind(kind).is_synced()
    }

    /// The cached object, `None` if absent (meaningful only when synced).
    pub fn get(&self, kind: ManagedKind, namespace: &str, name: &str) -> Option<DynamicObject> {
        let key = ObjectRef::new_with(name, kind.api_resource()).within(namespace);
        self.kind(kind)
            .store()
            .get(&key)
            .map(|stored| stored.object())
    }

    /// Objects of `kind` labeled managed-by us and owned by `owner_namespace`,
    /// wherever they live.
    pub fn owned_by(&self, kind: ManagedKind, owner_namespace: &str) -> Vec<DynamicObject> {
        let mut found: Vec<DynamicObject> = self
            .kind(kind)
            .store()
            .state_filter(|o| o.owner.as_deref() == Some(owner_namespace))
            .iter()
            .map(|stored| stored.object())
            .collect();
        found.sort_by_key(|o| (ResourceExt::namespace(o).unwrap_or_default(), o.name_any()));
        found
    }

    /// Forgets everything (on losing leadership).
    pub fn clear(&self) {
        for cache in self.kinds.values() {
            cache.clear();
        }
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

    #[test]
    fn stored_objects_keep_only_our_apply_entry_and_no_status() {
        let cache = LiveCache::new(&Keys::default());
        let mut mine = object("mine", Some("shop"), true);
        mine.metadata.managed_fields.as_mut().unwrap().push(
            serde_json::from_value(
                json!({"manager": "kube-controller-manager", "operation": "Update"}),
            )
            .unwrap(),
        );
        mine.data = json!({"data": {"a": "1"}, "status": {"replicas": 1}});
        cache.apply_event(CONFIG_MAP, watcher::Event::Apply(mine));
        let stored = cache.get(CONFIG_MAP, "ns", "mine").unwrap();
        assert_eq!(stored.metadata.managed_fields.as_ref().unwrap().len(), 1);
        assert!(applied_by_us(&stored.metadata));
        assert_eq!(stored.data, json!({"data": {"a": "1"}}));
        assert_eq!(cache.owned_by(CONFIG_MAP, "shop").len(), 1);
    }
}
