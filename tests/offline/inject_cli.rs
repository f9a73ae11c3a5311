//! The real binary's offline commands: `inject -f FILE|-` on a rendered Helm
//! chart, `certs`, `mapping`, and how bad input is reported.

use crate::support::{self, stderr, stdout, yaml_documents};

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::Deserialize;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_chiller-metrics");
const SIDECAR: &str = "statsd-exporter";
const MAPPING_VOLUME: &str = "chiller-metrics-statsd-mapping";
const INJECTED_LABEL: &str = "metrics.chiller.io/injected";

fn manifest(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/manifests")
        .join(name)
}

/// Runs the binary with `args`, feeding `stdin`, with no config from the environment.
fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("CHILLER_METRICS_CONFIG")
        .env_remove("CHILLER_METRICS_SIDECAR_MODE")
        .env_remove("CHILLER_METRICS_SIDECAR_IMAGE")
        .env_remove("CHILLER_METRICS_GRAFANA_NAMESPACE")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input).expect("write stdin");
    }
    child.wait_with_output().expect("wait for the binary")
}

fn succeeded(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed with {}:\n{}",
        output.status,
        stderr(output)
    );
}

fn kind_name(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Where a workload keeps its pod template.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|item| item["name"] == name)
}

fn gunicorn_args(container: &Value) -> Option<&str> {
    named(&container["env"], "GUNICORN_CMD_ARGS")?["value"].as_str()
}

/// What injection must have done to one template, `list` being where the sidecar went.
fn assert_injected(object: &Value, list: &str, app_containers: &[&str], prefix: &str) {
    let label = kind_name(object);
    let pointer = template_pointer(object["kind"].as_str().unwrap()).unwrap();
    let template = object.pointer(pointer).expect("has a pod template");
    let spec = &template["spec"];
    let sidecar =
        named(&spec[list], SIDECAR).unwrap_or_else(|| panic!("{label}: no sidecar in {list}"));
    assert_eq!(
        sidecar["restartPolicy"],
        if list == "initContainers" {
            json!("Always")
        } else {
            Value::Null
        },
        "{label}: sidecar restartPolicy"
    );
    assert_eq!(
        named(&sidecar["ports"], "statsd-metrics").map(|p| &p["containerPort"]),
        Some(&json!(9102)),
        "{label}: metrics port"
    );
    assert_eq!(
        named(&spec["volumes"], MAPPING_VOLUME)
            .map(|v| &v["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"]),
        Some(&json!(
            "metadata.annotations['metrics.chiller.io/statsd-mapping']"
        )),
        "{label}: mapping volume"
    );
    assert_eq!(
        template["metadata"]["annotations"]["metrics.chiller.io/statsd-mapping"],
        json!(chiller_metrics::config::DEFAULT_MAPPING),
        "{label}: the mapping travels with the pod"
    );
    assert_eq!(
        template["metadata"]["labels"][INJECTED_LABEL], "true",
        "{label}: injected label"
    );
    let flags = format!("--statsd-host=localhost:9125 --statsd-prefix={prefix}");
    for container in spec["containers"].as_array().unwrap() {
        let name = container["name"].as_str().unwrap();
        let args = gunicorn_args(container);
        if app_containers.contains(&name) {
            let args = args.unwrap_or_else(|| panic!("{label}/{name}: no GUNICORN_CMD_ARGS"));
            assert!(
                args.ends_with(&flags),
                "{label}/{name}: GUNICORN_CMD_ARGS is {args:?}, want it to end with {flags:?}"
            );
        } else {
            assert_eq!(args, None, "{label}/{name} must be left alone");
        }
    }
}

/// `object` without its pod template: what injection must leave untouched.
fn without_template(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(pointer) = template_pointer(object["kind"].as_str().unwrap_or_default())
        && let Some(template) = object.pointer_mut(pointer)
    {
        *template = Value::Null;
    }
    object
}

fn injected_rendered_chart(args: &[&str]) -> (Vec<Value>, Vec<Value>, String) {
    let file = manifest("chiller-rendered.yaml");
    let input = std::fs::read_to_string(&file).expect("read the fixture");
    let mut all = vec!["inject", "-f", file.to_str().unwrap()];
    all.extend_from_slice(args);
    let output = run(&all, None);
    succeeded(&output, "inject -f FILE");
    (
        yaml_documents(&input),
        yaml_documents(&stdout(&output)),
        stderr(&output),
    )
}

