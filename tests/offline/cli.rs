//! The command line as a user meets it: each subcommand offers only the
//! options that apply to it, `serve` explains a missing certificate, and
//! `explain -f` works offline (chart defaults or a `helm template` output).

use crate::support::{self, failed_steps, stderr, stdout};

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Output},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_chiller-metrics");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("CHILLER_METRICS_CONFIG")
        .env_remove("CHILLER_METRICS_TLS_CERT")
        .env_remove("CHILLER_METRICS_TLS_KEY")
        .output()
        .expect("run chiller-metrics")
}

/// The long options `--help` lists for a subcommand.
fn options(subcommand: &str) -> BTreeSet<String> {
    let output = run(&[subcommand, "--help"]);
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output)
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line
                .strip_prefix("-")
                .filter(|l| l.len() > 1 && l.as_bytes()[1] == b',')
                .map(|l| l[2..].trim_start())
                .unwrap_or(line);
            let flag = line.strip_prefix("--")?;
            let name: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            Some(name)
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn every_subcommand_offers_only_its_options() {
    let expected: &[(&str, &[&str])] = &[
        (
            "inject",
            &[
                "config",
                "sidecar-mode",
                "sidecar-image",
                "filename",
                "help",
            ],
        ),
        ("uninject", &["config", "filename", "help"]),
        (
            "render",
            &[
                "config",
                "grafana-namespace",
                "namespace",
                "postgres",
                "postgres-secret",
                "help",
            ],
        ),
        ("certs", &["out", "dns", "help"]),
        ("mapping", &["config", "help"]),
        (
            "config",
            &[
                "config",
                "sidecar-mode",
                "sidecar-image",
                "grafana-namespace",
                "schema",
                "help",
            ],
        ),
        (
            "check",
            &[
                "namespace",
                "name",
                "lease-name",
                "output",
                "webhook-address",
                "admin-address",
                "help",
            ],
        ),
        (
            "explain",
            &[
                "filename",
                "namespace-labels",
                "pod-selector",
                "namespace",
                "webhook-file",
                "config",
                "sidecar-mode",
                "name",
                "install-namespace",
                "output",
                "help",
            ],
        ),
        (
            "uninstall",
            &["namespace", "name", "lease-name", "timeout-seconds", "help"],
        ),
    ];
    for (subcommand, names) in expected {
        assert_eq!(options(subcommand), set(names), "{subcommand} --help");
    }
    let serve = options("serve");
    for flag in [
        "config",
        "sidecar-mode",
        "tls-cert",
        "tls-key",
        "log-format",
        "no-reconcile",
    ] {
        assert!(serve.contains(flag), "serve lacks --{flag}: {serve:?}");
    }
    assert!(!serve.contains("filename") && !serve.contains("mode"));
    // --log-format belongs to serve alone.
    let output = run(&["mapping", "--log-format", "json"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--log-format"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn serve_names_the_flag_and_env_of_a_missing_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");

    let output = run(&[
        "serve",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    let missing = format!("certificate {} does not exist", cert.display());
    for needle in [
        missing.as_str(),
        "--tls-cert",
        "CHILLER_METRICS_TLS_CERT",
        "chiller-metrics certs",
    ] {
        assert!(message.contains(needle), "lacks {needle:?}: {message}");
    }
    assert_eq!(message.lines().count(), 1, "one line: {message}");

    // The certificate is there, the key is not.
    std::fs::write(&cert, "not read yet").unwrap();
    let output = Command::new(BIN)
        .arg("serve")
        .env("CHILLER_METRICS_TLS_CERT", &cert)
        .env("CHILLER_METRICS_TLS_KEY", &key)
        .output()
        .unwrap();
    let message = stderr(&output);
    assert!(!output.status.success());
    for needle in [
        "private key",
        "--tls-key",
        "CHILLER_METRICS_TLS_KEY",
        "chiller-metrics certs",
    ] {
        assert!(message.contains(needle), "lacks {needle:?}: {message}");
    }

    // The defaults are named when no path is given.
    let output = run(&["serve"]);
    assert!(stderr(&output).contains("/etc/chiller-metrics/tls/tls.crt does not exist"));
}

const DEPLOYMENT: &str = "\
# Source: shop/templates/api.yaml
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  namespace: shop
spec:
  selector:
    matchLabels: {app: api}
  template:
    metadata:
      labels: {app: api}
    spec:
      containers:
        - name: api
          image: shop-api:1
";

fn explain_file(dir: &Path, extra: &[&str]) -> Value {
    let file = dir.join("deployment.yaml");
    std::fs::write(&file, DEPLOYMENT).unwrap();
    let mut args = vec!["explain", "-f", file.to_str().unwrap(), "-o", "json"];
    args.extend_from_slice(extra);
    let output = run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_str(&stdout(&output)).unwrap()
}

#[test]
fn explain_works_offline_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let opted_in = "--namespace-labels=metrics.chiller.io/inject=enabled,team=shop";

    let plain = explain_file(dir.path(), &[]);
    assert_eq!(plain["object"], "deployment shop/api");
    assert_eq!(plain["outcome"], "not-called");
    assert_eq!(failed_steps(&plain), [1]);
    assert_eq!(
        plain["sources"],
        serde_json::json!([
            "webhook configuration: the chart's defaults",
            "config: defaults"
        ])
    );

    let injected = explain_file(dir.path(), &[opted_in]);
    assert_eq!(injected["outcome"], "would-inject", "{injected:#}");
    assert_eq!(injected["verdict"], "its pods would be injected");

    let selected_out = explain_file(dir.path(), &[opted_in, "--pod-selector", "app notin (api)"]);
    assert_eq!(failed_steps(&selected_out), [5]);
    assert_eq!(selected_out["steps"][5]["status"], "not-reached");

    let excluded = explain_file(dir.path(), &[opted_in, "-n", "kube-public"]);
    assert_eq!(excluded["object"], "deployment kube-public/api");
    assert_eq!(failed_steps(&excluded), [2]);

    // The text form's first line is the verdict.
    let file = dir.path().join("deployment.yaml");
    let text = run(&["explain", "-f", file.to_str().unwrap(), opted_in]);
    assert_eq!(
        stdout(&text).lines().next(),
        Some("deployment shop/api: its pods would be injected")
    );

    // Flags that only make sense offline need -f; online needs KIND and NAME.
    assert!(!run(&["explain", "pod", "a/b", opted_in]).status.success());
    let missing = run(&["explain"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("KIND"), "{}", stderr(&missing));
}

/// `helm template` of the chart into `dir`.
fn helm_template(dir: &Path, args: &[&str]) -> Output {
    let rendered = support::helm(&dir.join("helm"))
        .args(["template", "chiller-metrics"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/chart/chiller-metrics"))
        .args(args)
        .output()
        .expect("run helm");
    assert!(rendered.status.success(), "{}", stderr(&rendered));
    rendered
}

/// The one webhook of the MutatingWebhookConfiguration in a YAML stream,
/// without its clientConfig.
fn webhook_of(yaml: &str) -> Value {
    use serde::Deserialize;
    let configuration = serde_norway::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .expect("a MutatingWebhookConfiguration");
    let mut webhook = configuration["webhooks"][0].clone();
    webhook.as_object_mut().unwrap().remove("clientConfig");
    webhook
}

#[test]
fn explains_default_webhook_is_the_one_the_chart_renders() {
    let dir = tempfile::tempdir().unwrap();
    let rendered = helm_template(dir.path(), &["--namespace", "chiller-metrics"]);
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/base/webhook.yaml"),
    )
    .unwrap();
    assert_eq!(webhook_of(&stdout(&rendered)), webhook_of(&shipped));
}

#[test]
fn explain_reads_the_webhook_configuration_from_helm_template_output() {
    let dir = tempfile::tempdir().unwrap();
    let rendered = helm_template(
        dir.path(),
        &[
            "--namespace",
            "metrics",
            "--set",
            "webhook.excludeNamespaces={shop}",
        ],
    );
    let webhook_file = dir.path().join("rendered.yaml");
    std::fs::write(&webhook_file, &rendered.stdout).unwrap();

    let opted_in = "--namespace-labels=metrics.chiller.io/inject=enabled";
    let explanation = explain_file(
        dir.path(),
        &[opted_in, "--webhook-file", webhook_file.to_str().unwrap()],
    );
    assert_eq!(failed_steps(&explanation), [2], "{explanation:#}");
    assert!(
        explanation["steps"][1]["detail"]
            .as_str()
            .unwrap()
            .contains("notin (kube-system,metrics,shop)"),
        "{explanation:#}"
    );
    assert!(
        explanation["sources"][0]
            .as_str()
            .unwrap()
            .contains("MutatingWebhookConfiguration chiller-metrics"),
        "{explanation:#}"
    );
}

#[test]
fn explain_reads_an_existing_pod_from_kubectl_get_output() {
    let dir = tempfile::tempdir().unwrap();
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: api-7d9f\n  namespace: shop\n  labels: {app: api}\nspec:\n  containers:\n    - name: api\n      image: shop-api:1\n";
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, pod).unwrap();
    let injected = run(&["inject", "-f", file.to_str().unwrap()]);
    assert!(injected.status.success(), "{}", stderr(&injected));
    // As `kubectl get pod -o yaml` prints it: created, with a status hash.
    let mut live: Value = serde_norway::from_slice(&injected.stdout).unwrap();
    live["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z".into();
    let status_text = live["metadata"]["annotations"]["metrics.chiller.io/status"]
        .as_str()
        .unwrap()
        .to_string();
    let mut status: Value = serde_json::from_str(&status_text).unwrap();
    status["configHash"] = "5f2c9a".into();
    live["metadata"]["annotations"]["metrics.chiller.io/status"] = status.to_string().into();
    std::fs::write(&file, serde_norway::to_string(&live).unwrap()).unwrap();

    let opted_in = "--namespace-labels=metrics.chiller.io/inject=enabled";
    let output = run(&[
        "explain",
        "-f",
        file.to_str().unwrap(),
        opted_in,
        "-o",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let explanation: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(explanation["outcome"], "injected", "{explanation:#}");
    assert_eq!(explanation["existing"]["configHash"], "5f2c9a");
    assert_eq!(explanation["existing"]["prefix"], "api");
    assert_eq!(
        failed_steps(&explanation),
        Vec::<u64>::new(),
        "{explanation:#}"
    );

    // The same pod created without the sidecar missed its injection.
    std::fs::write(
        &file,
        pod.replace(
            "  namespace: shop\n",
            "  namespace: shop\n  creationTimestamp: \"2026-01-01T00:00:00Z\"\n",
        ),
    )
    .unwrap();
    let output = run(&[
        "explain",
        "-f",
        file.to_str().unwrap(),
        opted_in,
        "-o",
        "json",
    ]);
    let explanation: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(explanation["outcome"], "missed", "{explanation:#}");
    assert_eq!(explanation["existing"]["injected"], false);
}

#[test]
fn explain_takes_a_generated_manifest_with_a_null_creation_timestamp_as_a_new_pod() {
    let dir = tempfile::tempdir().unwrap();
    // As `kubectl run api --image=shop-api:1 --dry-run=client -o yaml` writes it.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  creationTimestamp: null\n  labels:\n    run: api\n  name: api\nspec:\n  containers:\n  - image: shop-api:1\n    name: api\n    resources: {}\n  dnsPolicy: ClusterFirst\n  restartPolicy: Always\nstatus: {}\n";
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, pod).unwrap();
    let output = run(&[
        "explain",
        "-f",
        file.to_str().unwrap(),
        "--namespace=shop",
        "--namespace-labels=metrics.chiller.io/inject=enabled",
        "-o",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let explanation: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(explanation["outcome"], "would-inject", "{explanation:#}");
}

#[test]
fn serve_without_a_cluster_stops_and_names_standalone() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let made = run(&[
        "certs",
        "--out",
        certs.to_str().unwrap(),
        "--dns",
        "localhost",
    ]);
    assert!(made.status.success(), "{}", stderr(&made));
    let output = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("CHILLER_METRICS_TLS_CERT", certs.join("tls.crt"))
        .env("CHILLER_METRICS_TLS_KEY", certs.join("tls.key"))
        .env("KUBECONFIG", dir.path().join("no-such-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("CHILLER_METRICS_STANDALONE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a serve that went on without a cluster would never exit.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut serve = output;
    while serve.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = serve.kill();
            let _ = serve.wait();
            panic!("serve kept running without a cluster and without --standalone");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let output = serve.wait_with_output().unwrap();
    assert!(!output.status.success());
    let message = stderr(&output);
    for needle in ["no Kubernetes cluster configured", "--standalone"] {
        assert!(message.contains(needle), "lacks {needle:?}: {message}");
    }
}
