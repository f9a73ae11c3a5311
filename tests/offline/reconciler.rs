//! The reconcile loop against a mocked API server (tower-test): every request
//! the loop makes is checked against the expected method, path and query, and
//! any request not expected fails the test. Request bodies are checked after.
//! The whole controller (watches, caches, triggers) runs against a real
//! kube-apiserver in `apiserver_reconcile.rs` and `apiserver_ha.rs`.

use crate::support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chiller_metrics::{
    admin::Metrics,
    config::Config,
    inject::{Injector, ResolvedMode},
    keys::{self, Keys},
    reconcile::{
        Context, LeaseLock, LeaseTimings, NamespaceStatus, ReconcileError,
        compare::applied_value,
        context::{BACKOFF_BASE, BACKOFF_MAX, backoff_delay},
        desired::{DesiredObject, NamespaceSettings, desired_objects},
        error_policy,
        live::{MANAGED_KINDS, ManagedKind, managed_kind},
        pods::strip_replica_set,
        reconcile,
        uninjected::{RESTARTED_AT, restarted_for_injection_key},
    },
};
use http::{Request, Response};
use http_body_util::BodyExt;
use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    jiff::Timestamp,
};
use kube::{
    Client,
    api::DynamicObject,
    client::Body,
    runtime::{controller::Action, watcher},
};
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

type ApiHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Responder = Box<dyn FnOnce(&Value) -> (u16, Value) + Send>;

/// Guards against hangs only; no test asserts on speed.
const HANG_GUARD: Duration = Duration::from_secs(60);
const NS: &str = "shop";
const IDENTITY: &str = "replica-a";
const LEASE_NS: &str = "chiller-metrics";
const LEASE: &str = "chiller-metrics-reconciler";

// ---------------------------------------------------------------------------
// The mocked API server.

/// One expected request and its answer.
struct Step {
    method: &'static str,
    path: String,
    query: Vec<(String, String)>,
    /// Matches any path under `path` (a name the test cannot know).
    under: bool,
    /// 0, or the wave of a reconcile's concurrent requests (the applies of
    /// its objects) this step belongs to: a run of such steps matches in any
    /// order, but the steps of one path keep theirs, and a wave waits for
    /// the waves before it.
    wave: u8,
    respond: Responder,
}

impl Step {
    fn new(method: &'static str, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            query: Vec::new(),
            under: false,
            wave: 0,
            respond: Box::new(|_| (200, json!({}))),
        }
    }

    fn concurrent(mut self, wave: u8) -> Self {
        self.wave = wave;
        self
    }

    fn query(mut self, key: &str, value: &str) -> Self {
        self.query.push((key.into(), value.into()));
        self
    }

    fn prefix(mut self) -> Self {
        self.under = true;
        self
    }

    fn reply(mut self, status: u16, body: Value) -> Self {
        self.respond = Box::new(move |_| (status, body));
        self
    }

    /// Answers with the request body as stored by the server.
    fn echo(mut self) -> Self {
        self.respond = Box::new(|body| (200, stored(body.clone())));
        self
    }

    fn mismatch(&self, seen: &Seen) -> Option<String> {
        let path_matches = if self.under {
            seen.path.starts_with(&format!("{}/", self.path))
        } else {
            seen.path == self.path
        };
        if seen.method != self.method || !path_matches {
            return Some(format!(
                "expected {} {}, got {} {} {:?}",
                self.method, self.path, seen.method, seen.path, seen.query
            ));
        }
        self.query
            .iter()
            .find(|pair| !seen.query.contains(pair))
            .map(|(k, v)| {
                format!(
                    "{} {}: query lacks {k}={v}: {:?}",
                    seen.method, seen.path, seen.query
                )
            })
    }
}

/// A request the mock received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    body: Value,
}

