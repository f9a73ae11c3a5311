//! chiller-metrics installed on the local control plane the way a user
//! installs it: `helm install` of our chart (self-managed certificates from
//! `chiller-metrics certs`), the prometheus-operator CRDs applied server-side,
//! and `chiller-metrics serve` running as a local process that authenticates
//! as the chart's ServiceAccount. As envtest does, the webhook configuration's
//! `clientConfig.service` is rewritten to a loopback `url`; the caBundle stays
//! the chart's.
#![allow(dead_code)]

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

pub use super::run;
use super::{controlplane::ControlPlane, crate_dir, https::ServeProcess, yaml_documents};

pub const RELEASE: &str = "chiller-metrics";
pub const RELEASE_NAMESPACE: &str = "chiller-metrics";
pub const WEBHOOK_CONFIGURATION: &str = "chiller-metrics";
const CHART: &str = "manifests/chart/chiller-metrics";
pub const DOMAIN: &str = "metrics.chiller.io";

/// The chart, installed once per control plane.
pub struct Install {
    pub plane: &'static ControlPlane,
    /// `ca.crt`, `tls.crt`, `tls.key` from `chiller-metrics certs`.
    pub certs: PathBuf,
    /// The chart's ServiceAccount, with a TokenRequest token.
    pub kubeconfig: PathBuf,
    /// The chart's config file, as its ConfigMap holds it.
    pub config_file: PathBuf,
}

impl Install {
    /// Installs the chart (idempotent per control plane: `helm upgrade --install`).
    pub fn chart(plane: &'static ControlPlane, values: &[&str]) -> Install {
        let dir = plane.dir.join("install");
        let certs = dir.join("certs");
        run(Command::new(ServeProcess::BINARY).args([
            "certs",
            "--out",
            &certs.display().to_string(),
            "--dns",
            "chiller-metrics",
            "chiller-metrics.chiller-metrics.svc",
            "127.0.0.1",
        ]));
        let ca_bundle = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .encode(std::fs::read(certs.join("ca.crt")).unwrap())
        };
        apply_monitoring_crds(plane);
        let mut helm = helm(plane);
        helm.args(["upgrade", "--install", RELEASE])
            .arg(crate_dir().join(CHART))
            .args(["--namespace", RELEASE_NAMESPACE, "--create-namespace"])
            .args(["--set", "certs.mode=selfManaged"])
            .args(["--set", &format!("certs.selfManaged.caBundle={ca_bundle}")])
            .arg("--set-file")
            .arg(format!(
                "certs.selfManaged.cert={}",
                certs.join("tls.crt").display()
            ))
            .arg("--set-file")
            .arg(format!(
                "certs.selfManaged.key={}",
                certs.join("tls.key").display()
            ));
        for value in values {
            helm.args(["--set", value]);
        }
        run(&mut helm);

