//! The install manifests: the Helm chart (`helm lint`, `helm template` with
//! several value sets) and the kustomize overlays (`kubectl kustomize`).
//! Every rendered object must validate against the strict Kubernetes 1.37
//! schemas (cert-manager objects are checked structurally), and the webhook
//! configuration, Deployment and RBAC must keep their safety properties.

use std::{collections::BTreeSet, path::Path, process::Command};

use base64::Engine;
use serde_json::{Value, json};

use crate::support::{self, crate_path, run, yaml_documents};

const CHART: &str = "manifests/chart/chiller-metrics";
const BINARY: &str = env!("CARGO_BIN_EXE_chiller-metrics");
const DOMAIN: &str = "metrics.chiller.io";
const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

// ---------------------------------------------------------------- rendering

fn helm() -> Command {
    support::helm(&std::env::temp_dir().join("chiller-metrics-manifests-helm"))
}

/// `helm template` of the chart with `--set` style values; the documents.
fn render_chart(namespace: &str, values: &[&str]) -> Vec<Value> {
    let output = run(&mut helm_template(namespace, values));
    parse_documents(&String::from_utf8_lossy(&output.stdout))
}

fn helm_template(namespace: &str, values: &[&str]) -> Command {
    let mut command = helm();
    command
        .arg("template")
        .arg("chiller-metrics")
        .arg(crate_path(CHART))
        .args(["--namespace", namespace]);
    for value in values {
        command.args(["--set", value]);
    }
    command
}

/// `kubectl kustomize DIR`; the documents.
fn kustomize(dir: &Path) -> Vec<Value> {
    let output = run(Command::new(support::tool("kubectl"))
        .arg("kustomize")
        .arg(dir));
    parse_documents(&String::from_utf8_lossy(&output.stdout))
}

fn parse_documents(text: &str) -> Vec<Value> {
    let documents = yaml_documents(text);
    assert!(!documents.is_empty(), "nothing rendered:\n{text}");
    documents
}

fn name_of(object: &Value) -> String {
    format!(
        "{} {}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn all_of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

fn one_of_kind<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    let found = all_of_kind(documents, kind);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, found {}",
        found.len()
    );
    found[0]
}

fn named<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

// ------------------------------------------------------------- validation

/// Every document validates: built-in kinds against the strict schemas,
/// cert-manager kinds structurally. Returns the kinds seen.
fn validate_all(documents: &[Value]) -> BTreeSet<String> {
    let mut errors = Vec::new();
    for document in documents {
        let api_version = document["apiVersion"].as_str().unwrap_or_default();
        let result = if api_version.starts_with("cert-manager.io/") {
            check_cert_manager(document)
        } else {
            support::validate_k8s(document)
        };
        if let Err(e) = result {
            errors.push(format!("{}: {e}", name_of(document)));
        }
    }
    assert!(errors.is_empty(), "invalid objects:\n{}", errors.join("\n"));
    documents
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// cert-manager has no schema in the reference data: check Issuer and Certificate by hand.
fn check_cert_manager(object: &Value) -> Result<(), String> {
    if object["apiVersion"] != "cert-manager.io/v1" {
        return Err(format!(
            "apiVersion must be cert-manager.io/v1, is {}",
            object["apiVersion"]
        ));
    }
    let metadata = &object["metadata"];
    for field in ["name", "namespace"] {
        if metadata[field].as_str().is_none_or(str::is_empty) {
            return Err(format!("metadata.{field} is required"));
        }
    }
    let spec = object["spec"]
        .as_object()
        .ok_or_else(|| "spec is required".to_string())?;
    match object["kind"].as_str() {
        Some("Issuer") => {
            let kinds: Vec<&String> = spec
                .keys()
                .filter(|k| ["selfSigned", "ca", "acme", "vault", "venafi"].contains(&k.as_str()))
                .collect();
            if kinds.len() != 1 || kinds.len() != spec.len() {
                return Err(format!(
                    "an Issuer spec has exactly one issuer type, got {kinds:?} of {:?}",
                    spec.keys().collect::<Vec<_>>()
                ));
            }
            if spec.contains_key("ca") && spec["ca"]["secretName"].as_str().is_none() {
                return Err("spec.ca.secretName is required".into());
            }
            Ok(())
        }
        Some("Certificate") => check_certificate(spec),
        other => Err(format!("unexpected cert-manager kind {other:?}")),
    }
}

fn check_certificate(spec: &serde_json::Map<String, Value>) -> Result<(), String> {
    const FIELDS: [&str; 12] = [
        "secretName",
        "issuerRef",
        "dnsNames",
        "commonName",
        "duration",
        "renewBefore",
        "isCA",
        "privateKey",
        "usages",
        "ipAddresses",
        "subject",
        "secretTemplate",
    ];
    if let Some(unknown) = spec.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!("unknown Certificate field spec.{unknown}"));
    }
    if spec
        .get("secretName")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err("spec.secretName is required".into());
    }
    let issuer = spec.get("issuerRef").ok_or("spec.issuerRef is required")?;
    if issuer["name"].as_str().is_none_or(str::is_empty) {
        return Err("spec.issuerRef.name is required".into());
    }
    if !matches!(
        issuer["kind"].as_str(),
        None | Some("Issuer" | "ClusterIssuer")
    ) {
        return Err(format!(
            "spec.issuerRef.kind {} is not Issuer or ClusterIssuer",
            issuer["kind"]
        ));
    }
    if spec.get("dnsNames").is_none() && spec.get("commonName").is_none() {
        return Err("spec needs dnsNames or commonName".into());
    }
    if let Some(names) = spec.get("dnsNames") {
        let list = names.as_array().ok_or("spec.dnsNames must be a list")?;
        if list.is_empty() || list.iter().any(|n| n.as_str().is_none()) {
            return Err("spec.dnsNames must be a non-empty list of strings".into());
        }
    }
    for field in ["duration", "renewBefore"] {
        if let Some(value) = spec.get(field) {
            let text = value
                .as_str()
                .ok_or(format!("spec.{field} must be a string"))?;
            if !is_go_duration(text) {
                return Err(format!(
                    "spec.{field} {text:?} is not a duration like 2160h"
                ));
            }
        }
    }
    if let Some(is_ca) = spec.get("isCA") {
        is_ca.as_bool().ok_or("spec.isCA must be a boolean")?;
    }
    if let Some(key) = spec.get("privateKey") {
        if !matches!(
            key["algorithm"].as_str(),
            None | Some("RSA" | "ECDSA" | "Ed25519")
        ) {
            return Err(format!(
                "spec.privateKey.algorithm {} is unknown",
                key["algorithm"]
            ));
        }
        if !matches!(
            key["rotationPolicy"].as_str(),
            None | Some("Always" | "Never")
        ) {
            return Err(format!(
                "spec.privateKey.rotationPolicy {} is unknown",
                key["rotationPolicy"]
            ));
        }
    }
    const USAGES: [&str; 6] = [
        "server auth",
        "client auth",
        "digital signature",
        "key encipherment",
        "cert sign",
        "crl sign",
    ];
    if let Some(usages) = spec.get("usages") {
        for usage in usages.as_array().ok_or("spec.usages must be a list")? {
            if !usage.as_str().is_some_and(|u| USAGES.contains(&u)) {
                return Err(format!("spec.usages has unknown usage {usage}"));
            }
        }
    }
    Ok(())
}

