//! The thin layer that reads the cluster (kube) and reaches the webhook
//! (TLS) and the admin ports (`/readyz`), then hands everything to the pure
//! checks in [`super::items`].

use std::future::Future;

use k8s_openapi::{
    api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, ServiceReference},
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::ListParams,
    core::{ObjectList, Selector},
};
use rustls::pki_types::UnixTime;

use super::{
    CheckArgs, CheckError, TIMEOUT,
    items::{self, Fetched, Install, NamespacePods, ReadyProbe, WebhookProbe},
    report::{Item, Report},
    tls,
};
use crate::{
    cli::cluster_access,
    cluster::parse_version,
    config::Config,
    http_client::{self, HttpClient},
    inject::{Injector, ResolvedMode},
    keys::ENABLED,
};

/// One API call, bounded by [`TIMEOUT`].
async fn api<T>(
    action: &'static str,
    what: impl Into<String>,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Fetched<T> {
    Ok(cluster_access::call(action, what, call).await?)
}

fn items_of<T: Clone>(list: ObjectList<T>) -> Vec<T> {
    list.items
}

pub async fn check_all(client: &Client, args: &CheckArgs) -> Report {
    let install = Install {
        namespace: args.namespace.clone(),
        name: args.name.clone(),
        lease: args.lease_name.clone(),
    };
    let version = api("get", "the API server version", client.apiserver_version()).await;
    let api_item = match &version {
        Ok(info) => Item::pass(
            "kubernetes-api",
            "kubernetes api",
            "the Kubernetes API answers",
            format!("version {}", info.git_version),
        ),
        Err(error) => Item::fail(
            "kubernetes-api",
            "kubernetes api",
            "the Kubernetes API answers",
            error.to_string(),
            "check the kubeconfig (KUBECONFIG) and that `kubectl version` answers",
        ),
    };
    let Ok(version) = version else {
        return Report::new(vec![api_item]);
    };
    let mut report = vec![api_item];

    // The webhook.
    let configuration = api(
        "get",
        format!("MutatingWebhookConfiguration {}", args.name),
        Api::<MutatingWebhookConfiguration>::all(client.clone()).get_opt(&args.name),
    )
    .await;
    report.push(items::webhook_configuration(&install, &configuration));
    let probes = match &configuration {
        Ok(Some(configuration)) => probe_webhooks(client, configuration, args).await,
        _ => Vec::new(),
    };
    let exists = matches!(configuration, Ok(Some(_)));
    report.push(items::ca_bundle(&install, exists, &probes, UnixTime::now()));
    report.push(items::certificate_expiry(
        &install,
        exists,
        &probes,
        Timestamp::now().as_second(),
    ));

    // Its Deployment and pods.
    let deployment = api(
        "get",
        format!("Deployment {}/{}", args.namespace, args.name),
        Api::<Deployment>::namespaced(client.clone(), &args.namespace).get_opt(&args.name),
    )
    .await;
    report.push(items::deployment_available(&install, &deployment));
    let readiness = probe_readiness(client, args, &deployment).await;
    report.push(items::pods_ready(
        &install,
        &readiness,
        args.admin_address.is_none(),
    ));

    // The Prometheus Operator.
    let mut crds = Vec::new();
    let mut crd_error = None;
    for name in items::MONITORING_CRDS {
        match api(
            "get",
            format!("CustomResourceDefinition {name}"),
            Api::<CustomResourceDefinition>::all(client.clone()).get_opt(name),
        )
        .await
        {
            Ok(crd) => crds.push((name.to_string(), crd)),
            Err(error) => {
                crd_error = Some(error);
                break;
            }
        }
    }
    let crds = match crd_error {
        Some(error) => Err(error),
        None => Ok(crds),
    };
    report.push(items::operator_crds(&crds));
    let deployments = api(
        "list",
        "Deployments in all namespaces",
        Api::<Deployment>::all(client.clone()).list(&ListParams::default()),
    )
    .await
    .map(items_of);
    report.push(items::operator_running(&deployments));

    // The reconcile loop.
    let lease = api(
        "get",
        format!("Lease {}/{}", args.namespace, args.lease_name),
        Api::<Lease>::namespaced(client.clone(), &args.namespace).get_opt(&args.lease_name),
    )
    .await;
    report.push(items::leader_lease(&install, &lease, Timestamp::now()));

    let (config, config_note) = release_config(client, args).await;
    let keys = config.keys();
    let mode = ResolvedMode::resolve(
        config.sidecar.mode,
        parse_version(&version.major, &version.minor),
    );
    let injector = Injector::new(config, mode);
    let namespaces = api(
        "list",
        "opted-in Namespaces",
        Api::<Namespace>::all(client.clone())
            .list(&ListParams::default().labels(&format!("{}={ENABLED}", keys.inject))),
    )
    .await
    .map(items_of);
    report.push(items::namespaces_reconciled(&keys, &namespaces));

    // The pods of opted-in namespaces.
    let pods = match &namespaces {
        Ok(namespaces) => opted_in_pods(client, items::opted_in(namespaces, &keys)).await,
        Err(error) => Err(CheckError::Resolve {
            message: error.to_string(),
        }),
    };
    let mut injected = items::pods_injected(&injector, &pods);
    injected.detail.push_str(&format!("\n{config_note}"));
    report.push(injected);
    report.push(items::pods_up_to_date(&injector, &pods));
    Report::new(report)
}

/// The release's config, so that the domain and the injection decisions are
/// the webhook's; the defaults, said so, when it cannot be read.
async fn release_config(client: &Client, args: &CheckArgs) -> (Config, String) {
    cluster_access::release_config(client, &args.namespace, &args.name)
        .await
        .unwrap_or_else(|error| (Config::default(), format!("config: defaults ({error})")))
}

async fn opted_in_pods(client: &Client, namespaces: Vec<Namespace>) -> Fetched<Vec<NamespacePods>> {
    let mut out = Vec::new();
    for namespace in namespaces {
        let name = namespace.name_any();
        let pods = api(
            "list",
            format!("Pods in {name}"),
            Api::<Pod>::namespaced(client.clone(), &name).list(&ListParams::default()),
        )
        .await?;
        out.push(NamespacePods {
            namespace,
            pods: pods.items,
        });
    }
    Ok(out)
}

/// `https://host:port/path` → (`host`, `host:port`); IPv6 hosts in brackets.
pub fn url_target(url: &str) -> Result<(String, String), CheckError> {
    let bad = |why: &str| CheckError::Resolve {
        message: format!("webhook url {url:?}: {why}"),
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("not https://"))?;
    let authority = rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default()
        .rsplit('@')
        .next()
        .unwrap_or_default();
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port: u16 = match port {
        Some(port) => port.parse().map_err(|_| bad("bad port"))?,
        None => 443,
    };
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((host.to_string(), address))
}

/// A ready endpoint of the Service port `port` (the port the webhook
/// configuration names), from the Service's EndpointSlices.
pub fn endpoint_address(
    service: &Service,
    port: i32,
    slices: &[EndpointSlice],
) -> Result<String, String> {
    let name = service.name_any();
    let service_port = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.port == port))
        .ok_or_else(|| format!("Service {name} has no port {port}"))?;
    let port_name = service_port.name.clone().unwrap_or_default();
    for slice in slices {
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.clone().unwrap_or_default() == port_name)
            .and_then(|p| p.port)
        else {
            continue;
        };
        let ready = slice
            .endpoints
            .iter()
            .flatten()
            .find(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true));
        if let Some(address) = ready.and_then(|e| e.addresses.first()) {
            return Ok(if address.contains(':') {
                format!("[{address}]:{target}")
            } else {
                format!("{address}:{target}")
            });
        }
    }
    Err(format!(
        "Service {name} has no ready endpoint for port {port}"
    ))
}

