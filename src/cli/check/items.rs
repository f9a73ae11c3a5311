//! The checks, as pure functions over what was fetched: each gives one
//! [`Item`], with a hint when it fails.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{Namespace, Pod},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    jiff::Timestamp,
};
use kube::ResourceExt;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde_json::Value;

use super::{
    CheckError,
    report::{Item, ItemHead},
    tls,
};
use crate::{
    cluster::policy_from_namespace,
    inject::Injector,
    keys::{ENABLED, Keys},
    reconcile::pod_state::{PodState, classify, recorded_config_hash},
};

/// What was fetched, or why it could not be.
pub type Fetched<T> = Result<T, CheckError>;

pub const WEBHOOK: &str = "webhook";
pub const DEPLOYMENT: &str = "webhook deployment";
pub const OPERATOR: &str = "prometheus operator";
pub const RECONCILE: &str = "reconcile loop";
pub const PODS: &str = "opted-in pods";

/// The serving certificate must stay valid at least this long.
pub const MIN_CERT_DAYS: i64 = 30;
const DAY: i64 = 86_400;

/// The CRDs the reconcile loop applies objects of.
pub const MONITORING_CRDS: [&str; 3] = [
    "prometheuses.monitoring.coreos.com",
    "servicemonitors.monitoring.coreos.com",
    "podmonitors.monitoring.coreos.com",
];

/// Names of the installed objects, for the details and hints.
#[derive(Debug, Clone)]
pub struct Install {
    pub namespace: String,
    pub name: String,
    pub lease: String,
}

/// One webhook of the configuration, and what its endpoint presented.
#[derive(Debug)]
pub struct WebhookProbe {
    /// The webhook's name in the configuration.
    pub webhook: String,
    /// The name the API server verifies: the URL's host, or `SVC.NS.svc`.
    pub server_name: String,
    /// Where we connected; empty if no address could be found.
    pub address: String,
    /// The address came from `--webhook-address`.
    pub overridden: bool,
    /// The configuration addresses a Service (not a URL).
    pub via_service: bool,
    /// The caBundle, decoded (PEM).
    pub ca_bundle: Vec<u8>,
    /// The presented chain, leaf first.
    pub chain: Fetched<Vec<CertificateDer<'static>>>,
}

/// `/readyz` of one pod (or of `--admin-address`).
#[derive(Debug, Clone)]
pub struct ReadyProbe {
    pub target: String,
    pub outcome: Result<(), String>,
}

/// An opted-in namespace and its pods.
#[derive(Debug, Clone)]
pub struct NamespacePods {
    pub namespace: Namespace,
    pub pods: Vec<Pod>,
}

fn when(seconds: i64) -> String {
    Timestamp::from_second(seconds)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| seconds.to_string())
}

pub fn webhook_configuration(
    install: &Install,
    fetched: &Fetched<Option<MutatingWebhookConfiguration>>,
) -> Item {
    let item = ItemHead::new(
        "webhook-configuration",
        WEBHOOK,
        format!("the MutatingWebhookConfiguration {} exists", install.name),
    );
    let reinstall = format!(
        "reinstall the release: `helm upgrade --install {name} manifests/chart/chiller-metrics -n {ns}` (or `kubectl apply -k manifests/overlays/...` again)",
        name = install.name,
        ns = install.namespace
    );
    match fetched {
        Ok(Some(configuration)) => {
            let webhooks = configuration.webhooks.as_deref().unwrap_or_default();
            if webhooks.is_empty() {
                return item.fail(
                    "it has no webhooks",
                    reinstall,
                );
            }
            let lines: Vec<String> = webhooks
                .iter()
                .map(|w| {
                    let client = &w.client_config;
                    let target = match (&client.url, &client.service) {
                        (Some(url), _) => format!("url {url}"),
                        (None, Some(s)) => format!(
                            "service {}/{}:{}{}",
                            s.namespace,
                            s.name,
                            s.port.unwrap_or(443),
                            s.path.as_deref().unwrap_or("")
                        ),
                        (None, None) => "no url or service".into(),
                    };
                    format!(
                        "{} → {target} (failurePolicy {})",
                        w.name,
                        w.failure_policy.as_deref().unwrap_or("Fail")
                    )
                })
                .collect();
            item.pass(
                lines.join("\n"),
            )
        }
        Ok(None) => item.fail(
            format!(
                "MutatingWebhookConfiguration {} not found: the API server calls no webhook, so no pod is injected",
                install.name
            ),
            reinstall,
        ),
        Err(error) => item.fail(
            error.to_string(),
            "your kubeconfig's user needs get on mutatingwebhookconfigurations (admissionregistration.k8s.io)",
        ),
    }
}

