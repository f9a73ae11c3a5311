//! The reconcile loop at scale, on the real control plane: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, kwok nodes (pods
//! bound and Running, no process) and the Prometheus Operator, with
//! `chiller-metrics serve` out of cluster as the chart's ServiceAccount.
//! Namespaces each hold 2 Deployments of uninjected gunicorn-like pods before
//! `serve` starts; then all are labeled at once.
//!
//! Two tests share one scenario:
//! - 20 namespaces × 10 pods assert counts only, never times: each object we
//!   own written once, no pod LIST after the initial list, no write and no
//!   `resourceVersion` bump over an idle window of two resyncs, at most one
//!   Event per workload, and no write after the API server restarts and the
//!   stores list again;
//! - `make scale` (ignored here; `SCALE_NAMESPACES`, default 1,000, and
//!   `SCALE_PODS`, default 10 per namespace) prints the figures as a markdown
//!   table and writes them into BENCHMARKS.md between the `scale` markers. At
//!   the end it scales the Deployments up to `SCALE_GROWN_PODS` pods (default
//!   30 per namespace) and measures memory again. `SCALE_APISERVER_PROFILE`
//!   names a file for kube-apiserver's CPU profile while converging.
//!
//! Calls are counted from the API server's audit log (our ServiceAccount's
//! events only); memory and CPU from `/proc` of `serve`.

use crate::support;
use crate::support::controlplane;
use crate::support::install;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    str::FromStr,
    time::{Duration, Instant},
};

use controlplane::ControlPlane;
use controlplane::process::{cpu_seconds, proc_status_kb};
use futures::{StreamExt, stream};
use install::{DOMAIN, Install, run};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Namespace};
use kube::{
    Api,
    api::{
        ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    },
};
use serde_json::{Value, json};
use support::https::ServeProcess;

const SERVICE_ACCOUNT: &str = "system:serviceaccount:chiller-metrics:chiller-metrics";
/// The admin certificate's user, as which the Prometheus Operator runs.
const OPERATOR_USER: &str = "chiller-metrics-test-admin";
/// Room for 30,000 pods: kwok hands out pod IPs from each node's podCIDR.
const NODES: [(&str, &str); 2] = [
    ("kwok-scale-a", "10.244.0.0/16"),
    ("kwok-scale-b", "10.245.0.0/16"),
];
/// The Deployments of every namespace.
const WORKLOADS: [&str; 2] = ["web", "worker"];
/// Labels every namespace and pod of the scenario.
const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "scale");
const MANAGED_BY: &str = "app.kubernetes.io/managed-by=chiller-metrics";
/// Every kind the loop creates: (group, version, kind, plural).
const OWNED_KINDS: [(&str, &str, &str, &str); 8] = [
    ("", "v1", "ConfigMap", "configmaps"),
    ("", "v1", "Service", "services"),
    ("", "v1", "ServiceAccount", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "v1", "Role", "roles"),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
    ),
    ("apps", "v1", "Deployment", "deployments"),
    ("monitoring.coreos.com", "v1", "Prometheus", "prometheuses"),
    (
        "monitoring.coreos.com",
        "v1",
        "ServiceMonitor",
        "servicemonitors",
    ),
];
/// Longer than the loop's debounce: what a change causes has happened after it.
const SETTLE: Duration = Duration::from_secs(3);
/// Concurrent requests of the test's own client.
const PARALLEL: usize = 32;

/// The size of one run.
#[derive(Debug, Clone)]
struct Size {
    namespaces: usize,
    /// Pods per Deployment.
    replicas: usize,
    /// Namespaces labeled one at a time after the others converged.
    samples: usize,
    resync_seconds: u64,
    idle: Duration,
    /// Until every pod is Running, and until every namespace is complete.
    setup_timeout: Duration,
    converge_timeout: Duration,
    /// `serve`'s binary; the test build's by default.
    binary: Option<PathBuf>,
    /// Pods per Deployment of the labeled namespaces once grown, to show
    /// how memory grows with the pods watched; `None` skips it.
    grown_replicas: Option<usize>,
    /// Where to write a CPU profile of kube-apiserver over the first
    /// `APISERVER_PROFILE_SECONDS` of converging (`go tool pprof` reads it).
    apiserver_profile: Option<PathBuf>,
}

impl Size {
    fn pods_per_namespace(&self) -> usize {
        self.replicas * WORKLOADS.len()
    }
}

/// Seconds of kube-apiserver's CPU profile, from labeling on.
const APISERVER_PROFILE_SECONDS: u32 = 50;

/// `(namespace, plural, name)` of an object.
type ObjectKey = (String, String, String);

/// Our ServiceAccount's audit events over one window.
struct Calls(Vec<Value>);

impl Calls {
    fn verb(e: &Value) -> &str {
        e["verb"].as_str().unwrap_or_default()
    }

    fn resource(e: &Value) -> &str {
        e["objectRef"]["resource"].as_str().unwrap_or_default()
    }