async fn resolve_service(client: &Client, service: &ServiceReference) -> Fetched<String> {
    let what = format!("Service {}/{}", service.namespace, service.name);
    let live = api(
        "get",
        what.clone(),
        Api::<Service>::namespaced(client.clone(), &service.namespace).get_opt(&service.name),
    )
    .await?
    .ok_or_else(|| CheckError::Resolve {
        message: format!("{what} not found"),
    })?;
    let slices = api(
        "list",
        format!("EndpointSlices of {what}"),
        Api::<EndpointSlice>::namespaced(client.clone(), &service.namespace).list(
            &ListParams::default().labels(&format!("kubernetes.io/service-name={}", service.name)),
        ),
    )
    .await?;
    endpoint_address(&live, service.port.unwrap_or(443), &slices.items)
        .map_err(|message| CheckError::Resolve { message })
}

async fn probe_webhooks(
    client: &Client,
    configuration: &MutatingWebhookConfiguration,
    args: &CheckArgs,
) -> Vec<WebhookProbe> {
    let mut probes = Vec::new();
    for webhook in configuration.webhooks.iter().flatten() {
        let client_config = &webhook.client_config;
        let ca_bundle = client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.clone())
            .unwrap_or_default();
        let via_service = client_config.url.is_none() && client_config.service.is_some();
        let target: Fetched<(String, String)> = match (&client_config.url, &client_config.service) {
            (Some(url), _) => url_target(url),
            (None, Some(service)) => {
                let server_name = format!("{}.{}.svc", service.name, service.namespace);
                match &args.webhook_address {
                    Some(address) => Ok((server_name, address.clone())),
                    None => resolve_service(client, service)
                        .await
                        .map(|address| (server_name, address)),
                }
            }
            (None, None) => Err(CheckError::Resolve {
                message: "the webhook has neither url nor service".into(),
            }),
        };
        let (server_name, address, chain) = match target {
            Ok((server_name, address)) => {
                let address = args.webhook_address.clone().unwrap_or(address);
                let chain = tls::presented_chain(&address, &server_name, TIMEOUT).await;
                (server_name, address, chain)
            }
            Err(error) => (String::new(), String::new(), Err(error)),
        };
        probes.push(WebhookProbe {
            webhook: webhook.name.clone(),
            server_name,
            address,
            overridden: args.webhook_address.is_some(),
            via_service,
            ca_bundle,
            chain,
        });
    }
    probes
}