#[test]
fn inject_file_injects_every_workload_and_passes_the_rest_through() {
    let (input, output, notes) = injected_rendered_chart(&[]);
    let names: Vec<String> = output.iter().map(kind_name).collect();
    assert_eq!(
        names,
        input.iter().map(kind_name).collect::<Vec<_>>(),
        "documents in order, empty ones dropped"
    );
    assert_eq!(
        names,
        [
            "ConfigMap/chiller-config",
            "List/?",
            "Service/db",
            "Deployment/chiller-api",
            "Deployment/chiller-frontend",
            "StatefulSet/db",
            "StatefulSet/chiller-ws",
            "DaemonSet/chiller-node-agent",
            "ReplicaSet/chiller-api-canary",
            "Job/chiller-migrate",
            "CronJob/chiller-report",
            "Pod/chiller-test-connection",
        ]
    );
    for (before, after) in input.iter().zip(&output) {
        if let Err(error) = support::validate_k8s(after) {
            panic!("{} is not a valid object:\n{error}", kind_name(after));
        }
        assert_eq!(
            without_template(before),
            without_template(after),
            "{}: only the pod template may change",
            kind_name(after)
        );
    }
    let by_name = |name: &str| {
        output
            .iter()
            .find(|o| kind_name(o) == name)
            .unwrap_or_else(|| panic!("{name} is in the output"))
    };
    // Objects without pods pass through unchanged; so does the opted-out database.
    for name in [
        "ConfigMap/chiller-config",
        "List/?",
        "Service/db",
        "StatefulSet/db",
        "Pod/chiller-test-connection",
    ] {
        let before = input.iter().find(|o| kind_name(o) == name).unwrap();
        assert_eq!(by_name(name), before, "{name} must pass through unchanged");
    }

    // Job and CronJob get the native sidecar too: it ends with their pods.
    let cases: [(&str, &[&str], &str); 7] = [
        ("Deployment/chiller-api", &["api"], "chiller-api"),
        (
            "Deployment/chiller-frontend",
            &["frontend"],
            "chiller-frontend",
        ),
        ("StatefulSet/chiller-ws", &["ws"], "ws"),
        ("DaemonSet/chiller-node-agent", &["agent"], "node-agent"),
        ("ReplicaSet/chiller-api-canary", &["api"], "api"),
        ("Job/chiller-migrate", &["migrate"], "chiller-migrate"),
        ("CronJob/chiller-report", &["report"], "report"),
    ];
    for (name, containers, prefix) in cases {
        assert_injected(by_name(name), "initContainers", containers, prefix);
        assert!(
            notes.lines().any(|l| l == format!("injected {name}")),
            "no note for {name} in:\n{notes}"
        );
    }
    let frontend =
        &by_name("Deployment/chiller-frontend")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        gunicorn_args(frontend),
        Some(
            "--workers 4 --timeout 60 --statsd-host=localhost:9125 --statsd-prefix=chiller-frontend"
        ),
        "the chart's own gunicorn flags are kept"
    );
    assert!(
        notes
            .lines()
            .any(|l| l.starts_with("skipped StatefulSet/db:") && l.contains("opted out")),
        "the opted-out database is reported:\n{notes}"
    );
    assert!(
        notes
            .lines()
            .any(|l| l.starts_with("skipped Pod/chiller-test-connection:")
                && l.contains("opted out with the annotation")),
        "the opted-out test pod is reported:\n{notes}"
    );
}

#[test]
fn inject_stdin_gives_the_same_output_as_a_file() {
    let file = manifest("chiller-rendered.yaml");
    let input = std::fs::read(&file).expect("read the fixture");
    let from_file = run(&["inject", "-f", file.to_str().unwrap()], None);
    succeeded(&from_file, "inject -f FILE");
    let from_stdin = run(&["inject", "-f", "-"], Some(&input));
    succeeded(&from_stdin, "inject -f -");
    assert_eq!(stdout(&from_stdin), stdout(&from_file));
    assert_eq!(stderr(&from_stdin), stderr(&from_file));
    assert!(stdout(&from_stdin).contains(SIDECAR));
}

