//! Properties of the mutation over generated pods (random containers, env,
//! ports, volumes, labels, annotations, init containers, restart policies):
//! an injection's patch applies, leaves a valid pod, and a second pass adds
//! nothing; a skip names a reason the pod actually gives. Over generated pods
//! and namespaces, `explain` says "would be injected" exactly when the
//! webhook injects.

use crate::support;

use std::collections::BTreeMap;

use chiller_metrics::{
    cli::explain::decide::Outcome as Verdict,
    config::Config,
    inject::{
        Decision, GUNICORN_CMD_ARGS, Injector, NamespacePolicy, Operation, PodContext, PodPatch,
        PodView, ResolvedMode, SkipReason, check_pod, verify_patch,
    },
    webhook::{
        NamespacePolicies,
        admission::{self, Outcome},
    },
};
use k8s_openapi::api::core::v1::Pod;
use proptest::{prelude::*, sample::select};
use serde::Deserialize;
use serde_json::{Map, Value, json};

const DOMAIN: &str = "metrics.chiller.io";

#[derive(Debug, Clone)]
struct GenPort {
    port: i32,
    protocol: &'static str,
    name: Option<&'static str>,
}

#[derive(Debug, Clone)]
struct GenContainer {
    name: &'static str,
    ports: Vec<GenPort>,
    env: Vec<(&'static str, Option<&'static str>)>,
    args: Option<&'static str>,
    mounts: Vec<usize>,
    env_from: bool,
    sidecar: bool,
}

#[derive(Debug, Clone)]
struct GenPod {
    labels: Vec<(&'static str, &'static str)>,
    annotations: Vec<(&'static str, String)>,
    containers: Vec<GenContainer>,
    init_containers: Vec<GenContainer>,
    volumes: Vec<&'static str>,
    restart_policy: Option<&'static str>,
    host_network: bool,
    windows: bool,
    owned_by_job: bool,
}

fn port() -> impl Strategy<Value = GenPort> {
    (
        prop_oneof![
            9 => select(vec![80, 5000, 8080, 9090, 8125]),
            1 => select(vec![9102, 9125]),
        ],
        select(vec!["TCP", "UDP"]),
        proptest::option::of(prop_oneof![
            9 => select(vec!["http", "metrics", "grpc", "admin"]),
            1 => Just("statsd-metrics"),
        ]),
    )
        .prop_map(|(port, protocol, name)| GenPort {
            port,
            protocol,
            name,
        })
}

fn container() -> impl Strategy<Value = GenContainer> {
    (
        prop_oneof![
            19 => select(vec!["api", "web", "worker", "proxy", "log-shipper", "migrate"]),
            1 => Just("statsd-exporter"),
        ],
        prop::collection::vec(port(), 0..3),
        prop::collection::vec(
            (
                select(vec![GUNICORN_CMD_ARGS, "FLASK_ENV", "DB_HOST", "WORKERS"]),
                proptest::option::of(select(vec![
                    "--workers=2",
                    "--statsd-host=elsewhere:8125",
                    "production",
                    "",
                ])),
            ),
            0..4,
        ),
        proptest::option::of(select(vec!["--bind=0.0.0.0:5000", "--statsd-host=x:1"])),
        prop::collection::vec(0usize..4, 0..3),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.5),
    )
        .prop_map(
            |(name, ports, env, args, mounts, env_from, sidecar)| GenContainer {
                name,
                ports,
                env,
                args,
                mounts,
                env_from,
                sidecar,
            },
        )
}

