//! Checks that keep us from producing a pod the API server would reject or
//! that would break at run time.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, Pod};

use super::SkipReason;
use crate::config::{SidecarConfig, is_port_name};

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

/// A rule of the API server (or of the kubelet) that a pod breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodProblem {
    #[error("duplicate container name {0:?}")]
    DuplicateContainer(String),
    #[error("duplicate volume name {0:?}")]
    DuplicateVolume(String),
    #[error(
        "container {container:?}: port name {name:?} is invalid (1-15 lowercase letters, digits, '-')"
    )]
    InvalidPortName { container: String, name: String },
    #[error("port name {0:?} is used twice in the pod")]
    DuplicatePortName(String),
    #[error("port {0} is declared by two running containers")]
    DuplicatePort(String),
    #[error("container {container:?} mounts volume {volume:?}, which the pod does not define")]
    MissingVolume { container: String, volume: String },
    #[error("container {container:?}: duplicate mount path {path:?}")]
    DuplicateMountPath { container: String, path: String },
}

/// Checks the rules a patched pod must still satisfy. The webhook runs it on
/// every patched pod before answering; the tests run it on every golden result.
pub fn check_pod(pod: &Pod) -> Result<(), PodProblem> {
    let mut names = BTreeSet::new();
    for container in all_containers(pod) {
        if !names.insert(container.name.as_str()) {
            return Err(PodProblem::DuplicateContainer(container.name.clone()));
        }
    }
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default();
    let mut volume_names = BTreeSet::new();
    for volume in volumes {
        if !volume_names.insert(volume.name.as_str()) {
            return Err(PodProblem::DuplicateVolume(volume.name.clone()));
        }
    }
    let mut port_names = BTreeSet::new();
    for container in all_containers(pod) {
        let mut mount_paths = BTreeSet::new();
        for mount in container.volume_mounts.iter().flatten() {
            if !volume_names.contains(mount.name.as_str()) {
                return Err(PodProblem::MissingVolume {
                    container: container.name.clone(),
                    volume: mount.name.clone(),
                });
            }
            if !mount_paths.insert(mount.mount_path.as_str()) {
                return Err(PodProblem::DuplicateMountPath {
                    container: container.name.clone(),
                    path: mount.mount_path.clone(),
                });
            }
        }
        for name in container
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.as_deref())
        {
            if !is_port_name(name) {
                return Err(PodProblem::InvalidPortName {
                    container: container.name.clone(),
                    name: name.to_string(),
                });
            }
            if !port_names.insert(name) {
                return Err(PodProblem::DuplicatePortName(name.to_string()));
            }
        }
    }
    let mut bound: BTreeMap<(i32, String), &str> = BTreeMap::new();
    for container in long_running(pod) {
        for port in container.ports.iter().flatten() {
            let key = (
                port.container_port,
                port.protocol.clone().unwrap_or_else(|| "TCP".into()),
            );
            if let Some(_other) = bound.insert(key.clone(), container.name.as_str()) {
                return Err(PodProblem::DuplicatePort(format!("{}/{}", key.0, key.1)));
            }
        }
    }
    Ok(())
}
