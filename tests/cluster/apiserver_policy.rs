//! The chart's ValidatingAdmissionPolicy on a real kube-apiserver: acting as
//! the chart's ServiceAccount (impersonated), every write outside our own
//! objects is denied, and the writes the reconcile loop makes still pass.

use crate::support::controlplane;
use crate::support::install;

use std::process::{Command, Output};

use controlplane::ControlPlane;
use install::{DOMAIN, Install, ensure_namespace, run, run_with_input, try_with_input};
use serde_json::{Value, json};

const SERVICE_ACCOUNT: &str = "system:serviceaccount:chiller-metrics:chiller-metrics";
const OPTED_IN: &str = "policy-in";
const NOT_OPTED_IN: &str = "policy-out";
const POLICY_DENIED: &str = "ValidatingAdmissionPolicy 'chiller-metrics-writes'";

/// kubectl acting as the chart's ServiceAccount.
fn as_service_account(plane: &ControlPlane) -> Command {
    let mut command = plane.kubectl();
    command.arg(format!("--as={SERVICE_ACCOUNT}"));
    command
}

fn apply_as_admin(plane: &ControlPlane, object: Value) {
    run_with_input(
        plane.kubectl().args(["apply", "-f", "-"]),
        &object.to_string(),
    );
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A write's answer as text: accepted or refused.
struct Written(Result<String, String>);

impl From<Output> for Written {
    fn from(output: Output) -> Self {
        Written(if output.status.success() {
            Ok(text(&output))
        } else {
            Err(text(&output))
        })
    }
}

/// Asserts the write failed, and that its answer contains `because`.
fn assert_denied(what: &str, written: impl Into<Written>, because: &str) {
    match written.into().0 {
        Ok(text) => panic!("{what}: accepted\n{text}"),
        Err(text) => assert!(
            text.contains(because),
            "{what}: denied, but not by {because:?}:\n{text}"
        ),
    }
}

fn assert_allowed(what: &str, written: impl Into<Written>) {
    if let Err(text) = written.into().0 {
        panic!("{what}: denied\n{text}");
    }
}

/// A merge patch of a Namespace, sent as the ServiceAccount sends it: kubectl
/// would first get the Namespace, which the ServiceAccount may not.
fn patch_namespace(plane: &ControlPlane, name: &str, patch: Value) -> Written {
    let kubeconfig = plane.service_account_kubeconfig("chiller-metrics", "chiller-metrics");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    Written(runtime.block_on(async {
        let client = controlplane::client_from(&kubeconfig).await;
        let request = http::Request::patch(format!("/api/v1/namespaces/{name}"))
            .header("content-type", "application/merge-patch+json")
            .body(serde_json::to_vec(&patch).unwrap())
            .unwrap();
        client
            .request_text(request)
            .await
            .map_err(|error| error.to_string())
    }))
}

fn managed_labels() -> Value {
    json!({"app.kubernetes.io/managed-by": "chiller-metrics"})
}

fn deployment(namespace: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "chiller-e2e-app:e2e"}]},
            },
        },
    })
}

fn patch(plane: &ControlPlane, args: &[&str], patch: Value) -> Output {
    as_service_account(plane)
        .args(args)
        .args(["--type=merge", "-p", &patch.to_string()])
        .output()
        .expect("running kubectl")
}