fn unreachable_hint(probe: &WebhookProbe, install: &Install) -> String {
    if probe.via_service && !probe.overridden {
        format!(
            "the webhook pods may not be reachable from where check runs: forward a port and pass it, e.g. `kubectl -n {ns} port-forward svc/{name} 8443:443` and `--webhook-address 127.0.0.1:8443`; if the Service has no ready endpoint, see the deployment items below",
            ns = install.namespace,
            name = install.name
        )
    } else {
        format!(
            "is the webhook running and listening at {}? `kubectl -n {} get pods` and their logs",
            probe.address, install.namespace
        )
    }
}

pub fn ca_bundle(
    install: &Install,
    configuration_exists: bool,
    probes: &[WebhookProbe],
    now: UnixTime,
) -> Item {
    let item = ItemHead::new(
        "webhook-ca-bundle",
        WEBHOOK,
        "its caBundle verifies the certificate the webhook presents",
    );
    if !configuration_exists || probes.is_empty() {
        return item.skipped("not checked: no webhook configuration");
    }
    let mut passed = Vec::new();
    for probe in probes {
        let chain = match &probe.chain {
            Ok(chain) => chain,
            Err(error) => {
                return item.fail(
                    format!("{}: {error}", probe.webhook),
                    unreachable_hint(probe, install),
                );
            }
        };
        if probe.ca_bundle.iter().all(u8::is_ascii_whitespace) {
            return item.fail(
                format!(
                    "{}: the caBundle is empty, so the API server trusts only its system roots, which did not sign the webhook's certificate",
                    probe.webhook
                ),
                format!(
                    "with cert-manager, its CA injector fills the caBundle: check `kubectl -n {ns} describe certificate {name}-serving` and that cainjector runs; self-managed: `helm upgrade {name} ... --set certs.selfManaged.caBundle=$(base64 -w0 certs/ca.crt)`",
                    ns = install.namespace,
                    name = install.name
                ),
            );
        }
        match tls::verify(chain, &probe.ca_bundle, &probe.server_name, now) {
            Ok(()) => passed.push(format!(
                "{}: the certificate presented at {} for {} is signed by a CA in the caBundle",
                probe.webhook, probe.address, probe.server_name
            )),
            Err(reason) => {
                return item.fail(
                    format!(
                        "{}: {reason} (presented at {} for {})",
                        probe.webhook, probe.address, probe.server_name
                    ),
                    format!(
                        "the caBundle must hold the CA that signed the serving certificate in Secret {ns}/{name}-tls: self-managed, run `make certs` again and apply both, or `helm upgrade {name} ... --set certs.selfManaged.caBundle=$(base64 -w0 certs/ca.crt)`; with cert-manager, check `kubectl -n {ns} describe certificate {name}-serving` and the annotation cert-manager.io/inject-ca-from",
                        ns = install.namespace,
                        name = install.name
                    ),
                );
            }
        }
    }
    item.pass(passed.join("\n"))
}

pub fn certificate_expiry(
    install: &Install,
    configuration_exists: bool,
    probes: &[WebhookProbe],
    now: i64,
) -> Item {
    let item = ItemHead::new(
        "webhook-certificate",
        WEBHOOK,
        format!("the serving certificate is valid for {MIN_CERT_DAYS} days or more"),
    );
    if !configuration_exists || probes.is_empty() {
        return item.skipped("not checked: no webhook configuration");
    }
    let mut lines = Vec::new();
    for probe in probes {
        let leaf = match &probe.chain {
            Ok(chain) => chain.first(),
            Err(_) => None,
        };
        let Some(leaf) = leaf else {
            return item.skipped(format!(
                "not checked: {} presented no certificate",
                probe.webhook
            ));
        };
        let not_after = match tls::not_after(leaf) {
            Ok(seconds) => seconds,
            Err(reason) => {
                return item.fail(reason, "serve a valid X.509 certificate");
            }
        };
        let days = (not_after - now).div_euclid(DAY);
        if not_after - now < MIN_CERT_DAYS * DAY {
            let state = if not_after <= now {
                format!("expired at {}", when(not_after))
            } else {
                format!("expires at {} (in {days} days)", when(not_after))
            };
            return item.fail(
                format!(
                    "{}: the certificate presented at {} {state}",
                    probe.webhook, probe.address
                ),
                format!(
                    "renew it: self-managed, run `make certs` again and apply the Secret {ns}/{name}-tls and the caBundle (serve reloads the files, no restart); with cert-manager, check `kubectl -n {ns} describe certificate {name}-serving` (renewal happens before renewBefore)",
                    ns = install.namespace,
                    name = install.name
                ),
            );
        }
        lines.push(format!(
            "{}: expires at {} (in {days} days)",
            probe.webhook,
            when(not_after)
        ));
    }
    item.pass(lines.join("\n"))
}

