//! The webhook called by a real kube-apiserver: the chart installed with
//! helm, `serve` running as the chart's ServiceAccount, pods made by the real
//! kube-controller-manager (see `tests/support/controlplane`).

use crate::support::controlplane;
use crate::support::install;
use crate::support::{self, wait_until};

use std::{
    collections::BTreeMap,
    sync::OnceLock,
    time::{Duration, Instant},
};

use controlplane::ControlPlane;
use install::{
    DOMAIN, Install, dry_run_pod, ensure_namespace, kubectl_json, opt_in, run, run_with_input,
};
use serde_json::{Value, json};
use support::https::ServeProcess;

/// The API server stopped under a replica: a process of its own in `make
/// test`, beside this module's other tests.
mod outage;

/// How long controllers may take to create pods. Only guards against hangs.
const CONVERGE: Duration = Duration::from_secs(90);

struct Fixture {
    plane: &'static ControlPlane,
    install: Install,
    serve: ServeProcess,
}

/// One install and one `serve` for the whole binary.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        std::thread::spawn(|| {
            let plane = ControlPlane::shared();
            let _logs = plane.logs_on_failure();
            let install = Install::chart(plane, &[]);
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let serve = runtime.block_on(install.serve("chiller-metrics-0"));
            install.point_webhook_at(&serve);
            Fixture {
                plane,
                install,
                serve,
            }
        })
        .join()
        .expect("installing chiller-metrics on the local control plane")
    })
}

/// The tests share one webhook and read its counters: one test at a time.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Fixture {
    fn logs_on_failure(&self) -> controlplane::LogsOnFailure<'_> {
        self.plane
            .logs_on_failure()
            .with("chiller-metrics serve", self.serve.log_tail(40))
    }

    /// Reviews the webhook has answered so far, from its own metrics.
    fn reviews_answered(&self) -> f64 {
        let metrics = self.serve_metrics();
        support::https::sample(&metrics, "chiller_metrics_admission_duration_seconds_count")
            .expect("the review counter is exported")
    }

    fn serve_metrics(&self) -> String {
        install::metrics_of(&self.serve)
    }
}

fn injected_key() -> String {
    format!("{DOMAIN}/injected")
}

/// Polls the pods of `namespace` until `done` holds for them.
fn wait_for_pods(namespace: &str, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let list = kubectl_json(fixture().plane, &["get", "pods", "-n", namespace]);
        let pods = list["items"].as_array().cloned().unwrap_or_default();
        if done(&pods) {
            return pods;
        }
        assert!(
            Instant::now() < deadline,
            "{what} in {namespace} not seen within {CONVERGE:?}; pods: {:#}",
            names(&pods)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn names(pods: &[Value]) -> Value {
    pods.iter().map(|p| p["metadata"]["name"].clone()).collect()
}

fn name_of(pod: &Value) -> &str {
    pod["metadata"]["name"].as_str().unwrap_or("?")
}

/// The `--statsd-prefix` gunicorn gets, if the pod was injected.
fn statsd_prefix(pod: &Value) -> Option<String> {
    pod["spec"]["containers"]
        .as_array()?
        .iter()
        .flat_map(|c| c["env"].as_array().cloned().unwrap_or_default())
        .find(|env| env["name"] == "GUNICORN_CMD_ARGS")
        .and_then(|env| {
            env["value"]
                .as_str()?
                .split_whitespace()
                .find_map(|arg| arg.strip_prefix("--statsd-prefix=").map(String::from))
        })
}

/// Asserts everything an injected pod carries, as the API server stored it.
fn assert_injected(pod: &Value) {
    let name = name_of(pod);
    assert_eq!(
        pod["metadata"]["labels"][injected_key()],
        "true",
        "{name} lacks the injected label"
    );
    let status = pod["metadata"]["annotations"][format!("{DOMAIN}/status")]
        .as_str()
        .unwrap_or_else(|| panic!("{name} lacks the status annotation"));
    serde_json::from_str::<Value>(status).expect("the status annotation is JSON");
    // Kubernetes 1.37 supports native sidecars: `auto` chose them from /version.
    let sidecars: Vec<&Value> = pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == "statsd-exporter")
        .collect();
    assert_eq!(sidecars.len(), 1, "{name}: exactly one sidecar");
    assert_eq!(
        sidecars[0]["restartPolicy"], "Always",
        "{name}: a native sidecar"
    );
    assert!(
        !pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "statsd-exporter"),
        "{name}: the sidecar is not also an app container"
    );
    let args = statsd_prefix(pod);
    assert!(
        args.is_some(),
        "{name}: GUNICORN_CMD_ARGS names a statsd prefix"
    );
}