/// `GET /readyz` over plain HTTP: `Ok` for a 200, else what went wrong.
async fn readyz(address: &str) -> Result<(), String> {
    let client = HttpClient::new(http_client::Limits {
        connect: TIMEOUT,
        exchange: TIMEOUT,
        max_body: 64 * 1024,
    });
    client
        .get(&format!("http://{address}/readyz"))
        .await
        .map(|_| ())
        .map_err(|error| error.to_string())
}

/// The admin port of a pod: its container port named `admin`, else 9090.
fn admin_port(pod: &Pod) -> i32 {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("admin"))
        .map_or(9090, |p| p.container_port)
}

async fn probe_readiness(
    client: &Client,
    args: &CheckArgs,
    deployment: &Fetched<Option<Deployment>>,
) -> Fetched<Vec<ReadyProbe>> {
    if let Some(address) = &args.admin_address {
        return Ok(vec![ReadyProbe {
            target: format!("{address} (--admin-address)"),
            outcome: readyz(address).await,
        }]);
    }
    let deployment = match deployment {
        Ok(Some(deployment)) => deployment,
        Ok(None) => {
            return Err(CheckError::Resolve {
                message: "no Deployment, so no pods to ask".into(),
            });
        }
        Err(error) => {
            return Err(CheckError::Resolve {
                message: error.to_string(),
            });
        }
    };
    let selector: Selector =
        deployment
            .spec
            .selector
            .clone()
            .try_into()
            .map_err(|e| CheckError::Resolve {
                message: format!("the Deployment's selector: {e}"),
            })?;
    let pods = api(
        "list",
        format!("Pods of Deployment {}/{}", args.namespace, args.name),
        Api::<Pod>::namespaced(client.clone(), &args.namespace)
            .list(&ListParams::default().labels_from(&selector)),
    )
    .await?;
    let mut probes = Vec::new();
    for pod in &pods.items {
        let name = pod.name_any();
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Unknown".into());
        let outcome = if phase != "Running" {
            Err(format!("phase {phase}, not Running"))
        } else {
            let path = format!(
                "/api/v1/namespaces/{}/pods/{name}:{}/proxy/readyz",
                args.namespace,
                admin_port(pod)
            );
            match axum::http::Request::get(&path).body(Vec::new()) {
                Ok(request) => api(
                    "get",
                    format!("{path} (pod proxy)"),
                    client.request_text(request),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        probes.push(ReadyProbe {
            target: format!("pod {name}"),
            outcome,
        });
    }
    Ok(probes)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{ServicePort, ServiceSpec},
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    #[test]
    fn urls_give_the_verified_name_and_the_address() {
        let target = |url: &str| url_target(url).map_err(|e| e.to_string());
        assert_eq!(
            target("https://127.0.0.1:8443/mutate").unwrap(),
            ("127.0.0.1".into(), "127.0.0.1:8443".into())
        );
        assert_eq!(
            target("https://webhook.example/mutate?x=1").unwrap(),
            ("webhook.example".into(), "webhook.example:443".into())
        );
        assert_eq!(
            target("https://[::1]:9443/mutate").unwrap(),
            ("::1".into(), "[::1]:9443".into())
        );
        assert!(target("http://a/").is_err());
        assert!(target("https://a:x/").is_err());
    }

    #[test]
    fn the_service_resolves_to_a_ready_endpoint_of_the_named_port() {
        let service = Service {
            metadata: ObjectMeta {
                name: Some("chiller-metrics".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(vec![
                    ServicePort {
                        name: Some("https".into()),
                        port: 443,
                        ..Default::default()
                    },
                    ServicePort {
                        name: Some("admin".into()),
                        port: 9090,
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let endpoint = |ip: &str, ready: bool| Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                ..Default::default()
            }),
            ..Default::default()
        };
        let slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: Some(vec![
                endpoint("10.1.0.7", false),
                endpoint("10.1.0.8", true),
            ]),
            ports: Some(vec![
                EndpointPort {
                    name: Some("admin".into()),
                    port: Some(9090),
                    ..Default::default()
                },
                EndpointPort {
                    name: Some("https".into()),
                    port: Some(8443),
                    ..Default::default()
                },
            ]),
            metadata: ObjectMeta::default(),
        };
        assert_eq!(
            endpoint_address(&service, 443, std::slice::from_ref(&slice)),
            Ok("10.1.0.8:8443".into())
        );
        assert!(endpoint_address(&service, 8080, std::slice::from_ref(&slice)).is_err());
        let mut none_ready = slice;
        none_ready.endpoints = Some(vec![endpoint("10.1.0.7", false)]);
        assert!(endpoint_address(&service, 443, &[none_ready]).is_err());
    }
}