impl Seen {
    fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

#[derive(Default)]
struct MockState {
    seen: Vec<Seen>,
    problems: Vec<String>,
    remaining: usize,
}

struct MockApi {
    state: Arc<Mutex<MockState>>,
    task: JoinHandle<()>,
}

impl MockApi {
    /// Asserts every expected request came, in order, and nothing else; returns them.
    fn verify(self) -> Vec<Seen> {
        self.task.abort();
        let state = self.state.lock().unwrap();
        assert!(
            state.problems.is_empty(),
            "unexpected requests: {:#?}",
            state.problems
        );
        assert_eq!(
            state.remaining,
            0,
            "{} expected request(s) never came; seen: {:#?}",
            state.remaining,
            state
                .seen
                .iter()
                .map(|s| format!("{} {}", s.method, s.path))
                .collect::<Vec<_>>()
        );
        state.seen.clone()
    }
}

/// One DELETE per object, in the order the loop deletes them (by managed
/// kind, then namespace and name), each answered with the live object.
fn delete_steps(objects: &[DesiredObject], config: &Config) -> Vec<Step> {
    let mut ordered: Vec<&DesiredObject> = objects.iter().collect();
    ordered.sort_by_key(|o| {
        (
            MANAGED_KINDS
                .iter()
                .position(|k| k.kind == o.kind && k.api_version == o.api_version),
            o.namespace.clone(),
            o.name.clone(),
        )
    });
    ordered
        .into_iter()
        .map(|o| Step::new("DELETE", desired_path(o)).reply(200, live(o, config)))
        .collect()
}

fn mock_client() -> (Client, ApiHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// A client whose API server answers `steps` (see `serve`).
fn mock_api(steps: Vec<Step>) -> (Client, MockApi) {
    let (client, handle) = mock_client();
    (client, serve(handle, steps))
}

/// The step `seen` answers, and what is wrong with it if anything: the next
/// step, or within a run of concurrent steps the first that matches, with no
/// earlier step of its path and no step of an earlier wave pending.
fn next_step(
    steps: &mut std::collections::VecDeque<Step>,
    seen: &Seen,
) -> Option<(Step, Option<String>)> {
    let run = steps.iter().take_while(|step| step.wave > 0).count();
    if run == 0 {
        let step = steps.pop_front()?;
        let problem = step.mismatch(seen);
        return Some((step, problem));
    }
    let in_turn = (0..run).find(|&i| {
        let step = &steps[i];
        step.mismatch(seen).is_none()
            && !steps
                .iter()
                .take(i)
                .any(|earlier| earlier.path == step.path)
            && !steps.iter().take(run).any(|other| other.wave < step.wave)
    });
    match in_turn {
        Some(i) => Some((steps.remove(i)?, None)),
        None => {
            let step = steps.pop_front()?;
            let problem = format!(
                "{} {} is not one of the concurrent requests due now (next: {} {})",
                seen.method, seen.path, step.method, step.path
            );
            Some((step, Some(problem)))
        }
    }
}

/// Answers `steps` in order (see [`next_step`]). Anything else is recorded as
/// a problem and answered with a 500, so the reconcile still finishes and
/// `verify` fails.
fn serve(mut handle: ApiHandle, steps: Vec<Step>) -> MockApi {
    let state = Arc::new(Mutex::new(MockState {
        remaining: steps.len(),
        ..Default::default()
    }));
    let task_state = state.clone();
    let task = tokio::spawn(async move {
        let mut steps: std::collections::VecDeque<Step> = steps.into();
        while let Some((request, respond)) = handle.next_request().await {
            let seen = read(request).await;
            let (status, body) = match next_step(&mut steps, &seen) {
                Some((step, problem)) => {
                    let mut state = task_state.lock().unwrap();
                    state.remaining -= 1;
                    match problem {
                        Some(problem) => {
                            state.problems.push(problem);
                            (500, status_body(500, "InternalError", "unexpected request"))
                        }
                        None => {
                            drop(state);
                            (step.respond)(&seen.body)
                        }
                    }
                }
                None => {
                    task_state.lock().unwrap().problems.push(format!(
                        "after the last expected request: {} {} {:?}",
                        seen.method, seen.path, seen.query
                    ));
                    (500, status_body(500, "InternalError", "unexpected request"))
                }
            };
            task_state.lock().unwrap().seen.push(seen);
            respond.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    MockApi { state, task }
}

async fn read(request: Request<Body>) -> Seen {
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    let query = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query,
        body,
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {},
        "status": "Failure", "code": code, "reason": reason, "message": message,
    })
}

fn not_found() -> Value {
    status_body(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// The object as the API server would store it.
fn stored(mut object: Value) -> Value {
    if object.is_object() {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or("x")
            .to_string();
        object["metadata"]["uid"] = json!(format!("uid-{name}"));
        object["metadata"]["resourceVersion"] = json!("100");
        object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    object
}

// ---------------------------------------------------------------------------
// Fixtures.

fn config() -> Config {
    Config::default()
}

fn keys() -> Keys {
    config().keys()
}

fn namespace(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Namespace {
    let map = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    let mut labels = map(labels);
    labels.insert("kubernetes.io/metadata.name".into(), name.into());
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "uid": format!("ns-uid-{name}"),
            "resourceVersion": "1",
            "labels": labels,
            "annotations": map(annotations),
        },
    }))
    .unwrap()
}

fn opted_in(name: &str, annotations: &[(&str, &str)]) -> Namespace {
    namespace(name, &[(&keys().inject, keys::ENABLED)], annotations)
}

/// A context whose caches have completed their first (empty) list.
fn context(client: Client, config: Config, leading: bool) -> (Arc<Context>, Arc<Metrics>) {
    context_synced(client, config, leading, MANAGED_KINDS)
}

/// A context whose pod stores and caches of the `synced` kinds have
/// completed their first (empty) list; the other kinds never synced.
fn context_synced<'a>(
    client: Client,
    config: Config,
    leading: bool,
    synced: impl IntoIterator<Item = &'a ManagedKind>,
) -> (Arc<Context>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let (_leading_tx, leading_rx) = watch::channel(leading);
    let ctx = Context::new(
        client,
        Injector::new(config, ResolvedMode::Native),
        metrics.clone(),
        leading_rx,
        IDENTITY,
    );
    for kind in synced {
        ctx.live.sync_kind(*kind, Vec::new());
    }
    sync_pods(&ctx, &[], &[]);
    (Arc::new(ctx), metrics)
}

/// A synced context (see `context`) on a client whose API server answers `steps`.
fn mock_context(
    steps: Vec<Step>,
    config: &Config,
    leading: bool,
) -> (MockApi, Arc<Context>, Arc<Metrics>) {
    let (client, api) = mock_api(steps);
    let (ctx, metrics) = context(client, config.clone(), leading);
    (api, ctx, metrics)
}

/// Fills the caches with these live objects (as a completed list per kind).
fn prefill(ctx: &Context, objects: &[Value]) {
    for kind in MANAGED_KINDS {
        let of_kind = objects
            .iter()
            .filter(|o| o["apiVersion"] == kind.api_version && o["kind"] == kind.kind)
            .map(|o| serde_json::from_value::<DynamicObject>(o.clone()).unwrap())
            .collect();
        ctx.live.sync_kind(*kind, of_kind);
    }
}

fn desired_for(ns: &Namespace, config: &Config) -> Vec<DesiredObject> {
    let settings = NamespaceSettings::from_namespace(ns, &config.keys()).unwrap();
    desired_objects(&settings, config)
}

/// What the API server holds after we applied `object`, with server-side
/// additions and defaults that the comparison must tolerate.
fn live(object: &DesiredObject, config: &Config) -> Value {
    let mut value = stored(applied_value(&object.value, &config.domain));
    value["metadata"]["managedFields"] =
        json!([{"manager": "chiller-metrics", "operation": "Apply"}]);
    value["metadata"]["labels"]["added-by-someone"] = json!("yes");
    if object.kind == "Service" {
        if value["spec"]["clusterIP"].is_null() {
            value["spec"]["clusterIP"] = json!("10.96.0.10");
        }
        value["spec"]["sessionAffinity"] = json!("None");
        if let Some(ports) = value["spec"]["ports"].as_array_mut() {
            for port in ports {
                port["protocol"] = json!("TCP");
            }
        }
    }
    value
}

/// `live` for each object.
fn live_all(objects: &[DesiredObject], config: &Config) -> Vec<Value> {
    objects.iter().map(|o| live(o, config)).collect()
}

fn object_path(api_version: &str, plural: &str, namespace: &str, name: &str) -> String {
    let base = if api_version == "v1" {
        "/api/v1".to_string()
    } else {
        format!("/apis/{api_version}")
    };
    format!("{base}/namespaces/{namespace}/{plural}/{name}")
}

fn desired_path(object: &DesiredObject) -> String {
    object_path(
        object.api_version,
        object.plural,
        &object.namespace,
        &object.name,
    )
}

/// The apply of one desired object, concurrent with the others'; a
/// RoleBinding's once the rest are done (its Role must exist).
fn apply_step(object: &DesiredObject) -> Step {
    Step::new("PATCH", desired_path(object))
        .query("fieldManager", "chiller-metrics")
        .query("force", "true")
        .echo()
        .concurrent(wave(object))
}

/// The wave of a reconcile's requests for `object`: RoleBindings once the
/// rest are applied.
fn wave(object: &DesiredObject) -> u8 {
    if object.kind == "RoleBinding" { 2 } else { 1 }
}

/// Fills the pod and ReplicaSet stores as completed lists, stripped as the
/// watches store them: a reconcile lists nothing.
fn sync_pods(ctx: &Context, pods: &[Value], replica_sets: &[Value]) {
    ctx.pods.apply(&watcher::Event::Init);
    for pod in pods {
        let mut pod: Pod = serde_json::from_value(pod.clone()).unwrap();
        ctx.pods.strip_pod(&mut pod);
        ctx.pods.apply(&watcher::Event::InitApply(pod));
    }
    ctx.pods.apply(&watcher::Event::InitDone);
    ctx.pods.replica_sets.apply(&watcher::Event::Init);
    for replica_set in replica_sets {
        let mut replica_set = serde_json::from_value(replica_set.clone()).unwrap();
        strip_replica_set(&mut replica_set);
        ctx.pods
            .replica_sets
            .apply(&watcher::Event::InitApply(replica_set));
    }
    ctx.pods.replica_sets.apply(&watcher::Event::InitDone);
}

fn status_step(namespace: &str) -> Step {
    Step::new("PATCH", format!("/api/v1/namespaces/{namespace}"))
        .query("fieldManager", "chiller-metrics")
        .reply(
            200,
            serde_json::to_value(self::namespace(namespace, &[], &[])).unwrap(),
        )
}

fn event_step(namespace: &str) -> Step {
    Step::new(
        "POST",
        format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events"),
    )
    .echo()
}

fn ready_status(objects: usize, uninjected_pods: usize) -> NamespaceStatus {
    NamespaceStatus {
        ready: true,
        reason: "Ready".into(),
        message: format!("{objects} monitoring objects in sync"),
        uninjected_pods,
        config_hash: Injector::new(Config::default(), ResolvedMode::Native)
            .hashes()
            .config
            .clone(),
        ..Default::default()
    }
}

/// The status annotation a namespace-status PATCH sets (`None` = removed).
fn patched_status(seen: &Seen) -> Option<NamespaceStatus> {
    let value = &seen.body["metadata"]["annotations"][keys().reconcile_status];
    value
        .as_str()
        .map(|text| serde_json::from_str(text).unwrap())
}

/// An opted-in namespace already carrying this status annotation.
fn with_status(status: &NamespaceStatus, annotations: &[(&str, &str)]) -> Namespace {
    let key = keys().reconcile_status;
    let text = serde_json::to_string(status).unwrap();
    let mut all = annotations.to_vec();
    all.push((key.as_str(), text.as_str()));
    opted_in(NS, &all)
}

fn metric(metrics: &Metrics, line_start: &str) -> Option<f64> {
    metrics
        .encode()
        .lines()
        .find_map(|line| line.strip_prefix(line_start))
        .and_then(|rest| rest.trim().parse().ok())
}

async fn reconcile_once(ns: &Namespace, ctx: &Arc<Context>) -> Result<Action, ReconcileError> {
    tokio::time::timeout(HANG_GUARD, reconcile(Arc::new(ns.clone()), ctx.clone()))
        .await
        .expect("reconcile hung")
}

// ---------------------------------------------------------------------------
// Applying.

#[tokio::test]
async fn first_reconcile_applies_every_desired_object_once() {
    let config = config();
    let ns = opted_in(NS, &[]);
    let desired = desired_for(&ns, &config);
    assert!(
        desired.len() >= 5,
        "the desired set looks incomplete: {desired:?}"
    );
    let mut steps: Vec<Step> = desired.iter().map(apply_step).collect();
    steps.push(status_step(NS));
    let (api, ctx, metrics) = mock_context(steps, &config, true);

    let action = reconcile_once(&ns, &ctx).await.unwrap();

    let seen = api.verify();
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(config.reconcile.resync_seconds))
    );
    assert_eq!(seen.len(), desired.len() + 1, "{seen:#?}");
    for object in &desired {
        let request = seen
            .iter()
            .find(|s| s.path == desired_path(object))
            .expect("every object applied");
        assert_eq!(
            request.body,
            applied_value(&object.value, &config.domain),
            "body of the apply of {} {}",
            object.kind,
            object.name
        );
        let labels = &request.body["metadata"]["labels"];
        assert_eq!(labels[keys::MANAGED_BY_KEY], keys::MANAGED_BY);
        assert_eq!(labels[keys().owner_namespace], NS);
    }
    assert_eq!(
        patched_status(seen.last().unwrap()),
        Some(ready_status(desired.len(), 0))
    );
    assert_eq!(
        metric(&metrics, "chiller_metrics_reconcile_runs_total "),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "chiller_metrics_reconcile_duration_seconds_count "
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn steady_state_makes_no_writes() {
    let config = config();
    let desired = desired_for(&opted_in(NS, &[]), &config);
    let ns = with_status(&ready_status(desired.len(), 0), &[]);
    let (api, ctx, _) = mock_context(vec![], &config, true);
    prefill(&ctx, &live_all(&desired, &config));

    let action = reconcile_once(&ns, &ctx).await.unwrap();

    let seen = api.verify();
    assert!(seen.iter().all(|s| !s.is_write()), "{seen:#?}");
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(config.reconcile.resync_seconds))
    );
}