    fn is_write(e: &Value) -> bool {
        matches!(
            Self::verb(e),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }

    /// Writes but the leader Lease's renewals.
    fn writes(&self) -> Vec<&Value> {
        self.0
            .iter()
            .filter(|e| Self::is_write(e) && Self::resource(e) != "leases")
            .collect()
    }

    /// Each write as (verb, request URI), for a failure message.
    fn write_calls(&self) -> Vec<(&Value, &Value)> {
        self.writes()
            .into_iter()
            .map(|e| (&e["verb"], &e["requestURI"]))
            .collect()
    }

    /// Writes to objects of ours, per object.
    fn object_writes(&self) -> BTreeMap<ObjectKey, usize> {
        let mut writes = BTreeMap::new();
        for e in self.writes() {
            if matches!(Self::resource(e), "events" | "namespaces") {
                continue;
            }
            let key = (
                e["objectRef"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                Self::resource(e).to_string(),
                e["objectRef"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            *writes.entry(key).or_default() += 1;
        }
        writes
    }

    /// Writes to Namespaces (the status annotation), per namespace.
    fn namespace_writes(&self) -> BTreeMap<String, usize> {
        let mut writes = BTreeMap::new();
        for e in self.writes() {
            if Self::resource(e) == "namespaces" {
                let name = e["objectRef"]["name"].as_str().unwrap_or_default();
                *writes.entry(name.to_string()).or_default() += 1;
            }
        }
        writes
    }

    /// Events created, per namespace.
    fn events_created(&self) -> BTreeMap<String, usize> {
        let mut created = BTreeMap::new();
        for e in self.writes() {
            if Self::resource(e) == "events" && Self::verb(e) == "create" {
                let namespace = e["objectRef"]["namespace"].as_str().unwrap_or_default();
                *created.entry(namespace.to_string()).or_default() += 1;
            }
        }
        created
    }

    fn event_writes(&self) -> usize {
        self.writes()
            .iter()
            .filter(|e| Self::resource(e) == "events")
            .count()
    }

    fn count(&self, verb: &str) -> usize {
        self.0.iter().filter(|e| Self::verb(e) == verb).count()
    }

    /// LISTs per resource.
    fn lists(&self) -> BTreeMap<String, usize> {
        let mut lists = BTreeMap::new();
        for e in self.0.iter().filter(|e| Self::verb(e) == "list") {
            *lists.entry(Self::resource(e).to_string()).or_default() += 1;
        }
        lists
    }

    fn pod_lists(&self) -> usize {
        self.lists().get("pods").copied().unwrap_or(0)
    }
}

/// What one run measured.
struct Figures {
    size: Size,
    pods_total: usize,
    /// From labeling until every namespace had all its objects.
    all_converged: Duration,
    alone: Vec<Duration>,
    /// Namespaces labeled at once.
    labeled: Vec<String>,
    /// Per labeled namespace, the objects we own in it.
    owned: BTreeMap<String, BTreeSet<(String, String)>>,
    /// What `chiller-metrics render` says each namespace gets: (kind, name).
    rendered: BTreeMap<String, BTreeSet<(String, String)>>,
    converge: Calls,
    /// CPU seconds each process used while converging, most first.
    converge_cpu: Vec<(&'static str, f64)>,
    /// Writes each user made while converging.
    converge_writes_by_user: BTreeMap<String, usize>,
    idle: Calls,
    idle_window: Duration,
    idle_reconciles: f64,
    idle_cpu_seconds: f64,
    /// Objects of ours (and our Namespaces) whose resourceVersion changed
    /// while idle, but by the operator's status patches.
    idle_bumps: Vec<String>,
    /// kB, from `/proc/PID/status`.
    rss_after_list: u64,
    rss_steady: u64,
    rss_peak: u64,
    /// Our calls from an API server restart until the stores re-listed.
    relist: Calls,
    rss_relist_peak: u64,
    /// Pods watched once grown, and `serve`'s RSS and peak then (kB).
    grown: Option<(usize, u64, u64)>,
}

fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// `serve`'s command with another program, the same arguments and environment.
fn with_program(command: &Command, program: &Path) -> Command {
    let mut new = Command::new(program);
    new.args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => new.env(key, value),
            None => new.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        new.current_dir(dir);
    }
    new
}

fn reconciles(serve: &ServeProcess) -> f64 {
    support::https::sample(
        &install::metrics_of(serve),
        "chiller_metrics_reconcile_runs_total",
    )
    .unwrap_or(0.0)
}

/// Whether a namespace's status says complete: ready, with its pods counted.
fn complete(namespace: &Namespace, pods: usize) -> bool {
    namespace
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(&format!("{DOMAIN}/reconcile-status")))
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .is_some_and(|status| status["ready"] == true && status["uninjectedPods"] == pods)
}

fn workload(name: &str, replicas: usize) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, PART_OF.0: PART_OF.1}},
                "spec": {"containers": [{"name": "app", "image": "chiller-e2e-app:e2e"}]},
            },
        },
    }))
    .unwrap()
}