/// `2160h`, `1h30m`, `90s`: what cert-manager's duration fields accept.
fn is_go_duration(text: &str) -> bool {
    let mut rest = text;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "h", "m", "s"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        match unit {
            Some(unit) => rest = &rest[unit.len()..],
            None => return false,
        }
    }
    true
}

// ---------------------------------------------------- safety properties

/// What a rendering must look like, beyond schema validity.
struct Expected<'a> {
    namespace: &'a str,
    failure_policy: &'a str,
    domain: &'a str,
}

impl Default for Expected<'_> {
    fn default() -> Self {
        Self {
            namespace: "chiller-metrics",
            failure_policy: "Ignore",
            domain: DOMAIN,
        }
    }
}

fn check_install(documents: &[Value], expected: &Expected) {
    let kinds = validate_all(documents);
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    ] {
        assert!(kinds.contains(kind), "no {kind} rendered; kinds: {kinds:?}");
    }
    check_webhook(documents, expected);
    let pod_labels = check_deployment(documents, expected);
    check_service_and_pdb(documents, &pod_labels);
    check_cluster_role(one_of_kind(documents, "ClusterRole"));
    check_bindings(documents, expected.namespace);
    check_config_accepted(documents);
    check_args_parse(documents);
}

/// The binary parses the Deployment's args (a trailing `--help` stops
/// before serving; an unknown flag or a bad value fails first).
fn check_args_parse(documents: &[Value]) {
    let deployment = one_of_kind(documents, "Deployment");
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    let output = Command::new(BINARY)
        .args(&args)
        .arg("--help")
        .output()
        .expect("run chiller-metrics");
    assert!(
        output.status.success(),
        "chiller-metrics rejects the Deployment's args {args:?}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn check_webhook(documents: &[Value], expected: &Expected) {
    let configuration = one_of_kind(documents, "MutatingWebhookConfiguration");
    let webhooks = configuration["webhooks"].as_array().expect("webhooks");
    assert_eq!(webhooks.len(), 1, "one webhook");
    let webhook = &webhooks[0];
    assert_eq!(webhook["name"], format!("inject.{}", expected.domain));
    assert_eq!(
        webhook["rules"],
        json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                "resources": ["pods"], "scope": "Namespaced"}]),
        "only pod CREATE"
    );
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(webhook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(
        webhook["reinvocationPolicy"], "Never",
        "a reinvocation would meet the not-already-injected condition"
    );
    assert_eq!(webhook["failurePolicy"], expected.failure_policy);
    let timeout = webhook["timeoutSeconds"]
        .as_i64()
        .expect("timeoutSeconds set");
    assert!((1..=10).contains(&timeout), "short timeout, got {timeout}");

    let service = &webhook["clientConfig"]["service"];
    assert_eq!(service["path"], "/mutate");
    assert_eq!(service["namespace"], expected.namespace);
    let target = named(
        documents,
        "Service",
        service["name"].as_str().expect("service name"),
    );
    assert_eq!(target["metadata"]["namespace"], expected.namespace);
    let port = service["port"].as_i64().unwrap_or(443);
    assert!(
        target["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|p| p["port"] == port && p["targetPort"] == "https"),
        "the webhook's Service port {port} goes to the https port"
    );

    // Opted-in namespaces only, never the system ones nor our own.
    let inject_key = format!("{}/inject", expected.domain);
    let namespaces = &webhook["namespaceSelector"];
    assert_eq!(namespaces["matchLabels"][&inject_key], "enabled");
    let excluded = namespaces["matchExpressions"]
        .as_array()
        .expect("namespaceSelector.matchExpressions")
        .iter()
        .find(|e| e["key"] == "kubernetes.io/metadata.name" && e["operator"] == "NotIn")
        .expect("a NotIn on kubernetes.io/metadata.name");
    let excluded = strings(&excluded["values"]);
    for namespace in SYSTEM_NAMESPACES.iter().chain([&expected.namespace]) {
        assert!(
            excluded.contains(namespace),
            "{namespace} is not excluded: {excluded:?}"
        );
    }
    // Pods opted out by label never reach the webhook.
    let objects = webhook["objectSelector"]["matchExpressions"]
        .as_array()
        .expect("objectSelector.matchExpressions");
    assert!(
        objects.iter().any(|e| e["key"] == inject_key.as_str()
            && e["operator"] == "NotIn"
            && strings(&e["values"]) == ["disabled"]),
        "objectSelector excludes {inject_key}=disabled: {objects:?}"
    );
    // Already injected pods are skipped by CEL before any call.
    let conditions = webhook["matchConditions"]
        .as_array()
        .expect("matchConditions");
    let expression = format!(
        "!has(object.metadata.labels) || !('{}/injected' in object.metadata.labels)",
        expected.domain
    );
    assert!(
        conditions
            .iter()
            .any(|c| c["expression"] == expression.as_str()),
        "matchConditions skip injected pods: {conditions:?}"
    );
}

/// Returns the pod template's labels.
fn check_deployment(documents: &[Value], expected: &Expected) -> serde_json::Map<String, Value> {
    let deployment = one_of_kind(documents, "Deployment");
    assert_eq!(deployment["metadata"]["namespace"], expected.namespace);
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2, "two replicas");
    let template = &spec["template"];
    let labels = template["metadata"]["labels"]
        .as_object()
        .expect("pod labels")
        .clone();
    assert_eq!(
        labels.get(&format!("{}/inject", expected.domain)),
        Some(&json!("disabled")),
        "the webhook pod opts itself out"
    );
    for (key, value) in spec["selector"]["matchLabels"]
        .as_object()
        .expect("selector")
    {
        assert_eq!(
            labels.get(key),
            Some(value),
            "selector {key} matches the pod"
        );
    }

    let pod = &template["spec"];
    let anti =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    let terms = anti.as_array().expect("preferred pod anti-affinity");
    assert!(
        terms.iter().any(
            |t| t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
                && t["podAffinityTerm"]["labelSelector"]["matchLabels"]
                    .as_object()
                    .is_some_and(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
        ),
        "anti-affinity by hostname against our own pods: {terms:?}"
    );

    let pod_security = &pod["securityContext"];
    assert_eq!(pod_security["runAsNonRoot"], true);
    assert_eq!(pod_security["seccompProfile"]["type"], "RuntimeDefault");

    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert!(
        security["runAsNonRoot"] == true || pod_security["runAsNonRoot"] == true,
        "runs as non-root"
    );
    assert!(
        security.get("privileged").is_none_or(|p| p == false),
        "not privileged"
    );

    let ports = container["ports"].as_array().expect("ports");
    let port_named = |name: &str| {
        ports
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_i64())
            .unwrap_or_else(|| panic!("no container port named {name}"))
    };
    assert_eq!(port_named("https"), 8443, "webhook TLS port");
    assert_eq!(port_named("admin"), 9090, "admin port");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/livez")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe} path");
        assert!(
            get["port"] == "admin" || get["port"] == 9090,
            "{probe} on the admin port, got {}",
            get["port"]
        );
    }

    let args = strings(&container["args"]);
    assert_eq!(args.first(), Some(&"serve"), "runs serve: {args:?}");
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("--{name}=… missing from {args:?}"))
    };
    assert_eq!(flag("log-format"), "json");
    let drain: i64 = flag("drain-seconds").parse().expect("drain seconds");
    let shutdown: i64 = flag("shutdown-timeout-seconds")
        .parse()
        .expect("shutdown seconds");
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > drain + shutdown,
        "terminationGracePeriodSeconds {grace} must exceed drain {drain} + shutdown {shutdown}"
    );

    let env = container["env"].as_array().expect("env");
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert!(
            env.iter()
                .any(|e| e["name"] == name && e["valueFrom"]["fieldRef"]["fieldPath"] == field),
            "{name} from the downward API"
        );
    }

    // TLS files and the config file come from mounted volumes.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mount_of = |path: &str| {
        let mount = container["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .find(|m| {
                m["mountPath"]
                    .as_str()
                    .is_some_and(|dir| Path::new(path).parent() == Some(Path::new(dir)))
            })
            .unwrap_or_else(|| panic!("{path} is not in a mounted volume"));
        volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]))
    };
    for file in [flag("tls-cert"), flag("tls-key")] {
        assert!(
            mount_of(file)["secret"]["secretName"].is_string(),
            "{file} comes from a Secret"
        );
    }
    let config_file = flag("config");
    let config_map = mount_of(config_file)["configMap"]["name"]
        .as_str()
        .expect("config from a ConfigMap");
    let file_name = Path::new(config_file)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        named(documents, "ConfigMap", config_map)["data"][file_name].is_string(),
        "ConfigMap {config_map} has {file_name}"
    );
    labels
}

