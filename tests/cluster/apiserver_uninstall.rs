//! `chiller-metrics uninstall` then `helm uninstall`, on a real kube-apiserver
//! with the webhook's failurePolicy Fail: no pod create fails meanwhile, and
//! nothing of ours is left behind in any namespace.

use crate::support::controlplane;
use crate::support::install;
use crate::support::{self, wait_until};

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use controlplane::ControlPlane;
use install::{
    DOMAIN, Install, MANAGED_BY, RELEASE, RELEASE_NAMESPACE, ensure_namespace, kubectl_json, run,
};
use serde_json::json;
use support::https::ServeProcess;

const CONVERGE: Duration = Duration::from_secs(90);
const NAMESPACES: [&str; 2] = ["gone-one", "gone-two"];
/// Every kind we or the chart create, as kubectl names them.
const KINDS: &str = "configmaps,services,serviceaccounts,roles,rolebindings,deployments,prometheuses.monitoring.coreos.com,servicemonitors.monitoring.coreos.com,secrets,leases";

/// `kind namespace/name` of everything labeled managed-by us, in any namespace.
fn managed_anywhere(plane: &ControlPlane) -> Vec<String> {
    install::list(plane, KINDS, &["--all-namespaces", "-l", MANAGED_BY])
        .iter()
        .map(|o| {
            format!(
                "{} {}/{}",
                o["kind"].as_str().unwrap_or(""),
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// Whether `kubectl get ARGS` finds anything.
fn exists(plane: &ControlPlane, args: &[&str]) -> bool {
    plane
        .kubectl()
        .arg("get")
        .args(args)
        .output()
        .is_ok_and(|output| output.status.success())
}

#[test]
fn uninstall_leaves_nothing_behind_and_never_fails_a_pod_create() {
    let plane = ControlPlane::shared();
    let _plane_logs = plane.logs_on_failure();
    let install = Install::chart(plane, &["webhook.failurePolicy=Fail"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let serve = runtime.block_on(install.serve("chiller-metrics-0"));
    let _logs = plane
        .logs_on_failure()
        .with("chiller-metrics serve", serve.log_tail(40));
    install.point_webhook_at(&serve);
    for namespace in NAMESPACES {
        ensure_namespace(
            plane,
            namespace,
            &[(&format!("{DOMAIN}/inject"), "enabled")],
        );
    }
    wait_until(CONVERGE, "every opted-in namespace has its objects", || {
        let objects = managed_anywhere(plane);
        NAMESPACES
            .iter()
            .all(|ns| objects.iter().any(|o| o.contains(&format!(" {ns}/"))))
    });
    assert!(exists(
        plane,
        &[
            "lease",
            "chiller-metrics-reconciler",
            "-n",
            RELEASE_NAMESPACE
        ]
    ));

    // Stands in for the kubelet: the replica stops once its Deployment is scaled to 0.
    let serve_pid = serve.pid();
    let stopped = Arc::new(AtomicBool::new(false));
    let kubelet = {
        let stopped = stopped.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + CONVERGE;
            while Instant::now() < deadline {
                let replicas = kubectl_json(
                    plane,
                    &["get", "deployment", RELEASE, "-n", RELEASE_NAMESPACE],
                )["spec"]["replicas"]
                    .as_i64();
                if replicas == Some(0) {
                    let _ = Command::new("kill")
                        .args(["-TERM", &serve_pid.to_string()])
                        .status();
                    stopped.store(true, Ordering::SeqCst);
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    // Pods created all along, in an opted-in namespace.
    let creating = Arc::new(AtomicBool::new(true));
    let attempts = Arc::new(AtomicUsize::new(0));
    let creator = {
        let (creating, attempts) = (creating.clone(), attempts.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut created = 0;
            for i in 0..600 {
                if !creating.load(Ordering::SeqCst) {
                    break;
                }
                let mut pod = install::probe_pod(&format!("during-{i}"));
                pod["metadata"]["namespace"] = json!(NAMESPACES[0]);
                let output = install::try_with_input(
                    plane
                        .kubectl()
                        .args(["create", "--request-timeout=20s", "-f", "-"]),
                    &pod.to_string(),
                );
                if output.status.success() {
                    created += 1;
                } else {
                    failures.push(String::from_utf8_lossy(&output.stderr).to_string());
                }
                attempts.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
            (created, failures)
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    let output = run(Command::new(ServeProcess::BINARY)
        .arg("uninstall")
        .args(["--namespace", RELEASE_NAMESPACE, "--name", RELEASE])
        .env("KUBECONFIG", &plane.kubeconfig));
    let said = String::from_utf8_lossy(&output.stdout).to_string();
    kubelet.join().unwrap();
    assert!(
        stopped.load(Ordering::SeqCst),
        "the Deployment was never scaled to 0:\n{said}"
    );
    run(install::helm(plane).args([
        "uninstall",
        RELEASE,
        "--namespace",
        RELEASE_NAMESPACE,
        "--wait",
    ]));
    // Creates go on a little after the uninstall, and until there were
    // more than 10 in all: a loaded machine makes each kubectl slower.
    std::thread::sleep(Duration::from_secs(2));
    wait_until(Duration::from_secs(120), "more than 10 pod creates", || {
        attempts.load(Ordering::SeqCst) > 10
    });
    creating.store(false, Ordering::SeqCst);
    let (created, failures) = creator.join().unwrap();
    assert!(created > 10, "pods were created throughout ({created})");
    assert!(
        failures.is_empty(),
        "pod creates failed during the uninstall: {failures:#?}"
    );

    assert_eq!(
        managed_anywhere(plane),
        Vec::<String>::new(),
        "left behind; uninstall said:\n{said}"
    );
    for (what, args) in [
        (
            "the Lease",
            vec![
                "lease",
                "chiller-metrics-reconciler",
                "-n",
                RELEASE_NAMESPACE,
            ],
        ),
        (
            "the webhook configuration",
            vec!["mutatingwebhookconfiguration", RELEASE],
        ),
        ("the ClusterRole", vec!["clusterrole", RELEASE]),
        (
            "the admission policy",
            vec!["validatingadmissionpolicy", "chiller-metrics-writes"],
        ),
        (
            "the TLS Secret",
            vec!["secret", "chiller-metrics-tls", "-n", RELEASE_NAMESPACE],
        ),
        (
            "the Deployment",
            vec!["deployment", RELEASE, "-n", RELEASE_NAMESPACE],
        ),
    ] {
        assert!(
            !exists(plane, &args),
            "{what} is left behind; uninstall said:\n{said}"
        );
    }
}