#[tokio::test]
async fn before_the_caches_sync_live_objects_are_read_and_still_not_written() {
    let config = config();
    let desired = desired_for(&opted_in(NS, &[]), &config);
    let ns = with_status(&ready_status(desired.len(), 0), &[]);
    let mut steps: Vec<Step> = desired
        .iter()
        .map(|o| {
            Step::new("GET", desired_path(o))
                .reply(200, live(o, &config))
                .concurrent(wave(o))
        })
        .collect();
    // Pruning lists each kind in the namespace; the lists hold exactly the desired objects.
    for kind in MANAGED_KINDS {
        let items: Vec<Value> = desired
            .iter()
            .filter(|o| o.kind == kind.kind && o.api_version == kind.api_version)
            .map(|o| live(o, &config))
            .collect();
        let base = if kind.api_version == "v1" {
            "/api/v1".to_string()
        } else {
            format!("/apis/{}", kind.api_version)
        };
        steps.push(
            Step::new("GET", format!("{base}/namespaces/{NS}/{}", kind.plural))
                .query(
                    "labelSelector",
                    &format!(
                        "{}={},{}={NS}",
                        keys::MANAGED_BY_KEY,
                        keys::MANAGED_BY,
                        keys().owner_namespace
                    ),
                )
                .reply(
                    200,
                    json!({"apiVersion": kind.api_version, "kind": format!("{}List", kind.kind), "metadata": {}, "items": items}),
                ),
        );
    }
    let (client, api) = mock_api(steps);
    let (ctx, _) = context_synced(client, config.clone(), true, []);

    reconcile_once(&ns, &ctx).await.unwrap();

    let seen = api.verify();
    assert!(seen.iter().all(|s| !s.is_write()), "{seen:#?}");
}