        let config_map = kubectl_json(
            plane,
            &[
                "get",
                "configmap",
                "chiller-metrics-config",
                "-n",
                RELEASE_NAMESPACE,
            ],
        );
        let config_file = dir.join("config.yaml");
        let config = config_map["data"]
            .as_object()
            .and_then(|data| data.values().next())
            .and_then(Value::as_str)
            .unwrap_or_default();
        std::fs::write(&config_file, config).unwrap();
        let kubeconfig = plane.service_account_kubeconfig(RELEASE_NAMESPACE, "chiller-metrics");
        Install {
            plane,
            certs,
            kubeconfig,
            config_file,
        }
    }

    /// `chiller-metrics serve` as the chart's ServiceAccount, with the
    /// chart's certificate and config, as the pod `name` of the release.
    pub fn serve_command(&self, name: &str) -> Command {
        let scratch = self.plane.dir.join("install").join(name);
        std::fs::create_dir_all(&scratch).unwrap();
        let mut command = ServeProcess::command(&scratch);
        command
            .env_remove("CHILLER_METRICS_STANDALONE")
            .env("KUBECONFIG", &self.kubeconfig)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", RELEASE_NAMESPACE)
            .env("CHILLER_METRICS_CONFIG", &self.config_file)
            .env("CHILLER_METRICS_TLS_CERT", self.certs.join("tls.crt"))
            .env("CHILLER_METRICS_TLS_KEY", self.certs.join("tls.key"))
            .env("RUST_LOG", "info,kube=warn");
        command
    }

    /// Starts `serve` and waits until it is ready.
    pub async fn serve(&self, name: &str) -> ServeProcess {
        let serve = start_serve(self.serve_command(name));
        if let Err(error) = serve.wait_ready().await {
            panic!("{error}; log:\n{}", serve.log().join("\n"));
        }
        serve
    }

    /// Points the chart's webhook at `https://127.0.0.1:PORT/mutate`, keeping
    /// the chart's caBundle, and waits until the API server calls it.
    pub fn point_webhook_at(&self, serve: &ServeProcess) {
        self.point_webhook_at_url(&format!(
            "https://127.0.0.1:{}/mutate",
            serve.webhook_addr.port()
        ));
    }

    /// Points the chart's webhook at `url` and waits until the API server
    /// calls it (another webhook serving the chart's certificate).
    pub fn point_webhook_at_url(&self, url: &str) {
        self.set_webhook_url(url);
        self.wait_until_webhook_called();
    }

    /// Points the chart's webhook at `url` (keeping its caBundle); with an
    /// unreachable one, failurePolicy Ignore admits pods uninjected.
    pub fn set_webhook_url(&self, url: &str) {
        let configuration = kubectl_json(
            self.plane,
            &["get", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION],
        );
        let mut patch = Vec::new();
        for (i, webhook) in configuration["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            if webhook["clientConfig"].get("service").is_some() {
                patch.push(
                    json!({"op": "remove", "path": format!("/webhooks/{i}/clientConfig/service")}),
                );
            }
            patch.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/url"), "value": url}));
        }
        patch_webhook_configuration(self.plane, &Value::Array(patch));
    }

    /// The API server picks up webhook configuration changes asynchronously:
    /// dry-run a pod in an opted-in namespace until it comes back injected.
    fn wait_until_webhook_called(&self) {
        let namespace = "chiller-metrics-probe";
        ensure_namespace(
            self.plane,
            namespace,
            &[(&format!("{DOMAIN}/inject"), "enabled")],
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pod = dry_run_pod(self.plane, namespace, &probe_pod("probe"));
            if pod["metadata"]["labels"][format!("{DOMAIN}/injected")] == "true" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the API server did not call the webhook within 60 s; last dry-run pod: {pod:#}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// `serve`'s `/metrics`, read from a synchronous test.
pub fn metrics_of(serve: &ServeProcess) -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(super::https::admin_get(serve.admin_addr, "/metrics"))
        .expect("the admin port answers")
        .text()
}

/// Starts `serve` so that it dies with the test binary, even when a static
/// fixture holds it.
pub fn start_serve(command: Command) -> ServeProcess {
    ServeProcess::start_with(
        command,
        super::controlplane::process::spawn_tied_to_this_process,
    )
    .expect("serve starts")
}

/// A minimal gunicorn-like pod.
pub fn probe_pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": "chiller-e2e-app:e2e"}]},
    })
}

/// `kubectl create --dry-run=server` of `pod`; the pod the API server returns.
pub fn dry_run_pod(plane: &ControlPlane, namespace: &str, pod: &Value) -> Value {
    let output = try_dry_run_pod(plane, namespace, pod);
    assert!(
        output.status.success(),
        "dry-run create in {namespace} failed: {}\npod: {pod}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("kubectl prints JSON")
}

/// `kubectl create --dry-run=server -o json` of `pod`, whatever its outcome.
pub fn try_dry_run_pod(plane: &ControlPlane, namespace: &str, pod: &Value) -> Output {
    try_with_input(
        plane.kubectl().args([
            "create",
            "--dry-run=server",
            "-o",
            "json",
            "-n",
            namespace,
            "-f",
            "-",
        ]),
        &pod.to_string(),
    )
}

/// Creates the namespace if it is missing, and sets `labels` on it.
pub fn ensure_namespace(plane: &ControlPlane, name: &str, labels: &[(&str, &str)]) {
    let namespace = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        },
    });
    apply_server_side(plane, &namespace);
}

