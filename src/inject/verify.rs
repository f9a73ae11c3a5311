//! Verifying a patch before it is answered: it must apply, and the patched pod
//! must still satisfy the rules the API server and the kubelet enforce.
//!
//! The check runs on a [`PodShape`]: the parts of a pod that the injector's
//! patch touches (labels, annotations, containers and their env, ports and
//! mounts, init containers, volumes) and that the rules read. Applying the
//! patch to that shape instead of the whole pod keeps the check cheap on
//! every request. Every array and map the patch addresses keeps its presence
//! and length in the shape, so a patch applies to the shape exactly when it
//! applies to the pod; a patch that addresses anything outside the shape
//! fails verification (and the webhook fails open).

use std::collections::{BTreeMap, BTreeSet};

use json_patch::Patch;
use k8s_openapi::api::core::v1::{Container, Pod};
use serde::{Deserialize, Serialize};

use crate::config::is_port_name;

/// The parts of a pod that the injector's patch touches and the rules read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodShape<'a> {
    #[serde(borrow, default)]
    pub metadata: MetadataShape<'a>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<SpecShape<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataShape<'a> {
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<&'a str, &'a str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<&'a str, &'a str>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecShape<'a> {
    #[serde(borrow, default)]
    pub containers: Vec<ContainerShape<'a>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub init_containers: Option<Vec<ContainerShape<'a>>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<VolumeShape<'a>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerShape<'a> {
    pub name: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<&'a str>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVarShape<'a>>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortShape<'a>>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<Vec<MountShape<'a>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarShape<'a> {
    pub name: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<&'a str>,
    /// Only whether the variable has a `valueFrom`; its source is not needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<Present>,
}

/// Marks that a field is set, whatever its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Present {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortShape<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    pub container_port: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountShape<'a> {
    pub name: &'a str,
    pub mount_path: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeShape<'a> {
    pub name: &'a str,
}

impl<'a> PodShape<'a> {
    pub fn of(pod: &'a Pod) -> Self {
        let map = |m: &'a BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<BTreeMap<_, _>>()
        };
        let containers = |cs: &'a [Container]| cs.iter().map(ContainerShape::of).collect();
        Self {
            metadata: MetadataShape {
                labels: pod.metadata.labels.as_ref().map(map),
                annotations: pod.metadata.annotations.as_ref().map(map),
            },
            spec: pod.spec.as_ref().map(|spec| SpecShape {
                containers: containers(&spec.containers),
                init_containers: spec.init_containers.as_deref().map(containers),
                volumes: spec.volumes.as_ref().map(|volumes| {
                    volumes
                        .iter()
                        .map(|v| VolumeShape { name: &v.name })
                        .collect()
                }),
            }),
        }
    }

    /// App containers and init containers.
    pub fn containers(&self) -> impl Iterator<Item = &ContainerShape<'a>> {
        let spec = self.spec.as_ref();
        let apps = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
        let inits = spec
            .and_then(|s| s.init_containers.as_deref())
            .unwrap_or_default();
        apps.iter().chain(inits)
    }

    /// App containers and restartable (native sidecar) init containers: they
    /// share the pod's ports while the app runs.
    pub fn long_running(&self) -> impl Iterator<Item = &ContainerShape<'a>> {
        let spec = self.spec.as_ref();
        let apps = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
        let sidecars = spec
            .and_then(|s| s.init_containers.as_deref())
            .unwrap_or_default()
            .iter()
            .filter(|c| c.restart_policy == Some("Always"));
        apps.iter().chain(sidecars)
    }

    /// Checks the rules a patched pod must still satisfy.
    pub fn check(&self) -> Result<(), PodProblem> {
        let mut names = BTreeSet::new();
        for container in self.containers() {
            if !names.insert(container.name) {
                return Err(PodProblem::DuplicateContainer(container.name.to_string()));
            }
        }
        let volumes = self
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_deref())
            .unwrap_or_default();
        let mut volume_names = BTreeSet::new();
        for volume in volumes {
            if !volume_names.insert(volume.name) {
                return Err(PodProblem::DuplicateVolume(volume.name.to_string()));
            }
        }
        let mut port_names = BTreeSet::new();
        for container in self.containers() {
            let mut mount_paths = BTreeSet::new();
            for mount in container.volume_mounts.iter().flatten() {
                if !volume_names.contains(mount.name) {
                    return Err(PodProblem::MissingVolume {
                        container: container.name.to_string(),
                        volume: mount.name.to_string(),
                    });
                }
                if !mount_paths.insert(mount.mount_path) {
                    return Err(PodProblem::DuplicateMountPath {
                        container: container.name.to_string(),
                        path: mount.mount_path.to_string(),
                    });
                }
            }
            for name in container.ports.iter().flatten().filter_map(|p| p.name) {
                if !is_port_name(name) {
                    return Err(PodProblem::InvalidPortName {
                        container: container.name.to_string(),
                        name: name.to_string(),
                    });
                }
                if !port_names.insert(name) {
                    return Err(PodProblem::DuplicatePortName(name.to_string()));
                }
            }
        }
        let mut bound = BTreeSet::new();
        for container in self.long_running() {
            for port in container.ports.iter().flatten() {
                let key = (port.container_port, port.protocol.unwrap_or("TCP"));
                if !bound.insert(key) {
                    return Err(PodProblem::DuplicatePort(format!("{}/{}", key.0, key.1)));
                }
            }
        }
        Ok(())
    }
}

impl<'a> ContainerShape<'a> {
    fn of(container: &'a Container) -> Self {
        Self {
            name: &container.name,
            restart_policy: container.restart_policy.as_deref(),
            env: container.env.as_ref().map(|env| {
                env.iter()
                    .map(|var| EnvVarShape {
                        name: &var.name,
                        value: var.value.as_deref(),
                        value_from: var.value_from.as_ref().map(|_| Present {}),
                    })
                    .collect()
            }),
            ports: container.ports.as_ref().map(|ports| {
                ports
                    .iter()
                    .map(|p| PortShape {
                        name: p.name.as_deref(),
                        container_port: p.container_port,
                        protocol: p.protocol.as_deref(),
                    })
                    .collect()
            }),
            volume_mounts: container.volume_mounts.as_ref().map(|mounts| {
                mounts
                    .iter()
                    .map(|m| MountShape {
                        name: &m.name,
                        mount_path: &m.mount_path,
                    })
                    .collect()
            }),
        }
    }
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

/// Why a patch must not be answered.
#[derive(Debug, thiserror::Error)]
pub enum PatchProblem {
    #[error("patch does not apply: {0}")]
    DoesNotApply(#[from] json_patch::PatchError),
    #[error("patched pod would be invalid: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("patched pod would be invalid: {0}")]
    BreaksRule(#[from] PodProblem),
}

/// Checks the rules a pod must satisfy. The webhook runs them on every
/// patched pod before answering; the tests run them on every golden result.
pub fn check_pod(pod: &Pod) -> Result<(), PodProblem> {
    PodShape::of(pod).check()
}

/// Applies `patch` to `pod`'s shape and checks the result.
pub fn verify_patch(pod: &Pod, patch: &Patch) -> Result<(), PatchProblem> {
    let mut shape = serde_json::to_value(PodShape::of(pod))?;
    json_patch::patch(&mut shape, patch)?;
    PodShape::deserialize(&shape)?.check()?;
    Ok(())
}
