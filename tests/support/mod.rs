//! Shared helpers for the integration tests (`mod support;`):
//!
//! - [`validate`], [`validate_k8s`], [`validate_crd`]: check objects against the
//!   strict Kubernetes 1.37 JSON schemas and the prometheus-operator CRDs that
//!   `make tools` puts in `.tools/reference` (see [`reference_dir`]), so that a
//!   misspelled or mistyped field fails a test.
//! - [`tool`]: finds an external test tool or fails with how to install it.
//! - [`run_within`]: runs a command to its end, killed after a time limit.
//! - [`wait_until`]: polls a condition, bounded.
//! - [`controlplane`]: the local control plane and the real node; [`install`]:
//!   the chart installed on it, `serve` as the chart's ServiceAccount.
#![allow(dead_code)]

pub mod controlplane;
/// What the e2e tests on the real node share.
pub mod e2e;
/// The webhook over real HTTPS: in-process server, clients, the real binary.
pub mod https;
pub mod install;
pub mod load;

use std::{
    collections::HashMap,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use jsonschema::{Retrieve, Uri, Validator};
use serde_json::{Value, json};

/// Folder of the Kubernetes schemas inside `.tools/reference/schemas`.
pub const K8S_SCHEMAS: &str = "kubernetes-v1.37.0-strict";
/// The API group of the prometheus-operator CRDs.
pub const MONITORING_GROUP: &str = "monitoring.coreos.com";
const DEFINITIONS_REF: &str = "/api/_definitions.json";
const OBJECT_META_REF: &str =
    "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

/// The crate root.
pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `.tools/reference` in the crate: the reference data that `make tools`
/// (scripts/tools.sh) fetches at pinned versions.
///
/// - `schemas/kubernetes-v1.37.0-strict/`: from the PyPI package
///   `kubernetes-validate==1.37.0`.
/// - `crds/monitoring.coreos.com_{prometheuses,servicemonitors,podmonitors}.yaml`:
///   from the Go module `github.com/prometheus-operator/prometheus-operator`,
///   pinned in tools/prometheus-operator/go.mod.
///
/// Panics, saying to run `make tools`, when the data is missing.
pub fn reference_dir() -> PathBuf {
    let dir = crate_dir().join(".tools").join("reference");
    let crds = ["prometheuses", "servicemonitors", "podmonitors"]
        .map(|plural| PathBuf::from("crds").join(format!("{MONITORING_GROUP}_{plural}.yaml")));
    let definitions = PathBuf::from("schemas")
        .join(K8S_SCHEMAS)
        .join("_definitions.json");
    let missing: Vec<String> = std::iter::once(definitions)
        .chain(crds)
        .filter(|file| !dir.join(file).is_file())
        .map(|file| file.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "the reference schemas and CRDs are missing from {} (no {}): run `make tools`, \
         which fetches kubernetes-validate with pip and the prometheus-operator Go module",
        dir.display(),
        missing.join(", ")
    );
    dir
}

/// Polls `done` until it holds; panics naming `what` once `within` has passed.
pub fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A file or folder of the crate.
pub fn crate_path(relative: &str) -> PathBuf {
    crate_dir().join(relative)
}

/// helm with its own cache, config and data folders under `home`, away
/// from the user's.
pub fn helm(home: &Path) -> Command {
    let mut command = Command::new(tool("helm"));
    command
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    command
}

/// A command's stdout, which must be UTF-8.
pub fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

/// A command's stderr, for messages.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs a command; panics with its output unless it succeeds.
pub fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert_succeeded(command, &output, "");
    output
}

/// Panics with the command's output, then `more`, unless it succeeded.
pub fn assert_succeeded(command: &Command, output: &Output, more: &str) {
    assert!(
        output.status.success(),
        "{command:?} failed with {}:\n{}{}{more}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The documents of a multi-document YAML text, empty ones left out; panics
/// with the text if one does not parse.
pub fn yaml_documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            <Value as serde::Deserialize>::deserialize(document)
                .unwrap_or_else(|e| panic!("a YAML document does not parse: {e}\n{text}"))
        })
        .filter(|document| !document.is_null())
        .collect()
}