fn pod() -> impl Strategy<Value = GenPod> {
    let label = prop_oneof![
        9 => select(vec![
            ("app", "api"),
            ("app.kubernetes.io/name", "chiller"),
            ("app.kubernetes.io/component", "api"),
            ("metrics.chiller.io/inject", "enabled"),
            ("pod-template-hash", "6b8f7d9c4d"),
        ]),
        1 => select(vec![
            ("metrics.chiller.io/inject", "disabled"),
            ("metrics.chiller.io/injected", "true"),
        ]),
    ];
    let annotation = prop_oneof![
        1 => select(vec!["true", "false"]).prop_map(|v| ("metrics.chiller.io/inject", v.to_string())),
        3 => "[a-z][a-z0-9_-]{0,10}".prop_map(|v| ("metrics.chiller.io/statsd-prefix", v)),
        2 => select(vec!["api", "web,worker", "missing", "api, proxy", ","])
            .prop_map(|v| ("metrics.chiller.io/containers", v.to_string())),
        2 => select(vec!["api", "web"])
            .prop_map(|v| ("kubectl.kubernetes.io/default-container", v.to_string())),
        2 => Just(("checksum/config", "0f3c5d1b".to_string())),
    ];
    (
        prop::collection::vec(label, 0..4),
        prop::collection::vec(annotation, 0..4),
        prop::collection::vec(container(), 1..4),
        prop::collection::vec(container(), 0..2),
        prop::collection::vec(
            prop_oneof![
                9 => select(vec!["data", "config", "tmp"]),
                1 => Just("chiller-metrics-statsd-mapping"),
            ],
            0..4,
        ),
        proptest::option::of(select(vec!["Always", "OnFailure", "Never"])),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(
                labels,
                annotations,
                containers,
                init_containers,
                volumes,
                restart_policy,
                host_network,
                windows,
                owned_by_job,
            )| GenPod {
                labels,
                annotations,
                containers,
                init_containers,
                volumes,
                restart_policy,
                host_network,
                windows,
                owned_by_job,
            },
        )
}

/// A JSON object of these pairs.
fn object<V: serde::Serialize>(pairs: &[(&str, V)]) -> Value {
    let map: Map<String, Value> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    Value::Object(map)
}