fn check_service_and_pdb(documents: &[Value], pod_labels: &serde_json::Map<String, Value>) {
    let matches_pod = |selector: &Value| {
        let selector = selector.as_object().expect("selector");
        !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    let service = one_of_kind(documents, "Service");
    assert!(
        matches_pod(&service["spec"]["selector"]),
        "Service selects the webhook pods"
    );
    let pdb = one_of_kind(documents, "PodDisruptionBudget");
    assert!(
        matches_pod(&pdb["spec"]["selector"]["matchLabels"]),
        "PDB selects the webhook pods"
    );
    assert_eq!(pdb["spec"]["minAvailable"], 1);
}

fn check_cluster_role(role: &Value) {
    let rules = role["rules"].as_array().expect("rules");
    assert!(!rules.is_empty());
    for rule in rules {
        for field in ["apiGroups", "resources", "verbs"] {
            let values = strings(&rule[field]);
            assert!(!values.is_empty(), "rule without {field}: {rule}");
            assert!(
                !values.iter().any(|v| v.contains('*')),
                "wildcard in {field}: {rule}"
            );
        }
        assert!(
            !strings(&rule["resources"]).contains(&"secrets"),
            "the ClusterRole must not grant secrets: {rule}"
        );
        assert!(
            rule.get("nonResourceURLs").is_none(),
            "no nonResourceURLs: {rule}"
        );
        for verb in strings(&rule["verbs"]) {
            assert!(
                !["escalate", "bind", "impersonate", "deletecollection"].contains(&verb),
                "verb {verb} is never needed: {rule}"
            );
        }
    }
}

fn check_bindings(documents: &[Value], namespace: &str) {
    let account = one_of_kind(documents, "ServiceAccount");
    let account_name = &account["metadata"]["name"];
    let deployment = one_of_kind(documents, "Deployment");
    assert_eq!(
        &deployment["spec"]["template"]["spec"]["serviceAccountName"],
        account_name
    );
    for (kind, role_kind) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let binding = one_of_kind(documents, kind);
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": account_name, "namespace": namespace}])
        );
        assert_eq!(binding["roleRef"]["kind"], role_kind);
        named(
            documents,
            role_kind,
            binding["roleRef"]["name"].as_str().expect("roleRef name"),
        );
    }
    let lease_role = one_of_kind(documents, "Role");
    assert_eq!(lease_role["metadata"]["namespace"], namespace);
    assert_eq!(
        lease_role["rules"],
        json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                "verbs": ["get", "create", "update"]}])
    );
}