/// The numbers of the steps `explain -o json` says failed.
pub fn failed_steps(explanation: &Value) -> Vec<u64> {
    explanation["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "fail")
        .map(|s| s["number"].as_u64().unwrap())
        .collect()
}

/// A ConfigMap or Secret volume as the kubelet writes it: each file a link
/// into `..data`, which points at a timestamped folder and is swapped
/// atomically on every update (a link beside it, renamed over it), after
/// which the old folder is removed.
pub struct KubeletVolume {
    pub dir: PathBuf,
    generation: u32,
}

impl KubeletVolume {
    /// A volume in `dir` holding `files` (name, contents).
    pub fn new(dir: &Path, files: &[(&str, &[u8])]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut volume = Self {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        volume.publish(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        volume
    }

    /// Publishes new contents of the files, atomically.
    pub fn publish(&mut self, files: &[(&str, &[u8])]) {
        self.generation += 1;
        let name = format!("..2026_11_24_04_00_{:02}.{:09}", self.generation, 1);
        let target = self.dir.join(&name);
        std::fs::create_dir(&target).unwrap();
        for (file, contents) in files {
            std::fs::write(target.join(file), contents).unwrap();
        }
        let data = self.dir.join("..data");
        let old = std::fs::read_link(&data).ok();
        let staged = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &staged).unwrap();
        std::fs::rename(&staged, &data).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

/// Finds an external tool: in `<crate>/.tools/bin` or `<crate>/.tools/venv/bin`,
/// else on PATH. Panics naming how to install it.
pub fn tool(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let tools = crate_dir().join(".tools");
    // The pinned builds in .tools come first: a distribution's helm, kubectl
    // or promtool on PATH may be versions behind.
    let candidates = [tools.join("bin"), tools.join("venv").join("bin")]
        .into_iter()
        .chain(on_path);
    for dir in candidates {
        let file = dir.join(name);
        if is_executable(&file) {
            return file;
        }
    }
    panic!(
        "required test tool `{name}` not found on PATH nor in {}/{{bin,venv/bin}}; {}",
        tools.display(),
        install_hint(name)
    );
}

/// How to install the test tool `name`, for [`tool`]'s panic message.
pub fn install_hint(name: &str) -> String {
    match name {
        "wrk" => "install it with `apt-get install -y wrk`".into(),
        "h2load" => "install it with `apt-get install -y nghttp2-client`".into(),
        "gunicorn" | "flask" | "python3" => {
            "run `make tools` (installs gunicorn and flask into .tools/venv)".into()
        }
        "helm" | "kubectl" | "promtool" => {
            "run `make tools` (builds helm, kubectl and promtool from tools/ into .tools/bin)"
                .into()
        }
        "readelf" | "nm" => {
            "install it with `apt-get install -y binutils` (Debian package `binutils`)".into()
        }
        _ => "run `make tools`, or install it with your package manager".into(),
    }
}

/// Runs `command` to its end with stdout and stderr captured. After `within`
/// its whole process group is killed and the test fails, naming `what`.
pub fn run_within(mut command: Command, within: Duration, what: &str) -> Output {
    use std::os::unix::process::CommandExt;
    // Files, not pipes: a chatty child cannot block on a full pipe.
    let stdout = tempfile::tempfile().expect("a temporary file for stdout");
    let stderr = tempfile::tempfile().expect("a temporary file for stderr");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().expect("a second handle on stdout"))
        .stderr(stderr.try_clone().expect("a second handle on stderr"))
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let read = |mut file: std::fs::File| {
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0)).expect("rewinding the output");
        file.read_to_end(&mut bytes).expect("reading the output");
        bytes
    };
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            return Output {
                status,
                stdout: read(stdout),
                stderr: read(stderr),
            };
        }
        if Instant::now() > deadline {
            let group = i32::try_from(child.id()).expect("a pid fits in i32");
            // SAFETY: signals only the process group this call created.
            unsafe { libc::killpg(group, libc::SIGKILL) };
            let _ = child.wait();
            let log = String::from_utf8_lossy(&read(stderr)).into_owned();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "{what} did not finish within {within:?}; the end of its stderr:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn is_executable(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    file.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Validates a Kubernetes object or a prometheus-operator custom resource,
/// chosen by `apiVersion`. A `List` has each item validated.
pub fn validate(object: &Value) -> Result<(), String> {
    let (group, _, kind) = type_of(object)?;
    if kind == "List" {
        return validate_items(object, validate);
    }
    if group == MONITORING_GROUP {
        validate_crd(object)
    } else {
        validate_k8s(object)
    }
}

/// Validates a built-in Kubernetes object against the strict 1.37 schema of its kind.
/// Returns every error, each with the path of the offending value.
pub fn validate_k8s(object: &Value) -> Result<(), String> {
    let (group, version, kind) = type_of(object)?;
    if kind == "List" && group.is_empty() {
        return validate_items(object, validate_k8s);
    }
    let file = match group.split('.').next().unwrap_or_default() {
        "" => format!("{}-{version}.json", kind.to_lowercase()),
        label => format!("{}-{label}-{version}.json", kind.to_lowercase()),
    };
    let validator = cached(&file, || {
        let path = reference_dir()
            .join("schemas")
            .join(K8S_SCHEMAS)
            .join(&file);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "no schema for {}/{kind} ({}: {e})",
                api_version(object),
                path.display()
            )
        })?;
        let schema: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        compile(&schema)
    })?;
    check_with(&validator, object)
}