fn condition_true(deployment: &Deployment, kind: &str) -> bool {
    deployment
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_.as_deref() == Some(kind) && c.status.as_deref() == Some("True"))
        })
}

fn replicas(deployment: &Deployment) -> String {
    let available = deployment
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    let wanted = deployment.spec.replicas.unwrap_or(1);
    format!("{available}/{wanted} replicas available")
}

pub fn deployment_available(install: &Install, fetched: &Fetched<Option<Deployment>>) -> Item {
    let item = ItemHead::new(
        "deployment-available",
        DEPLOYMENT,
        format!("the Deployment {} is available", install.name),
    );
    let hint = format!(
        "run `kubectl -n {ns} rollout status deploy/{name}`, then `kubectl -n {ns} describe pods` and `kubectl -n {ns} logs deploy/{name}`",
        ns = install.namespace,
        name = install.name
    );
    match fetched {
        Ok(Some(deployment)) if condition_true(deployment, "Available") => {
            item.pass(replicas(deployment))
        }
        Ok(Some(deployment)) => item.fail(
            format!("not available: {}", replicas(deployment)),
            hint,
        ),
        Ok(None) => item.fail(
            format!(
                "Deployment {}/{} not found",
                install.namespace, install.name
            ),
            format!(
                "is it installed in namespace {}? pass --namespace and --name of the release; or reinstall it",
                install.namespace
            ),
        ),
        Err(error) => item.fail(error.to_string(), hint),
    }
}

pub fn pods_ready(install: &Install, fetched: &Fetched<Vec<ReadyProbe>>, via_proxy: bool) -> Item {
    let item = ItemHead::new(
        "pods-ready",
        DEPLOYMENT,
        "its pods answer /readyz on the admin port",
    );
    let reach_hint = if via_proxy {
        format!(
            "; if the API server cannot reach the pods, forward a port and pass it: `kubectl -n {ns} port-forward deploy/{name} 9090` and `--admin-address 127.0.0.1:9090`",
            ns = install.namespace,
            name = install.name
        )
    } else {
        String::new()
    };
    let probes = match fetched {
        Ok(probes) => probes,
        Err(error) => {
            return item.fail(
                error.to_string(),
                format!("check the Deployment first{reach_hint}"),
            );
        }
    };
    if probes.is_empty() {
        return item.fail(
            format!("Deployment {} has no pods", install.name),
            format!(
                "run `kubectl -n {} rollout status deploy/{}`",
                install.namespace, install.name
            ),
        );
    }
    let lines: Vec<String> = probes
        .iter()
        .map(|p| match &p.outcome {
            Ok(()) => format!("{}: ready", p.target),
            Err(why) => format!("{}: {why}", p.target),
        })
        .collect();
    if probes.iter().all(|p| p.outcome.is_ok()) {
        item.pass(lines.join("\n"))
    } else {
        item.fail(
            lines.join("\n"),
            format!(
                "a pod that is not ready says why in its log: `kubectl -n {} logs POD` (the namespace watch, the certificate files){reach_hint}",
                install.namespace
            ),
        )
    }
}

fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

const OPERATOR_INSTALL: &str = "install kube-prometheus-stack with our values: `helm install monitoring kube-prometheus-stack --repo https://prometheus-community.github.io/helm-charts --version 88.6.4 --namespace monitoring --create-namespace -f manifests/kube-prometheus-stack-values.yaml --wait`";

pub fn operator_crds(fetched: &Fetched<Vec<(String, Option<CustomResourceDefinition>)>>) -> Item {
    let item = ItemHead::new(
        "prometheus-operator-crds",
        OPERATOR,
        "the Prometheus Operator CRDs are installed",
    );
    let crds = match fetched {
        Ok(crds) => crds,
        Err(error) => {
            return item.fail(
                error.to_string(),
                "your kubeconfig's user needs get on customresourcedefinitions (apiextensions.k8s.io)",
            );
        }
    };
    let mut missing = Vec::new();
    let mut not_established = Vec::new();
    for (name, crd) in crds {
        match crd {
            None => missing.push(name.as_str()),
            Some(crd) if !established(crd) => not_established.push(name.as_str()),
            Some(_) => {}
        }
    }
    if missing.is_empty() && not_established.is_empty() {
        let names: Vec<&str> = crds.iter().map(|(n, _)| n.as_str()).collect();
        return item.pass(names.join(", "));
    }
    let mut detail = Vec::new();
    if !missing.is_empty() {
        detail.push(format!("missing: {}", missing.join(", ")));
    }
    if !not_established.is_empty() {
        detail.push(format!("not established: {}", not_established.join(", ")));
    }
    detail.push("the reconcile loop cannot apply Prometheus and ServiceMonitor objects".into());
    item.fail(
        detail.join("\n"),
        format!(
            "install the Prometheus Operator CRDs: {OPERATOR_INSTALL}\n(the CRDs alone: `kubectl apply --server-side -f` the monitoring.coreos.com CRDs of prometheus-operator v0.93.0, example/prometheus-operator-crd/)"
        ),
    )
}