#[tokio::test]
async fn drift_is_repaired_by_reapplying_only_the_drifted_objects() {
    let config = config();
    let desired = desired_for(&opted_in(NS, &[]), &config);
    let ns = with_status(&ready_status(desired.len(), 0), &[]);
    let edited = desired
        .iter()
        .position(|o| o.kind == "ConfigMap" && o.name == config.sidecar.mapping_config_map)
        .expect("the mapping ConfigMap is desired");
    let deleted = desired
        .iter()
        .position(|o| o.kind == "ServiceMonitor")
        .expect("a ServiceMonitor is desired");
    let mut live_objects = Vec::new();
    for (index, object) in desired.iter().enumerate() {
        let mut value = live(object, &config);
        if index == edited {
            value["data"] = json!({"statsd-mapping.yaml": "mappings: []"});
        }
        if index != deleted {
            live_objects.push(value);
        }
    }
    let mut drifted = [edited, deleted];
    drifted.sort();
    let steps: Vec<Step> = drifted.iter().map(|i| apply_step(&desired[*i])).collect();
    let (api, ctx, _) = mock_context(steps, &config, true);
    prefill(&ctx, &live_objects);

    reconcile_once(&ns, &ctx).await.unwrap();

    let seen = api.verify();
    let writes: Vec<&Seen> = seen.iter().filter(|s| s.is_write()).collect();
    assert_eq!(writes.len(), 2, "{writes:#?}");
    for (index, request) in drifted.iter().zip(writes) {
        assert_eq!(
            request.body,
            applied_value(&desired[*index].value, &config.domain)
        );
    }
}

#[tokio::test]
async fn an_object_no_longer_desired_is_deleted() {
    let config = config();
    let with_postgres = opted_in(
        NS,
        &[
            (keys().postgres.as_str(), "db:5432/chiller"),
            (keys().postgres_secret.as_str(), "db-auth"),
        ],
    );
    let without = desired_for(&opted_in(NS, &[]), &config);
    let stale: Vec<DesiredObject> = desired_for(&with_postgres, &config)
        .into_iter()
        .filter(|o| !without.iter().any(|w| w.kind == o.kind && w.name == o.name))
        .collect();
    assert!(!stale.is_empty(), "the Postgres exporter adds objects");
    let ns = with_status(&ready_status(without.len(), 0), &[]);
    let mut live_objects = live_all(&without, &config);
    live_objects.extend(live_all(&stale, &config));
    let (api, ctx, _) = mock_context(delete_steps(&stale, &config), &config, true);
    prefill(&ctx, &live_objects);

    reconcile_once(&ns, &ctx).await.unwrap();

    let seen = api.verify();
    for request in seen.iter().filter(|s| s.method == "DELETE") {
        let name = request.path.rsplit('/').next().unwrap();
        assert_eq!(
            request.body["preconditions"]["uid"],
            format!("uid-{name}"),
            "deletes are pinned to the uid we saw"
        );
    }
}

// ---------------------------------------------------------------------------
// Opting out.

fn someone_elses(
    kind: &str,
    api_version: &str,
    namespace: &str,
    name: &str,
    labels: Value,
) -> Value {
    stored(json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
    }))
}