fn assert_untouched(pod: &Value) {
    let name = name_of(pod);
    assert!(
        pod["metadata"]["labels"].get(injected_key()).is_none(),
        "{name} must not be injected: {pod:#}"
    );
    assert!(
        pod["spec"]["initContainers"]
            .as_array()
            .is_none_or(|c| !c.iter().any(|c| c["name"] == "statsd-exporter")),
        "{name} must not get the sidecar"
    );
    assert_eq!(
        statsd_prefix(pod),
        None,
        "{name} must not get GUNICORN_CMD_ARGS"
    );
}

/// The rendered chiller chart fixture as one List, `nodePort`s removed.
fn chiller_chart_without_node_ports() -> Value {
    let text = std::fs::read_to_string(support::crate_path(
        "tests/fixtures/manifests/chiller-rendered.yaml",
    ))
    .unwrap();
    fn strip(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("nodePort");
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut items = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let mut object = <Value as serde::Deserialize>::deserialize(document).unwrap();
        strip(&mut object);
        match object["kind"].as_str() {
            Some("List") => items.extend(object["items"].as_array().unwrap().iter().cloned()),
            Some(_) => items.push(object),
            None => {}
        }
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// A Deployment without app labels: its pods' prefix comes from the owner.
fn worker_deployment() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chiller-worker"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"tier": "worker"}},
            "template": {
                "metadata": {"labels": {"tier": "worker"}},
                "spec": {"containers": [{"name": "worker", "image": "ghcr.io/chiller-demo/chiller-api:1.4.2"}]},
            },
        },
    })
}