/// The config file the Deployment reads is accepted by the real binary;
/// returns what `chiller-metrics config` prints for it.
fn check_config_accepted(documents: &[Value]) -> String {
    let deployment = one_of_kind(documents, "Deployment");
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    let path = args
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("--config");
    let file_name = Path::new(path).file_name().unwrap().to_str().unwrap();
    let text = documents
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .find_map(|d| d["data"][file_name].as_str())
        .expect("the config ConfigMap");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(file_name);
    std::fs::write(&file, text).expect("write config");
    let output = Command::new(BINARY)
        .arg("config")
        .arg("--config")
        .arg(&file)
        .env_remove("CHILLER_METRICS_CONFIG")
        .env_remove("CHILLER_METRICS_SIDECAR_IMAGE")
        .env_remove("CHILLER_METRICS_SIDECAR_MODE")
        .env_remove("CHILLER_METRICS_GRAFANA_NAMESPACE")
        .output()
        .expect("run chiller-metrics config");
    assert!(
        output.status.success(),
        "chiller-metrics config rejects the rendered config:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The serving certificate's Secret is the one the Deployment mounts.
fn check_tls_secret_mounted(documents: &[Value], secret_name: &str) {
    let deployment = one_of_kind(documents, "Deployment");
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    assert!(
        volumes
            .iter()
            .any(|v| v["secret"]["secretName"] == secret_name),
        "the Deployment mounts Secret {secret_name}: {volumes:?}"
    );
}

fn check_cert_manager_wiring(documents: &[Value], namespace: &str) {
    let configuration = one_of_kind(documents, "MutatingWebhookConfiguration");
    let inject_from = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        .as_str()
        .expect("cert-manager.io/inject-ca-from annotation");
    let (cert_namespace, cert_name) = inject_from.split_once('/').expect("namespace/name");
    assert_eq!(cert_namespace, namespace);
    let certificate = named(documents, "Certificate", cert_name);
    assert_eq!(certificate["metadata"]["namespace"], namespace);
    assert!(
        configuration["webhooks"][0]["clientConfig"]
            .get("caBundle")
            .is_none(),
        "cert-manager fills the caBundle"
    );
    let service = one_of_kind(documents, "Service");
    let service_name = service["metadata"]["name"].as_str().unwrap();
    let dns = strings(&certificate["spec"]["dnsNames"]);
    assert!(
        dns.contains(&format!("{service_name}.{namespace}.svc").as_str()),
        "the certificate names the Service: {dns:?}"
    );
    check_tls_secret_mounted(
        documents,
        certificate["spec"]["secretName"].as_str().unwrap(),
    );
    // Its issuer is rendered too, and a CA issuer's secret is a CA Certificate.
    let issuer_name = certificate["spec"]["issuerRef"]["name"].as_str().unwrap();
    let issuer = named(documents, "Issuer", issuer_name);
    if let Some(ca_secret) = issuer["spec"]["ca"]["secretName"].as_str() {
        assert!(
            all_of_kind(documents, "Certificate")
                .iter()
                .any(|c| c["spec"]["secretName"] == ca_secret && c["spec"]["isCA"] == true),
            "the CA Issuer's Secret {ca_secret} comes from a CA Certificate"
        );
    }
}

fn check_tls_secret(documents: &[Value], ca_bundle_base64: &str) {
    let configuration = one_of_kind(documents, "MutatingWebhookConfiguration");
    assert_eq!(
        configuration["webhooks"][0]["clientConfig"]["caBundle"],
        ca_bundle_base64
    );
    let ca = base64::engine::general_purpose::STANDARD
        .decode(ca_bundle_base64)
        .expect("caBundle is base64");
    assert!(
        String::from_utf8_lossy(&ca).contains("BEGIN CERTIFICATE"),
        "caBundle is a PEM CA"
    );
    let secret = all_of_kind(documents, "Secret")
        .into_iter()
        .find(|s| s["type"] == "kubernetes.io/tls")
        .expect("a kubernetes.io/tls Secret");
    for key in ["tls.crt", "tls.key"] {
        let value = secret_data(secret, key);
        base64::engine::general_purpose::STANDARD
            .decode(&value)
            .unwrap_or_else(|e| panic!("{key} is not base64: {e}"));
    }
    check_tls_secret_mounted(documents, secret["metadata"]["name"].as_str().unwrap());
}

/// A Secret's base64 value without the line breaks kustomize folds it with
/// (the API server's decoder skips them too).
fn secret_data(secret: &Value, key: &str) -> String {
    secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("Secret has no {key}"))
        .replace(['\n', '\r'], "")
}

/// A CA and serving certificate from the real binary.
fn generate_certs(dir: &Path, dns: &str) {
    run(Command::new(BINARY)
        .args(["certs", "--out"])
        .arg(dir)
        .args(["--dns", dns]));
}

fn read_base64(file: &Path) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(file).expect("read cert"))
}

