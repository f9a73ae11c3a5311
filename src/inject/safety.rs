//! Checks, before mutating, that the sidecar has room in a pod.

use k8s_openapi::api::core::v1::{Container, Pod};

use super::SkipReason;
use crate::config::SidecarConfig;

/// Containers that share the pod's ports while the app runs: app containers
/// and restartable (native sidecar) init containers.
fn long_running(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    let apps = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let sidecars = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    apps.iter().chain(sidecars)
}

fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    let apps = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let inits = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    apps.iter().chain(inits)
}

/// Fails with the reason if the sidecar's name, volume, port name or ports are taken.
pub fn check_room_for_sidecar(pod: &Pod, cfg: &SidecarConfig) -> Result<(), SkipReason> {
    let conflict = |kind: &'static str, name: &str| SkipReason::NameConflict {
        kind,
        name: name.to_string(),
    };
    if all_containers(pod).any(|c| c.name == cfg.name) {
        return Err(conflict("container", &cfg.name));
    }
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default();
    if volumes.iter().any(|v| v.name == cfg.volume_name) {
        return Err(conflict("volume", &cfg.volume_name));
    }
    for container in all_containers(pod) {
        for port in container.ports.iter().flatten() {
            if port.name.as_deref() == Some(cfg.metrics_port_name.as_str()) {
                return Err(conflict("port", &cfg.metrics_port_name));
            }
        }
    }
    let ours = [
        (cfg.metrics_port, "TCP"),
        (cfg.statsd_port, "TCP"),
        (cfg.statsd_port, "UDP"),
    ];
    for container in long_running(pod) {
        for port in container.ports.iter().flatten() {
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            if ours
                .iter()
                .any(|&(p, proto)| i32::from(p) == port.container_port && proto == protocol)
            {
                return Err(SkipReason::PortConflict {
                    container: container.name.clone(),
                    port: port.container_port as u16,
                    protocol: protocol.to_string(),
                });
            }
        }
    }
    Ok(())
}