/// Builds a pod the API server would accept: duplicates of names, port names
/// and (for running containers) ports are dropped; mounts refer to volumes.
fn to_json(generated: &GenPod) -> Value {
    let mut volumes: Vec<&str> = Vec::new();
    for v in &generated.volumes {
        if !volumes.contains(v) {
            volumes.push(v);
        }
    }
    let mut names = Vec::new();
    let mut port_names = Vec::new();
    let mut bound = Vec::new();
    let mut build = |c: &GenContainer, init: bool| -> Option<Value> {
        if names.contains(&c.name) {
            return None;
        }
        names.push(c.name);
        let running = !init || c.sidecar;
        let mut ports = Vec::new();
        for p in &c.ports {
            if running && bound.contains(&(p.port, p.protocol)) {
                continue;
            }
            if p.name.is_some_and(|n| port_names.contains(&n)) {
                continue;
            }
            if running {
                bound.push((p.port, p.protocol));
            }
            port_names.extend(p.name);
            let mut port = json!({"containerPort": p.port, "protocol": p.protocol});
            if let Some(name) = p.name {
                port["name"] = json!(name);
            }
            ports.push(port);
        }
        let mut container = json!({"name": c.name, "image": format!("example/{}:1", c.name)});
        if !ports.is_empty() {
            container["ports"] = Value::Array(ports);
        }
        if !c.env.is_empty() {
            let env: Vec<Value> = c
                .env
                .iter()
                .map(|(name, value)| match value {
                    Some(value) => json!({"name": name, "value": value}),
                    None => json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
                })
                .collect();
            container["env"] = Value::Array(env);
        }
        if let Some(args) = c.args {
            container["args"] = json!([args]);
        }
        let mut mounts = Vec::new();
        let mut mounted = Vec::new();
        for &m in &c.mounts {
            if let Some(volume) = volumes.get(m).filter(|v| !mounted.contains(*v)) {
                mounted.push(*volume);
                mounts.push(json!({"name": volume, "mountPath": format!("/mnt/{volume}")}));
            }
        }
        if !mounts.is_empty() {
            container["volumeMounts"] = Value::Array(mounts);
        }
        if c.env_from {
            container["envFrom"] = json!([{"configMapRef": {"name": "settings"}}]);
        }
        if init && c.sidecar {
            container["restartPolicy"] = json!("Always");
        }
        Some(container)
    };
    let containers: Vec<Value> = generated
        .containers
        .iter()
        .filter_map(|c| build(c, false))
        .collect();
    let init_containers: Vec<Value> = generated
        .init_containers
        .iter()
        .filter_map(|c| build(c, true))
        .collect();
    let mut spec = json!({"containers": containers});
    if !init_containers.is_empty() {
        spec["initContainers"] = Value::Array(init_containers);
    }
    if !volumes.is_empty() {
        spec["volumes"] = volumes
            .iter()
            .map(|v| json!({"name": v, "emptyDir": {}}))
            .collect();
    }
    if let Some(policy) = generated.restart_policy {
        spec["restartPolicy"] = json!(policy);
    }
    if generated.host_network {
        spec["hostNetwork"] = json!(true);
    }
    if generated.windows {
        spec["os"] = json!({"name": "windows"});
    }
    let mut metadata = json!({"name": "pod-1", "namespace": "chiller"});
    if !generated.labels.is_empty() {
        metadata["labels"] = object(&generated.labels);
    }
    if !generated.annotations.is_empty() {
        metadata["annotations"] = object(&generated.annotations);
    }
    if generated.owned_by_job {
        metadata["ownerReferences"] = json!([{
            "apiVersion": "batch/v1", "kind": "Job", "name": "migrate",
            "uid": "c0ffee00-1111-4222-8333-444455556666", "controller": true
        }]);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
}

/// Whether the pod really gives the reason the mutation skipped it for.
fn justified(reason: &SkipReason, pod: &Value, mode: ResolvedMode) -> bool {
    let label = |key: &str| pod["metadata"]["labels"][key].as_str();
    let annotation = |key: &str| pod["metadata"]["annotations"][key].as_str();
    let all: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .flat_map(|list| pod["spec"][list].as_array().into_iter().flatten())
        .collect();
    let ports = || {
        all.iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
    };
    match reason {
        SkipReason::AlreadyInjected => {
            label(&format!("{DOMAIN}/injected")) == Some("true")
                && all.iter().any(|c| c["name"] == "statsd-exporter")
        }
        SkipReason::OptedOutByLabel(_) => label(&format!("{DOMAIN}/inject")) == Some("disabled"),
        SkipReason::OptedOutByAnnotation(_) => {
            annotation(&format!("{DOMAIN}/inject")) == Some("false")
        }
        SkipReason::HostNetwork => pod["spec"]["hostNetwork"] == true,
        SkipReason::WindowsPod => pod["spec"]["os"]["name"] == "windows",
        SkipReason::JobNeedsNativeSidecar => {
            mode == ResolvedMode::Container
                && (pod["metadata"]["ownerReferences"][0]["kind"] == "Job"
                    || matches!(
                        pod["spec"]["restartPolicy"].as_str(),
                        Some("Never" | "OnFailure")
                    ))
        }
        SkipReason::NameConflict { kind, name } => match *kind {
            "container" => all.iter().any(|c| c["name"] == name.as_str()),
            "volume" => pod["spec"]["volumes"]
                .as_array()
                .is_some_and(|v| v.iter().any(|v| v["name"] == name.as_str())),
            "port" => ports().any(|p| p["name"] == name.as_str()),
            _ => false,
        },
        SkipReason::PortConflict { port, protocol, .. } => {
            [9102, 9125].contains(port)
                && ports()
                    .any(|p| p["containerPort"] == *port && p["protocol"] == protocol.as_str())
        }
        SkipReason::UnknownContainers { missing, .. } => {
            let wanted = annotation(&format!("{DOMAIN}/containers")).unwrap_or_default();
            missing.iter().all(|m| {
                wanted.split(',').any(|w| w.trim() == m)
                    && !pod["spec"]["containers"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().any(|c| c["name"] == m.as_str()))
            }) && (!missing.is_empty() || wanted.split(',').all(|w| w.trim().is_empty()))
        }
        SkipReason::NoTargetContainer(why) => !why.is_empty(),
        SkipReason::NotSelected { .. } | SkipReason::InvalidNamespaceSelector(_) => false,
    }
}

/// Checks one generated pod; `Ok(true)` if it was injected, `Ok(false)` if skipped.
fn check(generated: &GenPod, mode: ResolvedMode) -> Result<bool, TestCaseError> {
    let injector = Injector::new(Config::default(), mode);
    let pod_json = to_json(generated);
    let pod: Pod = serde_json::from_value(pod_json.clone())
        .map_err(|e| TestCaseError::fail(format!("generated pod does not parse: {e}")))?;
    prop_assert_eq!(check_pod(&pod), Ok(()), "generated pod is invalid");
    prop_assert_eq!(support::validate_k8s(&pod_json), Ok(()));

    match injector.mutate(&pod, PodContext::default()) {
        Decision::Inject { patch, status, .. } => {
            let mut patched = pod_json.clone();
            json_patch::patch(&mut patched, &patch.to_json_patch())
                .map_err(|e| TestCaseError::fail(format!("patch does not apply: {e}")))?;
            if let Err(errors) = support::validate_k8s(&patched) {
                return Err(TestCaseError::fail(format!(
                    "patched pod fails the schema: {errors}"
                )));
            }
            let patched_pod: Pod = serde_json::from_value(patched.clone())
                .map_err(|e| TestCaseError::fail(format!("patched pod does not parse: {e}")))?;
            prop_assert_eq!(check_pod(&patched_pod), Ok(()));
            if let Err(problem) = verify_patch(&pod, &patch) {
                return Err(TestCaseError::fail(format!(
                    "the webhook's verification rejects a good patch: {problem}"
                )));
            }
            prop_assert_eq!(
                &patched["metadata"]["labels"][format!("{DOMAIN}/injected")],
                "true"
            );
            for name in &status.containers {
                let container = patched["spec"]["containers"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["name"] == name.as_str()))
                    .ok_or_else(|| TestCaseError::fail(format!("no container {name}")))?;
                let args = container["env"]
                    .as_array()
                    .and_then(|env| env.iter().rfind(|e| e["name"] == GUNICORN_CMD_ARGS))
                    .and_then(|e| e["value"].as_str())
                    .unwrap_or_default();
                prop_assert!(
                    args.contains("--statsd-host=localhost:9125"),
                    "{name}: {args}"
                );
            }
            match injector.mutate(&patched_pod, PodContext::default()) {
                Decision::Skip(SkipReason::AlreadyInjected) => {}
                other => {
                    return Err(TestCaseError::fail(format!(
                        "second pass must add nothing, got {other:?}"
                    )));
                }
            }
            Ok(true)
        }
        Decision::Skip(reason) => {
            prop_assert!(
                justified(&reason, &pod_json, mode),
                "skip reason {reason:?} ({reason}) does not hold for {pod_json:#}"
            );
            // A skip worth a warning is recorded once: the marked pod is
            // valid, skipped for the same reason, and not marked again.
            let view = PodView::deserialize(&pod_json).unwrap();
            let mark = injector.skip_mark(&view, &reason);
            prop_assert_eq!(mark.is_some(), reason.warrants_warning());
            if let Some(mark) = mark {
                let mut marked = pod_json.clone();
                json_patch::patch(&mut marked, &mark.to_json_patch())
                    .map_err(|e| TestCaseError::fail(format!("skip mark does not apply: {e}")))?;
                prop_assert_eq!(
                    &marked["metadata"]["annotations"][format!("{DOMAIN}/skipped")],
                    reason.metric_label()
                );
                prop_assert_eq!(support::validate_k8s(&marked), Ok(()));
                let marked_view = PodView::deserialize(&marked).unwrap();
                match injector.mutate(&marked_view, PodContext::default()) {
                    Decision::Skip(again) => {
                        prop_assert_eq!(&again, &reason);
                        prop_assert!(injector.skip_mark(&marked_view, &again).is_none());
                    }
                    other => {
                        return Err(TestCaseError::fail(format!(
                            "the marked pod must be skipped again, got {other:?}"
                        )));
                    }
                }
            }
            Ok(false)
        }
    }
}