#[test]
fn the_api_server_reports_its_real_version() {
    let f = fixture();
    let (status, body) = f.plane.get("/version");
    assert_eq!(status, 200);
    let version: Value = serde_json::from_str(&body).unwrap();
    let pinned = std::fs::read_to_string(support::crate_dir().join("tools/cluster/go.mod"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("k8s.io/kubernetes ")?
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
        .expect("go.mod pins k8s.io/kubernetes");
    assert_eq!(version["gitVersion"], pinned.as_str());
    assert_eq!(version["major"], "1");
    let minor = pinned.split('.').nth(1).unwrap();
    assert_eq!(version["minor"], minor);
}

#[test]
fn controller_made_pods_are_injected_in_every_opted_in_namespace() {
    let f = fixture();
    let _serial = one_at_a_time();
    let _logs = f.logs_on_failure();
    // The chiller chart, installed twice: without its fixed nodePort, which
    // only one Service in a cluster can hold.
    let chart = chiller_chart_without_node_ports();
    for namespace in ["chiller-one", "chiller-two"] {
        opt_in(fixture().plane, namespace);
        run_with_input(
            f.plane
                .kubectl()
                .args(["apply", "-n", namespace, "-f", "-"]),
            &chart.to_string(),
        );
        run_with_input(
            f.plane
                .kubectl()
                .args(["apply", "-n", namespace, "-f", "-"]),
            &worker_deployment().to_string(),
        );
    }
    for namespace in ["chiller-one", "chiller-two"] {
        // api ×2, frontend, canary, worker, ws-0, db-0, the migrate Job's pod, the bare Pod.
        let pods = wait_for_pods(namespace, "nine pods", |pods| pods.len() >= 9);
        let mut prefixes = BTreeMap::new();
        for pod in &pods {
            let name = name_of(pod);
            let controlled = pod["metadata"]["ownerReferences"][0]["controller"] == true;
            if name.starts_with("db-") || name == "chiller-test-connection" {
                assert_untouched(pod);
                continue;
            }
            assert!(controlled, "{name} was made by a controller");
            assert!(
                pod["metadata"]["generateName"].is_string() || name.starts_with("chiller-ws-"),
                "{name}: a ReplicaSet or Job pod has a generateName"
            );
            assert_injected(pod);
            let owner = pod["metadata"]["ownerReferences"][0]["name"]
                .as_str()
                .unwrap();
            prefixes.insert(
                owner.split('-').take(3).collect::<Vec<_>>().join("-"),
                statsd_prefix(pod).unwrap(),
            );
        }
        // README: annotation, then app.kubernetes.io/name(-component), then
        // `app`, then the owner's name without the pod-template hash.
        let worker = pods
            .iter()
            .find(|p| name_of(p).starts_with("chiller-worker-"))
            .expect("the worker pod");
        assert_eq!(
            statsd_prefix(worker).as_deref(),
            Some("chiller-worker"),
            "a ReplicaSet pod's prefix is its Deployment's name"
        );
        let by_name = |start: &str| {
            pods.iter()
                .find(|p| name_of(p).starts_with(start))
                .and_then(statsd_prefix)
                .unwrap_or_else(|| panic!("an injected pod named {start}…; {prefixes:?}"))
        };
        assert_eq!(by_name("chiller-api-canary-"), "api");
        assert_eq!(by_name("chiller-frontend-"), "chiller-frontend");
        assert_eq!(by_name("chiller-ws-0"), "ws");
        assert_eq!(by_name("chiller-migrate-"), "chiller-migrate");
        let api_pods: Vec<_> = pods
            .iter()
            .filter(|p| {
                let name = name_of(p);
                name.starts_with("chiller-api-") && !name.starts_with("chiller-api-canary")
            })
            .collect();
        assert_eq!(api_pods.len(), 2);
        for pod in api_pods {
            assert_eq!(statsd_prefix(pod).as_deref(), Some("chiller-api"));
        }
        // The frontend's own gunicorn settings are kept, ours appended.
        let frontend = pods
            .iter()
            .find(|p| name_of(p).starts_with("chiller-frontend-"))
            .unwrap();
        let args = frontend["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "GUNICORN_CMD_ARGS")
            .unwrap()["value"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(args.starts_with("--workers 4 --timeout 60"), "{args}");
        assert!(args.contains("--statsd-host=localhost:9125"), "{args}");
    }
}

#[test]
fn pods_outside_opted_in_namespaces_or_opted_out_come_back_untouched() {
    let f = fixture();
    let _serial = one_at_a_time();
    let _logs = f.logs_on_failure();
    let pod = install::probe_pod;
    ensure_namespace(f.plane, "chiller-not-labeled", &[]);
    assert_untouched(&dry_run_pod(f.plane, "chiller-not-labeled", &pod("plain")));
    // kube-system is excluded even when labeled.
    ensure_namespace(
        f.plane,
        "kube-system",
        &[(&format!("{DOMAIN}/inject"), "enabled")],
    );
    assert_untouched(&dry_run_pod(f.plane, "kube-system", &pod("system")));

    opt_in(fixture().plane, "chiller-opt-outs");
    let mut labeled = pod("labeled");
    labeled["metadata"]["labels"][format!("{DOMAIN}/inject")] = json!("disabled");
    assert_untouched(&dry_run_pod(f.plane, "chiller-opt-outs", &labeled));
    let mut annotated = pod("annotated");
    annotated["metadata"]["annotations"] = json!({format!("{DOMAIN}/inject"): "false"});
    assert_untouched(&dry_run_pod(f.plane, "chiller-opt-outs", &annotated));
    assert_injected(&dry_run_pod(f.plane, "chiller-opt-outs", &pod("control")));

    // The namespace's pod-selector excludes the database.
    opt_in(fixture().plane, "chiller-selector");
    install::annotate_namespace(
        f.plane,
        "chiller-selector",
        &[&format!("{DOMAIN}/pod-selector=app!=db")],
    );
    wait_until(CONVERGE, "the pod-selector is seen by the webhook", || {
        assert_untouched_or(&dry_run_pod(f.plane, "chiller-selector", &pod("db")))
    });
    assert_injected(&dry_run_pod(f.plane, "chiller-selector", &pod("api")));
}

/// True when `pod` is untouched; used while a namespace change propagates.
fn assert_untouched_or(pod: &Value) -> bool {
    pod["metadata"]["labels"].get(injected_key()).is_none()
}

#[test]
fn a_server_side_dry_run_returns_the_injected_pod_and_stores_nothing() {
    let f = fixture();
    let _serial = one_at_a_time();
    let _logs = f.logs_on_failure();
    opt_in(fixture().plane, "chiller-dry-run");
    // The reconcile loop (the same ServiceAccount) sets the namespace up
    // first; only the webhook's writes are looked for.
    wait_until(CONVERGE, "the reconcile loop sets up the namespace", || {
        install::reconcile_status(f.plane, "chiller-dry-run").is_some()
    });
    let before = f.plane.audit_events().len();
    let pod = dry_run_pod(f.plane, "chiller-dry-run", &install::probe_pod("dry"));
    assert_injected(&pod);
    let stored = f
        .plane
        .kubectl()
        .args(["get", "pod", "dry", "-n", "chiller-dry-run"])
        .output()
        .unwrap();
    assert!(!stored.status.success(), "a dry run stores no pod");
    // The webhook has no side effects: it wrote nothing to the API server.
    let events = f.plane.audit_events();
    let writes: Vec<&Value> = events[before..]
        .iter()
        .filter(|e| {
            e["user"]["username"] == "system:serviceaccount:chiller-metrics:chiller-metrics"
                && e["objectRef"]["namespace"] == "chiller-dry-run"
                && !matches!(e["verb"].as_str(), Some("get" | "list" | "watch"))
        })
        .collect();
    assert!(
        writes.is_empty(),
        "the webhook wrote during a dry run: {writes:#?}"
    );
}

#[test]
fn a_pod_already_carrying_the_injected_label_is_never_sent_to_the_webhook() {
    let f = fixture();
    let _serial = one_at_a_time();
    let _logs = f.logs_on_failure();
    opt_in(fixture().plane, "chiller-match-conditions");
    // The matchConditions expression was accepted as the chart wrote it.
    let configuration = kubectl_json(
        f.plane,
        &[
            "get",
            "mutatingwebhookconfiguration",
            install::WEBHOOK_CONFIGURATION,
        ],
    );
    let conditions = &configuration["webhooks"][0]["matchConditions"];
    assert_eq!(
        conditions[0]["name"], "not-already-injected",
        "{configuration:#}"
    );

    let mut labeled = install::probe_pod("pre-labeled");
    labeled["metadata"]["labels"][injected_key()] = json!("true");
    let before = f.reviews_answered();
    let pod = dry_run_pod(f.plane, "chiller-match-conditions", &labeled);
    assert!(
        pod["spec"]["initContainers"].is_null(),
        "not injected: {pod:#}"
    );
    assert_eq!(f.reviews_answered(), before, "the webhook was not called");
    // Positive control: an unlabeled pod is sent, and counted once.
    assert_injected(&dry_run_pod(
        f.plane,
        "chiller-match-conditions",
        &install::probe_pod("control"),
    ));
    assert_eq!(f.reviews_answered(), before + 1.0, "one review for one pod");
}

#[test]
fn every_golden_request_replayed_as_a_real_create_is_accepted() {
    let f = fixture();
    let _serial = one_at_a_time();
    let _logs = f.logs_on_failure();
    ensure_namespace(f.plane, "chiller-golden-control", &[]);
    let dir = support::crate_path("tests/golden/requests");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut replayed = 0;
    let mut broken_by_us = Vec::new();
    for file in &files {
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        let review: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let request = &review["request"];
        if request["kind"]["kind"] != "Pod"
            || request["operation"] != "CREATE"
            || request["subResource"].is_string()
        {
            continue;
        }
        let namespace = format!("golden-{stem}");
        let namespace = &namespace[..namespace.len().min(63)];
        opt_in(fixture().plane, namespace);
        let settings = dir.join(format!("{stem}.namespace.yaml"));
        if settings.is_file() {
            let object: Value =
                serde_norway::from_str(&std::fs::read_to_string(&settings).unwrap()).unwrap();
            for (key, value) in object["metadata"]["annotations"]
                .as_object()
                .into_iter()
                .flatten()
            {
                install::annotate_namespace(
                    f.plane,
                    namespace,
                    &[&format!("{key}={}", value.as_str().unwrap())],
                );
            }
        }
        let mut pod = request["object"].clone();
        let metadata = pod["metadata"].as_object_mut().unwrap();
        for field in [
            "namespace",
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "managedFields",
        ] {
            metadata.remove(field);
        }
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(support::crate_path(&format!(
                "tests/golden/expected/{stem}.json"
            )))
            .unwrap(),
        )
        .unwrap();
        let same_config = !dir.join(format!("{stem}.config.yaml")).exists();
        // The namespace watch may lag the annotation: retry while the outcome differs.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let created = install::try_dry_run_pod(f.plane, namespace, &pod);
            if !created.status.success() {
                let control = install::try_dry_run_pod(f.plane, "chiller-golden-control", &pod);
                if control.status.success() {
                    broken_by_us.push(format!(
                        "{stem}: {}",
                        String::from_utf8_lossy(&created.stderr)
                    ));
                }
                break;
            }
            replayed += 1;
            let stored: Value = serde_json::from_slice(&created.stdout).unwrap();
            // Injected by us: the label is new (a fixture may carry it already).
            let injected = stored["metadata"]["labels"][injected_key()] == "true"
                && pod["metadata"]["labels"][injected_key()] != "true";
            let want = expected["outcome"]["outcome"] == "injected";
            if !same_config || injected == want {
                if injected {
                    assert_injected(&stored);
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{stem}: the golden outcome is {:?}, the API server stored injected={injected}",
                expected["outcome"]
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    assert!(
        broken_by_us.is_empty(),
        "our patch made the API server reject: {broken_by_us:#?}"
    );
    assert!(replayed >= 20, "only {replayed} golden pods were replayed");
}

/// A second mutating webhook, as another injector would be: it adds a
/// container named `late` to every pod it sees.
struct AddContainerWebhook {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AddContainerWebhook {
    fn start(certs: &std::path::Path) -> Self {
        use chiller_metrics::webhook::{server, tls};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cert =
            tls::ReloadingCert::load(&certs.join("tls.crt"), &certs.join("tls.key")).unwrap();
        let config = tls::server_config(cert, tls::MinTlsVersion::Tls12).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let router = axum::Router::new().route("/add", axum::routing::post(add_container));
                let _ = server::serve_https(
                    listener,
                    config,
                    router,
                    server::Limits::default(),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
            });
        });
        Self {
            port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for AddContainerWebhook {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|stop| stop.send(()));
        let _ = self.thread.take().map(|thread| thread.join());
    }
}

async fn add_container(axum::Json(review): axum::Json<Value>) -> axum::Json<Value> {
    use base64::Engine;
    let pod = &review["request"]["object"];
    let has_late = pod["spec"]["containers"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["name"] == "late"));
    let mut response = json!({"uid": review["request"]["uid"], "allowed": true});
    if !has_late {
        let patch = json!([{"op": "add", "path": "/spec/containers/-",
            "value": {"name": "late", "image": "ghcr.io/chiller-demo/chiller-api:1.4.2"}}]);
        response["patchType"] = json!("JSONPatch");
        response["patch"] =
            json!(base64::engine::general_purpose::STANDARD.encode(patch.to_string()));
    }
    axum::Json(
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
    )
}

#[test]
fn injection_happens_once_when_another_webhook_mutates_the_pod_before_or_after_us() {
    let f = fixture();
    let _serial = one_at_a_time();
    let _logs = f.logs_on_failure();
    let second = AddContainerWebhook::start(&f.install.certs);
    let ca_bundle = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(f.install.certs.join("ca.crt")).unwrap())
    };
    // Webhook configurations are called in name order: "aa-" before ours, "zz-" after.
    for (configuration, order) in [
        ("aa-add-container", "before"),
        ("zz-add-container", "after"),
    ] {
        let namespace = format!("chiller-reinvocation-{order}");
        ensure_namespace(
            f.plane,
            &namespace,
            &[
                (&format!("{DOMAIN}/inject"), "enabled"),
                ("chiller-tests/second-webhook", order),
            ],
        );
        let webhook = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": configuration},
            "webhooks": [{
                "name": "add-container.chiller-tests.example",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
                "clientConfig": {"url": format!("https://127.0.0.1:{}/add", second.port), "caBundle": ca_bundle},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "namespaceSelector": {"matchLabels": {"chiller-tests/second-webhook": order}},
            }],
        });
        run_with_input(
            f.plane.kubectl().args(["apply", "-f", "-"]),
            &webhook.to_string(),
        );
    }
    for order in ["before", "after"] {
        let namespace = format!("chiller-reinvocation-{order}");
        let deadline = Instant::now() + CONVERGE;
        let pod = loop {
            let reviews = f.reviews_answered();
            let pod = dry_run_pod(f.plane, &namespace, &install::probe_pod("twice-mutated"));
            let has_late = pod["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "late");
            if has_late {
                assert_eq!(
                    f.reviews_answered(),
                    reviews + 1.0,
                    "{order}: our webhook answered once"
                );
                break pod;
            }
            assert!(
                Instant::now() < deadline,
                "the second webhook ({order}) was never called"
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        assert_injected(&pod);
        let containers: Vec<&str> = pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(containers, ["app", "late"], "{order}");
        let late = &pod["spec"]["containers"][1];
        let late_configured = late["env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["name"] == "GUNICORN_CMD_ARGS"));
        // Before us: we saw `late` and configured it. After us: the API server
        // reinvokes us (IfNeeded), but matchConditions skip an injected pod.
        assert_eq!(late_configured, order == "before", "{order}: {pod:#}");
    }
    for configuration in ["aa-add-container", "zz-add-container"] {
        run(f
            .plane
            .kubectl()
            .args(["delete", "mutatingwebhookconfiguration", configuration]));
    }
}
