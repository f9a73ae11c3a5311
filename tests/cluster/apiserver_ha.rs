//! High availability and faults against a real kube-apiserver: two `serve`
//! replicas contend for the real Lease; kube-apiserver and etcd are
//! restarted under load; a leader whose renewals are forbidden steps down.
//!
//! One scenario, in steps: every step changes who leads.

use crate::support::controlplane;
use crate::support::install;
use crate::support::{self, wait_until};

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use controlplane::ControlPlane;
use install::{
    DOMAIN, Install, ensure_namespace, kubectl_json, managed_objects, opt_in, rendered, run,
};
use serde_json::Value;
use support::https::{HttpVersion, HttpsClient, ServeProcess, admin_get, chiller_api_review};

const CONVERGE: Duration = Duration::from_secs(90);
const LEASE: &str = "chiller-metrics-reconciler";
/// LeaseTimings::default().lease_duration: how long a dead leader blocks others.
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// Where a Deployment's pods predate the opt-in: one Event series on it.
const EVENTS_NAMESPACE: &str = "ha-events";

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

fn metric(serve: &ServeProcess, series: &str) -> f64 {
    support::https::sample(&install::metrics_of(serve), series).unwrap_or(0.0)
}

fn ready(serve: &ServeProcess) -> bool {
    block_on(admin_get(serve.admin_addr, "/readyz")).is_ok_and(|r| r.status == 200)
}

fn lease(plane: &ControlPlane) -> Value {
    kubectl_json(
        plane,
        &["get", "lease", LEASE, "-n", install::RELEASE_NAMESPACE],
    )
}