/// Creates the namespaces (not opted in) with their Deployments.
async fn create_namespaces(client: &kube::Client, names: &[String], replicas: usize) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let results: Vec<_> = stream::iter(names.iter().cloned())
        .map(|name| {
            let namespaces = namespaces.clone();
            let client = client.clone();
            async move {
                let namespace: Namespace = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {PART_OF.0: PART_OF.1}},
                }))
                .unwrap();
                namespaces
                    .create(&PostParams::default(), &namespace)
                    .await?;
                let deployments: Api<Deployment> = Api::namespaced(client, &name);
                for workload_name in WORKLOADS {
                    deployments
                        .create(&PostParams::default(), &workload(workload_name, replicas))
                        .await?;
                }
                Ok::<_, kube::Error>(())
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    for result in results {
        result.expect("creating a namespace and its Deployments");
    }
}

/// Pods of the scenario that are Running.
/// Sets the replicas of every Deployment in `names`.
async fn scale_workloads(client: &kube::Client, names: &[String], replicas: usize) {
    let patch = json!({"spec": {"replicas": replicas}});
    let results: Vec<_> = stream::iter(names.iter().flat_map(|ns| WORKLOADS.map(|w| (ns, w))))
        .map(|(namespace, workload)| {
            let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
            let patch = patch.clone();
            async move {
                deployments
                    .patch(workload, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    for result in results {
        result.expect("scaling a Deployment");
    }
}

async fn running_pods(client: &kube::Client) -> usize {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client.clone());
    let mut params = ListParams::default()
        .labels(&format!("{}={}", PART_OF.0, PART_OF.1))
        .fields("status.phase=Running")
        .limit(5000);
    let mut count = 0;
    loop {
        let page = pods.list_metadata(&params).await.expect("listing pods");
        count += page.items.len();
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return count,
        }
    }
}

/// Waits until `total` pods of the scenario are Running, saying how many
/// are every 30 s. Counts every 2 s: a LIST of thousands of pods costs the
/// API server.
fn wait_running(
    runtime: &tokio::runtime::Runtime,
    client: &kube::Client,
    total: usize,
    within: Duration,
) {
    let started = Instant::now();
    let mut last_report = Instant::now();
    support::wait_until(within, "every pod is Running on a kwok node", || {
        let running = runtime.block_on(running_pods(client));
        if last_report.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "{running}/{total} pods Running after {:?}",
                started.elapsed()
            );
            last_report = Instant::now();
        }
        running == total || {
            std::thread::sleep(Duration::from_secs(2));
            false
        }
    });
}

/// Labels `names` for injection, all at once.
async fn opt_in(client: &kube::Client, names: &[String]) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let patch = json!({"metadata": {"labels": {format!("{DOMAIN}/inject"): "enabled"}}});
    let results: Vec<_> = stream::iter(names.iter().cloned())
        .map(|name| {
            let namespaces = namespaces.clone();
            let patch = patch.clone();
            async move {
                namespaces
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
            }
        })
        .buffer_unordered(PARALLEL * 2)
        .collect()
        .await;
    for result in results {
        result.expect("labeling a namespace");
    }
}

/// Waits until every one of `names` is complete, from a watch of the
/// scenario's namespaces: no LIST of a thousand namespaces every poll,
/// which would load the API server being measured.
async fn until_complete(client: kube::Client, names: BTreeSet<String>, pods: usize) {
    use kube::runtime::{WatchStreamExt, watcher};
    let namespaces: Api<Namespace> = Api::all(client);
    let config = watcher::Config::default().labels(&format!("{}={}", PART_OF.0, PART_OF.1));
    let stream = watcher(namespaces, config).applied_objects();
    futures::pin_mut!(stream);
    let mut done = BTreeSet::new();
    while done.len() < names.len() {
        let namespace = match stream.next().await {
            Some(Ok(namespace)) => namespace,
            Some(Err(error)) => {
                eprintln!("namespace watch: {error}; it retries");
                continue;
            }
            None => panic!("the namespace watch ended"),
        };
        let name = namespace.metadata.name.clone().unwrap_or_default();
        if names.contains(&name) && complete(&namespace, pods) {
            done.insert(name);
        } else {
            done.remove(&name);
        }
    }
}

/// The namespaces of the scenario.
async fn scenario_namespaces(client: &kube::Client) -> Vec<Namespace> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .list(&ListParams::default().labels(&format!("{}={}", PART_OF.0, PART_OF.1)))
        .await
        .expect("listing namespaces")
        .items
}