#[test]
fn inject_is_idempotent() {
    let first = run(
        &[
            "inject",
            "-f",
            manifest("chiller-rendered.yaml").to_str().unwrap(),
        ],
        None,
    );
    succeeded(&first, "first inject");
    let second = run(&["inject", "-f", "-"], Some(&first.stdout));
    succeeded(&second, "second inject");
    assert_eq!(
        yaml_documents(&stdout(&second)),
        yaml_documents(&stdout(&first))
    );
    let notes = stderr(&second);
    assert!(
        !notes.lines().any(|l| l.starts_with("injected ")),
        "nothing is injected twice:\n{notes}"
    );
    assert!(
        notes
            .lines()
            .filter(|l| l.contains("already has the statsd exporter sidecar"))
            .count()
            == 7,
        "{notes}"
    );
}

#[test]
fn inject_in_container_mode_skips_jobs_and_adds_a_regular_container() {
    let (_, output, notes) = injected_rendered_chart(&["--sidecar-mode", "container"]);
    let by_name = |name: &str| output.iter().find(|o| kind_name(o) == name).unwrap();
    let api = by_name("Deployment/chiller-api");
    support::validate_k8s(api).unwrap();
    assert_injected(api, "containers", &["api"], "chiller-api");
    assert!(
        api["spec"]["template"]["spec"]["initContainers"].is_null(),
        "no init containers in container mode"
    );
    for name in ["Job/chiller-migrate", "CronJob/chiller-report"] {
        let text = serde_json::to_string(by_name(name)).unwrap();
        assert!(!text.contains(SIDECAR), "{name} must not get a sidecar");
        assert!(
            notes
                .lines()
                .any(|l| l.starts_with(&format!("skipped {name}:"))
                    && l.contains("run-to-completion")),
            "{name} skip is reported:\n{notes}"
        );
    }
}

#[test]
fn inject_accepts_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "sidecar:\n  image: registry.example/statsd-exporter:v0.28.0\ngunicorn:\n  statsdHost: 127.0.0.1\n",
    )
    .unwrap();
    let (_, output, _) = injected_rendered_chart(&["--config", config.to_str().unwrap()]);
    let api = output
        .iter()
        .find(|o| kind_name(o) == "Deployment/chiller-api")
        .unwrap();
    let spec = &api["spec"]["template"]["spec"];
    assert_eq!(
        named(&spec["initContainers"], SIDECAR).unwrap()["image"],
        "registry.example/statsd-exporter:v0.28.0"
    );
    assert_eq!(
        gunicorn_args(&spec["containers"][0]),
        Some("--statsd-host=127.0.0.1:9125 --statsd-prefix=chiller-api")
    );
}

#[test]
fn certs_writes_a_ca_and_a_serving_certificate() {
    use rustls::{
        RootCertStore,
        client::{WebPkiServerVerifier, danger::ServerCertVerifier},
        pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    };

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let output = run(
        &[
            "certs",
            "--out",
            out.to_str().unwrap(),
            "--dns",
            "a",
            "--dns",
            "127.0.0.1",
        ],
        None,
    );
    succeeded(&output, "certs");
    let ca = std::fs::read(out.join("ca.crt")).expect("ca.crt");
    let cert = std::fs::read(out.join("tls.crt")).expect("tls.crt");
    let key = std::fs::read_to_string(out.join("tls.key")).expect("tls.key");
    assert!(key.contains("PRIVATE KEY-----"), "tls.key is a PEM key");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "tls.key must not be readable by others");
    }
    let bundle = stdout(&output);
    let decoded = STANDARD
        .decode(bundle.trim())
        .expect("the printed caBundle is base64");
    assert_eq!(decoded, ca, "the caBundle is ca.crt");

    // The serving certificate chains to the CA and is valid for both names.
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&ca).expect("ca.crt is PEM"))
        .unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
        .build()
        .unwrap();
    let leaf = CertificateDer::from_pem_slice(&cert).expect("tls.crt is PEM");
    for name in ["a", "127.0.0.1"] {
        let server = ServerName::try_from(name).unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &server, &[], UnixTime::now())
            .unwrap_or_else(|e| panic!("tls.crt is not valid for {name}: {e}"));
    }
    let other = ServerName::try_from("b").unwrap();
    assert!(
        verifier
            .verify_server_cert(&leaf, &[], &other, &[], UnixTime::now())
            .is_err(),
        "tls.crt must not be valid for a name it was not issued for"
    );
}

