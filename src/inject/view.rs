//! The pod as the injector sees it: a borrowed view of the fields the
//! mutation and its check read (labels, annotations, owner references, the
//! containers' names, env, ports, command, args and mounts, init containers,
//! volume names, `hostNetwork`, `os`, `restartPolicy`), nothing else.
//!
//! The webhook deserializes it straight from the request bytes: strings are
//! borrowed from the body (copied only when they contain escapes), and every
//! other field is skipped without allocating. The offline `inject` command
//! deserializes it from its parsed manifests, and code that already holds a
//! `k8s_openapi` [`Pod`] borrows one from it with [`PodView::of`].
//!
//! Like `k8s_openapi`'s own deserializers, fields the API server requires
//! (a container's `name`, a port's `containerPort`, ...) default when they
//! are missing or `null`.

use std::{borrow::Cow, collections::BTreeMap, fmt, ops::Deref};

use k8s_openapi::api::core::v1::{Container, Pod};
use serde::{Deserialize, Deserializer, de::Visitor};

/// A string of the view: borrowed from the input when it has no escapes.
///
/// (serde's own `Cow<str>` only borrows as a struct field marked
/// `#[serde(borrow)]`, not inside an `Option`, a `Vec` or a map.)
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Str<'a>(pub Cow<'a, str>);

impl<'a> Str<'a> {
    pub const fn borrowed(s: &'a str) -> Self {
        Self(Cow::Borrowed(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The same string, borrowed from this one.
    pub fn reborrow(&self) -> Str<'_> {
        Str::borrowed(&self.0)
    }
}

impl Deref for Str<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Str<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Str<'_> {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Str<'_> {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl fmt::Debug for Str<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Str<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;

        impl<'de> Visitor<'de> for StrVisitor {
            type Value = Str<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }

            /// `null` where a string is required reads as "", as in `k8s_openapi`.
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Str::default())
            }

            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Str::default())
            }

            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_str(self)
            }
        }

        deserializer.deserialize_option(StrVisitor)
    }
}