#[tokio::test]
async fn opting_out_deletes_only_our_objects_for_that_namespace() {
    let mut config = config();
    config.reconcile.grafana_namespace = Some("monitoring".into());
    let desired = desired_for(&opted_in(NS, &[]), &config);
    assert!(
        desired.iter().any(|o| o.namespace == "monitoring"),
        "dashboards go to the Grafana namespace"
    );
    let mut live_objects = live_all(&desired, &config);
    let k = keys();
    live_objects.extend([
        // Ours, but for another namespace.
        someone_elses(
            "ConfigMap",
            "v1",
            "monitoring",
            "other-dashboard",
            json!({keys::MANAGED_BY_KEY: keys::MANAGED_BY, k.owner_namespace.clone(): "other"}),
        ),
        // Claims the owner label but is not managed by us.
        someone_elses(
            "ConfigMap",
            "v1",
            NS,
            "look-alike",
            json!({k.owner_namespace.clone(): NS}),
        ),
        // Managed by us in name only, with no owner: never ours to delete.
        someone_elses(
            "ServiceMonitor",
            "monitoring.coreos.com/v1",
            NS,
            "hand-made",
            json!({keys::MANAGED_BY_KEY: keys::MANAGED_BY}),
        ),
        // Unlabeled.
        someone_elses("Service", "v1", NS, "app", json!({})),
    ]);
    let status_text = serde_json::to_string(&ready_status(desired.len(), 0)).unwrap();
    let ns = namespace(
        NS,
        &[],
        &[(keys().reconcile_status.as_str(), status_text.as_str())],
    );

    let mut steps = delete_steps(&desired, &config);
    steps.push(status_step(NS));
    let (api, ctx, metrics) = mock_context(steps, &config, true);
    prefill(&ctx, &live_objects);

    reconcile_once(&ns, &ctx).await.unwrap();

    let seen = api.verify();
    let deleted: Vec<&str> = seen
        .iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(deleted.len(), desired.len());
    for untouched in [
        "other-dashboard",
        "look-alike",
        "hand-made",
        "/services/app",
    ] {
        assert!(
            deleted.iter().all(|p| !p.ends_with(untouched)),
            "{untouched} must not be deleted: {deleted:#?}"
        );
    }
    assert_eq!(patched_status(seen.last().unwrap()), None);
    assert!(
        seen.last().unwrap().body["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .contains_key(&keys().reconcile_status),
        "the status annotation is removed with null"
    );
    assert_eq!(
        metric(&metrics, "chiller_metrics_reconcile_runs_total "),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_namespace_that_never_opted_in_gets_no_requests_at_all() {
    let config = config();
    // Another namespace's objects are in the cache; nothing belongs to `default`.
    let other = desired_for(&opted_in("other", &[]), &config);
    for ns in [
        namespace("default", &[], &[]),
        namespace("kube-system", &[], &[]),
        namespace("shop", &[(&keys().inject, "disabled")], &[]),
    ] {
        let (api, ctx, _) = mock_context(vec![], &config, true);
        prefill(&ctx, &live_all(&other, &config));

        reconcile_once(&ns, &ctx).await.unwrap();

        let seen = api.verify();
        assert!(seen.is_empty(), "{}: {seen:#?}", ns.metadata.name.unwrap());
    }
}

#[tokio::test]
async fn the_default_namespace_is_set_up_only_when_labeled() {
    let config = config();
    let ns = opted_in("default", &[]);
    let desired = desired_for(&ns, &config);
    let mut steps: Vec<Step> = desired.iter().map(apply_step).collect();
    steps.push(status_step("default"));
    let (api, ctx, _) = mock_context(steps, &config, true);

    reconcile_once(&ns, &ctx).await.unwrap();

    let seen = api.verify();
    assert!(seen.iter().all(|s| !s.path.contains("/namespaces/shop")));
}

// ---------------------------------------------------------------------------
// Failures.

#[tokio::test]
async fn missing_prometheus_operator_crds_are_reported_and_the_rest_applied() {
    let config = config();
    let ns = opted_in(NS, &[]);
    let desired = desired_for(&ns, &config);
    let mut steps = Vec::new();
    for object in &desired {
        if object.api_version.starts_with("monitoring.coreos.com/") {
            // The watch of the kind never synced, so the object is read first.
            steps.push(
                Step::new("GET", desired_path(object))
                    .reply(404, not_found())
                    .concurrent(1),
            );
            steps.push(
                Step::new("PATCH", desired_path(object))
                    .query("fieldManager", "chiller-metrics")
                    .query("force", "true")
                    .reply(404, not_found())
                    .concurrent(1),
            );
        } else {
            steps.push(apply_step(object));
        }
    }
    for kind in MANAGED_KINDS.iter().filter(|k| k.is_prometheus_operator()) {
        steps.push(
            Step::new(
                "GET",
                format!("/apis/{}/namespaces/{NS}/{}", kind.api_version, kind.plural),
            )
            .reply(404, not_found()),
        );
    }
    steps.push(status_step(NS));
    steps.push(event_step("default"));
    let (client, api) = mock_api(steps);
    let (ctx, metrics) = context_synced(
        client,
        config.clone(),
        true,
        MANAGED_KINDS.iter().filter(|k| !k.is_prometheus_operator()),
    );

    let error = reconcile_once(&ns, &ctx).await.unwrap_err();

    let seen = api.verify();
    assert!(
        matches!(error, ReconcileError::PrometheusOperatorMissing { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("Prometheus"), "{error}");
    let core_applied = seen
        .iter()
        .filter(|s| s.method == "PATCH" && !s.path.contains("monitoring.coreos.com"))
        .filter(|s| s.path != format!("/api/v1/namespaces/{NS}"))
        .count();
    let core_desired = desired
        .iter()
        .filter(|o| !o.api_version.starts_with("monitoring.coreos.com/"))
        .count();
    assert_eq!(
        core_applied, core_desired,
        "the other objects are still applied"
    );
    let status = patched_status(&seen[seen.len() - 2]).expect("status set");
    assert!(!status.ready);
    assert_eq!(status.reason, "PrometheusOperatorMissing");
    assert_eq!(status.uninjected_pods, 0);
    let event = &seen.last().unwrap().body;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "PrometheusOperatorMissing");
    assert_eq!(event["regarding"]["kind"], "Namespace");
    assert_eq!(event["regarding"]["name"], NS);
    support::validate_k8s(event).expect("the event is a valid events.k8s.io/v1 Event");
    assert_eq!(
        metric(
            &metrics,
            "chiller_metrics_reconcile_failures_total{reason=\"crd_missing\"} "
        ),
        Some(1.0)
    );
    // Retried with backoff.
    let action = error_policy(Arc::new(ns), &error, ctx);
    assert_eq!(action, Action::requeue(BACKOFF_BASE));
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_with_exponential_backoff_per_namespace() {
    let config = config();
    let ns = opted_in(NS, &[]);
    let desired = desired_for(&ns, &config);
    let mut steps: Vec<Step> = desired.iter().map(apply_step).collect();
    steps[0] = Step::new("PATCH", desired_path(&desired[0]))
        .reply(500, status_body(500, "InternalError", "etcd is sad"));
    steps.push(status_step(NS));
    steps.push(event_step("default"));
    // The retry: only the failed object is still missing.
    steps.push(apply_step(&desired[0]));
    steps.push(status_step(NS));
    let (api, ctx, metrics) = mock_context(steps, &config, true);

    let error = reconcile_once(&ns, &ctx).await.unwrap_err();
    assert!(matches!(error, ReconcileError::Api { .. }), "{error}");
    assert_eq!(
        metric(
            &metrics,
            "chiller_metrics_reconcile_failures_total{reason=\"api_error\"} "
        ),
        Some(1.0)
    );
    let shop = Arc::new(ns.clone());
    assert_eq!(
        error_policy(shop.clone(), &error, ctx.clone()),
        Action::requeue(BACKOFF_BASE)
    );
    assert_eq!(
        error_policy(shop.clone(), &error, ctx.clone()),
        Action::requeue(BACKOFF_BASE * 2)
    );
    // Another namespace's failures are counted separately.
    assert_eq!(
        error_policy(Arc::new(opted_in("other", &[])), &error, ctx.clone()),
        Action::requeue(BACKOFF_BASE)
    );

    reconcile_once(&ns, &ctx).await.unwrap();

    let seen = api.verify();
    let first_status = seen
        .iter()
        .filter(|s| s.path == format!("/api/v1/namespaces/{NS}"))
        .map(|s| patched_status(s).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(first_status[0].reason, "ApplyFailed");
    assert!(first_status[0].message.contains("etcd is sad"));
    assert_eq!(first_status[1], ready_status(desired.len(), 0));
    // A success resets the backoff.
    assert_eq!(
        error_policy(shop, &error, ctx),
        Action::requeue(BACKOFF_BASE)
    );
}

#[test]
fn backoff_doubles_up_to_a_maximum() {
    assert_eq!(backoff_delay(1), BACKOFF_BASE);
    assert_eq!(backoff_delay(2), BACKOFF_BASE * 2);
    assert_eq!(backoff_delay(3), BACKOFF_BASE * 4);
    assert_eq!(backoff_delay(30), BACKOFF_MAX);
    assert_eq!(backoff_delay(u32::MAX), BACKOFF_MAX);
}

#[test]
fn every_desired_kind_is_watched_and_cleaned_up() {
    let config = config();
    let ns = opted_in(
        NS,
        &[
            (keys().postgres.as_str(), "db:5432/chiller"),
            (keys().postgres_secret.as_str(), "db-auth"),
        ],
    );
    for object in desired_for(&ns, &config) {
        let kind = managed_kind(object.api_version, object.kind).unwrap_or_else(|| {
            panic!(
                "{} {} is not a managed kind",
                object.api_version, object.kind
            )
        });
        assert_eq!(kind.plural, object.plural);
    }
}

// ---------------------------------------------------------------------------
// Leadership.

#[tokio::test]
async fn a_replica_that_does_not_lead_writes_nothing() {
    let config = config();
    let desired = desired_for(&opted_in(NS, &[]), &config);
    for ns in [opted_in(NS, &[]), namespace(NS, &[], &[])] {
        let (api, ctx, metrics) = mock_context(vec![], &config, false);
        // Drifted for the opted-in case, orphaned for the opted-out one.
        prefill(&ctx, &live_all(&desired[1..], &config));

        let action = reconcile_once(&ns, &ctx).await.unwrap();

        assert!(api.verify().is_empty());
        assert_eq!(action, Action::await_change());
        assert_eq!(
            metric(&metrics, "chiller_metrics_reconcile_runs_total "),
            Some(0.0)
        );
    }
}

fn lease(holder: &str, resource_version: &str, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LEASE, "namespace": LEASE_NS, "resourceVersion": resource_version},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": "2026-01-01T00:00:00.000000Z",
            "renewTime": "2026-01-01T00:00:00.000000Z",
            "leaseTransitions": transitions,
        },
    })
}

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/chiller-metrics/leases";

fn lock(client: Client) -> LeaseLock {
    LeaseLock::new(client, LEASE_NS, LEASE, IDENTITY, LeaseTimings::default())
}

/// An expected request on our Lease.
fn lease_step(method: &'static str) -> Step {
    Step::new(method, format!("{LEASE_PATH}/{LEASE}"))
}

/// A lock whose API server answers `steps`.
fn lease_api(steps: Vec<Step>) -> (LeaseLock, MockApi) {
    let (client, api) = mock_api(steps);
    (lock(client), api)
}

#[tokio::test]
async fn leader_election_creates_a_missing_lease() {
    let (mut lock, api) = lease_api(vec![
        lease_step("GET").reply(404, not_found()),
        Step::new("POST", LEASE_PATH).echo(),
    ]);

    assert!(lock.try_acquire_or_renew(Instant::now()).await.unwrap());

    let seen = api.verify();
    let created = &seen[1].body;
    assert_eq!(created["spec"]["holderIdentity"], IDENTITY);
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(created["spec"]["leaseTransitions"], 0);
    support::validate_k8s(created).expect("a valid Lease");
}

#[tokio::test]
async fn leader_election_waits_for_a_live_holder_and_takes_over_an_expired_lease() {
    let held = lease("replica-b", "5", 2);
    let (mut lock, api) = lease_api(vec![
        lease_step("GET").reply(200, held.clone()),
        lease_step("GET").reply(200, held.clone()),
        lease_step("GET").reply(200, held.clone()),
        lease_step("PUT").echo(),
    ]);
    let start = Instant::now();

    assert!(!lock.try_acquire_or_renew(start).await.unwrap());
    // Unchanged for less than the lease duration: the holder is alive.
    assert!(
        !lock
            .try_acquire_or_renew(start + Duration::from_secs(10))
            .await
            .unwrap()
    );
    // Unchanged for longer: expired, taken over.
    assert!(
        lock.try_acquire_or_renew(start + Duration::from_secs(16))
            .await
            .unwrap()
    );

    let seen = api.verify();
    let taken = &seen[3].body;
    assert_eq!(taken["spec"]["holderIdentity"], IDENTITY);
    assert_eq!(taken["spec"]["leaseTransitions"], 3);
    assert_eq!(
        taken["metadata"]["resourceVersion"], "5",
        "the takeover is conditional on the version read"
    );
    support::validate_k8s(taken).expect("a valid Lease");
}

#[tokio::test]
async fn leader_election_renews_its_own_lease() {
    let (mut lock, api) = lease_api(vec![
        lease_step("GET").reply(200, lease(IDENTITY, "7", 1)),
        lease_step("PUT").echo(),
    ]);

    assert!(lock.try_acquire_or_renew(Instant::now()).await.unwrap());

    let seen = api.verify();
    let renewed = &seen[1].body["spec"];
    assert_eq!(renewed["holderIdentity"], IDENTITY);
    assert_eq!(renewed["leaseTransitions"], 1);
    assert_eq!(renewed["acquireTime"], "2026-01-01T00:00:00.000000Z");
    assert_ne!(renewed["renewTime"], "2026-01-01T00:00:00.000000Z");
    assert_eq!(seen[1].body["metadata"]["resourceVersion"], "7");
}

#[tokio::test]
async fn leader_election_loses_a_race_on_conflict() {
    let (mut lock, api) = lease_api(vec![
        lease_step("GET").reply(200, lease("", "3", 4)),
        lease_step("PUT").reply(
            409,
            status_body(409, "Conflict", "the object has been modified"),
        ),
        lease_step("GET").reply(404, not_found()),
        Step::new("POST", LEASE_PATH).reply(
            409,
            status_body(409, "AlreadyExists", "leases \"x\" already exists"),
        ),
    ]);

    assert!(!lock.try_acquire_or_renew(Instant::now()).await.unwrap());
    assert!(!lock.try_acquire_or_renew(Instant::now()).await.unwrap());

    api.verify();
}

#[tokio::test]
async fn a_leader_that_cannot_renew_steps_down() {
    let (client, mut handle) = mock_client();
    // Creates the lease, then every request fails.
    let server = tokio::spawn(async move {
        let mut count = 0;
        while let Some((request, respond)) = handle.next_request().await {
            count += 1;
            let (status, body) = match (count, request.method().as_str()) {
                (1, "GET") => (404, not_found()),
                (2, "POST") => (201, stored(read(request).await.body)),
                _ => (500, status_body(500, "InternalError", "unavailable")),
            };
            respond.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    let timings = LeaseTimings {
        lease_duration: Duration::from_secs(1),
        renew_deadline: Duration::from_millis(300),
        retry_period: Duration::from_millis(20),
    };
    let (leading_tx, mut leading) = watch::channel(false);
    let campaign = tokio::spawn(
        LeaseLock::new(client, LEASE_NS, LEASE, IDENTITY, timings)
            .run(leading_tx, std::future::pending()),
    );

    tokio::time::timeout(HANG_GUARD, leading.wait_for(|lead| *lead))
        .await
        .expect("never became leader")
        .unwrap();
    tokio::time::timeout(HANG_GUARD, leading.wait_for(|lead| !*lead))
        .await
        .expect("never stepped down")
        .unwrap();

    campaign.abort();
    server.abort();
}

#[tokio::test]
async fn leader_election_releases_a_lease_it_holds() {
    let (mut lock, api) = lease_api(vec![
        lease_step("GET").reply(200, lease(IDENTITY, "7", 1)),
        lease_step("PUT").echo(),
    ]);

    assert!(lock.release().await.unwrap());

    let seen = api.verify();
    let released = &seen[1].body;
    assert!(
        released["spec"].get("holderIdentity").is_none(),
        "no holder: the next candidate takes it at once: {released}"
    );
    assert_eq!(released["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(released["spec"]["leaseTransitions"], 1);
    assert_eq!(
        released["metadata"]["resourceVersion"], "7",
        "the release is conditional on the version read"
    );
    support::validate_k8s(released).expect("a valid Lease");
}

#[tokio::test]
async fn leader_election_never_releases_another_holders_lease() {
    let (mut lock, api) = lease_api(vec![
        lease_step("GET").reply(200, lease("replica-b", "8", 2)),
        lease_step("GET").reply(404, not_found()),
    ]);

    assert!(!lock.release().await.unwrap());
    assert!(!lock.release().await.unwrap());

    let seen = api.verify();
    assert!(seen.iter().all(|request| request.method == "GET"));
}

#[tokio::test]
async fn a_stopped_leader_steps_down_and_releases_its_lease() {
    let (lock, api) = lease_api(vec![
        lease_step("GET").reply(404, not_found()),
        Step::new("POST", LEASE_PATH).echo(),
        lease_step("GET").reply(200, lease(IDENTITY, "1", 0)),
        lease_step("PUT").echo(),
    ]);
    let (leading_tx, mut leading) = watch::channel(false);
    let mut became_leader = leading.clone();
    let stop = async move {
        let _ = became_leader.wait_for(|lead| *lead).await;
    };
    let campaign = tokio::spawn(lock.run(leading_tx, stop));

    tokio::time::timeout(HANG_GUARD, campaign)
        .await
        .expect("the campaign ends once stopped")
        .unwrap();

    assert!(!*leading.borrow_and_update(), "stepped down");
    let seen = api.verify();
    assert_eq!(seen[3].method, "PUT");
    assert!(seen[3].body["spec"].get("holderIdentity").is_none());
}

// ---------------------------------------------------------------------------
// Uninjected pods.

fn app_pod(name: &str, replica_set: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": NS, "uid": format!("uid-{name}"),
            "labels": {"app": "api"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set, "uid": "rs-uid", "controller": true}],
        },
        "spec": {"containers": [{"name": "api", "image": "chiller/api:1", "ports": [{"containerPort": 8000}]}]},
        "status": {"phase": "Running"},
    })
}

/// A pod without a controller.
fn bare_pod(name: &str) -> Value {
    let mut pod = app_pod(name, "x");
    pod["metadata"]["ownerReferences"] = json!([]);
    pod
}

/// Pods that must not count: opted out, and finished.
fn other_pods() -> Vec<Value> {
    let mut opted_out = bare_pod("prometheus-chiller-metrics-0");
    opted_out["metadata"]["labels"][keys().inject] = json!(keys::DISABLED);
    let mut finished = bare_pod("migrate-abcde");
    finished["status"]["phase"] = json!("Succeeded");
    vec![opted_out, finished]
}

fn replica_set() -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {
            "name": "api-7d9f8", "namespace": NS, "uid": "rs-uid",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "api", "uid": "deploy-uid", "controller": true}],
        },
    })
}

