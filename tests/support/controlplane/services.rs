//! Service addresses on the node: the real kube-proxy (built from
//! `tools/cluster`) programs each Service's ClusterIP into iptables of the
//! node's network namespace, where the pods' bridge lives.

use std::ffi::OsString;

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