#[test]
fn mapping_prints_the_statsd_mapping() {
    let output = run(&["mapping"], None);
    succeeded(&output, "mapping");
    let text = stdout(&output);
    let printed: Value = serde_norway::from_str(&text).expect("the mapping is YAML");
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/inject/statsd-mapping.yaml"),
    )
    .unwrap();
    let expected: Value = serde_norway::from_str(&source).unwrap();
    assert_eq!(printed, expected);
    let names: Vec<&str> = printed["mappings"]
        .as_array()
        .expect("a mappings list")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    for metric in [
        "gunicorn_request_duration_seconds",
        "gunicorn_requests_total",
        "gunicorn_responses_total",
        "gunicorn_workers",
        "gunicorn_log_messages_total",
    ] {
        assert!(names.contains(&metric), "{metric} missing from {names:?}");
    }
}

/// A failure: non-zero exit, nothing on stdout, and stderr containing every `needle`.
fn assert_fails(output: &Output, needles: &[&str]) {
    let err = stderr(output);
    assert!(
        !output.status.success(),
        "expected a failure, got success; stderr:\n{err}"
    );
    assert!(
        output.stdout.is_empty(),
        "nothing on stdout: {}",
        stdout(output)
    );
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
}

#[test]
fn invalid_flags_are_rejected() {
    let output = run(&["inject", "-f", "-", "--bogus"], Some(b""));
    assert_fails(&output, &["--bogus"]);
    assert_eq!(output.status.code(), Some(2), "clap's usage error code");
    assert_fails(&run(&["inject"], None), &["--filename"]);
    assert_fails(
        &run(
            &["inject", "-f", "-", "--sidecar-mode", "sidecar"],
            Some(b""),
        ),
        &["sidecar", "--sidecar-mode"],
    );
    // One flag for the sidecar mode.
    assert_fails(
        &run(&["inject", "-f", "-", "--mode", "container"], Some(b"")),
        &["--mode"],
    );
    assert_fails(&run(&["certs", "--out", "x"], None), &["--dns"]);
}

#[test]
fn an_invalid_config_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let unknown_key = dir.path().join("unknown-key.yaml");
    std::fs::write(&unknown_key, "sidecar:\n  imagee: prom/statsd-exporter\n").unwrap();
    let path = unknown_key.to_str().unwrap();
    assert_fails(
        &run(&["inject", "-f", "-", "--config", path], Some(b"")),
        &[path, "imagee"],
    );
    assert_fails(&run(&["mapping", "--config", path], None), &["imagee"]);

    let bad_value = dir.path().join("bad-port.yaml");
    std::fs::write(&bad_value, "sidecar:\n  metricsPort: http\n").unwrap();
    assert_fails(
        &run(
            &["inject", "-f", "-", "--config", bad_value.to_str().unwrap()],
            Some(b""),
        ),
        &["metricsPort"],
    );

    let missing = dir.path().join("missing.yaml");
    assert_fails(
        &run(
            &["inject", "-f", "-", "--config", missing.to_str().unwrap()],
            Some(b""),
        ),
        &[missing.to_str().unwrap()],
    );
}

#[test]
fn unreadable_or_invalid_input_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-file.yaml");
    assert_fails(
        &run(&["inject", "-f", missing.to_str().unwrap()], None),
        &["cannot read", missing.to_str().unwrap()],
    );
    assert_fails(
        &run(&["inject", "-f", dir.path().to_str().unwrap()], None),
        &["cannot read"],
    );
    let broken = b"apiVersion: v1\nkind: ConfigMap\n---\nkind: [unclosed\n";
    assert_fails(
        &run(&["inject", "-f", "-"], Some(broken)),
        &["document 2", "not valid YAML"],
    );
    let bad_pod = b"apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  containers: oops\n";
    assert_fails(&run(&["inject", "-f", "-"], Some(bad_pod)), &["Pod/x"]);
}

/// The input's documents as text, each with the `---` line that starts it.
fn document_texts(yaml: &str) -> Vec<String> {
    let mut documents = vec![String::new()];
    for line in yaml.split_inclusive('\n') {
        let started = documents
            .last()
            .unwrap()
            .lines()
            .any(|l| l.trim_end() == "---" || !(l.trim().is_empty() || l.starts_with('#')));
        if line.trim_end() == "---" && started {
            documents.push(String::new());
        }
        documents.last_mut().unwrap().push_str(line);
    }
    documents
}