/// Deserializes `null` as the type's default, as `k8s_openapi` does for
/// the fields the API server requires.
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Labels or annotations: entries sorted by key, each key once (the last
/// value of a key given twice, as a map that inserts them would keep). The
/// API server writes them sorted, so reading them costs one scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StrMap<'a>(Vec<(Str<'a>, Str<'a>)>);

impl<'a> StrMap<'a> {
    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&Str<'a>> {
        self.position(key).ok().map(|at| &self.0[at].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// Sets `key` to `value`, returning the value it replaces.
    pub fn insert(&mut self, key: Str<'a>, value: Str<'a>) -> Option<Str<'a>> {
        match self.position(&key) {
            Ok(at) => Some(std::mem::replace(&mut self.0[at].1, value)),
            Err(at) => {
                self.0.insert(at, (key, value));
                None
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&Str<'a>, &Str<'a>)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Sorts by key and keeps the last value of a repeated key.
    fn from_entries(mut entries: Vec<(Str<'a>, Str<'a>)>) -> Self {
        if !entries.is_sorted_by(|a, b| a.0 < b.0) {
            // Stable: of a repeated key, the later value stays later.
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            entries.dedup_by(|later, earlier| {
                let repeated = later.0 == earlier.0;
                if repeated {
                    std::mem::swap(&mut later.1, &mut earlier.1);
                }
                repeated
            });
        }
        Self(entries)
    }
}

impl<'a> FromIterator<(Str<'a>, Str<'a>)> for StrMap<'a> {
    fn from_iter<I: IntoIterator<Item = (Str<'a>, Str<'a>)>>(entries: I) -> Self {
        Self::from_entries(entries.into_iter().collect())
    }
}

impl<'m, 'a> IntoIterator for &'m StrMap<'a> {
    type Item = (&'m Str<'a>, &'m Str<'a>);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'m, (Str<'a>, Str<'a>)>,
        fn(&'m (Str<'a>, Str<'a>)) -> (&'m Str<'a>, &'m Str<'a>),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for StrMap<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<'a>(std::marker::PhantomData<StrMap<'a>>);

        impl<'de: 'a, 'a> Visitor<'de> for MapVisitor<'a> {
            type Value = StrMap<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(StrMap::from_entries(entries))
            }
        }

        deserializer.deserialize_map(MapVisitor(std::marker::PhantomData))
    }
}

/// The parts of a pod the injector reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView<'a> {
    #[serde(borrow, default, deserialize_with = "present_metadata")]
    pub metadata: MetadataView<'a>,
    #[serde(borrow, default)]
    pub spec: Option<SpecView<'a>>,
}

/// Metadata as read, marked present: a patch can only add to metadata
/// that the pod's JSON has.
fn present_metadata<'de: 'a, 'a, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<MetadataView<'a>, D::Error> {
    Ok(Option::<MetadataView>::deserialize(deserializer)?
        .map(|metadata| MetadataView {
            present: true,
            ..metadata
        })
        .unwrap_or_default())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataView<'a> {
    /// Whether the pod's JSON has `metadata` (an object); a typed pod always has.
    #[serde(skip)]
    pub present: bool,
    #[serde(borrow, default)]
    pub name: Option<Str<'a>>,
    #[serde(borrow, default)]
    pub generate_name: Option<Str<'a>>,
    #[serde(borrow, default)]
    pub namespace: Option<Str<'a>>,
    #[serde(borrow, default)]
    pub labels: Option<StrMap<'a>>,
    #[serde(borrow, default)]
    pub annotations: Option<StrMap<'a>>,
    #[serde(borrow, default)]
    pub owner_references: Option<Vec<OwnerReferenceView<'a>>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReferenceView<'a> {
    #[serde(borrow, default)]
    pub api_version: Str<'a>,
    #[serde(borrow, default)]
    pub kind: Str<'a>,
    #[serde(borrow, default)]
    pub name: Str<'a>,
    #[serde(default)]
    pub controller: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecView<'a> {
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub containers: Vec<ContainerView<'a>>,
    #[serde(borrow, default)]
    pub init_containers: Option<Vec<ContainerView<'a>>>,
    #[serde(borrow, default)]
    pub volumes: Option<Vec<VolumeView<'a>>>,
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(borrow, default)]
    pub os: Option<OsView<'a>>,
    #[serde(borrow, default)]
    pub restart_policy: Option<Str<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct OsView<'a> {
    #[serde(borrow, default)]
    pub name: Str<'a>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView<'a> {
    #[serde(borrow, default)]
    pub name: Str<'a>,
    #[serde(borrow, default)]
    pub restart_policy: Option<Str<'a>>,
    #[serde(borrow, default)]
    pub command: Option<Vec<Str<'a>>>,
    #[serde(borrow, default)]
    pub args: Option<Vec<Str<'a>>>,
    #[serde(borrow, default)]
    pub env: Option<Vec<EnvVarView<'a>>>,
    /// Only how many sources there are; their content is skipped.
    #[serde(default)]
    pub env_from: Option<Vec<Present>>,
    #[serde(borrow, default)]
    pub ports: Option<Vec<PortView<'a>>>,
    #[serde(borrow, default)]
    pub volume_mounts: Option<Vec<MountView<'a>>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarView<'a> {
    #[serde(borrow, default)]
    pub name: Str<'a>,
    #[serde(borrow, default)]
    pub value: Option<Str<'a>>,
    /// Only whether the variable has a `valueFrom`; its source is skipped.
    #[serde(default)]
    pub value_from: Option<Present>,
}

/// Marks that a field is set, whatever its content (an object): skipped
/// without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Present {}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortView<'a> {
    #[serde(borrow, default)]
    pub name: Option<Str<'a>>,
    #[serde(default, deserialize_with = "nullable")]
    pub container_port: i32,
    #[serde(borrow, default)]
    pub protocol: Option<Str<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountView<'a> {
    #[serde(borrow, default)]
    pub name: Str<'a>,
    #[serde(borrow, default)]
    pub mount_path: Str<'a>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct VolumeView<'a> {
    #[serde(borrow, default)]
    pub name: Str<'a>,
}

impl<'a> PodView<'a> {
    /// The view of a typed pod, borrowing its strings.
    pub fn of(pod: &'a Pod) -> Self {
        let s = |s: &'a String| Str::borrowed(s);
        let opt = |o: &'a Option<String>| o.as_deref().map(Str::borrowed);
        let map = |m: &'a BTreeMap<String, String>| m.iter().map(|(k, v)| (s(k), s(v))).collect();
        let containers = |cs: &'a [Container]| cs.iter().map(ContainerView::of).collect();
        let meta = &pod.metadata;
        Self {
            metadata: MetadataView {
                present: true,
                name: opt(&meta.name),
                generate_name: opt(&meta.generate_name),
                namespace: opt(&meta.namespace),
                labels: meta.labels.as_ref().map(map),
                annotations: meta.annotations.as_ref().map(map),
                owner_references: meta.owner_references.as_ref().map(|refs| {
                    refs.iter()
                        .map(|r| OwnerReferenceView {
                            api_version: s(&r.api_version),
                            kind: s(&r.kind),
                            name: s(&r.name),
                            controller: r.controller,
                        })
                        .collect()
                }),
            },
            spec: pod.spec.as_ref().map(|spec| SpecView {
                containers: containers(&spec.containers),
                init_containers: spec.init_containers.as_deref().map(containers),
                volumes: spec.volumes.as_ref().map(|volumes| {
                    volumes
                        .iter()
                        .map(|v| VolumeView { name: s(&v.name) })
                        .collect()
                }),
                host_network: spec.host_network,
                os: spec.os.as_ref().map(|os| OsView { name: s(&os.name) }),
                restart_policy: opt(&spec.restart_policy),
            }),
        }
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata.labels.as_ref()?.get(key).map(Str::as_str)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(key)
            .map(Str::as_str)
    }

    /// App containers, in order.
    pub fn app_containers(&self) -> &[ContainerView<'a>] {
        self.spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default()
    }

    /// Init containers, in order.
    pub fn init_containers(&self) -> &[ContainerView<'a>] {
        self.spec
            .as_ref()
            .and_then(|s| s.init_containers.as_deref())
            .unwrap_or_default()
    }

    pub fn volumes(&self) -> &[VolumeView<'a>] {
        self.spec
            .as_ref()
            .and_then(|s| s.volumes.as_deref())
            .unwrap_or_default()
    }

    /// App containers and init containers.
    pub fn containers(&self) -> impl Iterator<Item = &ContainerView<'a>> {
        self.app_containers().iter().chain(self.init_containers())
    }

    /// App containers and restartable (native sidecar) init containers: they
    /// share the pod's ports while the app runs.
    pub fn long_running(&self) -> impl Iterator<Item = &ContainerView<'a>> {
        let sidecars = self
            .init_containers()
            .iter()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"));
        self.app_containers().iter().chain(sidecars)
    }
}

impl<'a> ContainerView<'a> {
    pub fn of(container: &'a Container) -> Self {
        let s = |s: &'a String| Str::borrowed(s);
        let list = |l: &'a Option<Vec<String>>| {
            l.as_ref()
                .map(|l| l.iter().map(|a| Str::borrowed(a)).collect())
        };
        Self {
            name: s(&container.name),
            restart_policy: container.restart_policy.as_deref().map(Str::borrowed),
            command: list(&container.command),
            args: list(&container.args),
            env: container.env.as_ref().map(|env| {
                env.iter()
                    .map(|var| EnvVarView {
                        name: s(&var.name),
                        value: var.value.as_deref().map(Str::borrowed),
                        value_from: var.value_from.as_ref().map(|_| Present {}),
                    })
                    .collect()
            }),
            env_from: container
                .env_from
                .as_ref()
                .map(|sources| vec![Present {}; sources.len()]),
            ports: container.ports.as_ref().map(|ports| {
                ports
                    .iter()
                    .map(|p| PortView {
                        name: p.name.as_deref().map(Str::borrowed),
                        container_port: p.container_port,
                        protocol: p.protocol.as_deref().map(Str::borrowed),
                    })
                    .collect()
            }),
            volume_mounts: container.volume_mounts.as_ref().map(|mounts| {
                mounts
                    .iter()
                    .map(|m| MountView {
                        name: s(&m.name),
                        mount_path: s(&m.mount_path),
                    })
                    .collect()
            }),
        }
    }
}