fn deployment(annotations: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "api", "namespace": NS, "uid": "deploy-uid", "resourceVersion": "9", "annotations": annotations},
        "spec": {"selector": {"matchLabels": {"app": "api"}}, "template": {"metadata": {"labels": {"app": "api"}}, "spec": {"containers": [{"name": "api", "image": "chiller/api:1"}]}}},
    })
}

const DEPLOY_PATH: &str = "/apis/apps/v1/namespaces/shop/deployments/api";

/// Two reconciles of NS, its monitoring objects in sync, with these pods:
/// the first publishes one Event in `events_namespace` and writes `status`;
/// the second, nothing having changed, sends no request at all. Returns the
/// requests (Event first) and the metrics.
async fn reconcile_pods_twice(
    pods: &[Value],
    replica_sets: &[Value],
    events_namespace: &str,
    status: &NamespaceStatus,
) -> (Vec<Seen>, Arc<Metrics>) {
    let config = config();
    let desired = desired_for(&opted_in(NS, &[]), &config);
    let ns = with_status(&ready_status(desired.len(), 0), &[]);
    let (api, ctx, metrics) = mock_context(
        vec![
            event_step(events_namespace),
            status_step(NS),
            // Second pass, nothing new: no event, no status change.
        ],
        &config,
        true,
    );
    prefill(&ctx, &live_all(&desired, &config));
    sync_pods(&ctx, pods, replica_sets);

    reconcile_once(&ns, &ctx).await.unwrap();
    reconcile_once(&with_status(status, &[]), &ctx)
        .await
        .unwrap();

    let seen = api.verify();
    assert_eq!(patched_status(&seen[1]).as_ref(), Some(status));
    (seen, metrics)
}

