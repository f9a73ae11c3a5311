//! Checks, before mutating, that the sidecar has room in a pod.

use super::{PodView, SkipReason};
use crate::config::SidecarConfig;

/// Fails with the reason if the sidecar's name, volume, port name or ports are taken.
pub fn check_room_for_sidecar(pod: &PodView, cfg: &SidecarConfig) -> Result<(), SkipReason> {
    let conflict = |kind: &'static str, name: &str| SkipReason::NameConflict {
        kind,
        name: name.to_string(),
    };
    if pod.containers().any(|c| c.name == *cfg.name) {
        return Err(conflict("container", &cfg.name));
    }
    if pod.volumes().iter().any(|v| v.name == *cfg.volume_name) {
        return Err(conflict("volume", &cfg.volume_name));
    }
    for container in pod.containers() {
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
    for container in pod.long_running() {
        for port in container.ports.iter().flatten() {
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            if ours
                .iter()
                .any(|&(p, proto)| i32::from(p) == port.container_port && proto == protocol)
            {
                return Err(SkipReason::PortConflict {
                    container: container.name.to_string(),
                    port: port.container_port as u16,
                    protocol: protocol.to_string(),
                });
            }
        }
    }
    Ok(())
}