impl ContainerView<'_> {
    /// The same view, borrowing its strings from this one.
    pub fn reborrow(&self) -> ContainerView<'_> {
        fn opt<'b>(o: &'b Option<Str>) -> Option<Str<'b>> {
            o.as_ref().map(Str::reborrow)
        }
        fn list<'b>(l: &'b Option<Vec<Str>>) -> Option<Vec<Str<'b>>> {
            l.as_ref().map(|l| l.iter().map(Str::reborrow).collect())
        }
        ContainerView {
            name: self.name.reborrow(),
            restart_policy: opt(&self.restart_policy),
            command: list(&self.command),
            args: list(&self.args),
            env: self.env.as_ref().map(|env| {
                env.iter()
                    .map(|var| EnvVarView {
                        name: var.name.reborrow(),
                        value: opt(&var.value),
                        value_from: var.value_from,
                    })
                    .collect()
            }),
            env_from: self.env_from.clone(),
            ports: self.ports.as_ref().map(|ports| {
                ports
                    .iter()
                    .map(|p| PortView {
                        name: opt(&p.name),
                        container_port: p.container_port,
                        protocol: opt(&p.protocol),
                    })
                    .collect()
            }),
            volume_mounts: self.volume_mounts.as_ref().map(|mounts| {
                mounts
                    .iter()
                    .map(|m| MountView {
                        name: m.name.reborrow(),
                        mount_path: m.mount_path.reborrow(),
                    })
                    .collect()
            }),
        }
    }
}