fn holder(plane: &ControlPlane) -> Option<String> {
    plane
        .kubectl()
        .args([
            "get",
            "lease",
            LEASE,
            "-n",
            install::RELEASE_NAMESPACE,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|h| !h.is_empty())
}

fn assert_converged(plane: &ControlPlane, namespaces: &[&str]) {
    for namespace in namespaces {
        let want = rendered(namespace, false);
        wait_until(
            CONVERGE,
            &format!("{namespace} converges to exactly the rendered objects"),
            || managed_objects(plane, namespace) == want,
        );
    }
}

/// Sends reviews to each replica until stopped; counts answers that were
/// not 200 while the replica was expected to answer.
struct ReviewLoad {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl ReviewLoad {
    fn start(targets: Vec<(String, HttpsClient, Arc<AtomicBool>)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let body = chiller_api_review().to_string();
                let mut problems = Vec::new();
                block_on(async {
                    // Bounded: at most 10 minutes of 20 ms rounds.
                    for _ in 0..30_000 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        for (name, client, expected) in &targets {
                            if !expected.load(Ordering::SeqCst) {
                                continue;
                            }
                            match client
                                .post_json("/mutate", body.clone(), HttpVersion::Http2)
                                .await
                            {
                                Ok(response) if response.status == 200 => {
                                    answered.fetch_add(1, Ordering::SeqCst);
                                }
                                other if expected.load(Ordering::SeqCst) => {
                                    problems.push(format!("{name}: {:?}", other.map(|r| r.status)));
                                }
                                _ => {}
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
                problems
            })
        };
        Self {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    /// Stops and returns (answered, problems).
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let problems = self.thread.take().unwrap().join().unwrap();
        (self.answered.load(Ordering::SeqCst), problems)
    }
}

impl Drop for ReviewLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn client_for(serve: &ServeProcess, install: &Install) -> HttpsClient {
    let ca = std::fs::read_to_string(install.certs.join("ca.crt")).unwrap();
    let mut client = serve.client(&ca);
    client.server_name = "127.0.0.1".into();
    client
}

#[test]
fn replicas_share_the_lease_and_survive_control_plane_faults() {
    let plane = ControlPlane::shared();
    let _plane_logs = plane.logs_on_failure();
    let install = Install::chart(plane, &["config.reconcile.resyncSeconds=5"]);
    let a = serve_draining(&install, "replica-a");
    let b = serve_draining(&install, "replica-b");
    let _logs = plane
        .logs_on_failure()
        .with("replica-a", a.log_tail(40))
        .with("replica-b", b.log_tail(40));
    install.point_webhook_at(&a);

    // The load's reviews are for the chiller API pod: the API server only
    // sends reviews for opted-in namespaces.
    opt_in(plane, "chiller");
    // Exactly one replica reconciles.
    opt_in(plane, "ha-one");
    assert_converged(plane, &["ha-one"]);
    let leader_name = holder(plane).expect("the Lease has a holder");
    let (leader, follower) = match leader_name.as_str() {
        "replica-a" => (a, b),
        "replica-b" => (b, a),
        other => panic!("unexpected holder {other}"),
    };
    assert!(metric(&leader, "chiller_metrics_reconcile_runs_total") > 0.0);
    assert_eq!(
        metric(&follower, "chiller_metrics_reconcile_runs_total"),
        0.0,
        "the follower never reconciles"
    );
    pods_created_before_the_opt_in(plane, EVENTS_NAMESPACE);
    one_event_series_counted(plane, 1);

    // SIGTERM: the leader releases the Lease, the follower takes over, and
    // both answer the webhook throughout (the leader until it exits).
    let leader_expected = Arc::new(AtomicBool::new(true));
    let load = ReviewLoad::start(vec![
        (
            "leader".into(),
            client_for(&leader, &install),
            leader_expected.clone(),
        ),
        (
            "follower".into(),
            client_for(&follower, &install),
            Arc::new(AtomicBool::new(true)),
        ),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let transitions_before = lease(plane)["spec"]["leaseTransitions"]
        .as_i64()
        .unwrap_or(0);
    let sigterm = Instant::now();
    leader.send_sigterm();
    // Like an endpoints controller: stop sending once /readyz fails; the
    // drain keeps the replica serving what is already on its way.
    wait_until(CONVERGE, "the old leader turns unready", || !ready(&leader));
    leader_expected.store(false, Ordering::SeqCst);
    wait_until(CONVERGE, "the follower holds the Lease", || {
        holder(plane).is_some_and(|h| h != leader_name)
    });
    let takeover = sigterm.elapsed();
    assert!(
        takeover < LEASE_DURATION,
        "took over after {takeover:?}: the Lease was not released, the follower waited for it to expire"
    );
    assert_eq!(
        lease(plane)["spec"]["leaseTransitions"]
            .as_i64()
            .unwrap_or(0),
        transitions_before + 1
    );
    let mut leader = leader;
    let (status, log) = {
        let status = leader.wait_exit(Duration::from_secs(60));
        (status, leader.log())
    };
    assert!(
        status.success(),
        "the old leader exits cleanly: {}",
        log.join("\n")
    );
    assert!(
        log.iter()
            .any(|l| l.contains("released the reconcile lease")),
        "the old leader logged the release"
    );
    let new_leader = follower;
    opt_in(plane, "ha-two");
    assert_converged(plane, &["ha-one", "ha-two"]);
    // The new leader reports the same pods again: in the same series.
    one_event_series_counted(plane, 2);
    let (answered, problems) = load.finish();
    assert!(answered > 50, "the load ran ({answered} answers)");
    assert!(
        problems.is_empty(),
        "reviews failed during the handover: {problems:#?}"
    );
    install.point_webhook_at(&new_leader);

    // Faults: restart kube-apiserver, then etcd, while pods are created and
    // the loop runs.
    for fault in ["kube-apiserver", "etcd"] {
        let namespace = format!("fault-{fault}");
        opt_in(plane, &namespace);
        let load = ReviewLoad::start(vec![(
            "replica".into(),
            client_for(&new_leader, &install),
            Arc::new(AtomicBool::new(true)),
        )]);
        let creator = PodCreator::start(plane, &namespace);
        std::thread::sleep(Duration::from_secs(2));
        let saw_unready = Arc::new(AtomicBool::new(false));
        let watcher = {
            let saw_unready = saw_unready.clone();
            let admin = new_leader.admin_addr;
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline && !saw_unready.load(Ordering::SeqCst) {
                    if block_on(admin_get(admin, "/readyz")).is_ok_and(|r| r.status == 503) {
                        saw_unready.store(true, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        match fault {
            "kube-apiserver" => {
                plane.stop_apiserver();
                wait_until_flag(&saw_unready);
                plane.start_apiserver_again();
            }
            // Longer than a renew deadline: the election rounds time out.
            _ => plane.restart_etcd(Duration::from_secs(15)),
        }
        let _ = watcher.join();
        assert!(
            saw_unready.load(Ordering::SeqCst),
            "/readyz reported the {fault} outage"
        );
        wait_until(
            CONVERGE,
            &format!("/readyz recovers after the {fault} restart"),
            || ready(&new_leader),
        );
        let created = creator.finish();
        // The watches resumed: a namespace opted in after the fault converges.
        let after = format!("after-{fault}");
        opt_in(plane, &after);
        assert_converged(plane, &["ha-one", "ha-two", &namespace, &after]);
        let (answered, problems) = load.finish();
        assert!(answered > 20, "the load ran ({answered} answers)");
        assert!(
            problems.is_empty(),
            "the webhook failed during the {fault} restart: {problems:#?}"
        );
        // Every pod created through the fault was injected.
        let pods = kubectl_json(plane, &["get", "pods", "-n", &namespace]);
        let pods = pods["items"].as_array().unwrap();
        assert!(pods.len() >= created.min(1), "{created} created");
        for pod in pods {
            assert_eq!(
                pod["metadata"]["labels"][format!("{DOMAIN}/injected")],
                "true",
                "{} was created during the {fault} restart",
                pod["metadata"]["name"]
            );
        }
    }

    // A leader that cannot renew steps down before anyone could take over.
    forbidden_renewal_steps_down(plane, &install, new_leader);
}

/// A Deployment whose pods exist before `namespace` opts in: they run
/// without the sidecar, and the leader reports them on the Deployment.
fn pods_created_before_the_opt_in(plane: &ControlPlane, namespace: &str) {
    ensure_namespace(plane, namespace, &[]);
    let deployment = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "api"}},
            "template": {
                "metadata": {"labels": {"app": "api"}},
                "spec": install::probe_pod("api")["spec"],
            },
        },
    });
    install::run_with_input(
        plane.kubectl().args(["apply", "-f", "-"]),
        &deployment.to_string(),
    );
    wait_until(CONVERGE, "the Deployment has two pods", || {
        kubectl_json(plane, &["get", "pods", "-n", namespace])["items"]
            .as_array()
            .is_some_and(|pods| pods.len() == 2)
    });
    opt_in(plane, namespace);
}

/// Waits until the uninjected pods of `EVENTS_NAMESPACE` are reported in
/// exactly one Event, whose series has counted `count` reports (a single
/// report has no series).
fn one_event_series_counted(plane: &ControlPlane, count: i64) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let events = kubectl_json(
            plane,
            &["get", "events.events.k8s.io", "-n", EVENTS_NAMESPACE],
        );
        let last = events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["reason"] == "PodsNotInjected"
                    && e["regarding"]["kind"] == "Deployment"
                    && e["regarding"]["name"] == "api"
            })
            .map(|e| {
                (
                    e["metadata"]["name"].as_str().unwrap_or("").to_string(),
                    e["reportingInstance"].as_str().unwrap_or("").to_string(),
                    e["series"]["count"].as_i64().unwrap_or(1),
                )
            })
            .collect::<Vec<_>>();
        if last.len() == 1 && last[0].2 == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "one PodsNotInjected series counted {count} times: not within {CONVERGE:?}; (name, reporter, count): {last:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `serve` with a drain period, as the chart runs it.
fn serve_draining(install: &Install, name: &str) -> ServeProcess {
    let mut command = install.serve_command(name);
    command.env("CHILLER_METRICS_DRAIN_SECONDS", "3");
    let serve = install::start_serve(command);
    block_on(serve.wait_ready()).expect("serve becomes ready");
    serve
}

fn wait_until_flag(flag: &AtomicBool) {
    wait_until(CONVERGE, "the outage is visible", || {
        flag.load(Ordering::SeqCst)
    });
}

/// Creates pods one after another until stopped; failures while the
/// control plane is down are expected and not counted.
struct PodCreator {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl PodCreator {
    fn start(plane: &'static ControlPlane, namespace: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let namespace = namespace.to_string();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut created = 0;
                for i in 0..600 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let pod = install::probe_pod(&format!("load-{i}"));
                    let output = install::try_with_input(
                        plane.kubectl().args([
                            "create",
                            "-n",
                            &namespace,
                            "--request-timeout=5s",
                            "-f",
                            "-",
                        ]),
                        &pod.to_string(),
                    );
                    if output.status.success() {
                        created += 1;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
                created
            })
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for PodCreator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A third replica with its own ServiceAccount takes the Lease; then its
/// right to update Leases is revoked. It must stop reconciling before the
/// Lease it last renewed expires, when another replica could take over.
fn forbidden_renewal_steps_down(plane: &ControlPlane, install: &Install, current: ServeProcess) {
    let namespace = install::RELEASE_NAMESPACE;
    run(plane
        .kubectl()
        .args(["create", "serviceaccount", "replica-c", "-n", namespace]));
    run(plane.kubectl().args([
        "create",
        "clusterrolebinding",
        "replica-c",
        &format!("--clusterrole={}", install::RELEASE),
        &format!("--serviceaccount={namespace}:replica-c"),
    ]));
    run(plane.kubectl().args([
        "create",
        "rolebinding",
        "replica-c-leader-election",
        "-n",
        namespace,
        "--role=chiller-metrics-leader-election",
        &format!("--serviceaccount={namespace}:replica-c"),
    ]));
    let kubeconfig = plane.service_account_kubeconfig(namespace, "replica-c");
    let mut command = install.serve_command("replica-c");
    command.env("KUBECONFIG", &kubeconfig);
    let c = install::start_serve(command);
    block_on(c.wait_ready()).expect("replica-c ready");
    let _logs = plane.logs_on_failure().with("replica-c", c.log_tail(40));
    // Hand over from the current leader to replica-c.
    let (status, _) = current.terminate();
    assert!(status.success());
    wait_until(CONVERGE, "replica-c leads", || {
        holder(plane).as_deref() == Some("replica-c")
    });
    wait_until(CONVERGE, "replica-c reconciles", || {
        metric(&c, "chiller_metrics_reconcile_runs_total") > 0.0
    });
    one_event_series_counted(plane, 3);

    run(plane.kubectl().args([
        "delete",
        "rolebinding",
        "replica-c-leader-election",
        "-n",
        namespace,
    ]));
    wait_until(CONVERGE, "replica-c steps down", || {
        c.log()
            .iter()
            .any(|l| l.contains("lost the reconcile lease: stepping down"))
    });
    let stepped_down = SystemTime::now();
    let renewed = lease(plane)["spec"]["renewTime"]
        .as_str()
        .unwrap()
        .to_string();
    let renewed = parse_micro_time(&renewed);
    assert!(
        stepped_down < renewed + LEASE_DURATION,
        "replica-c stepped down at {stepped_down:?}, after its Lease (renewed {renewed:?}) expired"
    );
    // And it reconciles no more.
    let runs = metric(&c, "chiller_metrics_reconcile_runs_total");
    opt_in(plane, "after-step-down");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        metric(&c, "chiller_metrics_reconcile_runs_total"),
        runs,
        "no reconcile after stepping down"
    );
    let lost = c
        .log()
        .iter()
        .filter(|l| l.contains("forbidden") || l.contains("Forbidden"))
        .count();
    assert!(lost > 0, "the renewals were forbidden by RBAC");
}

/// `2026-11-29T18:00:00.123456Z` as a SystemTime.
fn parse_micro_time(text: &str) -> SystemTime {
    let parsed: k8s_openapi::jiff::Timestamp = text
        .parse()
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"));
    SystemTime::from(parsed)
}