/// Generated values per property, before any is counted as reaching it.
const CASES: u32 = 384;
/// Cases that must reach the part a property is about: injection, or the
/// verification of an injected patch. Far below what a run reaches (about
/// 95 of 384 in native mode, 250 of 1,536 in container mode: five standard
/// deviations and more), so chance does not fail it, while a generator
/// drifting towards skips does.
const MIN_REACHED: u32 = 48;

/// Runs `property` over `cases` generated values and returns how many
/// reached the part it is about (`Ok(true)`), so that a generator drifting
/// towards skips cannot leave the property tested on nothing.
fn reached<T: std::fmt::Debug>(
    cases: u32,
    strategy: impl Strategy<Value = T>,
    property: impl Fn(&T) -> Result<bool, TestCaseError>,
) -> u32 {
    let reached = std::cell::Cell::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let result = runner.run(&strategy, |value| {
        if property(&value)? {
            reached.set(reached.get() + 1);
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    eprintln!("{} of {cases} cases reached the property", reached.get());
    reached.get()
}

/// Checks `cases` generated pods in `mode`; enough must reach injection.
fn injects_valid_pods_once(cases: u32, mode: ResolvedMode) {
    let injected = reached(cases, pod(), |generated| check(generated, mode));
    assert!(
        injected >= MIN_REACHED,
        "only {injected} of {cases} generated pods reached injection"
    );
}

#[test]
fn native_mode_injects_valid_pods_once() {
    injects_valid_pods_once(CASES, ResolvedMode::Native);
}

/// Container mode also skips Job-like pods (restart policy Never or
/// OnFailure, or owned by a Job: a regular sidecar would keep them from
/// finishing), so about one in six generated pods is injected; it runs four
/// times the cases.
#[test]
fn container_mode_injects_valid_pods_once() {
    injects_valid_pods_once(4 * CASES, ResolvedMode::Container);
}

#[test]
fn verification_on_the_pod_shape_agrees_with_the_whole_pod() {
    let verified = reached(CASES, (pod(), corruption()), |(generated, corruption)| {
        check_verification(generated, *corruption)
    });
    assert!(
        verified >= MIN_REACHED,
        "only {verified} of {CASES} generated patches reached verification"
    );
}

/// A way to break a good patch, as a bug in the injector could.
#[derive(Debug, Clone, Copy)]
enum Corruption {
    None,
    /// Points an operation one past the end of the list it indexes.
    IndexOutOfRange,
    /// Adds a second container under an existing name.
    DuplicateContainer,
    /// Adds a volume under an existing name.
    DuplicateVolume,
    /// Gives the sidecar a port another long-running container declares.
    DuplicatePort,
    /// Mounts a volume the pod does not define.
    MissingVolume,
    /// Replaces a value that is not there.
    ReplaceMissing,
}

fn corruption() -> impl Strategy<Value = Corruption> {
    select(vec![
        Corruption::None,
        Corruption::IndexOutOfRange,
        Corruption::DuplicateContainer,
        Corruption::DuplicateVolume,
        Corruption::DuplicatePort,
        Corruption::MissingVolume,
        Corruption::ReplaceMissing,
    ])
}

/// Adds a corruption to the injector's patch (whose sidecar and volume stay
/// prebuilt, as the webhook verifies them).
fn corrupt(patch: &mut PodPatch, pod: &Value, corruption: Corruption) {
    use json_patch::jsonptr::PointerBuf;
    let add = |path: &str, value: Value| Operation::add(PointerBuf::parse(path).unwrap(), value);
    let first = pod["spec"]["containers"][0]["name"]
        .as_str()
        .unwrap_or("app");
    match corruption {
        Corruption::None => {}
        Corruption::IndexOutOfRange => {
            let count = pod["spec"]["containers"].as_array().map_or(0, Vec::len);
            patch.0.push(add(
                &format!("/spec/containers/{}/env/-", count + 1),
                json!({"name": "X", "value": "1"}),
            ));
        }
        Corruption::DuplicateContainer => patch.0.push(add(
            "/spec/containers/-",
            json!({"name": first, "image": "other:1"}),
        )),
        Corruption::DuplicateVolume => {
            let mut patched = pod.clone();
            json_patch::patch(&mut patched, &patch.to_json_patch())
                .expect("the good patch applies");
            let name = patched["spec"]["volumes"][0]["name"].clone();
            patch.0.push(add(
                "/spec/volumes/-",
                json!({"name": name, "emptyDir": {}}),
            ));
        }
        Corruption::DuplicatePort => patch.0.push(add(
            "/spec/containers/-",
            json!({"name": "extra", "image": "x:1", "ports": [{"containerPort": 9102}]}),
        )),
        Corruption::MissingVolume => patch.0.push(add(
            "/spec/containers/-",
            json!({"name": "extra", "image": "x:1",
                   "volumeMounts": [{"name": "not-defined", "mountPath": "/x"}]}),
        )),
        Corruption::ReplaceMissing => patch.0.push(Operation::replace(
            PointerBuf::parse("/spec/containers/0/env/999/value").unwrap(),
            json!("x"),
        )),
    }
}

/// The webhook verifies a patch on the pod's shape; applying it to the whole
/// pod and checking the result must give the same verdict.
/// `Ok(true)` if the pod was injected and its (corrupted) patch verified.
fn check_verification(generated: &GenPod, corruption: Corruption) -> Result<bool, TestCaseError> {
    let injector = Injector::new(Config::default(), ResolvedMode::Native);
    let pod_json = to_json(generated);
    let pod: Pod = serde_json::from_value(pod_json.clone())
        .map_err(|e| TestCaseError::fail(format!("generated pod does not parse: {e}")))?;
    let Decision::Inject { mut patch, .. } = injector.mutate(&pod, PodContext::default()) else {
        return Ok(false);
    };
    corrupt(&mut patch, &pod_json, corruption);
    let mut patched = pod_json.clone();
    let whole = json_patch::patch(&mut patched, &patch.to_json_patch())
        .map_err(|e| e.to_string())
        .and_then(|()| serde_json::from_value::<Pod>(patched).map_err(|e| e.to_string()))
        .and_then(|patched| check_pod(&patched).map_err(|e| e.to_string()));
    let shape = verify_patch(&pod, &patch);
    prop_assert_eq!(
        whole.is_ok(),
        shape.is_ok(),
        "{:?}: whole pod says {:?}, shape says {:?}",
        corruption,
        whole,
        shape.map_err(|e| e.to_string())
    );
    if !matches!(corruption, Corruption::None) {
        prop_assert!(whole.is_err(), "{:?} must break the patch", corruption);
    }
    Ok(true)
}

#[test]
fn namespace_selector_skips_are_justified() {
    let injector = Injector::new(Config::default(), ResolvedMode::Native);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "db-0", "labels": {"app": "db"}},
        "spec": {"containers": [{"name": "postgres", "image": "postgres:16"}]}
    }))
    .unwrap();
    let policy = NamespacePolicy {
        pod_selector: Some("app!=db".into()),
    };
    let ctx = PodContext {
        namespace: Some(&policy),
        ..Default::default()
    };
    assert_eq!(
        injector.mutate(&pod, ctx),
        Decision::Skip(SkipReason::NotSelected {
            selector: "app!=db".into(),
            unmet: vec!["app!=db".into()],
        })
    );
}