/// `resourceVersion` of every object of ours (by kind, namespace, name),
/// and of the scenario's Namespaces, which carry our status.
async fn resource_versions(client: &kube::Client) -> BTreeMap<String, String> {
    let mut versions = BTreeMap::new();
    for (group, version, kind, plural) in OWNED_KINDS {
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let list = api
            .list_metadata(&ListParams::default().labels(MANAGED_BY))
            .await
            .expect("listing our objects");
        for object in list.items {
            let key = format!(
                "{kind} {}/{}",
                object.metadata.namespace.unwrap_or_default(),
                object.metadata.name.unwrap_or_default()
            );
            versions.insert(key, object.metadata.resource_version.unwrap_or_default());
        }
    }
    for namespace in scenario_namespaces(client).await {
        versions.insert(
            format!("Namespace {}", namespace.metadata.name.unwrap_or_default()),
            namespace.metadata.resource_version.unwrap_or_default(),
        );
    }
    versions
}

/// (kind, name) of our objects per namespace.
async fn owned_objects(client: &kube::Client) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let mut owned: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for (group, version, kind, plural) in OWNED_KINDS {
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        for object in api
            .list_metadata(&ListParams::default().labels(MANAGED_BY))
            .await
            .expect("listing our objects")
            .items
        {
            owned
                .entry(object.metadata.namespace.unwrap_or_default())
                .or_default()
                .insert((kind.to_string(), object.metadata.name.unwrap_or_default()));
        }
    }
    owned
}