impl VolumeView<'_> {
    /// The same view, borrowing its name from this one.
    pub fn reborrow(&self) -> VolumeView<'_> {
        VolumeView {
            name: self.name.reborrow(),
        }
    }
}

/// Something the injector can read a pod from: its view, or a typed pod.
pub trait AsPodView {
    fn with_view<R>(&self, f: impl FnOnce(&PodView<'_>) -> R) -> R;
}

impl AsPodView for PodView<'_> {
    fn with_view<R>(&self, f: impl FnOnce(&PodView<'_>) -> R) -> R {
        f(self)
    }
}

impl AsPodView for Pod {
    fn with_view<R>(&self, f: impl FnOnce(&PodView<'_>) -> R) -> R {
        f(&PodView::of(self))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strings_are_borrowed_unless_escaped() {
        let text = r#"{"metadata":{"name":"api","labels":{"app":"a\"b"}},
            "spec":{"containers":[{"name":"api","image":"x","env":[{"name":"A","value":"1"}]}]}}"#;
        let view: PodView = serde_json::from_str(text).unwrap();
        assert!(matches!(
            view.metadata.name.as_ref().unwrap().0,
            Cow::Borrowed(_)
        ));
        assert!(matches!(view.label("app").map(|_| ()), Some(())));
        let value = view.metadata.labels.as_ref().unwrap().get("app").unwrap();
        assert!(matches!(value.0, Cow::Owned(_)));
        assert_eq!(value, "a\"b");
        let env = view.app_containers()[0].env.as_ref().unwrap();
        assert!(matches!(env[0].value.as_ref().unwrap().0, Cow::Borrowed(_)));
    }

    /// Maps read as serde_json reads them into a `BTreeMap`: sorted, and of
    /// a repeated key the last value.
    #[test]
    fn maps_read_as_btree_maps_do() {
        for text in [
            r#"{}"#,
            r#"{"a":"1","b":"2","c":"3"}"#,
            r#"{"c":"3","a":"1","b":"2"}"#,
            r#"{"a":"1","a":"2"}"#,
            r#"{"b":"x","a":"1","b":"y","a":"2","c":null,"b":"z"}"#,
            r#"{"k\"":"e\u00e9","k":"plain"}"#,
        ] {
            let ours: StrMap = serde_json::from_str(text).unwrap();
            let theirs: BTreeMap<String, Option<String>> = serde_json::from_str(text).unwrap();
            let ours: Vec<_> = ours
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let theirs: Vec<_> = theirs
                .into_iter()
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect();
            assert_eq!(ours, theirs, "{text}");
        }
        let mut map: StrMap = serde_json::from_str(r#"{"b":"2","d":"4"}"#).unwrap();
        assert_eq!(map.insert(Str::borrowed("c"), Str::borrowed("3")), None);
        assert_eq!(
            map.insert(Str::borrowed("b"), Str::borrowed("two")),
            Some(Str::borrowed("2"))
        );
        let keys: Vec<_> = map.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "c", "d"]);
        assert_eq!(map.get("b").map(Str::as_str), Some("two"));
        assert!(map.contains_key("d") && !map.contains_key("a"));
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn the_view_of_a_typed_pod_equals_the_view_of_its_json() {
        let value = json!({
            "metadata": {"name": "p", "generateName": "p-", "namespace": "ns",
                "labels": {"app": "api"}, "annotations": {"a": "b"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "rs", "uid": "u", "controller": true}]},
            "spec": {
                "containers": [{"name": "api", "image": "api:1", "command": ["gunicorn"],
                    "args": ["--bind=:5000"],
                    "env": [{"name": "A", "value": "1"},
                            {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}],
                    "envFrom": [{"configMapRef": {"name": "c"}}],
                    "ports": [{"containerPort": 5000, "name": "http", "protocol": "TCP"}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "initContainers": [{"name": "init", "restartPolicy": "Always"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "hostNetwork": false, "os": {"name": "linux"}, "restartPolicy": "Always"
            }
        });
        let pod: Pod = serde_json::from_value(value.clone()).unwrap();
        let text = value.to_string();
        let from_json: PodView = serde_json::from_str(&text).unwrap();
        assert_eq!(PodView::of(&pod), from_json);
    }

    #[test]
    fn required_fields_may_be_null_or_missing_as_in_k8s_openapi() {
        let text = r#"{"metadata":{"name":null},"spec":{"containers":[{"name":null,
            "ports":[{"containerPort":null}]}]}}"#;
        let view: PodView = serde_json::from_str(text).unwrap();
        let pod: Pod = serde_json::from_str(text).unwrap();
        assert_eq!(view, PodView::of(&pod));
    }
}