/// A namespace for the explain property: its name, whether it opted in,
/// and its pod-selector annotation.
#[derive(Debug, Clone)]
struct GenNamespace {
    name: &'static str,
    opted_in: bool,
    pod_selector: Option<&'static str>,
}

fn namespace() -> impl Strategy<Value = GenNamespace> {
    (
        prop_oneof![9 => Just("chiller"), 1 => Just("kube-system")],
        prop::bool::weighted(0.85),
        prop_oneof![
            6 => Just(None),
            4 => select(vec![
                "app=api",
                "app!=api",
                "app in (api, chiller)",
                "!metrics.chiller.io/injected",
                "app.kubernetes.io/name",
                "app in api",
                " ",
            ])
            .prop_map(Some),
        ],
    )
        .prop_map(|(name, opted_in, pod_selector)| GenNamespace {
            name,
            opted_in,
            pod_selector,
        })
}

/// One case: a pod (injected already, or not), with `creationTimestamp`
/// absent or null, in a namespace, under a sidecar mode.
#[derive(Debug, Clone)]
struct ExplainCase {
    pod: GenPod,
    namespace: GenNamespace,
    injected_before: bool,
    null_creation_timestamp: bool,
    mode: ResolvedMode,
}

fn explain_case() -> impl Strategy<Value = ExplainCase> {
    (
        pod(),
        namespace(),
        prop::bool::weighted(0.15),
        prop::bool::ANY,
        select(vec![ResolvedMode::Native, ResolvedMode::Container]),
    )
        .prop_map(
            |(pod, namespace, injected_before, null_creation_timestamp, mode)| ExplainCase {
                pod,
                namespace,
                injected_before,
                null_creation_timestamp,
                mode,
            },
        )
}