// ------------------------------------------------------------------- helm

#[test]
fn helm_lint_passes_for_every_certificate_mode() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), "chiller-metrics.chiller-metrics.svc");
    let ca = read_base64(&certs.path().join("ca.crt"));
    let values_file = certs.path().join("self-managed.yaml");
    std::fs::write(
        &values_file,
        serde_json::to_string(&json!({"certs": {"mode": "selfManaged", "selfManaged": {
            "caBundle": ca,
            "cert": std::fs::read_to_string(certs.path().join("tls.crt")).unwrap(),
            "key": std::fs::read_to_string(certs.path().join("tls.key")).unwrap(),
        }}}))
        .unwrap(),
    )
    .unwrap();
    for extra in [
        vec![],
        vec!["--set", "certs.mode=generated"],
        vec!["--set", "webhook.failurePolicy=Fail"],
        vec!["-f", values_file.to_str().unwrap()],
    ] {
        let output = run(helm()
            .args(["lint", "--strict", "--namespace", "chiller-metrics"])
            .arg(crate_path(CHART))
            .args(&extra));
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            text.contains("0 chart(s) failed"),
            "helm lint {extra:?}:\n{text}"
        );
        assert!(
            !text.contains("[ERROR]") && !text.contains("[WARNING]"),
            "helm lint {extra:?}:\n{text}"
        );
    }
}

#[test]
fn chart_defaults_are_safe_and_valid() {
    let documents = render_chart("chiller-metrics", &[]);
    check_install(&documents, &Expected::default());
    check_cert_manager_wiring(&documents, "chiller-metrics");
}

#[test]
fn chart_excludes_the_release_namespace_wherever_it_is_installed() {
    let documents = render_chart("observability", &[]);
    check_install(
        &documents,
        &Expected {
            namespace: "observability",
            ..Expected::default()
        },
    );
    check_cert_manager_wiring(&documents, "observability");
}

#[test]
fn chart_never_injects_kube_system_whatever_the_values_say() {
    let output =
        run(helm_template("chiller-metrics", &[])
            .args(["--set-json", "webhook.excludeNamespaces=[]"]));
    let documents = parse_documents(&String::from_utf8_lossy(&output.stdout));
    let webhook = &one_of_kind(&documents, "MutatingWebhookConfiguration")["webhooks"][0];
    let excluded = webhook["namespaceSelector"]["matchExpressions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "kubernetes.io/metadata.name" && e["operator"] == "NotIn")
        .expect("a NotIn on the namespace name");
    assert_eq!(
        excluded["values"],
        json!(["kube-system", "chiller-metrics"])
    );
}

#[test]
fn chart_scrapes_its_own_metrics_where_the_prometheus_operator_runs() {
    let without = render_chart("chiller-metrics", &[]);
    assert!(
        all_of_kind(&without, "ServiceMonitor").is_empty(),
        "no CRD, no ServiceMonitor"
    );

    let output = run(helm_template(
        "chiller-metrics",
        &["serviceMonitor.labels.release=monitoring"],
    )
    .args(["--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"]));
    let with = parse_documents(&String::from_utf8_lossy(&output.stdout));
    let monitor = one_of_kind(&with, "ServiceMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "monitoring");
    assert_eq!(
        monitor["spec"]["endpoints"],
        json!([{"port": "admin", "path": "/metrics", "interval": "30s"}])
    );
    let service = one_of_kind(&with, "Service");
    let selected = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    assert!(
        selected
            .iter()
            .all(|(k, v)| service["metadata"]["labels"][k] == *v),
        "the ServiceMonitor selects the chart's Service: {selected:?}"
    );
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "admin"),
        "the Service has the admin port"
    );
    support::validate_crd(monitor).expect("a valid ServiceMonitor");
}

