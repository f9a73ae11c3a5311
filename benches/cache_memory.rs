//! Heap bytes the reconcile loop's stores hold, counted by the global
//! allocator: per pod, stored as the pod watch stores it (the chiller API pod
//! injected and not, with the metadata, status and managed fields the API
//! server adds), and per opted-in namespace, its managed objects as the live cache
//! stores them (the objects as applied, with the server's metadata), and per
//! Namespace in each of the two Namespace stores.
//!
//! `cargo bench --bench cache_memory` prints one table; `make scale` measures
//! the whole process on a real control plane.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicI64, Ordering},
};

use chiller_metrics::{
    cluster::keep_what_we_read,
    config::Config,
    reconcile::{
        compare::applied_value,
        desired::{NamespaceSettings, desired_objects},
        live::{LiveCache, managed_kind},
        pods::PodCache,
    },
};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    api::DynamicObject,
    runtime::{reflector, watcher::Event},
};
use serde_json::{Value, json};

/// Bytes allocated and not yet freed.
struct Counting;

static HELD: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn held() -> i64 {
    HELD.load(Ordering::Relaxed)
}

const PODS: usize = 2_000;
const NAMESPACES: usize = 200;
const INJECTED_API_POD: &str = include_str!("../tests/golden/expected/chiller-api.json");
const API_POD_REVIEW: &str = include_str!("../tests/golden/requests/chiller-api.json");

/// What the API server adds to every object: identity, timestamps and a
/// managed-fields entry per writer.
fn server_metadata(object: &mut Value, i: usize) {
    let metadata = &mut object["metadata"];
    metadata["uid"] = json!(format!("4f6c1d2e-9a0b-4c3d-8e7f-{i:012}"));
    metadata["resourceVersion"] = json!(format!("{}", 100_000 + i));
    metadata["creationTimestamp"] = json!("2026-12-06T08:00:00Z");
    metadata["generation"] = json!(1);
    let fields: serde_json::Map<String, Value> = object
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, _)| !matches!(key.as_str(), "apiVersion" | "kind" | "metadata"))
        .map(|(key, value)| (format!("f:{key}"), field_set(value)))
        .collect();
    object["metadata"]["managedFields"] = json!([{
        "manager": "chiller-metrics",
        "operation": "Apply",
        "apiVersion": object["apiVersion"],
        "time": "2026-12-06T08:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }, {
        "manager": "kube-controller-manager",
        "operation": "Update",
        "apiVersion": object["apiVersion"],
        "time": "2026-12-06T08:00:01Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:annotations": {}}},
    }]);
}

/// A managed-fields set shaped like `value`.
fn field_set(value: &Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, value)| (format!("f:{key}"), field_set(value)))
                .collect(),
        ),
        _ => json!({}),
    }
}

/// The `i`th pod of a Deployment's ReplicaSet, running, as the watch sees it.
fn pod(template: &Value, i: usize) -> Pod {
    let mut pod = template.clone();
    pod["metadata"]["name"] = json!(format!("api-7d9f8c6b5-{i:05}"));
    pod["metadata"]["namespace"] = json!(format!("shop-{:04}", i / 10));
    pod["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "api-7d9f8c6b5",
        "uid": "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d", "controller": true,
        "blockOwnerDeletion": true,
    }]);
    pod["spec"]["nodeName"] = json!("node-1");
    let statuses: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(pod["spec"]["initContainers"].as_array().into_iter().flatten())
        .map(|container| {
            json!({
                "name": container["name"], "image": container["image"],
                "imageID": "sha256:5e0d6a1f2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6",
                "containerID": format!("containerd://{:064}", i),
                "ready": true, "restartCount": 0, "started": true,
                "state": {"running": {"startedAt": "2026-12-06T08:00:02Z"}},
            })
        })
        .collect();
    let conditions = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .map(|kind| json!({"type": kind, "status": "True", "lastTransitionTime": "2026-12-06T08:00:02Z"}));
    pod["status"] = json!({
        "phase": "Running",
        "podIP": "10.244.0.17", "hostIP": "172.18.0.2",
        "startTime": "2026-12-06T08:00:00Z", "qosClass": "Burstable",
        "conditions": conditions,
        "containerStatuses": statuses,
    });
    server_metadata(&mut pod, i);
    serde_json::from_value(pod).expect("the injected pod is a Pod")
}