/// The objects in sync in NS.
fn desired_in_ns() -> usize {
    desired_for(&opted_in(NS, &[]), &config()).len()
}

#[tokio::test]
async fn uninjected_pods_are_reported_on_their_deployment() {
    let mut pods = vec![
        app_pod("api-7d9f8-abcde", "api-7d9f8"),
        app_pod("api-7d9f8-fghij", "api-7d9f8"),
    ];
    pods.extend(other_pods());
    let status = ready_status(desired_in_ns(), 2);

    let (seen, metrics) = reconcile_pods_twice(&pods, &[replica_set()], NS, &status).await;

    let event = &seen[0].body;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "PodsNotInjected");
    assert_eq!(event["regarding"]["kind"], "Deployment");
    assert_eq!(event["regarding"]["name"], "api");
    assert_eq!(event["regarding"]["namespace"], NS);
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains("api-7d9f8-abcde") && note.contains("api-7d9f8-fghij"),
        "{note}"
    );
    assert!(note.contains(&keys().restart_uninjected), "{note}");
    support::validate_k8s(event).expect("a valid Event");
    assert_eq!(
        metric(
            &metrics,
            "chiller_metrics_uninjected_pods{namespace=\"shop\"} "
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&metrics, "chiller_metrics_workload_restarts_total "),
        Some(0.0)
    );
}

/// A bare pod is its own workload: ten of them make one Event regarding
/// their Namespace (cluster-scoped, so in "default"), naming them all.
#[tokio::test]
async fn ten_bare_uninjected_pods_in_a_namespace_make_one_event_regarding_the_namespace() {
    let names: Vec<String> = (0..10).map(|i| format!("runner-{i}")).collect();
    let pods: Vec<Value> = names.iter().map(|name| bare_pod(name)).collect();
    let status = ready_status(desired_in_ns(), 10);

    let (seen, _) = reconcile_pods_twice(&pods, &[], "default", &status).await;

    let events: Vec<&Seen> = seen.iter().filter(|s| s.path.contains("/events")).collect();
    assert_eq!(events.len(), 1, "one Event in all: {seen:#?}");
    let event = &events[0].body;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "PodsNotInjected");
    assert_eq!(
        event["regarding"],
        json!({"apiVersion": "v1", "kind": "Namespace", "name": NS, "uid": format!("ns-uid-{NS}")})
    );
    let note = event["note"].as_str().unwrap();
    assert!(note.starts_with("10 bare pod(s) "), "{note}");
    for name in &names {
        assert!(note.contains(name.as_str()), "{name} missing: {note}");
    }
    support::validate_k8s(event).expect("a valid Event");
    assert_eq!(
        seen.iter().filter(|s| s.is_write()).count(),
        2,
        "the Event and the status, both in the first reconcile: {seen:#?}"
    );
}