/// `quay.io/prometheus-operator/prometheus-operator:v0.93.0` → `prometheus-operator`.
fn image_name(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last)
}

/// The image of the first container whose image name is a prometheus-operator.
fn operator_image(deployment: &Deployment) -> Option<String> {
    let spec = deployment.spec.template.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| c.image.as_deref())
        .find(|image| image_name(image).contains("prometheus-operator"))
        .map(String::from)
}

pub fn operator_running(fetched: &Fetched<Vec<Deployment>>) -> Item {
    let item = ItemHead::new(
        "prometheus-operator-running",
        OPERATOR,
        "the Prometheus Operator is running",
    );
    let deployments = match fetched {
        Ok(deployments) => deployments,
        Err(error) => {
            return item.fail(
                error.to_string(),
                "your kubeconfig's user needs list on deployments (apps) in all namespaces",
            );
        }
    };
    let found: Vec<(&Deployment, String)> = deployments
        .iter()
        .filter_map(|d| operator_image(d).map(|image| (d, image)))
        .collect();
    let line = |(d, image): &(&Deployment, String)| {
        format!(
            "Deployment {}/{} runs {image}: {}",
            d.namespace().unwrap_or_default(),
            d.name_any(),
            replicas(d)
        )
    };
    let how = "found by its image among all Deployments of the cluster";
    if let Some(running) = found.iter().find(|f| condition_true(f.0, "Available")) {
        return item.pass(format!("{} ({how})", line(running)));
    }
    match found.first() {
        Some(first) => item.fail(
            format!(
                "{} ({how}), but it is not available",
                found.iter().map(line).collect::<Vec<_>>().join("\n")
            ),
            format!(
                "run `kubectl -n {} rollout status deploy/{}` and read its pods' events and logs",
                first.0.namespace().unwrap_or_default(),
                first.0.name_any()
            ),
        ),
        None => item.fail(
            format!(
                "no Deployment in the cluster runs a prometheus-operator image (looked at {} Deployments): the per-namespace Prometheus objects are never turned into Prometheus servers",
                deployments.len()
            ),
            OPERATOR_INSTALL,
        ),
    }
}