#[test]
fn the_service_account_is_denied_every_write_outside_its_own_objects() {
    let plane = ControlPlane::shared();
    let _logs = plane.logs_on_failure();
    let _install = Install::chart(plane, &[]);
    let inject = format!("{DOMAIN}/inject");
    ensure_namespace(plane, OPTED_IN, &[(&inject, "enabled")]);
    ensure_namespace(
        plane,
        NOT_OPTED_IN,
        &[("pod-security.kubernetes.io/enforce", "baseline")],
    );
    apply_as_admin(
        plane,
        deployment(OPTED_IN, "foreign", json!({"app": "foreign"})),
    );
    for (namespace, name) in [("kube-system", "aws-auth"), (OPTED_IN, "settings")] {
        apply_as_admin(
            plane,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": name, "namespace": namespace}, "data": {"k": "v"}}),
        );
    }
    // A Role the ServiceAccount may bind (it holds what the Role grants), so
    // that RBAC's escalation check lets the binding reach the policy.
    apply_as_admin(
        plane,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "pod-reader", "namespace": OPTED_IN},
               "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}),
    );
    let mut pod = install::probe_pod("app");
    pod["metadata"]["namespace"] = json!(OPTED_IN);
    apply_as_admin(plane, pod);

    // Denied.
    assert_denied(
        "scaling a Deployment we don't manage",
        patch(
            plane,
            &["-n", OPTED_IN, "patch", "deployment", "foreign"],
            json!({"spec": {"replicas": 5}}),
        ),
        "writes only its own workloads",
    );
    assert_denied(
        "changing the image of a Deployment we don't manage, with a restart",
        patch(
            plane,
            &["-n", OPTED_IN, "patch", "deployment", "foreign"],
            json!({"spec": {"template": {
                "metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "now"}},
                "spec": {"containers": [{"name": "app", "image": "evil:1"}]},
            }}}),
        ),
        "writes only its own workloads",
    );
    assert_denied(
        "claiming a Deployment by adding our label",
        patch(
            plane,
            &["-n", OPTED_IN, "patch", "deployment", "foreign"],
            json!({"metadata": {"labels": managed_labels()}}),
        ),
        POLICY_DENIED,
    );
    assert_denied(
        "creating a Deployment in a namespace that did not opt in",
        try_with_input(
            as_service_account(plane).args(["create", "-f", "-"]),
            &deployment(NOT_OPTED_IN, "sneaky", managed_labels()).to_string(),
        ),
        "writes only its own workloads",
    );
    assert_denied(
        "changing a pod's image",
        patch(
            plane,
            &["-n", OPTED_IN, "patch", "pod", "app"],
            json!({"spec": {"containers": [{"name": "app", "image": "evil:1"}]}}),
        ),
        "forbidden",
    );
    for namespace in ["kube-system", OPTED_IN] {
        let name = if namespace == "kube-system" {
            "aws-auth"
        } else {
            "settings"
        };
        assert_denied(
            &format!("editing ConfigMap {namespace}/{name}"),
            patch(
                plane,
                &["-n", namespace, "patch", "configmap", name],
                json!({"data": {"k": "evil"}}),
            ),
            "writes only objects labeled app.kubernetes.io/managed-by=chiller-metrics",
        );
    }
    assert_denied(
        "removing a Namespace's Pod Security label",
        patch_namespace(
            plane,
            NOT_OPTED_IN,
            json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": null}}}),
        ),
        "only its own metrics annotations on a Namespace",
    );
    assert_denied(
        "binding a Role to a subject of its choosing",
        try_with_input(
            as_service_account(plane).args(["create", "-f", "-"]),
            &json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "backdoor", "namespace": OPTED_IN, "labels": managed_labels()},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "User", "name": "mallory", "apiGroup": "rbac.authorization.k8s.io"}],
            })
            .to_string(),
        ),
        "binds its Roles only to ServiceAccounts of the same namespace",
    );

    // Allowed: what the reconcile loop writes.
    assert_allowed(
        "our status annotation on an opted-in Namespace",
        patch_namespace(
            plane,
            OPTED_IN,
            json!({"metadata": {"annotations": {format!("{DOMAIN}/reconcile-status"): "{}"}}}),
        ),
    );
    assert_allowed(
        "a rollout restart with our annotations",
        patch(
            plane,
            &["-n", OPTED_IN, "patch", "deployment", "foreign"],
            json!({
                "metadata": {"annotations": {format!("{DOMAIN}/restarted-for-config"): "abc"}},
                "spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-05T00:00:00Z"}}}},
            }),
        ),
    );
    let ours = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "ours", "namespace": OPTED_IN, "labels": managed_labels()}, "data": {}});
    assert_allowed(
        "our own ConfigMap in an opted-in namespace",
        try_with_input(
            as_service_account(plane).args(["create", "-f", "-"]),
            &ours.to_string(),
        ),
    );
    // After an opt-out, the loop deletes its own objects.
    run(plane
        .kubectl()
        .args(["label", "namespace", OPTED_IN, &format!("{inject}-")]));
    assert_allowed(
        "deleting our own ConfigMap after the opt-out",
        as_service_account(plane)
            .args(["-n", OPTED_IN, "delete", "configmap", "ours"])
            .output()
            .unwrap(),
    );
}