#[test]
fn chart_cert_manager_mode_can_use_an_existing_issuer() {
    let documents = render_chart(
        "chiller-metrics",
        &[
            "certs.certManager.issuerRef.name=corp-ca",
            "certs.certManager.issuerRef.kind=ClusterIssuer",
        ],
    );
    validate_all(&documents);
    assert!(
        all_of_kind(&documents, "Issuer").is_empty(),
        "no own Issuer with an issuerRef"
    );
    let certificate = one_of_kind(&documents, "Certificate");
    assert_eq!(
        certificate["spec"]["issuerRef"],
        json!({"name": "corp-ca", "kind": "ClusterIssuer"})
    );
}

#[test]
fn chart_failure_policy_fail_still_only_affects_opted_in_namespaces() {
    let documents = render_chart("chiller-metrics", &["webhook.failurePolicy=Fail"]);
    check_install(
        &documents,
        &Expected {
            failure_policy: "Fail",
            ..Expected::default()
        },
    );
}

#[test]
fn chart_single_replica_has_no_pdb_that_would_block_drains() {
    let documents = render_chart("chiller-metrics", &["replicas=1"]);
    validate_all(&documents);
    assert_eq!(one_of_kind(&documents, "Deployment")["spec"]["replicas"], 1);
    assert!(all_of_kind(&documents, "PodDisruptionBudget").is_empty());
    let documents = render_chart("chiller-metrics", &["replicas=3"]);
    assert_eq!(one_of_kind(&documents, "Deployment")["spec"]["replicas"], 3);
    assert_eq!(
        one_of_kind(&documents, "PodDisruptionBudget")["spec"]["minAvailable"],
        1
    );
}

#[test]
fn chart_rejects_unsafe_or_incomplete_values() {
    for (values, message) in [
        (
            vec!["webhook.failurePolicy=Sometimes"],
            "webhook.failurePolicy must be Ignore or Fail",
        ),
        (
            vec!["certs.mode=selfManaged"],
            "needs certs.selfManaged.caBundle",
        ),
        (
            vec!["certs.mode=selfManaged", "certs.selfManaged.caBundle=Zm9v"],
            "existingSecret, or cert and key",
        ),
        (
            vec!["certs.mode=manual"],
            "certs.mode must be certManager, selfManaged or generated",
        ),
    ] {
        // The templates' own checks, behind the values schema.
        let output = helm_template("chiller-metrics", &values)
            .arg("--skip-schema-validation")
            .output()
            .expect("run helm");
        assert!(
            !output.status.success(),
            "helm template accepted {values:?}"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(message),
            "{values:?}: expected {message:?} in:\n{stderr}"
        );
    }
}

#[test]
fn chart_renders_a_custom_config_file_the_binary_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        "config:\n  domain: metrics.example.com\n  sidecar:\n    image: registry.example.com/statsd-exporter:v0.28.0\n    mode: native\n  reconcile:\n    grafanaNamespace: monitoring\n    resyncSeconds: 120\n    prometheus:\n      retention: 3d\n",
    )
    .unwrap();
    let output = run(helm_template("chiller-metrics", &[]).arg("-f").arg(&values));
    let documents = parse_documents(&String::from_utf8_lossy(&output.stdout));
    check_install(
        &documents,
        &Expected {
            domain: "metrics.example.com",
            ..Expected::default()
        },
    );
    let effective: Value = serde_norway::from_str(&check_config_accepted(&documents))
        .expect("chiller-metrics config prints YAML");
    assert_eq!(effective["domain"], "metrics.example.com");
    assert_eq!(
        effective["sidecar"]["image"],
        "registry.example.com/statsd-exporter:v0.28.0"
    );
    assert_eq!(effective["sidecar"]["mode"], "native");
    assert_eq!(effective["reconcile"]["grafanaNamespace"], "monitoring");
    assert_eq!(effective["reconcile"]["resyncSeconds"], 120);
    assert_eq!(effective["reconcile"]["prometheus"]["retention"], "3d");
    // A changed config rolls the pods.
    let defaults = render_chart("chiller-metrics", &[]);
    let checksum = |documents: &[Value]| {
        one_of_kind(documents, "Deployment")["spec"]["template"]["metadata"]["annotations"]
            ["checksum/config"]
            .clone()
    };
    assert_ne!(checksum(&defaults), checksum(&documents));
}

#[test]
fn chart_values_schema_embeds_the_binarys_config_schema() {
    let output = run(Command::new(BINARY).args(["config", "--schema"]));
    let generated: Value = serde_json::from_slice(&output.stdout).expect("a JSON schema");
    assert_eq!(generated["additionalProperties"], false, "{generated:#}");
    let path = crate_path("manifests/chart/chiller-metrics/values.schema.json");
    let mut schema: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("JSON");
    if support::updating_golden() {
        schema["properties"]["config"] = generated;
        std::fs::write(&path, serde_json::to_string_pretty(&schema).unwrap() + "\n").unwrap();
        return;
    }
    assert_eq!(
        schema["properties"]["config"], generated,
        "values.schema.json is stale: `UPDATE_GOLDEN=1 cargo test --test offline -- manifests::` regenerates it"
    );
}