pub fn leader_lease(install: &Install, fetched: &Fetched<Option<Lease>>, now: Timestamp) -> Item {
    let item = ItemHead::new(
        "leader-lease",
        RECONCILE,
        format!("the Lease {} has a live holder", install.lease),
    );
    let hint = format!(
        "a replica that leads logs it: `kubectl -n {ns} logs deploy/{name} | grep -i lead`; check the pods run (items above) and that the release was not installed with reconcile=false (--no-reconcile)",
        ns = install.namespace,
        name = install.name
    );
    let lease = match fetched {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            return item.fail(
                format!(
                    "Lease {}/{} not found: no replica has led the reconcile loop",
                    install.namespace, install.lease
                ),
                hint,
            );
        }
        Err(error) => return item.fail(error.to_string(), hint),
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let Some(holder) = spec.holder_identity.filter(|h| !h.is_empty()) else {
        return item.fail(
            "no holder: the last leader released it and no replica has taken it over, so no namespace is reconciled",
            hint,
        );
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let Some(renewed) = spec.renew_time.or(spec.acquire_time).map(|t| t.0) else {
        return item.fail(format!("held by {holder}, but never renewed"), hint);
    };
    let age = now.as_second() - renewed.as_second();
    if age >= duration {
        return item.fail(
            format!(
                "held by {holder}, but last renewed at {renewed} ({age} s ago; it lasts {duration} s): the holder is gone or cannot reach the API server"
            ),
            hint,
        );
    }
    item.pass(format!(
        "held by {holder}, renewed {} s ago (lasts {duration} s)",
        age.max(0)
    ))
}

/// The reconcile loop's status annotation, parsed loosely (newer fields are fine).
fn reconcile_status(namespace: &Namespace, keys: &Keys) -> Option<Result<Value, String>> {
    let text = namespace.annotations().get(&keys.reconcile_status)?;
    Some(serde_json::from_str::<Value>(text).map_err(|e| format!("not JSON: {e}")))
}

pub fn opted_in(namespaces: &[Namespace], keys: &Keys) -> Vec<Namespace> {
    namespaces
        .iter()
        .filter(|ns| ns.labels().get(&keys.inject).is_some_and(|v| v == ENABLED))
        .cloned()
        .collect()
}

pub fn namespaces_reconciled(keys: &Keys, fetched: &Fetched<Vec<Namespace>>) -> Item {
    let item = ItemHead::new(
        "namespaces-reconciled",
        RECONCILE,
        "every opted-in namespace is reconciled without error",
    );
    let namespaces = match fetched {
        Ok(namespaces) => opted_in(namespaces, keys),
        Err(error) => {
            return item.fail(
                error.to_string(),
                "your kubeconfig's user needs list on namespaces",
            );
        }
    };
    if namespaces.is_empty() {
        return item.pass(format!(
            "no namespace is opted in (label {}={ENABLED})",
            keys.inject
        ));
    }
    let mut ready = Vec::new();
    let mut failed = Vec::new();
    let mut unreconciled = Vec::new();
    for namespace in &namespaces {
        let name = namespace.name_any();
        match reconcile_status(namespace, keys) {
            None => unreconciled.push(name),
            Some(Err(why)) => failed.push((name, format!("status annotation {why}"))),
            Some(Ok(status)) if status["ready"] == true => ready.push(name),
            Some(Ok(status)) => {
                let text = |key: &str| status[key].as_str().unwrap_or("").to_string();
                failed.push((name, format!("{}: {}", text("reason"), text("message"))));
            }
        }
    }
    if failed.is_empty() && unreconciled.is_empty() {
        return item.pass(format!("{} ready: {}", ready.len(), ready.join(", ")));
    }
    let mut detail: Vec<String> = failed
        .iter()
        .map(|(name, why)| format!("{name}: not ready: {why}"))
        .collect();
    detail.extend(
        unreconciled
            .iter()
            .map(|name| format!("{name}: no status yet ({} not set)", keys.reconcile_status)),
    );
    let mut hints = Vec::new();
    if let Some((name, _)) = failed.first() {
        hints.push(format!(
            "see why: `kubectl get events -n default --field-selector involvedObject.kind=Namespace,involvedObject.name={name}`; fix the namespace's {domain}/ annotations it names, or what the message says",
            domain = keys.inject.rsplit_once('/').map_or("", |(d, _)| d)
        ));
    }
    if !unreconciled.is_empty() {
        hints.push(
            "a namespace with no status has not been reconciled yet: a leader must hold the Lease (item above); it is reconciled within seconds of opting in"
                .into(),
        );
    }
    item.fail(detail.join("\n"), hints.join("\n"))
}

/// The workload that recreates a pod: `Deployment api` (ReplicaSet name
/// minus the pod-template hash), another controller, or the pod itself.
fn workload_of(pod: &Pod) -> (String, String) {
    let controller = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true));
    match controller {
        None => ("pod".into(), pod.name_any()),
        Some(owner) if owner.kind == "ReplicaSet" => {
            let hash = pod.labels().get("pod-template-hash");
            match hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => ("deployment".into(), deployment.to_string()),
                None => ("replicaset".into(), owner.name.clone()),
            }
        }
        Some(owner) => (owner.kind.to_lowercase(), owner.name.clone()),
    }
}

fn lacks_injected_label(pod: &Pod, keys: &Keys) -> bool {
    pod.labels().get(&keys.injected).is_none_or(|v| v != "true")
}

/// A pod the webhook would inject today but that runs without the sidecar:
/// the reconcile loop's own classification (which also honours the skip the
/// webhook recorded on the pod).
pub fn is_uninjected(pod: &Pod, namespace: &Namespace, injector: &Injector) -> bool {
    let policy = policy_from_namespace(namespace, injector.keys());
    classify(pod, injector, &policy) == PodState::Uninjected
}

