//! Verifying a patch before it is answered: it must apply, and the patched pod
//! must still satisfy the rules the API server and the kubelet enforce.
//!
//! The check runs on the pod's [`PodView`]: the patch is applied to the view,
//! operation by operation, and the rules read the result. The view holds
//! every array and map the injector's patch addresses (labels, annotations,
//! containers and their env, ports and mounts, init containers, volumes),
//! with its presence and length, so a patch applies to the view exactly when
//! it applies to the pod; a patch that addresses anything outside the view,
//! or uses an operation the injector never writes, fails verification (and
//! the webhook fails open).

use std::{borrow::Cow, collections::BTreeSet};

use json_patch::jsonptr::{Pointer, Token};
use serde::Deserialize;
use serde_json::Value;

use super::{
    Op, PatchValue, PodPatch,
    patch::{ItemView, PrebuiltView},
    view::{AsPodView, ContainerView, EnvVarView, MountView, PodView, PortView, Str, VolumeView},
};
use crate::config::is_port_name;

impl PodView<'_> {
    /// Checks the rules a patched pod must still satisfy.
    pub fn check(&self) -> Result<(), PodProblem> {
        let mut names = BTreeSet::new();
        for container in self.containers() {
            if !names.insert(container.name.as_str()) {
                return Err(PodProblem::DuplicateContainer(container.name.to_string()));
            }
        }
        let mut volume_names = BTreeSet::new();
        for volume in self.volumes() {
            if !volume_names.insert(volume.name.as_str()) {
                return Err(PodProblem::DuplicateVolume(volume.name.to_string()));
            }
        }
        let mut port_names = BTreeSet::new();
        for container in self.containers() {
            let mut mount_paths = BTreeSet::new();
            for mount in container.volume_mounts.iter().flatten() {
                if !volume_names.contains(mount.name.as_str()) {
                    return Err(PodProblem::MissingVolume {
                        container: container.name.to_string(),
                        volume: mount.name.to_string(),
                    });
                }
                if !mount_paths.insert(mount.mount_path.as_str()) {
                    return Err(PodProblem::DuplicateMountPath {
                        container: container.name.to_string(),
                        path: mount.mount_path.to_string(),
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
                let key = (
                    port.container_port,
                    port.protocol.as_deref().unwrap_or("TCP"),
                );
                if !bound.insert(key) {
                    return Err(PodProblem::DuplicatePort(format!("{}/{}", key.0, key.1)));
                }
            }
        }
        Ok(())
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
    #[error("patch does not apply: operation {index} ({path}): {reason}")]
    DoesNotApply {
        index: usize,
        path: String,
        reason: &'static str,
    },
    #[error("patched pod would be invalid: operation {index} ({path}): {source}")]
    Malformed {
        index: usize,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("patched pod would be invalid: {0}")]
    BreaksRule(#[from] PodProblem),
}

/// Checks the rules a pod must satisfy. The webhook runs them on every
/// patched pod before answering; the tests run them on every golden result.
pub fn check_pod<P: AsPodView + ?Sized>(pod: &P) -> Result<(), PodProblem> {
    pod.with_view(|view| view.check())
}

/// Applies `patch` to `pod`'s view and checks the result.
pub fn verify_patch<P: AsPodView + ?Sized>(pod: &P, patch: &PodPatch) -> Result<(), PatchProblem> {
    pod.with_view(|view| {
        let mut patched = view.clone();
        for (index, operation) in patch.0.iter().enumerate() {
            apply(
                &mut patched,
                &operation.path,
                &operation.value,
                operation.op,
            )
            .map_err(|failure| failure.at(index, &operation.path))?;
        }
        patched.check()?;
        Ok(())
    })
}

enum Failure {
    /// RFC 6902 says the operation fails: its target or parent is missing.
    Missing,
    /// The path leaves the view: not something the injector writes.
    OutsideView,
    Malformed(serde_json::Error),
}

impl From<serde_json::Error> for Failure {
    fn from(error: serde_json::Error) -> Self {
        Self::Malformed(error)
    }
}

impl Failure {
    fn at(self, index: usize, path: &Pointer) -> PatchProblem {
        let path = path.as_str().to_string();
        let reason = match self {
            Self::Missing => "the target or its parent does not exist",
            Self::OutsideView => "the path is outside what the injector writes",
            Self::Malformed(source) => {
                return PatchProblem::Malformed {
                    index,
                    path,
                    source,
                };
            }
        };
        PatchProblem::DoesNotApply {
            index,
            path,
            reason,
        }
    }
}

/// The deepest path the view has: `/spec/containers/<i>/env/<j>/value`
/// is 6 tokens; anything deeper is outside it.
const MAX_DEPTH: usize = 8;

/// Applies one add or replace at `path` to the view, with the semantics
/// `json_patch` gives it on the pod's JSON.
fn apply<'p>(
    pod: &mut PodView<'p>,
    path: &Pointer,
    value: &'p PatchValue,
    op: Op,
) -> Result<(), Failure> {
    let mut tokens: [Option<Token<'_>>; MAX_DEPTH] = Default::default();
    let mut depth = 0;
    for token in path.tokens() {
        let slot = tokens.get_mut(depth).ok_or(Failure::OutsideView)?;
        *slot = Some(token);
        depth += 1;
    }
    let decoded: [Cow<'_, str>; MAX_DEPTH] =
        std::array::from_fn(|i| tokens[i].as_ref().map_or(Cow::Borrowed(""), Token::decoded));
    let keys: [&str; MAX_DEPTH] = std::array::from_fn(|i| decoded[i].as_ref());
    match &keys[..depth] {
        ["metadata", field @ ("labels" | "annotations"), rest @ ..] => {
            if !pod.metadata.present {
                return Err(Failure::Missing);
            }
            let map = match *field {
                "labels" => &mut pod.metadata.labels,
                _ => &mut pod.metadata.annotations,
            };
            match rest {
                [] => set_field(map, value.value(), op),
                [key] => {
                    let map = map.as_mut().ok_or(Failure::Missing)?;
                    if op == Op::Replace && !map.contains_key(key) {
                        return Err(Failure::Missing);
                    }
                    map.insert(
                        Str((*key).to_owned().into()),
                        Str::deserialize(value.value())?,
                    );
                    Ok(())
                }
                _ => Err(Failure::OutsideView),
            }
        }
        ["spec", list @ ("containers" | "initContainers"), rest @ ..] => {
            let spec = pod.spec.as_mut().ok_or(Failure::Missing)?;
            if *list == "containers" {
                // Always present in the view; absent in the JSON only if the
                // pod has no containers, which the API server rejects.
                let mut list = Some(std::mem::take(&mut spec.containers));
                let result = apply_container_list(&mut list, rest, value, op);
                spec.containers = list.unwrap_or_default();
                result
            } else {
                apply_container_list(&mut spec.init_containers, rest, value, op)
            }
        }
        ["spec", "volumes", rest @ ..] => {
            let spec = pod.spec.as_mut().ok_or(Failure::Missing)?;
            apply_list(&mut spec.volumes, rest, value, op, |_, _, _, _| {
                Err(Failure::OutsideView)
            })
        }
        _ => Err(Failure::OutsideView),
    }
}

fn apply_container_list<'p>(
    list: &mut Option<Vec<ContainerView<'p>>>,
    rest: &[&str],
    value: &'p PatchValue,
    op: Op,
) -> Result<(), Failure> {
    apply_list(
        list,
        rest,
        value,
        op,
        |container, rest, value, op| match rest {
            ["env", rest @ ..] => apply_list(
                &mut container.env,
                rest,
                value,
                op,
                |var, rest, value, op| match rest {
                    ["value"] => {
                        if op == Op::Replace && var.value.is_none() {
                            return Err(Failure::Missing);
                        }
                        var.value = Some(Str::deserialize(value.value())?);
                        Ok(())
                    }
                    _ => Err(Failure::OutsideView),
                },
            ),
            ["ports", rest @ ..] => {
                apply_list(&mut container.ports, rest, value, op, |_, _, _, _| {
                    Err(Failure::OutsideView)
                })
            }
            ["volumeMounts", rest @ ..] => apply_list(
                &mut container.volume_mounts,
                rest,
                value,
                op,
                |_, _, _, _| Err(Failure::OutsideView),
            ),
            _ => Err(Failure::OutsideView),
        },
    )
}

/// Sets a whole field: add creates or replaces it, replace needs it to exist.
fn set_field<'p, T: Deserialize<'p>>(
    field: &mut Option<T>,
    value: &'p Value,
    op: Op,
) -> Result<(), Failure> {
    if op == Op::Replace && field.is_none() {
        return Err(Failure::Missing);
    }
    *field = Some(T::deserialize(value)?);
    Ok(())
}

/// An operation on a list field, its items, or (through `inner`) inside one item.
fn apply_list<'p, T: FromPatch<'p>>(
    list: &mut Option<Vec<T>>,
    rest: &[&str],
    value: &'p PatchValue,
    op: Op,
    inner: impl FnOnce(&mut T, &[&str], &'p PatchValue, Op) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let [token, rest @ ..] = rest else {
        if op == Op::Replace && list.is_none() {
            return Err(Failure::Missing);
        }
        *list = Some(FromPatch::list(value)?);
        return Ok(());
    };
    let items = list.as_mut().ok_or(Failure::Missing)?;
    if rest.is_empty() && op == Op::Add {
        // RFC 6902: `-` appends, an index up to the length inserts.
        let at = match *token {
            "-" => items.len(),
            index => parse_index(index)
                .filter(|&i| i <= items.len())
                .ok_or(Failure::Missing)?,
        };
        items.insert(at, T::item(value)?);
        return Ok(());
    }
    let item = parse_index(token)
        .and_then(|i| items.get_mut(i))
        .ok_or(Failure::Missing)?;
    if rest.is_empty() {
        *item = T::item(value)?;
        Ok(())
    } else {
        inner(item, rest, value, op)
    }
}

/// An item of a list the view holds, read from a patch's value: from the
/// value's prebuilt view when it has one (the sidecar, its volume), else
/// deserialized from its JSON.
trait FromPatch<'p>: Deserialize<'p> {
    fn prebuilt(_view: &'p ItemView) -> Option<Self> {
        None
    }

    fn item(value: &'p PatchValue) -> Result<Self, serde_json::Error> {
        match prebuilt_view(value) {
            Some(PrebuiltView {
                item,
                in_list: false,
            }) => Self::prebuilt(item),
            _ => None,
        }
        .map_or_else(|| Self::deserialize(value.value()), Ok)
    }

    fn list(value: &'p PatchValue) -> Result<Vec<Self>, serde_json::Error> {
        match prebuilt_view(value) {
            Some(PrebuiltView {
                item,
                in_list: true,
            }) => Self::prebuilt(item).map(|v| vec![v]),
            _ => None,
        }
        .map_or_else(|| Vec::deserialize(value.value()), Ok)
    }
}

fn prebuilt_view(value: &PatchValue) -> Option<&PrebuiltView> {
    match value {
        PatchValue::Prebuilt(prebuilt) => prebuilt.view(),
        PatchValue::Json(_) => None,
    }
}

impl<'p> FromPatch<'p> for ContainerView<'p> {
    fn prebuilt(view: &'p ItemView) -> Option<Self> {
        match view {
            ItemView::Container(container) => Some(container.reborrow()),
            ItemView::Volume(_) => None,
        }
    }
}

impl<'p> FromPatch<'p> for VolumeView<'p> {
    fn prebuilt(view: &'p ItemView) -> Option<Self> {
        match view {
            ItemView::Volume(volume) => Some(volume.reborrow()),
            ItemView::Container(_) => None,
        }
    }
}

impl<'p> FromPatch<'p> for EnvVarView<'p> {}
impl<'p> FromPatch<'p> for PortView<'p> {}
impl<'p> FromPatch<'p> for MountView<'p> {}

/// An array index as JSON Pointer writes it: digits, no leading zero.
fn parse_index(token: &str) -> Option<usize> {
    let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
    if !digits || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

#[cfg(test)]
mod tests {
    use json_patch::jsonptr::PointerBuf;
    use serde_json::json;

    use super::*;
    use crate::inject::Operation;

    /// Escaped keys (`~0` is `~`, `~1` is `/`) address the keys they decode to.
    #[test]
    fn escaped_tokens_address_the_decoded_key() {
        let pod: Value = json!({
            "metadata": {"labels": {"a~b/c": "1"}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        });
        let view = PodView::deserialize(&pod).unwrap();
        let replace = |path: &str| {
            PodPatch(vec![Operation::replace(
                PointerBuf::parse(path).unwrap(),
                json!("2"),
            )])
        };
        let decoded = verify_patch(&view, &replace("/metadata/labels/a~0b~1c"));
        assert!(decoded.is_ok(), "{decoded:?}");
        assert!(verify_patch(&view, &replace("/metadata/labels/a~1b~0c")).is_err());
        assert!(verify_patch(&view, &replace("/metadata/labels/a~0b/c")).is_err());
    }
}