/// Every map's keys in `after` start with `before`'s keys, in their order.
fn assert_key_order_kept(before: &serde_norway::Value, after: &serde_norway::Value, at: &str) {
    use serde_norway::Value as Yaml;
    match (before, after) {
        (Yaml::Mapping(b), Yaml::Mapping(a)) => {
            let kept: Vec<&Yaml> = a.keys().filter(|k| b.contains_key(*k)).collect();
            let original: Vec<&Yaml> = b.keys().collect();
            assert_eq!(kept, original, "key order changed at {at}");
            for (key, value) in b {
                if let Some(new) = a.get(key) {
                    assert_key_order_kept(value, new, &format!("{at}/{key:?}"));
                }
            }
        }
        (Yaml::Sequence(b), Yaml::Sequence(a)) => {
            for (i, (value, new)) in b.iter().zip(a).enumerate() {
                assert_key_order_kept(value, new, &format!("{at}/{i}"));
            }
        }
        _ => {}
    }
}

fn yaml_values(yaml: &str) -> Vec<serde_norway::Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| serde_norway::Value::deserialize(d).unwrap())
        .collect()
}

#[test]
fn inject_writes_unchanged_documents_byte_for_byte_and_keeps_key_order() {
    let input = std::fs::read_to_string(manifest("chiller-rendered.yaml")).unwrap();
    let output = run(&["inject", "-f", "-"], Some(input.as_bytes()));
    succeeded(&output, "inject");
    let output = stdout(&output);
    let (before, after) = (document_texts(&input), document_texts(&output));
    assert_eq!(
        before.len(),
        after.len(),
        "every document is written:\n{output}"
    );
    let mut unchanged = 0;
    for (original, written) in before.iter().zip(&after) {
        let workload = original.contains("\nspec:") && original.contains("containers:");
        let opted_out =
            original.contains("inject: disabled") || original.contains("inject: \"false\"");
        if !workload || opted_out {
            assert_eq!(
                written, original,
                "an unchanged document is written as it was"
            );
            unchanged += 1;
        } else {
            assert_ne!(written, original);
            // Its `---` and `# Source:` lines stay.
            let head: String = original
                .lines()
                .take_while(|l| l.starts_with('#') || l.trim_end() == "---")
                .map(|l| format!("{l}\n"))
                .collect();
            assert!(!head.is_empty() && written.starts_with(&head), "{written}");
            // A diff shows only additions, and the one value we extend.
            let mut written_lines = written.lines();
            let mut after_gunicorn = false;
            for line in original.lines() {
                let ours = after_gunicorn && line.trim_start().starts_with("value:");
                after_gunicorn = line.trim_start() == "- name: GUNICORN_CMD_ARGS";
                if ours {
                    continue;
                }
                assert!(
                    written_lines.any(|w| w == line),
                    "line {line:?} was rewritten or moved:\n{written}"
                );
            }
        }
    }
    assert!(
        unchanged >= 5,
        "the fixture has comments, a ConfigMap, a List, opt-outs"
    );
    let sources = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("# Source:"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(sources(&output), sources(&input));
    for (b, a) in yaml_values(&input).iter().zip(&yaml_values(&output)) {
        assert_key_order_kept(b, a, "");
    }
}

#[test]
fn uninject_removes_exactly_what_inject_added() {
    let input = std::fs::read_to_string(manifest("chiller-rendered.yaml")).unwrap();
    for mode in ["native", "container"] {
        let injected = run(
            &["inject", "-f", "-", "--sidecar-mode", mode],
            Some(input.as_bytes()),
        );
        succeeded(&injected, "inject");
        assert!(stdout(&injected).contains(SIDECAR));
        let uninjected = run(&["uninject", "-f", "-"], Some(&injected.stdout));
        succeeded(&uninjected, "uninject");
        let text = stdout(&uninjected);
        assert_eq!(
            yaml_values(&text),
            yaml_values(&input),
            "{mode}: uninject(inject(x)) == x"
        );
        assert!(!text.contains(SIDECAR) && !text.contains(INJECTED_LABEL));
        let notes = stderr(&uninjected);
        assert_eq!(
            notes
                .lines()
                .filter(|l| l.starts_with("uninjected "))
                .count(),
            if mode == "native" { 7 } else { 5 },
            "{notes}"
        );
    }
    // Nothing to remove: the input comes back byte for byte.
    let untouched = run(&["uninject", "-f", "-"], Some(input.as_bytes()));
    succeeded(&untouched, "uninject of an uninjected file");
    assert_eq!(stdout(&untouched), input);
}