#[test]
fn a_typo_in_the_values_fails_helm_at_install() {
    for (value, named) in [
        ("config.sidecar.typo=1", "typo"),
        ("config.reconcile.resyncSeconds=soon", "resyncSeconds"),
        ("replicaz=2", "replicaz"),
        ("webhook.failurePolicy=Sometimes", "failurePolicy"),
        ("serviceMonitor.interval=often", "interval"),
    ] {
        let output = helm_template("chiller-metrics", &[value])
            .output()
            .expect("run helm");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "helm accepted {value}");
        assert!(
            stderr.contains("schema") && stderr.contains(named),
            "{value}: the error should name the schema and {named:?}:\n{stderr}"
        );
    }
}

#[test]
fn chart_config_with_an_unknown_key_is_rejected_by_the_binary() {
    // Guards check_config_accepted itself: a typo in the config must fail,
    // even where the values schema is skipped.
    let output = run(
        helm_template("chiller-metrics", &["config.sidecar.imag=typo"])
            .arg("--skip-schema-validation"),
    );
    let documents = parse_documents(&String::from_utf8_lossy(&output.stdout));
    let result = std::panic::catch_unwind(|| check_config_accepted(&documents));
    assert!(result.is_err(), "a config with an unknown key was accepted");
}

#[test]
fn chart_generated_certificates_match_the_ca_bundle() {
    let documents = render_chart("chiller-metrics", &["certs.mode=generated"]);
    check_install(&documents, &Expected::default());
    assert!(all_of_kind(&documents, "Certificate").is_empty());
    let secret = all_of_kind(&documents, "Secret")
        .into_iter()
        .find(|s| s["type"] == "kubernetes.io/tls")
        .expect("tls Secret");
    let ca = secret["data"]["ca.crt"].as_str().expect("ca.crt");
    check_tls_secret(&documents, ca);
}

#[test]
fn chart_self_managed_certificates_are_used_as_given() {
    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path(), "chiller-metrics.chiller-metrics.svc");
    let ca = read_base64(&certs.path().join("ca.crt"));
    let cert = std::fs::read_to_string(certs.path().join("tls.crt")).unwrap();
    let values = certs.path().join("values.yaml");
    std::fs::write(
        &values,
        serde_json::to_string(&json!({"certs": {"mode": "selfManaged", "selfManaged": {
            "caBundle": ca, "cert": cert,
            "key": std::fs::read_to_string(certs.path().join("tls.key")).unwrap(),
        }}}))
        .unwrap(),
    )
    .unwrap();
    let output = run(helm_template("chiller-metrics", &[]).arg("-f").arg(&values));
    let documents = parse_documents(&String::from_utf8_lossy(&output.stdout));
    check_install(&documents, &Expected::default());
    check_tls_secret(&documents, &ca);
    let secret = one_of_kind(&documents, "Secret");
    assert_eq!(
        secret_data(secret, "tls.crt"),
        read_base64(&certs.path().join("tls.crt"))
    );

    // With an existing Secret, the chart renders none and mounts that one.
    let documents = render_chart(
        "chiller-metrics",
        &[
            "certs.mode=selfManaged",
            &format!("certs.selfManaged.caBundle={ca}"),
            "certs.selfManaged.existingSecret=webhook-tls",
        ],
    );
    check_install(&documents, &Expected::default());
    assert!(all_of_kind(&documents, "Secret").is_empty());
    check_tls_secret_mounted(&documents, "webhook-tls");
}

// -------------------------------------------------------------- kustomize

#[test]
fn kustomize_cert_manager_overlay_is_safe_and_valid() {
    let documents = kustomize(&crate_path("manifests/overlays/cert-manager"));
    check_install(&documents, &Expected::default());
    check_cert_manager_wiring(&documents, "chiller-metrics");
    let namespace = one_of_kind(&documents, "Namespace");
    assert_eq!(namespace["metadata"]["name"], "chiller-metrics");
    assert!(
        namespace["metadata"]["labels"]
            .get(format!("{DOMAIN}/inject"))
            .is_none(),
        "the injector's namespace never opts in"
    );
}

#[test]
fn kustomize_self_managed_overlay_uses_the_generated_certificates() {
    // The README's steps on a copy of manifests/: certs, fill-certs.sh, kustomize.
    let work = tempfile::tempdir().unwrap();
    let manifests = work.path().join("manifests");
    copy_dir(&crate_path("manifests"), &manifests);
    let certs = work.path().join("certs");
    generate_certs(&certs, "chiller-metrics.chiller-metrics.svc");
    let overlay = manifests.join("overlays/self-managed");
    run(Command::new(overlay.join("fill-certs.sh")).arg(&certs));
    let documents = kustomize(&overlay);
    check_install(&documents, &Expected::default());
    check_tls_secret(&documents, &read_base64(&certs.join("ca.crt")));
    let secret = one_of_kind(&documents, "Secret");
    assert_eq!(
        secret_data(secret, "tls.key"),
        read_base64(&certs.join("tls.key"))
    );
}

#[test]
fn self_managed_fill_script_refuses_missing_certificates() {
    let work = tempfile::tempdir().unwrap();
    let manifests = work.path().join("manifests");
    copy_dir(&crate_path("manifests"), &manifests);
    let output = Command::new(manifests.join("overlays/self-managed/fill-certs.sh"))
        .arg(work.path().join("no-such-dir"))
        .output()
        .expect("run fill-certs.sh");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("make certs"));
}