/// `kubectl apply --server-side` of `object` (a List applies its items), as
/// the tests' own field manager.
pub fn apply_server_side(plane: &ControlPlane, object: &Value) {
    run_with_input(
        plane.kubectl().args([
            "apply",
            "--server-side",
            "--field-manager=chiller-tests",
            "-f",
            "-",
        ]),
        &object.to_string(),
    );
}

/// The writes among audit events `calls`, but the leader Lease's renewals
/// (leader election, not reconciling).
pub fn writes_but_lease_renewals(calls: Vec<Value>) -> Vec<Value> {
    calls
        .into_iter()
        .filter(|e| {
            matches!(
                e["verb"].as_str(),
                Some("create" | "update" | "patch" | "delete" | "deletecollection")
            )
        })
        .filter(|e| e["objectRef"]["resource"] != "leases")
        .collect()
}

/// Applies the prometheus-operator v0.93.0 CRDs with server-side apply and
/// waits until they are established.
pub fn apply_monitoring_crds(plane: &ControlPlane) {
    let dir = crds_dir();
    let mut apply = plane.kubectl();
    apply.args(["apply", "--server-side", "--field-manager=chiller-tests"]);
    for plural in ["prometheuses", "servicemonitors", "podmonitors"] {
        apply
            .arg("-f")
            .arg(dir.join(format!("monitoring.coreos.com_{plural}.yaml")));
    }
    run(&mut apply);
    // Polled: `kubectl wait` fails outright while a new CRD has no status yet.
    let deadline = Instant::now() + Duration::from_secs(60);
    for plural in ["prometheuses", "servicemonitors", "podmonitors"] {
        let name = format!("{plural}.monitoring.coreos.com");
        loop {
            let crd = kubectl_json(plane, &["get", "crd", &name]);
            let established = crd["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Established" && c["status"] == "True");
            if established {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "CRD {name} not established within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Where `make tools` puts the prometheus-operator CRDs.
pub fn crds_dir() -> PathBuf {
    super::reference_dir().join("crds")
}

/// helm with its own home folders, against the control plane.
pub fn helm(plane: &ControlPlane) -> Command {
    let mut command = super::helm(&plane.dir.join("helm"));
    command.env("KUBECONFIG", &plane.kubeconfig);
    command
}

/// Labels `namespace` opted in, creating it if it is missing.
pub fn opt_in(plane: &ControlPlane, namespace: &str) {
    ensure_namespace(
        plane,
        namespace,
        &[(&format!("{DOMAIN}/inject"), "enabled")],
    );
}

/// Sets `key=value` annotations on a namespace, replacing any there.
pub fn annotate_namespace(plane: &ControlPlane, namespace: &str, annotations: &[&str]) {
    run(plane
        .kubectl()
        .args(["annotate", "--overwrite", "namespace", namespace])
        .args(annotations));
}

/// Whether the stored pod `namespace/name` carries our injected label.
pub fn injected(plane: &ControlPlane, namespace: &str, name: &str) -> bool {
    let pod = kubectl_json(plane, &["get", "pod", name, "-n", namespace]);
    pod["metadata"]["labels"][format!("{DOMAIN}/injected")] == "true"
}

/// `(kind, name)` of what `chiller-metrics render` says the loop applies in
/// `namespace`, with a Postgres exporter when `postgres`.
pub fn rendered(namespace: &str, postgres: bool) -> BTreeSet<(String, String)> {
    let mut command = Command::new(ServeProcess::BINARY);
    command.args(["render", "--namespace", namespace]);
    if postgres {
        command.args([
            "--postgres",
            "db:5432/chiller",
            "--postgres-secret",
            "db-auth",
        ]);
    }
    let output = run(&mut command);
    yaml_documents(&String::from_utf8(output.stdout).unwrap())
        .into_iter()
        .map(|doc| {
            (
                doc["kind"].as_str().unwrap().to_string(),
                doc["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The label on everything the reconcile loop makes.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by=chiller-metrics";
/// The kinds the reconcile loop makes, as `kubectl get` names them.
pub const MANAGED_RESOURCES: &str = "configmaps,services,serviceaccounts,roles.rbac.authorization.k8s.io,rolebindings.rbac.authorization.k8s.io,deployments.apps,prometheuses.monitoring.coreos.com,servicemonitors.monitoring.coreos.com";

/// The items of `kubectl get RESOURCES ARGS -o json`.
pub fn list(plane: &ControlPlane, resources: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["get", resources];
    all.extend_from_slice(args);
    let list = kubectl_json(plane, &all);
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("kubectl get {resources} listed no items: {list}"))
        .clone()
}

/// `(kind, name)` of the objects labeled managed-by us in `namespace`.
pub fn managed_objects(plane: &ControlPlane, namespace: &str) -> BTreeSet<(String, String)> {
    list(
        plane,
        MANAGED_RESOURCES,
        &["-n", namespace, "-l", MANAGED_BY],
    )
    .iter()
    .map(|o| {
        (
            o["kind"].as_str().unwrap().to_string(),
            o["metadata"]["name"].as_str().unwrap().to_string(),
        )
    })
    .collect()
}

/// Applies a JSON patch to the chart's MutatingWebhookConfiguration.
pub fn patch_webhook_configuration(plane: &ControlPlane, patch: &Value) {
    run(plane.kubectl().args([
        "patch",
        "mutatingwebhookconfiguration",
        WEBHOOK_CONFIGURATION,
        "--type=json",
        "-p",
        &patch.to_string(),
    ]));
}

/// `kubectl ... -o json`, parsed.
/// The reconcile loop's status annotation on `namespace`, if written.
pub fn reconcile_status(plane: &ControlPlane, namespace: &str) -> Option<Value> {
    let ns = kubectl_json(plane, &["get", "namespace", namespace]);
    ns["metadata"]["annotations"][format!("{DOMAIN}/reconcile-status")]
        .as_str()
        .map(|s| serde_json::from_str(s).expect("the status annotation is JSON"))
}

pub fn kubectl_json(plane: &ControlPlane, args: &[&str]) -> Value {
    let output = run(plane.kubectl().args(args).args(["-o", "json"]));
    serde_json::from_slice(&output.stdout).expect("kubectl prints JSON")
}

pub use super::controlplane::try_with_input;

/// Runs a command with `input` on stdin; panics unless it succeeds.
pub fn run_with_input(command: &mut Command, input: &str) -> Output {
    let output = try_with_input(command, input);
    super::assert_succeeded(command, &output, &format!("\ninput: {input}"));
    output
}

/// `chiller-metrics SUBCOMMAND` as a user runs it: with the plane's admin
/// kubeconfig, from outside the cluster.
pub fn user_command(plane: &ControlPlane, subcommand: &'static str) -> Command {
    let mut command = Command::new(ServeProcess::BINARY);
    command
        .arg(subcommand)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("RUST_LOG", "warn");
    command
}

/// One run of a `chiller-metrics` subcommand, whatever its exit code.
pub struct Ran {
    pub subcommand: &'static str,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Runs `command`, a `chiller-metrics` `subcommand`.
    pub fn of(subcommand: &'static str, command: &mut Command) -> Ran {
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("running chiller-metrics {subcommand}: {e}"));
        Ran {
            subcommand,
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// The `-o json` output, parsed.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "{} -o json printed no JSON ({e}):\n{}\n{}",
                self.subcommand, self.stdout, self.stderr
            )
        })
    }
}
