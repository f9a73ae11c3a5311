//! Time and allocations of the pure mutation (`Injector::mutate`) and of the
//! whole AdmissionReview path (`admission::review` + response serialization).
//!
//! The pod is read as the webhook reads it, a `PodView` borrowing from the
//! pod's text (`stage-pod-from-text`).
//!
//! `cargo bench --bench mutate` prints criterion's timings and, before them,
//! the heap allocations per call counted by the global allocator below.

use std::{
    alloc::{GlobalAlloc, Layout},
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
};

use chiller_metrics::{
    config::Config,
    inject::{Decision, Injector, PodContext, PodView, ResolvedMode, verify_patch},
    webhook::{NoCluster, admission},
};
use criterion::{Criterion, Throughput, criterion_group};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{DynamicObject, admission::AdmissionReview};
use mimalloc::MiMalloc;
use serde_json::{Value, json};

/// Counts allocations (and bytes), made through mimalloc as in the binary.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { MiMalloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CHILLER_API_REVIEW: &str = include_str!("../tests/golden/requests/chiller-api.json");

fn chiller_review() -> Value {
    serde_json::from_str(CHILLER_API_REVIEW).expect("chiller-api.json is JSON")
}

fn chiller_pod() -> Value {
    chiller_review()["request"]["object"].clone()
}

/// The chiller API pod with `count` containers (sidecars of a service mesh,
/// log shippers, ...): each with its own port and a few env vars.
fn pod_with_containers(count: usize) -> Value {
    let mut pod = chiller_pod();
    let template = pod["spec"]["containers"][0].clone();
    let containers: Vec<Value> = (0..count)
        .map(|i| {
            let mut c = template.clone();
            c["name"] = json!(format!("app-{i}"));
            c["ports"] = json!([{"name": format!("http-{i}"), "containerPort": 5000 + i, "protocol": "TCP"}]);
            c
        })
        .collect();
    pod["spec"]["containers"] = Value::Array(containers);
    pod
}

/// The chiller API pod grown to about `bytes` with env vars, as a pod that
/// inlines a big configuration would be.
fn big_pod(bytes: usize) -> Value {
    let mut pod = chiller_pod();
    let env = pod["spec"]["containers"][0]["env"]
        .as_array_mut()
        .expect("env is a list");
    let mut size = 3_000;
    let mut i = 0;
    while size < bytes {
        let value = format!("{i:08}-{}", "x".repeat(80));
        size += value.len() + 40;
        env.push(json!({"name": format!("SETTING_{i}"), "value": value}));
        i += 1;
    }
    pod
}

/// The review of `pod`, with the request's fields in the order the API
/// server writes them (as in the golden request): `operation` before
/// `object`. (A `serde_json::Value` would sort them.)
fn review_body(pod: &Value) -> Vec<u8> {
    const ORDER: [&str; 12] = [
        "uid",
        "kind",
        "resource",
        "requestKind",
        "requestResource",
        "namespace",
        "operation",
        "userInfo",
        "object",
        "oldObject",
        "dryRun",
        "options",
    ];
    let review = chiller_review();
    let request = review["request"].as_object().expect("a request");
    assert!(
        request.keys().all(|key| ORDER.contains(&key.as_str())),
        "ORDER names every field of the request"
    );
    let fields: Vec<String> = ORDER
        .iter()
        .filter_map(|&key| {
            let value = if key == "object" {
                Some(pod)
            } else {
                request.get(key)
            }?;
            Some(format!("{}:{value}", Value::from(key)))
        })
        .collect();
    format!(
        r#"{{"apiVersion":{},"kind":{},"request":{{{}}}}}"#,
        review["apiVersion"],
        review["kind"],
        fields.join(",")
    )
    .into_bytes()
}

/// Runs `f` `iterations` times and returns (allocations, bytes) per call.
fn allocations_per_call(iterations: u64, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let calls = ALLOCATIONS.load(Ordering::Relaxed);
    let bytes = ALLOCATED_BYTES.load(Ordering::Relaxed);
    for _ in 0..iterations {
        f();
    }
    let calls = ALLOCATIONS.load(Ordering::Relaxed) - calls;
    let bytes = ALLOCATED_BYTES.load(Ordering::Relaxed) - bytes;
    (
        calls as f64 / iterations as f64,
        bytes as f64 / iterations as f64,
    )
}