#[test]
fn chart_and_kustomize_grant_the_same_cluster_permissions() {
    let chart = render_chart("chiller-metrics", &[]);
    let plain = kustomize(&crate_path("manifests/overlays/cert-manager"));
    assert_eq!(
        one_of_kind(&chart, "ClusterRole")["rules"],
        one_of_kind(&plain, "ClusterRole")["rules"],
        "manifests/base/rbac.yaml and the chart's rbac.yaml differ"
    );
    assert_eq!(
        one_of_kind(&chart, "Role")["rules"],
        one_of_kind(&plain, "Role")["rules"]
    );
    let webhook = |d: &[Value]| {
        let mut w = one_of_kind(d, "MutatingWebhookConfiguration")["webhooks"][0].clone();
        w["clientConfig"]["service"]["name"] = Value::Null;
        w
    };
    assert_eq!(
        webhook(&chart),
        webhook(&plain),
        "the two webhook configurations differ"
    );
    for kind in [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        assert_eq!(
            words_only(&one_of_kind(&chart, kind)["spec"]),
            words_only(&one_of_kind(&plain, kind)["spec"]),
            "manifests/base/admission-policy.yaml and the chart's {kind} differ"
        );
    }
}

/// `value` with every string's whitespace runs made one space: kustomize
/// re-folds the CEL expressions' YAML block scalars.
fn words_only(value: &Value) -> Value {
    match value {
        Value::String(text) => Value::String(text.split_whitespace().collect::<Vec<_>>().join(" ")),
        Value::Array(items) => Value::Array(items.iter().map(words_only).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| (key.clone(), words_only(value)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `(apiGroup, resource, verb)` triples a set of RBAC rules grants.
fn grants(rules: &Value) -> BTreeSet<(String, String, String)> {
    let mut granted = BTreeSet::new();
    for rule in rules.as_array().expect("rules") {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    granted.insert((group.to_string(), resource.to_string(), verb.to_string()));
                }
            }
        }
    }
    granted
}

#[test]
fn cluster_role_covers_what_the_reconciler_applies() {
    let install = kustomize(&crate_path("manifests/overlays/cert-manager"));
    let granted = grants(&one_of_kind(&install, "ClusterRole")["rules"]);
    let output = run(Command::new(BINARY).args([
        "render",
        "--namespace",
        "shop",
        "--postgres",
        "db:5432/chiller",
        "--postgres-secret",
        "db-auth",
    ]));
    let objects = parse_documents(&String::from_utf8_lossy(&output.stdout));
    let mut missing = BTreeSet::new();
    for object in &objects {
        let api_version = object["apiVersion"].as_str().expect("apiVersion");
        let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
        let kind = object["kind"].as_str().expect("kind").to_lowercase();
        let resource = if kind.ends_with('s') {
            format!("{kind}es")
        } else {
            format!("{kind}s")
        };
        // Server-side apply (patch, and create for a new object), list and
        // watch, delete on opt-out, and get until the watch caches sync.
        for verb in ["get", "list", "watch", "create", "patch", "delete"] {
            let triple = (group.to_string(), resource.clone(), verb.to_string());
            if !granted.contains(&triple) {
                missing.insert(triple);
            }
        }
        // Creating a Role needs every permission it grants (escalation check).
        if object["kind"] == "Role" {
            missing.extend(grants(&object["rules"]).difference(&granted).cloned());
        }
    }
    assert!(
        objects.iter().any(|o| o["kind"] == "Role"),
        "render shows the Prometheus Role"
    );
    assert!(
        missing.is_empty(),
        "the ClusterRole lacks (apiGroup, resource, verb): {missing:?}"
    );
}

#[test]
fn kube_prometheus_stack_values_keep_namespaces_isolated() {
    let text = std::fs::read_to_string(crate_path("manifests/kube-prometheus-stack-values.yaml"))
        .expect("values file");
    let values: Value = serde_norway::from_str(&text).expect("values are YAML");
    assert_eq!(
        values["prometheus"]["enabled"], false,
        "no stack-wide Prometheus"
    );
    assert_eq!(
        values["prometheusOperator"]["namespaces"],
        json!({}),
        "operator on all namespaces"
    );
    let sidecar = &values["grafana"]["sidecar"];
    for (kind, label) in [
        ("dashboards", "grafana_dashboard"),
        ("datasources", "grafana_datasource"),
    ] {
        assert_eq!(sidecar[kind]["enabled"], true);
        assert_eq!(sidecar[kind]["label"], label);
        assert_eq!(sidecar[kind]["labelValue"], "1");
        assert_eq!(sidecar[kind]["searchNamespace"], "ALL");
    }
}

#[test]
fn e2e_test_app_chart_is_valid() {
    // Checked here so that a typo fails in seconds, not in a kind run.
    let output = run(helm()
        .args(["template", "app"])
        .arg(crate_path("tests/e2e/chart"))
        .args(["--namespace", "shop-a"]));
    let documents = parse_documents(&String::from_utf8_lossy(&output.stdout));
    validate_all(&documents);
    for name in ["frontend", "api", "db"] {
        let deployment = named(&documents, "Deployment", name);
        assert_eq!(
            deployment["spec"]["template"]["metadata"]["labels"]["app"],
            name
        );
        named(&documents, "Service", name);
    }
    let secret = named(&documents, "Secret", "db-auth");
    for key in ["username", "password"] {
        assert!(secret["stringData"][key].is_string(), "db-auth has {key}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