/// Validates a monitoring.coreos.com/v1 Prometheus, ServiceMonitor or
/// PodMonitor against its CRD schema, made strict: unknown fields, which the
/// API server would silently prune, are errors.
pub fn validate_crd(object: &Value) -> Result<(), String> {
    let (group, version, kind) = type_of(object)?;
    if group != MONITORING_GROUP {
        return Err(format!(
            "{} is not a {MONITORING_GROUP} resource",
            api_version(object)
        ));
    }
    let plural = match kind {
        "Prometheus" => "prometheuses",
        "ServiceMonitor" => "servicemonitors",
        "PodMonitor" => "podmonitors",
        other => return Err(format!("no CRD for {MONITORING_GROUP} kind {other:?}")),
    };
    let key = format!("crd:{plural}:{version}");
    let validator = cached(&key, || {
        let path = reference_dir()
            .join("crds")
            .join(format!("{MONITORING_GROUP}_{plural}.yaml"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let crd: Value = serde_norway::from_str(&text)
            .map_err(|e| format!("{} is not YAML: {e}", path.display()))?;
        let mut schema = crd["spec"]["versions"]
            .as_array()
            .and_then(|versions| versions.iter().find(|v| v["name"] == version))
            .map(|v| v["schema"]["openAPIV3Schema"].clone())
            .filter(Value::is_object)
            .ok_or_else(|| format!("{} has no version {version}", path.display()))?;
        strict_structural(&mut schema);
        schema["properties"]["metadata"] = json!({"$ref": OBJECT_META_REF});
        compile(&schema)
    })?;
    check_with(&validator, object)
}

/// Rewrites a CRD's structural schema for a JSON Schema validator: unknown
/// fields become errors, `x-kubernetes-int-or-string` accepts both types and
/// `nullable` admits null.
pub fn strict_structural(schema: &mut Value) {
    let Some(node) = schema.as_object_mut() else {
        return;
    };
    if node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        node.remove("type");
        node.insert(
            "anyOf".into(),
            json!([{"type": "integer"}, {"type": "string"}]),
        );
    }
    if node.get("nullable") == Some(&Value::Bool(true))
        && let Some(Value::String(kind)) = node.get("type").cloned()
    {
        node.insert("type".into(), json!([kind, "null"]));
    }
    let preserves_unknown =
        node.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if node.contains_key("properties")
        && !node.contains_key("additionalProperties")
        && !preserves_unknown
    {
        node.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (key, child) in node.iter_mut() {
        match key.as_str() {
            "properties" | "patternProperties" | "definitions" | "$defs" => {
                if let Some(children) = child.as_object_mut() {
                    children.values_mut().for_each(strict_structural);
                }
            }
            "items" | "additionalProperties" | "not" => strict_structural(child),
            "allOf" | "anyOf" | "oneOf" => {
                if let Some(children) = child.as_array_mut() {
                    children.iter_mut().for_each(strict_structural);
                }
            }
            _ => {}
        }
    }
}

fn type_of(object: &Value) -> Result<(&str, &str, &str), String> {
    let api_version = object["apiVersion"]
        .as_str()
        .ok_or_else(|| format!("object has no apiVersion: {}", short(object)))?;
    let kind = object["kind"]
        .as_str()
        .ok_or_else(|| format!("object has no kind: {}", short(object)))?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    Ok((group, version, kind))
}

fn api_version(object: &Value) -> &str {
    object["apiVersion"].as_str().unwrap_or("?")
}

fn short(object: &Value) -> String {
    let text = object.to_string();
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

fn validate_items(list: &Value, each: fn(&Value) -> Result<(), String>) -> Result<(), String> {
    let items = list["items"]
        .as_array()
        .ok_or_else(|| "List has no items array".to_string())?;
    let errors: Vec<String> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| each(item).err().map(|e| format!("items[{i}]: {e}")))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

type Cache = Mutex<HashMap<String, Arc<Validator>>>;

fn cached(
    key: &str,
    build: impl FnOnce() -> Result<Validator, String>,
) -> Result<Arc<Validator>, String> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(validator) = cache.get(key) {
        return Ok(validator.clone());
    }
    let validator = Arc::new(build()?);
    cache.insert(key.to_string(), validator.clone());
    Ok(validator)
}

fn compile(schema: &Value) -> Result<Validator, String> {
    jsonschema::options()
        .with_retriever(SharedDefinitions)
        .build(schema)
        .map_err(|e| format!("schema does not compile: {e}"))
}

fn check_with(validator: &Validator, object: &Value) -> Result<(), String> {
    let errors: Vec<String> = validator
        .iter_errors(object)
        .map(|e| {
            let path = e.instance_path().to_string();
            let path = if path.is_empty() { "/" } else { &path };
            format!("  at {path}: {e}")
        })
        .collect();
    if errors.is_empty() {
        return Ok(());
    }
    let name = object["metadata"]["name"]
        .as_str()
        .or(object["metadata"]["generateName"].as_str())
        .unwrap_or("<unnamed>");
    Err(format!(
        "{} {} {name:?} is invalid:\n{}",
        api_version(object),
        object["kind"].as_str().unwrap_or("?"),
        errors.join("\n")
    ))
}

/// Serves `/api/_definitions.json`, the file every Kubernetes schema refers to.
struct SharedDefinitions;

impl Retrieve for SharedDefinitions {
    fn retrieve(
        &self,
        uri: &Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        if uri.path().as_str() != DEFINITIONS_REF {
            return Err(format!("unexpected schema reference {uri}").into());
        }
        static DEFINITIONS: OnceLock<Value> = OnceLock::new();
        let definitions = DEFINITIONS.get_or_init(|| {
            let path = reference_dir()
                .join("schemas")
                .join(K8S_SCHEMAS)
                .join("_definitions.json");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
        });
        Ok(definitions.clone())
    }
}

/// `UPDATE_GOLDEN=1`: golden files are rewritten instead of compared.
#[allow(dead_code)]
pub fn updating_golden() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A release build with thin LTO takes minutes on a small machine.
const RELEASE_BUILD_LIMIT: Duration = Duration::from_secs(60 * 60);

/// `cargo build --release --locked --bin chiller-metrics`, as users build it:
/// without the image-only link settings, and without the variables `cargo
/// test` and `cargo run` set for their child. ring's build script reruns when
/// `CARGO_MANIFEST_DIR` changes, so an inherited one rebuilt ring, rustls and
/// everything above them instead of reusing the binary `make test` built.
pub fn release_build() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(crate_dir())
        .args(["build", "--release", "--locked", "--bin", "chiller-metrics"])
        .env_remove("CHILLER_METRICS_PACK_RELOCS")
        .env_remove("CHILLER_METRICS_PLAIN_LINK");
    as_a_user_runs_it(&mut command);
    command
}

/// Drops from `command`'s environment what `cargo test` set for the test
/// process, so that a `cargo build` it runs (directly, or as a documented
/// step in a script) reuses the build `make test` made.
pub fn as_a_user_runs_it(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if set_by_cargo_for_its_child(&name.to_string_lossy()) {
            command.env_remove(&name);
        }
    }
}