pub fn pods_injected(injector: &Injector, fetched: &Fetched<Vec<NamespacePods>>) -> Item {
    let item = ItemHead::new(
        "pods-injected",
        PODS,
        "no pod in an opted-in namespace is missing the sidecar",
    );
    let keys = injector.keys();
    let namespaces = match fetched {
        Ok(namespaces) => namespaces,
        Err(error) => {
            return item.fail(
                error.to_string(),
                "your kubeconfig's user needs list on namespaces and pods",
            );
        }
    };
    // namespace → workload → pods
    let mut found: BTreeMap<String, BTreeMap<(String, String), Vec<String>>> = BTreeMap::new();
    let mut checked = 0;
    for entry in namespaces {
        for pod in &entry.pods {
            checked += 1;
            if is_uninjected(pod, &entry.namespace, injector) {
                found
                    .entry(entry.namespace.name_any())
                    .or_default()
                    .entry(workload_of(pod))
                    .or_default()
                    .push(pod.name_any());
            }
        }
    }
    if found.is_empty() {
        return item.pass(format!(
            "{checked} pods in {} opted-in namespaces: each is injected, opted out or not selected",
            namespaces.len()
        ));
    }
    let mut detail = Vec::new();
    let mut commands = Vec::new();
    for (namespace, workloads) in &found {
        for ((kind, name), pods) in workloads {
            detail.push(format!(
                "{namespace}: {} without the sidecar ({kind} {name})",
                pods.join(", ")
            ));
            commands.push(match kind.as_str() {
                "deployment" | "statefulset" | "daemonset" => {
                    format!("`kubectl -n {namespace} rollout restart {kind}/{name}`")
                }
                "pod" => format!("delete and recreate pod {namespace}/{name}"),
                _ => format!("recreate the pods of {kind} {namespace}/{name}"),
            });
        }
    }
    item.fail(
        detail.join("\n"),
        format!(
            "they were created while the webhook did not answer or before their namespace opted in; once the webhook items above pass, recreate them: {}\n(or annotate the namespace {}=true to let chiller-metrics restart Deployments and StatefulSets)",
            commands.join(", "),
            keys.restart_uninjected
        ),
    )
}

/// `configHash` of the namespace status: the config the reconcile loop
/// injects with now. Injected pods record the hash they were injected with
/// under the same name in their `…/status` annotation.
fn config_hash(value: &Value) -> Option<&str> {
    value.get("configHash").and_then(Value::as_str)
}