fn benches(c: &mut Criterion) {
    let injector = Injector::new(Config::default(), ResolvedMode::Native);
    let cases = [
        ("chiller-api", chiller_pod()),
        ("60-containers", pod_with_containers(60)),
        ("600KB", big_pod(600 * 1024)),
    ];
    for (name, pod_json) in &cases {
        // The pod as the webhook reads it: a view borrowing from its text.
        let pod_text = serde_json::to_string(pod_json).expect("serializes");
        let pod: PodView = serde_json::from_str(&pod_text).expect("a valid pod");
        let body = review_body(pod_json);
        assert!(
            matches!(
                injector.mutate(&pod, PodContext::default()),
                Decision::Inject { .. }
            ),
            "{name}: the benchmark pod must be injected"
        );

        let mutate = || {
            black_box(injector.mutate(black_box(&pod), PodContext::default()));
        };
        let review = || {
            let (review, _) =
                admission::review(&injector, &NoCluster, black_box(&body)).expect("a valid review");
            black_box(admission::to_bytes(&review));
        };
        let (mutate_allocs, mutate_bytes) = allocations_per_call(200, mutate);
        let (review_allocs, review_bytes) = allocations_per_call(20, review);
        println!(
            "allocations {name} (request body {} bytes): mutate {mutate_allocs:.0} allocations, {mutate_bytes:.0} bytes per call; \
             review {review_allocs:.0} allocations, {review_bytes:.0} bytes per call",
            body.len()
        );

        let mut group = c.benchmark_group(*name);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function("mutate", |b| {
            b.iter(|| injector.mutate(black_box(&pod), PodContext::default()))
        });
        group.bench_function("review", |b| {
            b.iter(|| {
                let (review, _) = admission::review(&injector, &NoCluster, black_box(&body))
                    .expect("a valid review");
                admission::to_bytes(&review)
            })
        });
        // Stages of `review`, to see where its time goes.
        group.bench_function("stage-parse-review", |b| {
            b.iter(|| {
                serde_json::from_slice::<AdmissionReview<DynamicObject>>(black_box(&body))
                    .expect("a review")
            })
        });
        group.bench_function("stage-pod-from-text", |b| {
            b.iter(|| serde_json::from_str::<PodView>(black_box(&pod_text)).expect("a pod"))
        });
        let Decision::Inject { patch, .. } = injector.mutate(&pod, PodContext::default()) else {
            unreachable!("checked above");
        };
        group.bench_function("stage-verify-patch", |b| {
            b.iter(|| verify_patch(black_box(&pod), black_box(&patch)).expect("a good patch"))
        });
        let (answered, _) =
            admission::review(&injector, &NoCluster, &body).expect("a valid review");
        group.bench_function("stage-response-to-bytes", |b| {
            b.iter(|| admission::to_bytes(black_box(&answered)))
        });
        group.finish();
    }
}

/// What the baseline server (`benches/baseline/server.rs`) does per request,
/// in process: parse into kube's types and answer "allowed" with no patch.
fn baseline_review(body: &[u8]) -> Vec<u8> {
    use kube::core::admission::{AdmissionRequest, AdmissionResponse};
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body).expect("a review");
    let request: AdmissionRequest<DynamicObject> = review.try_into().expect("a request");
    serde_json::to_vec(&AdmissionResponse::from(&request).into_review()).expect("serializes")
}