/// The one namespace of a case, as the webhook's namespace cache holds it.
struct OneNamespace {
    name: &'static str,
    policy: NamespacePolicy,
}

impl NamespacePolicies for OneNamespace {
    fn policy(&self, namespace: &str) -> Option<NamespacePolicy> {
        (namespace == self.name).then(|| self.policy.clone())
    }
}

/// How a case ended, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reached {
    /// The API server calls the webhook and it injects.
    Injected,
    /// The API server calls the webhook and it leaves the pod alone.
    Skipped,
    /// The chart's configuration keeps the API server from calling the webhook.
    NotCalled,
}

/// Explain's verdict on the pod, read as `explain -f` reads the manifest,
/// against the webhook's answer to the API server's review of its creation.
fn check_explain(case: &ExplainCase) -> Result<Reached, TestCaseError> {
    let injector = Injector::new(Config::default(), case.mode);
    let keys = injector.keys();
    let mut pod = to_json(&case.pod);
    if case.injected_before
        && let Decision::Inject { patch, .. } = injector.mutate(
            &serde_json::from_value::<Pod>(pod.clone()).unwrap(),
            PodContext::default(),
        )
    {
        json_patch::patch(&mut pod, &patch.to_json_patch()).unwrap();
    }
    let ns = &case.namespace;
    pod["metadata"]["namespace"] = json!(ns.name);
    if case.null_creation_timestamp {
        pod["metadata"]["creationTimestamp"] = Value::Null;
    }
    let mut labels = BTreeMap::new();
    if ns.opted_in {
        labels.insert(keys.inject.clone(), "enabled".to_string());
    }
    let annotations: BTreeMap<String, String> = ns
        .pod_selector
        .map(|selector| (keys.pod_selector.clone(), selector.to_string()))
        .into_iter()
        .collect();

    // The webhook: called as the chart configures the API server (opted-in
    // namespaces but kube-system, pods without the opt-out label and without
    // the injected label), answering with the review handler.
    let pod_label = |key: &str| pod["metadata"]["labels"].get(key);
    let called = ns.opted_in
        && ns.name != "kube-system"
        && pod_label(&keys.inject) != Some(&json!("disabled"))
        && pod_label(&keys.injected).is_none();
    let namespaces = OneNamespace {
        name: ns.name,
        policy: NamespacePolicy::from_annotations(Some(&annotations), keys),
    };
    let body = serde_json::to_vec(&support::pod_create_review(&pod, ns.name)).unwrap();
    let (_, outcome) = admission::review(&injector, &namespaces, &body)
        .map_err(|e| TestCaseError::fail(format!("the review failed: {e}")))?;
    let reached = match (called, outcome == Outcome::Injected) {
        (false, _) => Reached::NotCalled,
        (true, true) => Reached::Injected,
        (true, false) => Reached::Skipped,
    };

    let explanation = support::explain_manifest(&pod, "default", labels, annotations, &injector);
    prop_assert_ne!(
        explanation.outcome,
        Verdict::Undetermined,
        "{:#?}",
        explanation
    );
    let says_injected = explanation.outcome == Verdict::WouldInject;
    prop_assert_eq!(
        says_injected,
        reached == Reached::Injected,
        "explain: {:#?}\nwebhook: {:?} ({:?}) for {:#}",
        explanation,
        reached,
        outcome,
        pod
    );
    prop_assert_eq!(says_injected, explanation.verdict == "would be injected");
    if reached == Reached::NotCalled {
        prop_assert_eq!(
            explanation.outcome,
            Verdict::NotCalled,
            "{:#?}",
            explanation
        );
    }
    Ok(reached)
}

/// Explain and the webhook agree on every generated pod and namespace, and
/// enough cases end each way (injected, skipped by the webhook, not called):
/// a run reaches about 100, 630 and 410 of 1,152, so the least, injection,
/// is more than five standard deviations above the minimum.
#[test]
fn explain_says_injected_exactly_when_the_webhook_injects() {
    let cases = 3 * CASES;
    let counts = std::cell::RefCell::new(BTreeMap::<Reached, u32>::new());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let result = runner.run(&explain_case(), |case| {
        let reached = check_explain(&case)?;
        *counts.borrow_mut().entry(reached).or_default() += 1;
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    let counts = counts.into_inner();
    eprintln!("of {cases} cases: {counts:?}");
    for way in [Reached::Injected, Reached::Skipped, Reached::NotCalled] {
        let count = counts.get(&way).copied().unwrap_or(0);
        assert!(
            count >= MIN_REACHED,
            "only {count} of {cases} generated cases ended {way:?}: {counts:?}"
        );
    }
}