/// `(kind, name)` of what `chiller-metrics render` says the loop applies.
fn rendered(namespace: &str) -> BTreeSet<(String, String)> {
    let output = run(Command::new(ServeProcess::BINARY).args(["render", "--namespace", namespace]));
    serde_norway::Deserializer::from_str(&String::from_utf8(output.stdout).unwrap())
        .map(|doc| <Value as serde::Deserialize>::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .map(|doc| {
            (
                doc["kind"].as_str().unwrap().to_string(),
                doc["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The plural of one of our kinds.
fn plural(kind: &str) -> &'static str {
    OWNED_KINDS
        .iter()
        .find(|k| k.2 == kind)
        .map(|k| k.3)
        .unwrap_or_else(|| panic!("{kind} is not one of our kinds"))
}

/// The whole scenario; every wait is bounded by `size`'s limits.
fn measure(size: Size) -> Figures {
    let plane = ControlPlane::shared();
    let _plane_logs = plane.logs_on_failure();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime.block_on(plane.client());

    plane.add_nodes(&NODES);
    let operator = plane.start_prometheus_operator();
    let install = Install::chart(
        plane,
        &[&format!(
            "config.reconcile.resyncSeconds={}",
            size.resync_seconds
        )],
    );

    let labeled: Vec<String> = (0..size.namespaces)
        .map(|i| format!("scale-{i:05}"))
        .collect();
    let alone: Vec<String> = (0..size.samples).map(|i| format!("alone-{i:03}")).collect();
    let all: Vec<String> = labeled.iter().chain(&alone).cloned().collect();
    let pods_total = all.len() * size.pods_per_namespace();
    let started = Instant::now();
    runtime.block_on(create_namespaces(&client, &all, size.replicas));
    wait_running(&runtime, &client, pods_total, size.setup_timeout);
    eprintln!("{pods_total} pods Running after {:?}", started.elapsed());

    // `serve` starts with every pod already there: its initial list holds them all.
    let before_serve = plane.audit_offset();
    let mut command = install.serve_command("chiller-metrics-0");
    if let Some(binary) = &size.binary {
        command = with_program(&command, binary);
    }
    let serve = install::start_serve(command);
    if let Err(error) = runtime.block_on(serve.wait_ready()) {
        panic!("{error}; log:\n{}", serve.log().join("\n"));
    }
    let _logs = plane
        .logs_on_failure()
        .with("chiller-metrics serve", serve.log_tail(60))
        .with("prometheus-operator", {
            let log = operator.log_path().to_path_buf();
            move || controlplane::process::tail(&log, 30)
        });
    install.set_webhook_url(&format!(
        "https://127.0.0.1:{}/mutate",
        serve.webhook_addr.port()
    ));
    support::wait_until(size.converge_timeout, "serve watches pods", || {
        Calls(plane.audit_events_since(before_serve, SERVICE_ACCOUNT))
            .0
            .iter()
            .any(|e| e["verb"] == "watch" && e["objectRef"]["resource"] == "pods")
    });
    std::thread::sleep(SETTLE);
    let pid = serve.pid();
    let rss_after_list = proc_status_kb(pid, "VmRSS");

    // All at once.
    let mut processes = plane.pids();
    processes.push((
        "prometheus-operator",
        operator.pid().expect("the operator runs"),
    ));
    processes.push(("chiller-metrics serve", pid));
    let cpu_before: Vec<f64> = processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let profile = size.apiserver_profile.clone().map(|path| {
        let mut kubectl = plane.kubectl();
        kubectl.args([
            "get",
            "--raw",
            &format!("/debug/pprof/profile?seconds={APISERVER_PROFILE_SECONDS}"),
        ]);
        std::thread::spawn(move || {
            let output = kubectl.output().expect("running kubectl for the profile");
            assert!(
                output.status.success(),
                "kube-apiserver's CPU profile: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            std::fs::write(&path, output.stdout).expect("writing the profile");
            eprintln!("kube-apiserver's CPU profile: {}", path.display());
        })
    });
    let pods = size.pods_per_namespace();
    let converged = runtime.spawn(until_complete(
        client.clone(),
        labeled.iter().cloned().collect(),
        pods,
    ));
    let from = plane.audit_offset();
    let start = Instant::now();
    runtime.block_on(opt_in(&client, &labeled));
    runtime
        .block_on(async { tokio::time::timeout(size.converge_timeout, converged).await })
        .unwrap_or_else(|_| {
            panic!(
                "every namespace has all its objects: not within {:?}",
                size.converge_timeout
            )
        })
        .expect("the namespace watch");
    let all_converged = start.elapsed();
    let mut converge_cpu: Vec<(&'static str, f64)> = processes
        .iter()
        .zip(cpu_before)
        .map(|((name, pid), before)| (*name, cpu_seconds(*pid) - before))
        .collect();
    converge_cpu.sort_by(|a, b| b.1.total_cmp(&a.1));
    let converge_writes_by_user = plane.audit_writes_by_user_since(from);
    eprintln!(
        "{} namespaces converged in {all_converged:?}; CPU seconds meanwhile: {converge_cpu:?}; \
         writes by user: {converge_writes_by_user:?}",
        labeled.len()
    );
    if let Some(profile) = profile {
        profile.join().expect("the profile's thread");
    }
    std::thread::sleep(SETTLE);
    let converge = Calls(plane.audit_events_since(from, SERVICE_ACCOUNT));
    let owned = runtime.block_on(owned_objects(&client));
    let rendered: BTreeMap<String, BTreeSet<(String, String)>> = labeled
        .iter()
        .take(if size.binary.is_some() { 1 } else { usize::MAX })
        .map(|name| (name.clone(), rendered(name)))
        .collect();

    // One namespace at a time, the others idle but for their resyncs
    // (spread over the resync period as their first reconciles were, so
    // the loop is never quiet for long).
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut samples = Vec::new();
    for name in &alone {
        std::thread::sleep(SETTLE);
        let start = Instant::now();
        runtime.block_on(opt_in(&client, std::slice::from_ref(name)));
        let deadline = start + size.converge_timeout;
        loop {
            let namespace = runtime
                .block_on(namespaces.get(name))
                .expect("reading a namespace");
            if complete(&namespace, pods) {
                samples.push(start.elapsed());
                break;
            }
            assert!(Instant::now() < deadline, "{name} not complete in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // Idle: nothing changes over the idle window. (A short resync never
    // leaves the loop quiet for long: what converging caused is over
    // after a settle period.)
    std::thread::sleep(SETTLE);
    let versions_before = runtime.block_on(resource_versions(&client));
    let from = plane.audit_offset();
    let reconciles_before = reconciles(&serve);
    let cpu_before = cpu_seconds(pid);
    let idle_start = Instant::now();
    std::thread::sleep(size.idle);
    let idle_window = idle_start.elapsed();
    let idle_cpu_seconds = cpu_seconds(pid) - cpu_before;
    let idle_reconciles = reconciles(&serve) - reconciles_before;
    let idle = Calls(plane.audit_events_since(from, SERVICE_ACCOUNT));
    let versions_after = runtime.block_on(resource_versions(&client));
    // The operator (as the admin user) writes its Prometheus objects: their
    // status, and its finalizer on each (a metadata patch, which a run whose
    // operator is still busy with 1,000 of them shows while idle). Those
    // bumps are not ours.
    let operator_status: BTreeSet<String> = plane
        .audit_events_since(from, OPERATOR_USER)
        .iter()
        .filter(|e| e["objectRef"]["resource"] == "prometheuses" && Calls::is_write(e))
        .map(|e| {
            format!(
                "Prometheus {}/{}",
                e["objectRef"]["namespace"].as_str().unwrap_or_default(),
                e["objectRef"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    let idle_bumps = versions_before
        .iter()
        .filter(|(key, version)| versions_after.get(*key) != Some(version))
        .map(|(key, _)| key.clone())
        .filter(|key| !operator_status.contains(key))
        .collect();
    let rss_steady = proc_status_kb(pid, "VmRSS");
    let rss_peak = proc_status_kb(pid, "VmHWM");

    // A re-list: the API server restarts, the watches resume from versions
    // its new watch cache does not hold (410 Gone), and the stores list
    // everything again. The peak is measured from here on (clear_refs 5
    // resets VmHWM).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("resetting serve's peak RSS");
    let from = plane.audit_offset();
    plane.stop_apiserver();
    plane.start_apiserver_again();
    if let Err(error) = runtime.block_on(serve.wait_ready()) {
        panic!("{error}; log:\n{}", serve.log().join("\n"));
    }
    let mut lists = usize::MAX;
    support::wait_until(size.converge_timeout, "the re-list is over", || {
        std::thread::sleep(SETTLE);
        let now = Calls(plane.audit_events_since(from, SERVICE_ACCOUNT)).count("list");
        std::mem::replace(&mut lists, now) == now
    });
    let relist = Calls(plane.audit_events_since(from, SERVICE_ACCOUNT));
    let rss_relist_peak = proc_status_kb(pid, "VmHWM");

    // More pods: every Deployment of the labeled namespaces scaled up.
    let grown = size.grown_replicas.map(|replicas| {
        let started = Instant::now();
        runtime.block_on(scale_workloads(&client, &labeled, replicas));
        let total = pods_total + labeled.len() * WORKLOADS.len() * (replicas - size.replicas);
        wait_running(&runtime, &client, total, size.setup_timeout);
        eprintln!("{total} pods Running after {:?}", started.elapsed());
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("resetting serve's peak RSS");
        std::thread::sleep(SETTLE * 10);
        (
            total,
            proc_status_kb(pid, "VmRSS"),
            proc_status_kb(pid, "VmHWM"),
        )
    });

    let (status, _) = serve.terminate();
    assert!(status.success(), "serve exits cleanly");
    drop(operator);
    Figures {
        size,
        pods_total,
        all_converged,
        alone: samples,
        labeled,
        owned,
        rendered,
        converge,
        converge_cpu,
        converge_writes_by_user,
        idle,
        idle_window,
        idle_reconciles,
        idle_cpu_seconds,
        idle_bumps,
        rss_after_list,
        rss_steady,
        rss_peak,
        relist,
        rss_relist_peak,
        grown,
    }
}

impl Figures {
    /// Writes to our objects in `namespace` that were not exactly one per object.
    fn extra_writes(&self, namespace: &str) -> Vec<String> {
        let writes = self.converge.object_writes();
        let owned = self.owned.get(namespace).cloned().unwrap_or_default();
        let mut wrong = Vec::new();
        for (kind, name) in &owned {
            let key = (
                namespace.to_string(),
                plural(kind).to_string(),
                name.clone(),
            );
            let count = writes.get(&key).copied().unwrap_or(0);
            if count != 1 {
                wrong.push(format!("{kind} {name}: {count} writes"));
            }
        }
        for ((ns, resource, name), count) in &writes {
            if ns == namespace
                && !owned
                    .iter()
                    .any(|(k, n)| plural(k) == resource && n == name)
            {
                wrong.push(format!(
                    "{resource} {name}: {count} writes to no object we own"
                ));
            }
        }
        wrong
    }

    fn per_namespace(&self, total: usize) -> f64 {
        total as f64 / self.labeled.len() as f64
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.alone.clone();
        sorted.sort();
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
        sorted.get(rank - 1).copied().unwrap_or_default()
    }

    /// The figures as a markdown table, with the goals beside them.
    fn table(&self) -> String {
        let n = self.labeled.len();
        let owned_per_namespace = self.owned.get(&self.labeled[0]).map_or(0, BTreeSet::len);
        let object_writes: usize = self.converge.object_writes().values().sum();
        let namespace_writes: usize = self.converge.namespace_writes().values().sum();
        let events_created: usize = self.converge.events_created().values().sum();
        let lists = self.converge.lists();
        let lists_total: usize = lists.values().sum();
        let mb = |kb: u64| kb as f64 / 1024.0;
        let bumped_kinds: BTreeSet<&str> = self
            .idle_bumps
            .iter()
            .filter_map(|b| b.split_whitespace().next())
            .collect();
        let rows = [
            (
                format!("all {n} namespaces converged, labeled at once"),
                format!("{:.1} s", self.all_converged.as_secs_f64()),
                "≤ 25 s".to_string(),
            ),
            (
                "CPU seconds while converging, by process".to_string(),
                self.converge_cpu
                    .iter()
                    .map(|(name, seconds)| format!("{name} {seconds:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                String::new(),
            ),
            (
                "writes the API server took while converging: all / ours".to_string(),
                format!(
                    "{} / {}",
                    self.converge_writes_by_user.values().sum::<usize>(),
                    self.converge_writes_by_user
                        .get(SERVICE_ACCOUNT)
                        .copied()
                        .unwrap_or(0)
                ),
                String::new(),
            ),
            (
                format!(
                    "one namespace labeled alone, p50 / p99 ({} samples, 10 ms polls)",
                    self.alone.len()
                ),
                format!(
                    "{:.2} s / {:.2} s",
                    self.percentile(0.5).as_secs_f64(),
                    self.percentile(0.99).as_secs_f64()
                ),
                "p99 ≤ 0.5 s".to_string(),
            ),
            (
                "writes per namespace to converge: our objects / Namespace status".to_string(),
                format!(
                    "{:.2} / {:.2} ({owned_per_namespace} objects owned)",
                    self.per_namespace(object_writes),
                    self.per_namespace(namespace_writes)
                ),
                format!("{owned_per_namespace}, one per object"),
            ),
            (
                "Events per namespace to converge: created / all event writes".to_string(),
                format!(
                    "{:.2} / {:.2}",
                    self.per_namespace(events_created),
                    self.per_namespace(self.converge.event_writes())
                ),
                format!("≤ {} (one per workload and cause)", WORKLOADS.len()),
            ),
            (
                "reads per namespace to converge: get / list / watch".to_string(),
                format!(
                    "{:.2} / {:.2} / {:.2}",
                    self.per_namespace(self.converge.count("get")),
                    self.per_namespace(self.converge.count("list")),
                    self.per_namespace(self.converge.count("watch"))
                ),
                String::new(),
            ),
            (
                "LISTs while converging (pods / all)".to_string(),
                format!("{} / {lists_total} {lists:?}", self.converge.pod_lists()),
                "0: everything from watches".to_string(),
            ),
            (
                format!(
                    "idle {:.0} s (resync {} s): writes",
                    self.idle_window.as_secs_f64(),
                    self.size.resync_seconds
                ),
                self.idle.writes().len().to_string(),
                "0".to_string(),
            ),
            (
                "idle: resourceVersion bumps on our objects and Namespaces (but the operator's writes)"
                    .to_string(),
                format!("{} {bumped_kinds:?}", self.idle_bumps.len()),
                "0".to_string(),
            ),
            (
                "idle: reconciles per namespace / pod LISTs".to_string(),
                format!(
                    "{:.2} / {}",
                    self.idle_reconciles / (n + self.alone.len()) as f64,
                    self.idle.pod_lists()
                ),
                "0 LISTs".to_string(),
            ),
            (
                "idle: serve CPU seconds".to_string(),
                format!("{:.2}", self.idle_cpu_seconds),
                String::new(),
            ),
            (
                format!(
                    "serve RSS after the initial list ({} pods, {} namespaces)",
                    self.pods_total,
                    n + self.alone.len()
                ),
                format!("{:.1} MB", mb(self.rss_after_list)),
                "≤ 64 MB".to_string(),
            ),
            (
                "serve RSS steady (after idle) / peak (VmHWM)".to_string(),
                format!(
                    "{:.1} MB / {:.1} MB ({:.2}×)",
                    mb(self.rss_steady),
                    mb(self.rss_peak),
                    self.rss_peak as f64 / self.rss_steady.max(1) as f64
                ),
                "≤ 64 MB, peak ≤ 1.5× steady".to_string(),
            ),
            (
                "re-list after an API server restart: pod LISTs / writes / serve peak RSS"
                    .to_string(),
                format!(
                    "{} / {} / {:.1} MB ({:.2}× steady)",
                    self.relist.pod_lists(),
                    self.relist.writes().len(),
                    mb(self.rss_relist_peak),
                    self.rss_relist_peak as f64 / self.rss_steady.max(1) as f64
                ),
                "0 writes, peak ≤ 1.5× steady".to_string(),
            ),
        ];
        let grown = self.grown.map(|(pods, rss, peak)| {
            (
                format!("serve RSS / peak with {pods} pods (Deployments scaled up)"),
                format!(
                    "{:.1} MB / {:.1} MB ({:.2}× the RSS with {} pods)",
                    mb(rss),
                    mb(peak),
                    rss as f64 / self.rss_steady.max(1) as f64,
                    self.pods_total
                ),
                String::new(),
            )
        });
        let mut table = String::from("| figure | measured | goal |\n|---|---|---|\n");
        for (figure, measured, goal) in rows.into_iter().chain(grown) {
            table.push_str(&format!("| {figure} | {measured} | {goal} |\n"));
        }
        table
    }
}

/// 20 namespaces × 10 pods: counts only.
#[test]
fn twenty_namespaces_converge_with_one_write_per_object_and_stay_quiet() {
    let resync_seconds = 15;
    let figures = measure(Size {
        namespaces: 20,
        replicas: 5,
        samples: 0,
        resync_seconds,
        idle: Duration::from_secs(2 * resync_seconds + 2),
        setup_timeout: Duration::from_secs(300),
        converge_timeout: Duration::from_secs(120),
        binary: None,
        grown_replicas: None,
        apiserver_profile: None,
    });
    eprintln!("{}", figures.table());
    let n = figures.labeled.len();
    // Every goal is checked, and all that fail are named together.
    let mut failed = Vec::new();
    let mut check = |holds: bool, goal: String| {
        if !holds {
            failed.push(goal);
        }
    };

    for name in &figures.labeled {
        check(
            figures.owned.get(name) == figures.rendered.get(name),
            format!(
                "{name} holds exactly what render says: {:?} != {:?}",
                figures.owned.get(name),
                figures.rendered.get(name)
            ),
        );
    }
    let wrong: BTreeMap<&String, Vec<String>> = figures
        .labeled
        .iter()
        .map(|name| (name, figures.extra_writes(name)))
        .filter(|(_, wrong)| !wrong.is_empty())
        .collect();
    check(
        wrong.is_empty(),
        format!("converging writes each object we own once: {wrong:#?}"),
    );
    let namespace_writes = figures.converge.namespace_writes();
    check(
        namespace_writes.values().all(|&w| w <= 1),
        format!(
            "the status annotation is written at most once per namespace: {namespace_writes:?}"
        ),
    );
    let events = figures.converge.events_created();
    check(
        events.values().all(|&e| e <= WORKLOADS.len()),
        format!(
            "at most one Event per workload ({}) in each namespace, not one per pod: {events:?}",
            WORKLOADS.len()
        ),
    );
    check(
        figures.converge.pod_lists() + figures.idle.pod_lists() == 0,
        format!(
            "no pod LIST after the initial list, every reconcile reads a watch cache \
             (LISTs converging: {:?}, idle: {:?})",
            figures.converge.lists(),
            figures.idle.lists()
        ),
    );
    check(
        figures.idle_reconciles >= n as f64,
        format!(
            "the idle window spans a resync of every namespace ({} reconciles)",
            figures.idle_reconciles
        ),
    );
    let writes = figures.idle.write_calls();
    check(
        writes.is_empty(),
        format!("no write while idle: {writes:#?}"),
    );
    check(
        figures.idle_bumps.is_empty(),
        format!(
            "no resourceVersion of ours changes while idle: {:?}",
            figures.idle_bumps
        ),
    );
    check(
        figures.relist.pod_lists() > 0,
        format!(
            "the API server restart made the stores list again: {:?}",
            figures.relist.lists()
        ),
    );
    let writes = figures.relist.write_calls();
    check(
        writes.is_empty(),
        format!("no write after a re-list: {writes:#?}"),
    );
    assert!(
        failed.is_empty(),
        "goals missed:\n- {}",
        failed.join("\n- ")
    );
}

/// `make scale`: the figures of issue-sized runs, into BENCHMARKS.md.
#[test]
#[ignore = "make scale: minutes on a control plane with thousands of pods"]
fn the_reconcile_loop_at_scale_into_benchmarks() {
    let namespaces = env_or("SCALE_NAMESPACES", 1000usize).max(1);
    let pods = env_or("SCALE_PODS", namespaces * 10);
    let replicas = (pods / (namespaces * WORKLOADS.len())).max(1);
    let resync_seconds = env_or("SCALE_RESYNC_SECONDS", 300u64);
    // Ten minutes, and at least one full resync period.
    let idle = Duration::from_secs(env_or("SCALE_IDLE_SECONDS", (resync_seconds + 30).max(600)));
    let binary = std::env::var_os("SCALE_SERVE_BINARY").map(PathBuf::from);
    let release = binary.is_some();
    let figures = measure(Size {
        namespaces,
        replicas,
        samples: env_or("SCALE_SAMPLES", 20),
        resync_seconds,
        idle,
        setup_timeout: Duration::from_secs(env_or("SCALE_SETUP_SECONDS", 3600)),
        converge_timeout: Duration::from_secs(env_or("SCALE_CONVERGE_SECONDS", 600)),
        binary,
        grown_replicas: Some(
            (env_or("SCALE_GROWN_PODS", namespaces * 30) / (namespaces * WORKLOADS.len()))
                .max(replicas),
        )
        .filter(|&grown| grown > replicas),
        apiserver_profile: std::env::var_os("SCALE_APISERVER_PROFILE").map(PathBuf::from),
    });
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let section = format!(
        "{} namespaces × {} pods ({} Deployments × {replicas}) on {} kwok nodes, {cores} cores, \
         `serve` {} out of cluster as the chart's ServiceAccount, the Prometheus Operator \
         running; {} more namespaces labeled one at a time.\n\n{}",
        figures.labeled.len(),
        figures.size.pods_per_namespace(),
        WORKLOADS.len(),
        NODES.len(),
        if release {
            "(release build)"
        } else {
            "(debug build)"
        },
        figures.alone.len(),
        figures.table()
    );
    println!("{section}");
    let path = support::crate_dir().join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).expect("reading BENCHMARKS.md");
    let (begin, end) = ("<!-- scale:begin -->", "<!-- scale:end -->");
    let (head, rest) = text
        .split_once(begin)
        .expect("BENCHMARKS.md has the scale:begin marker");
    let (_, tail) = rest
        .split_once(end)
        .expect("BENCHMARKS.md has the scale:end marker");
    std::fs::write(&path, format!("{head}{begin}\n{section}{end}{tail}"))
        .expect("writing BENCHMARKS.md");
}