/// Bytes per pod held by the pod store, for pods like `template`.
fn bytes_per_pod(config: &Config, template: &Value) -> f64 {
    let cache = PodCache::new(&config.keys());
    cache.pods.apply(&Event::Init);
    cache.pods.apply(&Event::InitDone);
    let before = held();
    for i in 0..PODS {
        let mut pod = pod(template, i);
        cache.strip_pod(&mut pod);
        cache.apply(&Event::Apply(pod));
    }
    let bytes = held() - before;
    assert_eq!(cache.pods.store().len(), PODS);
    bytes as f64 / PODS as f64
}

/// Bytes per opted-in namespace held by the live cache.
fn bytes_per_namespace(config: &Config) -> f64 {
    let live = LiveCache::new(&config.keys());
    let before = held();
    for i in 0..NAMESPACES {
        let settings = NamespaceSettings {
            name: format!("shop-{i:04}"),
            uid: Some(format!("7c1e2d3f-4a5b-6c7d-8e9f-{i:012}")),
            postgres: None,
        };
        for object in desired_objects(&settings, config) {
            let mut applied = applied_value(&object.value, &config.domain);
            server_metadata(&mut applied, i);
            let applied: DynamicObject =
                serde_json::from_value(applied).expect("an applied object");
            let kind = managed_kind(object.api_version, object.kind).expect("a managed kind");
            live.apply_event(*kind, Event::Apply(applied));
        }
    }
    (held() - before) as f64 / NAMESPACES as f64
}

/// Bytes per Namespace in one Namespace store: as the watch delivers it,
/// and as stored (`keep_what_we_read`). Labeled by `kubectl apply`, with
/// our status annotation.
fn bytes_per_namespace_object(config: &Config) -> (f64, f64) {
    let keys = config.keys();
    let namespace = |i: usize| {
        let name = format!("shop-{i:04}");
        let mut namespace = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/metadata.name": name, keys.inject.as_str(): "enabled"},
                "annotations": {
                    keys.reconcile_status.as_str():
                        r#"{"ready":true,"objects":9,"uninjectedPods":0,"outdatedPods":0,"config":"3f9a1c0d2b4e"}"#,
                    "kubectl.kubernetes.io/last-applied-configuration": format!(
                        r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"annotations":{{}},"labels":{{"{}":"enabled"}},"name":"{name}"}}}}"#,
                        keys.inject
                    ),
                },
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        });
        server_metadata(&mut namespace, i);
        serde_json::from_value::<Namespace>(namespace).expect("a Namespace")
    };
    let held_by = |compact: bool| {
        let (store, mut writer) = reflector::store::<Namespace>();
        let before = held();
        for i in 0..NAMESPACES {
            let mut namespace = namespace(i);
            if compact {
                keep_what_we_read(&mut namespace, &keys);
            }
            writer.apply_watcher_event(&Event::Apply(namespace));
        }
        let bytes = held() - before;
        assert_eq!(store.len(), NAMESPACES);
        bytes as f64 / NAMESPACES as f64
    };
    (held_by(false), held_by(true))
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let config = Config::default();
    let injected = bytes_per_pod(
        &config,
        &serde_json::from_str::<Value>(INJECTED_API_POD).expect("golden JSON")["patchedPod"],
    );
    let uninjected = bytes_per_pod(
        &config,
        &serde_json::from_str::<Value>(API_POD_REVIEW).expect("golden JSON")["request"]["object"],
    );
    let namespace = bytes_per_namespace(&config);
    let (delivered, stored) = bytes_per_namespace_object(&config);
    let mb = |bytes: f64| bytes / 1e6;
    println!("| store | heap per item | at 10,000 pods and 1,000 namespaces |");
    println!("|---|---|---|");
    println!(
        "| pods, injected (stored stripped) | {injected:.0} B per pod | {:.1} MB |",
        mb(injected * 10_000.0)
    );
    println!(
        "| pods, not injected (stored stripped) | {uninjected:.0} B per pod | {:.1} MB |",
        mb(uninjected * 10_000.0)
    );
    println!(
        "| our objects (live cache) | {namespace:.0} B per namespace | {:.1} MB |",
        mb(namespace * 1_000.0)
    );
    println!(
        "| a Namespace store, Namespaces as delivered | {delivered:.0} B per namespace | {:.1} MB |",
        mb(delivered * 1_000.0)
    );
    println!(
        "| a Namespace store, as stored (our labels and annotations only) | {stored:.0} B per namespace | {:.1} MB |",
        mb(stored * 1_000.0)
    );
}