/// Bare pods skipped for one reason share one Event on their Namespace too.
#[tokio::test]
async fn bare_pods_skipped_for_one_reason_make_one_event_regarding_the_namespace() {
    let pods: Vec<Value> = ["edge-a", "edge-b", "edge-c"]
        .into_iter()
        .map(|name| {
            let mut pod = bare_pod(name);
            pod["metadata"]["annotations"] = json!({keys().skipped: "host_network"});
            pod["spec"]["hostNetwork"] = json!(true);
            pod
        })
        .collect();
    let status = NamespaceStatus {
        skipped_pods: [("host_network".to_string(), 3)].into(),
        ..ready_status(desired_in_ns(), 0)
    };

    let (seen, _) = reconcile_pods_twice(&pods, &[], "default", &status).await;

    let event = &seen[0].body;
    assert_eq!(event["reason"], "NotInjectedHostNetwork");
    assert_eq!(event["regarding"]["kind"], "Namespace");
    assert_eq!(event["regarding"]["name"], NS);
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains("3 bare pod(s) (edge-a, edge-b, edge-c)"),
        "{note}"
    );
    support::validate_k8s(event).expect("a valid Event");
}

#[tokio::test]
async fn restart_uninjected_restarts_the_deployment_once_per_cooldown() {
    let config = config();
    let desired = desired_for(&opted_in(NS, &[]), &config);
    let restart_key = keys().restart_uninjected;
    let ns = with_status(
        &ready_status(desired.len(), 1),
        &[(restart_key.as_str(), "true")],
    );
    let cooldown_key = restarted_for_injection_key(&config.domain);
    let pods = vec![app_pod("api-7d9f8-abcde", "api-7d9f8")];
    let restarted_long_ago = json!({cooldown_key.clone(): "2020-01-01T00:00:00Z"});
    let patched: Arc<Mutex<Option<Value>>> = Arc::default();
    let keep = patched.clone();
    let mut restart = Step::new("PATCH", DEPLOY_PATH).query("fieldManager", "chiller-metrics");
    restart.respond = Box::new(move |body| {
        *keep.lock().unwrap() = Some(body.clone());
        let mut updated = deployment(body["metadata"]["annotations"].clone());
        updated["spec"]["template"]["metadata"]["annotations"] =
            body["spec"]["template"]["metadata"]["annotations"].clone();
        (200, updated)
    });
    let after_restart = patched.clone();
    let mut check_again = Step::new("GET", DEPLOY_PATH);
    check_again.respond = Box::new(move |_| {
        let body = after_restart.lock().unwrap().clone().unwrap_or_default();
        (200, deployment(body["metadata"]["annotations"].clone()))
    });
    let (api, ctx, metrics) = mock_context(
        vec![
            event_step(NS),
            Step::new("GET", DEPLOY_PATH).reply(200, deployment(restarted_long_ago)),
            restart,
            event_step(NS),
            // Second pass: the Deployment now carries our stamp, its old pod is
            // still uninjected, and it is left alone within the cooldown.
            check_again,
        ],
        &config,
        true,
    );
    prefill(&ctx, &live_all(&desired, &config));
    sync_pods(&ctx, &pods, &[replica_set()]);

    reconcile_once(&ns, &ctx).await.unwrap();
    reconcile_once(&ns, &ctx).await.unwrap();

    let seen = api.verify();
    let body = patched
        .lock()
        .unwrap()
        .clone()
        .expect("the Deployment was patched");
    let stamp = body["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT]
        .as_str()
        .expect("restartedAt set on the pod template");
    let when: Timestamp = stamp.parse().expect("RFC 3339");
    assert!((Timestamp::now().as_second() - when.as_second()).abs() < 3600);
    assert_eq!(
        body["metadata"]["annotations"][cooldown_key.as_str()],
        stamp
    );
    assert_eq!(seen[3].body["reason"], "RestartedForInjection");
    assert_eq!(seen[3].body["type"], "Normal");
    assert_eq!(seen[3].body["regarding"]["name"], "api");
    let restarts = seen
        .iter()
        .filter(|s| s.path == DEPLOY_PATH && s.method == "PATCH")
        .count();
    assert_eq!(restarts, 1, "one restart per cooldown");
    assert_eq!(
        metric(&metrics, "chiller_metrics_workload_restarts_total "),
        Some(1.0)
    );
}

/// A replica that never published (a new leader) finds the Event that the
/// old leader left for the same cause, by its name, and counts on in its
/// series instead of opening a second Event.
#[tokio::test]
async fn a_new_leader_continues_the_event_series_it_finds_on_the_server() {
    let events_path = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events");
    let (client, api) = mock_api(vec![
            Step::new("POST", events_path.clone()).reply(
                409,
                status_body(409, "AlreadyExists", "events.events.k8s.io already exists"),
            ),
            // The name comes from the refused create: checked below.
            Step::new("GET", events_path.clone()).prefix().reply(
                200,
                json!({
                    "apiVersion": "events.k8s.io/v1",
                    "kind": "Event",
                    "metadata": {"name": "api.left-by-old-leader", "namespace": NS},
                    "eventTime": "2026-01-01T00:00:00.000000Z",
                    "reason": "PodsNotInjected",
                    "type": "Warning",
                    "action": "CheckInjection",
                    "regarding": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api", "namespace": NS, "uid": "uid-api"},
                    "reportingController": "chiller-metrics",
                    "reportingInstance": "replica-a",
                    "series": {"count": 3, "lastObservedTime": "2026-01-01T00:05:00.000000Z"},
                }),
            ),
            Step::new("PATCH", events_path.clone()).prefix().echo(),
            // Known now: the next repeat is one patch.
            Step::new("PATCH", events_path.clone()).prefix().echo(),
    ]);
    let events = chiller_metrics::reconcile::events::EventSeries::new(
        client,
        "chiller-metrics",
        "replica-b",
    );
    let event = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: "PodsNotInjected".into(),
        note: Some("2 pod(s) run without the statsd exporter sidecar".into()),
        action: "CheckInjection".into(),
        secondary: None,
    };
    let regarding = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("Deployment".into()),
        name: Some("api".into()),
        namespace: Some(NS.into()),
        uid: Some("uid-api".into()),
        ..Default::default()
    };
    for _ in 0..2 {
        tokio::time::timeout(HANG_GUARD, events.publish(&event, &regarding))
            .await
            .expect("publish hung")
            .expect("published");
    }

    let seen = api.verify();
    let name = seen[0].body["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(name.starts_with("api."), "{name}");
    for step in &seen[1..] {
        assert_eq!(step.path, format!("{events_path}/{name}"), "one Event");
    }
    assert_eq!(seen[2].body["series"]["count"], 4);
    assert_eq!(seen[3].body["series"]["count"], 5);
    assert!(seen[3].body["series"]["lastObservedTime"].is_string());
}