/// `MUTATE_CALLGRIND=<pod>:<path>:<iterations>` (pod: chiller-api,
/// 60-containers or 600KB; path: review, baseline or one of the stages of
/// [`stage`]) runs one path in a loop instead of criterion, for instruction
/// counts:
///
/// ```sh
/// MUTATE_CALLGRIND=chiller-api:review:1000 valgrind --tool=callgrind \
///   --collect-atstart=no --toggle-collect=mutate::callgrind_loop target/release/deps/mutate-*
/// ```
///
/// Callgrind's total divided by the iterations is the cost per review.
fn callgrind(spec: &str) {
    let mut parts = spec.split(':');
    let (Some(pod), Some(path), Some(iterations)) = (parts.next(), parts.next(), parts.next())
    else {
        panic!("MUTATE_CALLGRIND is <pod>:<review|baseline>:<iterations>, got {spec:?}");
    };
    let iterations: u64 = iterations.parse().expect("iterations is a number");
    let pod_json = match pod {
        "chiller-api" => chiller_pod(),
        "60-containers" => pod_with_containers(60),
        "600KB" => big_pod(600 * 1024),
        other => panic!("unknown pod {other:?}"),
    };
    let body = review_body(&pod_json);
    let injector = Injector::new(Config::default(), ResolvedMode::Native);
    let review = |body: &[u8]| {
        let (review, _) = admission::review(&injector, &NoCluster, body).expect("a valid review");
        admission::to_bytes(&review)
    };
    let stage_run;
    let run: &dyn Fn(&[u8]) -> Vec<u8> = match path {
        "review" => &review,
        "baseline" => &baseline_review,
        _ => {
            stage_run = stage(&injector, &pod_json, path);
            &*stage_run
        }
    };
    // Warm up outside the measured loop (lazy statics, allocator pages).
    black_box(run(&body));
    callgrind_loop(iterations, &body, run);
}

/// One path of the callgrind mode: a request body in, the bytes answered out.
type Run<'a> = dyn Fn(&[u8]) -> Vec<u8> + 'a;

/// The stages `scripts/speed-earns.sh` compares, each next to the plain way
/// it replaces (its input made outside the loop; the body is not read):
///
/// - `review-sorted`: the review of the same body with its keys sorted, so
///   `object` comes before `operation`: the envelope keeps the pod as raw
///   JSON and views it afterwards, two passes over the pod as with
///   `#[derive(Deserialize)]` envelope structs, against `review`'s one;
/// - `pod-view` / `pod-typed` / `pod-value`: the pod read as the webhook
///   reads it (a borrowed `PodView`), as a typed `k8s_openapi` Pod (and the
///   view the injector reads of it), as a `serde_json::Value`.
fn stage<'a>(injector: &'a Injector, pod_json: &Value, path: &str) -> Box<Run<'a>> {
    let pod_text = serde_json::to_string(pod_json).expect("serializes");
    match path {
        "review-sorted" => {
            let review: Value = serde_json::from_slice(&review_body(pod_json)).expect("JSON");
            let sorted = serde_json::to_vec(&review).expect("serializes");
            Box::new(move |_| {
                let (review, _) =
                    admission::review(injector, &NoCluster, &sorted).expect("a valid review");
                admission::to_bytes(&review)
            })
        }
        "pod-view" => Box::new(move |_| {
            black_box(serde_json::from_str::<PodView>(&pod_text).expect("a pod"));
            Vec::new()
        }),
        "pod-typed" => Box::new(move |_| {
            let pod: Pod = serde_json::from_str(&pod_text).expect("a pod");
            black_box(PodView::of(&pod));
            Vec::new()
        }),
        "pod-value" => Box::new(move |_| {
            black_box(serde_json::from_str::<Value>(&pod_text).expect("a pod"));
            Vec::new()
        }),
        other => panic!("unknown path {other:?}"),
    }
}

#[inline(never)]
fn callgrind_loop(iterations: u64, body: &[u8], run: &dyn Fn(&[u8]) -> Vec<u8>) {
    for _ in 0..iterations {
        black_box(run(black_box(body)));
    }
}

criterion_group! {
    name = mutation;
    // Short enough that `make bench` stays within a few minutes.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = benches
}

/// `MUTATE_WRITE_BODIES=<dir>` writes the three reviews to `<dir>/<pod>.json`
/// for `scripts/bench.sh`, so the load test posts the same pods.
fn write_bodies(dir: &str) {
    std::fs::create_dir_all(dir).expect("creating the bodies' folder");
    for (name, pod) in [
        ("chiller-api", chiller_pod()),
        ("60-containers", pod_with_containers(60)),
        ("600KB", big_pod(600 * 1024)),
    ] {
        let path = std::path::Path::new(dir).join(format!("{name}.json"));
        std::fs::write(&path, review_body(&pod)).expect("writing a body");
    }
}

fn main() {
    if let Ok(spec) = std::env::var("MUTATE_CALLGRIND") {
        callgrind(&spec);
        return;
    }
    if let Ok(dir) = std::env::var("MUTATE_WRITE_BODIES") {
        write_bodies(&dir);
        return;
    }
    mutation();
    Criterion::default().configure_from_args().final_summary();
}