pub fn pods_up_to_date(injector: &Injector, fetched: &Fetched<Vec<NamespacePods>>) -> Item {
    let item = ItemHead::new(
        "pods-up-to-date",
        PODS,
        "no injected pod is outdated (injected with an older config)",
    );
    let keys = injector.keys();
    let Ok(namespaces) = fetched else {
        return item.skipped("not checked: pods could not be listed");
    };
    let mut outdated = Vec::new();
    let mut compared = 0;
    let mut hashed_namespaces = 0;
    for entry in namespaces {
        let status = reconcile_status(&entry.namespace, keys).and_then(Result::ok);
        let Some(current) = status.as_ref().and_then(config_hash) else {
            continue;
        };
        hashed_namespaces += 1;
        for pod in &entry.pods {
            if lacks_injected_label(pod, keys) || pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            compared += 1;
            let recorded = recorded_config_hash(pod, &keys.status);
            let recorded = recorded.as_deref();
            if recorded != Some(current) {
                let (kind, name) = workload_of(pod);
                outdated.push((
                    entry.namespace.name_any(),
                    pod.name_any(),
                    kind,
                    name,
                    recorded.unwrap_or("none").to_string(),
                    current.to_string(),
                ));
            }
        }
    }
    if hashed_namespaces == 0 {
        return item.skipped("not checked: no config hash recorded");
    }
    if outdated.is_empty() {
        return item.pass(format!(
            "{compared} injected pods carry the current config hash"
        ));
    }
    let detail: Vec<String> = outdated
        .iter()
        .map(|(ns, pod, kind, name, recorded, current)| {
            format!(
                "{ns}: {pod} ({kind} {name}) injected with config {recorded}, current {current}"
            )
        })
        .collect();
    let (ns, _, kind, name, _, _) = &outdated[0];
    // A bare pod has no rollout: it is recreated by hand.
    let example = if kind == "pod" {
        format!("delete and recreate pod {ns}/{name}")
    } else {
        format!("`kubectl -n {ns} rollout restart {kind}/{name}`")
    };
    item.fail(
        detail.join("\n"),
        format!(
            "recreate them so the webhook injects the current config, e.g. {example}\n(or annotate the namespace {}=true to let chiller-metrics restart Deployments and StatefulSets one at a time)",
            keys.rollout_outdated
        ),
    )
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus},
            coordination::v1::LeaseSpec,
            core::v1::{Container, PodSpec, PodTemplateSpec},
        },
        apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference},
    };
    use serde_json::json;

    use super::*;
    use crate::{config::Config, inject::ResolvedMode, test_support::labels as map};

    fn install() -> Install {
        Install {
            namespace: "chiller-metrics".into(),
            name: "chiller-metrics".into(),
            lease: "chiller-metrics-reconciler".into(),
        }
    }

    fn deployment(namespace: &str, name: &str, image: &str, available: bool) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: DeploymentSpec {
                replicas: Some(1),
                template: PodTemplateSpec {
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "c".into(),
                            image: Some(image.into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            },
            status: Some(DeploymentStatus {
                available_replicas: Some(i32::from(available)),
                conditions: Some(vec![DeploymentCondition {
                    type_: Some("Available".into()),
                    status: Some(if available { "True" } else { "False" }.into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_operator_is_found_by_image_name_not_by_a_reloader_image() {
        let reloader = deployment(
            "x",
            "reloader",
            "quay.io/prometheus-operator/prometheus-config-reloader:v0.93.0",
            true,
        );
        let operator = deployment(
            "monitoring",
            "kps-operator",
            "quay.io/prometheus-operator/prometheus-operator:v0.93.0",
            true,
        );
        let item = operator_running(&Ok(vec![reloader.clone(), operator.clone()]));
        assert_eq!(item.status, super::super::report::Status::Pass, "{item:?}");
        assert!(
            item.detail.contains("monitoring/kps-operator"),
            "{}",
            item.detail
        );
        let none = operator_running(&Ok(vec![reloader]));
        assert_eq!(none.status, super::super::report::Status::Fail);
        assert!(none.hint.unwrap().contains("kube-prometheus-stack"));
        let down = operator_running(&Ok(vec![deployment(
            "monitoring",
            "op",
            "ghcr.io/x/prometheus-operator@sha256:abc",
            false,
        )]));
        assert_eq!(down.status, super::super::report::Status::Fail);
        assert!(down.hint.unwrap().contains("rollout status deploy/op"));
    }

    #[test]
    fn the_lease_needs_a_holder_and_a_recent_renewal() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let lease = |holder: Option<&str>, renewed: i64| Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
                ..Default::default()
            }),
        };
        let check = |l: Lease| leader_lease(&install(), &Ok(Some(l)), now).status;
        use super::super::report::Status::*;
        assert_eq!(check(lease(Some("pod-0"), 999_990)), Pass);
        assert_eq!(check(lease(Some("pod-0"), 999_985)), Fail);
        assert_eq!(check(lease(None, 999_999)), Fail);
        assert_eq!(check(lease(Some(""), 999_999)), Fail);
        assert_eq!(leader_lease(&install(), &Ok(None), now).status, Fail);
    }

    fn meta(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            labels: Some(map(labels)),
            annotations: Some(map(annotations)),
            ..Default::default()
        }
    }

    fn namespace(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: meta(name, labels, annotations),
            ..Default::default()
        }
    }

    const INJECT: &str = "metrics.chiller.io/inject";
    const STATUS: &str = "metrics.chiller.io/reconcile-status";

    #[test]
    fn reconcile_status_decides_the_namespace_item() {
        let keys = Keys::default();
        let good = namespace(
            "a",
            &[(INJECT, "enabled")],
            &[(STATUS, r#"{"ready":true}"#)],
        );
        let bad = namespace(
            "b",
            &[(INJECT, "enabled")],
            &[(
                STATUS,
                r#"{"ready":false,"reason":"InvalidSettings","message":"bad port"}"#,
            )],
        );
        let fresh = namespace("c", &[(INJECT, "enabled")], &[]);
        let other = namespace("d", &[], &[(STATUS, r#"{"ready":false}"#)]);
        let item = namespaces_reconciled(&keys, &Ok(vec![good.clone(), other.clone()]));
        assert_eq!(item.status, super::super::report::Status::Pass, "{item:?}");
        let item = namespaces_reconciled(&keys, &Ok(vec![good, bad, fresh, other]));
        assert_eq!(item.status, super::super::report::Status::Fail);
        assert_eq!(
            item.detail,
            "b: not ready: InvalidSettings: bad port\nc: no status yet (metrics.chiller.io/reconcile-status not set)"
        );
        assert!(item.hint.unwrap().contains("involvedObject.name=b"));
    }

    fn pod(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: meta(name, labels, annotations),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("chiller-api:1".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn injector() -> Injector {
        Injector::new(Config::default(), ResolvedMode::Native)
    }

    #[test]
    fn uninjected_pods_use_the_webhooks_decision() {
        let ns = namespace(
            "shop",
            &[(INJECT, "enabled")],
            &[("metrics.chiller.io/pod-selector", "app!=db")],
        );
        let mut owned = pod(
            "api-7d9f8-x2",
            &[("app", "api"), ("pod-template-hash", "7d9f8")],
            &[],
        );
        owned.metadata.owner_references = Some(vec![OwnerReference {
            kind: "ReplicaSet".into(),
            name: "api-7d9f8".into(),
            controller: Some(true),
            ..Default::default()
        }]);
        let pods = vec![
            owned,
            pod("db-0", &[("app", "db")], &[]),
            pod("off", &[("app", "x"), (INJECT, "disabled")], &[]),
            pod("off2", &[("app", "x")], &[(INJECT, "false")]),
        ];
        let fetched = Ok(vec![NamespacePods {
            namespace: ns.clone(),
            pods,
        }]);
        let item = pods_injected(&injector(), &fetched);
        assert_eq!(item.status, super::super::report::Status::Fail);
        assert_eq!(
            item.detail,
            "shop: api-7d9f8-x2 without the sidecar (deployment api)"
        );
        assert!(
            item.hint
                .unwrap()
                .contains("`kubectl -n shop rollout restart deployment/api`")
        );
        let fine = Ok(vec![NamespacePods {
            namespace: ns,
            pods: vec![pod("db-0", &[("app", "db")], &[])],
        }]);
        assert_eq!(
            pods_injected(&injector(), &fine).status,
            super::super::report::Status::Pass
        );
    }

    /// A pod the webhook skipped and marked (say, a port conflict) is
    /// reported by its skip, as the reconcile loop counts it, not as missing
    /// the sidecar.
    #[test]
    fn a_pod_the_webhook_skipped_is_not_counted_as_uninjected() {
        let ns = namespace("shop", &[(INJECT, "enabled")], &[]);
        let skipped = pod(
            "api",
            &[("app", "api")],
            &[("metrics.chiller.io/skipped", "port_conflict")],
        );
        let fetched = Ok(vec![NamespacePods {
            namespace: ns,
            pods: vec![skipped],
        }]);
        assert_eq!(
            pods_injected(&injector(), &fetched).status,
            super::super::report::Status::Pass
        );
    }

    #[test]
    fn outdated_is_not_checked_without_a_config_hash() {
        let ns = namespace(
            "shop",
            &[(INJECT, "enabled")],
            &[(STATUS, r#"{"ready":true}"#)],
        );
        let injected = pod(
            "api",
            &[("metrics.chiller.io/injected", "true")],
            &[("metrics.chiller.io/status", r#"{"version":"1"}"#)],
        );
        let fetched = Ok(vec![NamespacePods {
            namespace: ns,
            pods: vec![injected.clone()],
        }]);
        let item = pods_up_to_date(&injector(), &fetched);
        assert_eq!(item.status, super::super::report::Status::Skipped);
        assert_eq!(item.detail, "not checked: no config hash recorded");

        let hashed = namespace(
            "shop",
            &[(INJECT, "enabled")],
            &[(STATUS, r#"{"ready":true,"configHash":"abc"}"#)],
        );
        let mut current = injected.clone();
        current.metadata.annotations = Some(
            [(
                "metrics.chiller.io/status".to_string(),
                json!({"configHash": "abc"}).to_string(),
            )]
            .into(),
        );
        let item = pods_up_to_date(
            &injector(),
            &Ok(vec![NamespacePods {
                namespace: hashed.clone(),
                pods: vec![current, injected],
            }]),
        );
        assert_eq!(item.status, super::super::report::Status::Fail);
        assert_eq!(
            item.detail,
            "shop: api (pod api) injected with config none, current abc"
        );
    }

    #[test]
    fn the_certificate_must_last_thirty_days() {
        let certs = crate::certs::generate(&["127.0.0.1".to_string()]).unwrap();
        let chain: Vec<CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(certs.cert.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let probe = WebhookProbe {
            webhook: "inject.metrics.chiller.io".into(),
            server_name: "127.0.0.1".into(),
            address: "127.0.0.1:8443".into(),
            overridden: false,
            via_service: false,
            ca_bundle: certs.ca_cert.clone().into_bytes(),
            chain: Ok(chain.clone()),
        };
        let not_after = tls::not_after(&chain[0]).unwrap();
        use super::super::report::Status::*;
        let at =
            |now| certificate_expiry(&install(), true, std::slice::from_ref(&probe), now).status;
        assert_eq!(at(not_after - 31 * DAY), Pass);
        assert_eq!(at(not_after - 29 * DAY), Fail);
        assert_eq!(at(not_after + 1), Fail);
        let item = ca_bundle(
            &install(),
            true,
            std::slice::from_ref(&probe),
            UnixTime::now(),
        );
        assert_eq!(item.status, Pass, "{item:?}");
        assert_eq!(
            ca_bundle(&install(), false, &[], UnixTime::now()).status,
            Skipped
        );
    }
}
