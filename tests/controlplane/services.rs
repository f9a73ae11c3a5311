//! Service addresses for the pod runner's pods: the real kube-proxy (built
//! from `tools/cluster`) programs each Service's ClusterIP into iptables of
//! the network namespace the pods' bridge lives in, and every pod gets a
//! hosts file naming the Services, where a cluster would run its DNS.

use std::{ffi::OsString, path::Path};

use serde_json::Value;

use super::{
    ControlPlane, binaries, free_port,
    process::{Lifetime, Process},
};

/// The pods' cluster CIDR (the bridge's network).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// Starts kube-proxy in iptables mode, for the node `node`.
pub fn start_kube_proxy(plane: &ControlPlane, node: &str) -> Process {
    // Routed pod traffic (a ClusterIP DNAT-ed to another pod) crosses this
    // namespace; a fresh network namespace does not forward.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enabling IPv4 forwarding");
    let config = plane.dir.join("kube-proxy.yaml");
    let text = format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {node}
mode: iptables
clusterCIDR: {CLUSTER_CIDR}
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
# The pods share one bridge: without br_netfilter a reply between two pods
# would skip the reverse NAT, so Service traffic is masqueraded.
iptables:
  masqueradeAll: true
# Leave the conntrack sysctls as they are.
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
",
        kubeconfig = plane.kubeconfig.display(),
        healthz = free_port(),
        metrics = free_port(),
    );
    std::fs::write(&config, text).expect("writing kube-proxy's configuration");
    Process::start(
        "kube-proxy",
        binaries().join("kube-proxy"),
        vec![
            OsString::from(format!("--config={}", config.display())),
            OsString::from("--v=1"),
        ],
        &plane.dir,
        Lifetime::TestBinary,
    )
}

/// A pod's /etc/hosts: localhost, the pod's own name, and every Service
/// with a ClusterIP under the names cluster DNS would answer for
/// (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`; the short
/// name only in the pod's own namespace).
pub fn hosts_file(pod: &Value, services: &Value) -> String {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let mut lines = vec![
        "127.0.0.1\tlocalhost".to_string(),
        "::1\tlocalhost".to_string(),
    ];
    if let (Some(ip), Some(name)) = (
        pod["status"]["podIP"].as_str(),
        pod["metadata"]["name"].as_str(),
    ) {
        lines.push(format!("{ip}\t{name}"));
    }
    for service in services["items"].as_array().into_iter().flatten() {
        let Some(ip) = service["spec"]["clusterIP"].as_str() else {
            continue;
        };
        if ip == "None" || ip.is_empty() {
            continue;
        }
        let name = service["metadata"]["name"].as_str().unwrap_or_default();
        let ns = service["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default();
        let mut names = Vec::new();
        if ns == namespace {
            names.push(name.to_string());
        }
        names.push(format!("{name}.{ns}"));
        names.push(format!("{name}.{ns}.svc"));
        names.push(format!("{name}.{ns}.svc.cluster.local"));
        lines.push(format!("{ip}\t{}", names.join(" ")));
    }
    lines.join("\n") + "\n"
}

/// Writes `text` into `file` in place (same inode), so a bind mount of the
/// file sees the new content.
pub fn write_in_place(file: &Path, text: &str) -> Result<(), String> {
    if std::fs::read_to_string(file).is_ok_and(|current| current == text) {
        return Ok(());
    }
    std::fs::write(file, text).map_err(|e| format!("{}: {e}", file.display()))
}