/// The variables cargo sets for a test or `cargo run` (not the user's
/// `CARGO_*` settings such as `CARGO_HOME` or `CARGO_TARGET_DIR`).
fn set_by_cargo_for_its_child(name: &str) -> bool {
    const PREFIXES: [&str; 3] = ["CARGO_PKG_", "CARGO_BIN_", "CARGO_MANIFEST_"];
    const NAMES: [&str; 5] = [
        "CARGO_CRATE_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "OUT_DIR",
        "LD_LIBRARY_PATH",
    ];
    PREFIXES.iter().any(|prefix| name.starts_with(prefix)) || NAMES.contains(&name)
}

/// The release binary (see [`release_build`]); returns its path.
pub fn release_binary() -> PathBuf {
    let mut command = release_build();
    command.args(["--message-format", "json-render-diagnostics"]);
    let output = run_within(command, RELEASE_BUILD_LIMIT, "the release build");
    assert!(
        output.status.success(),
        "the release build failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo names the built executable")
}

/// What `explain -f` says of the pod in `manifest`, created in `namespace`
/// with `labels` and `annotations`, under the chart's webhook configuration
/// and `injector`'s config and mode.
pub fn explain_manifest(
    manifest: &Value,
    namespace: &str,
    labels: std::collections::BTreeMap<String, String>,
    annotations: std::collections::BTreeMap<String, String>,
    injector: &chiller_metrics::inject::Injector,
) -> chiller_metrics::cli::explain::decide::Explanation {
    use chiller_metrics::cli::explain::{
        decide::{Inputs, NamespaceFacts, WebhookFacts, explain, our_webhook},
        input::{shipped_webhook, subject_of_manifest},
    };
    let subject = subject_of_manifest(manifest, namespace).expect("the manifest holds a pod");
    let domain = &injector.config().domain;
    let webhook = WebhookFacts {
        source: "the chart's defaults".into(),
        webhook: our_webhook(shipped_webhook(domain).webhooks, domain),
    };
    explain(&Inputs {
        subject: &subject,
        namespace: Some(&NamespaceFacts {
            labels,
            annotations,
        }),
        webhook: &webhook,
        injector,
    })
}

/// The AdmissionReview the API server sends for creating `pod` in `namespace`.
pub fn pod_create_review(pod: &Value, namespace: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7d3c8e2a-5b1f-4c9d-8e6a-0f2b4d6c8a10",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "kubernetes-admin", "groups": ["system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    })
}
