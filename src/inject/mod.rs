//! The mutation: a pure function from a pod (plus namespace policy and config)
//! to a JSONPatch or a reason to skip. No I/O happens here; the webhook and the
//! offline `inject` command both call [`Injector::mutate`].

mod gunicorn;
mod patch;
mod prefix;
mod safety;
mod selector;
mod sidecar;
mod verify;
mod view;

use std::{collections::BTreeMap, sync::Arc};

use json_patch::jsonptr::PointerBuf;
use kube::core::SelectorExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use gunicorn::{ContainerSkip, GUNICORN_CMD_ARGS};
pub use patch::{
    ItemView, Op, Operation, PatchValue, PodPatch, Prebuilt, PrebuiltView, UnsupportedOperation,
};
pub use prefix::statsd_prefix;
pub use selector::{SelectorError, parse_selector};
pub use sidecar::{MAPPING_DIR, mapping_volume, sidecar_container};
pub use verify::{PatchProblem, PodProblem, check_pod, verify_patch};
pub use view::{
    AsPodView, ContainerView, EnvVarView, MetadataView, MountView, OsView, OwnerReferenceView,
    PodView, PortView, Present, SpecView, Str, StrMap, VolumeView,
};

use crate::{
    config::{Config, SidecarMode},
    keys::{self, Keys},
};

/// The sidecar mode after `auto` has been resolved against the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolvedMode {
    Native,
    Container,
}

impl ResolvedMode {
    /// `auto` becomes native from Kubernetes 1.29 on, and when there is no cluster.
    pub fn resolve(mode: SidecarMode, server_version: Option<(u32, u32)>) -> Self {
        match mode {
            SidecarMode::Native => Self::Native,
            SidecarMode::Container => Self::Container,
            SidecarMode::Auto => match server_version {
                Some((major, minor)) if (major, minor) < (1, 29) => Self::Container,
                _ => Self::Native,
            },
        }
    }
}

/// What the namespace says about its pods (from the watched namespace cache).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespacePolicy {
    /// `metrics.chiller.io/pod-selector`, unparsed.
    pub pod_selector: Option<String>,
}

impl NamespacePolicy {
    /// The policy a namespace's annotations give; a blank selector is none.
    pub fn from_annotations(annotations: Option<&BTreeMap<String, String>>, keys: &Keys) -> Self {
        Self {
            pod_selector: annotations
                .and_then(|a| a.get(&keys.pod_selector))
                .filter(|s| !s.trim().is_empty())
                .cloned(),
        }
    }
}

/// Facts about a pod that are not in the pod object itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct PodContext<'a> {
    pub namespace: Option<&'a NamespacePolicy>,
    /// Name of the workload a pod template belongs to (offline injection).
    pub owner_hint: Option<&'a str>,
    /// The template belongs to a Job or CronJob (offline injection).
    pub job_template: bool,
}

/// Why a pod was left alone. `metric_label` is the `reason` label of the metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("pod already has the statsd exporter sidecar")]
    AlreadyInjected,
    #[error("pod opted out with the label {0}=disabled")]
    OptedOutByLabel(String),
    #[error("pod opted out with the annotation {0}: \"false\"")]
    OptedOutByAnnotation(String),
    #[error("pod does not match the namespace pod selector {selector:?} (unmet: {})", unmet.join(", "))]
    NotSelected {
        selector: String,
        /// The selector's terms the pod's labels do not meet, as written by
        /// `kubectl -l`.
        unmet: Vec<String>,
    },
    #[error("namespace pod selector is invalid, injection skipped: {0}")]
    InvalidNamespaceSelector(SelectorError),
    #[error(
        "a run-to-completion pod would never finish with a regular sidecar container (sidecar mode is container)"
    )]
    JobNeedsNativeSidecar,
    #[error("pod uses the host network, where the sidecar's ports would clash between pods")]
    HostNetwork,
    #[error("pod runs on Windows; the statsd exporter image is Linux only")]
    WindowsPod,
    #[error("{kind} name {name:?} is already used in the pod")]
    NameConflict { kind: &'static str, name: String },
    #[error("container {container:?} already uses port {port}/{protocol}")]
    PortConflict {
        container: String,
        port: u16,
        protocol: String,
    },
    #[error("annotation {annotation} names containers the pod does not have: {missing:?}")]
    UnknownContainers {
        annotation: String,
        missing: Vec<String>,
    },
    #[error("no container can take the statsd settings: {0}")]
    NoTargetContainer(String),
}

impl SkipReason {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::AlreadyInjected => "already_injected",
            Self::OptedOutByLabel(_) | Self::OptedOutByAnnotation(_) => "opted_out",
            Self::NotSelected { .. } => "not_selected",
            Self::InvalidNamespaceSelector(_) => "invalid_namespace_selector",
            Self::JobNeedsNativeSidecar => "job_needs_native_sidecar",
            Self::HostNetwork => "host_network",
            Self::WindowsPod => "windows_pod",
            Self::NameConflict { .. } => "name_conflict",
            Self::PortConflict { .. } => "port_conflict",
            Self::UnknownContainers { .. } => "unknown_containers",
            Self::NoTargetContainer(_) => "no_target_container",
        }
    }

    /// Skips the user chose or that are routine give no warning; the others do.
    pub fn warrants_warning(&self) -> bool {
        !matches!(
            self,
            Self::AlreadyInjected
                | Self::OptedOutByLabel(_)
                | Self::OptedOutByAnnotation(_)
                | Self::NotSelected { .. }
        )
    }

    /// The stage of [`Injector::mutate`] that gave this reason.
    pub fn stage(&self) -> Stage {
        match self {
            Self::AlreadyInjected | Self::OptedOutByLabel(_) | Self::OptedOutByAnnotation(_) => {
                Stage::Wanted
            }
            Self::NotSelected { .. } | Self::InvalidNamespaceSelector(_) => Stage::Selected,
            Self::JobNeedsNativeSidecar
            | Self::HostNetwork
            | Self::WindowsPod
            | Self::NameConflict { .. }
            | Self::PortConflict { .. }
            | Self::UnknownContainers { .. }
            | Self::NoTargetContainer(_) => Stage::Fits,
        }
    }
}

/// The stages of [`Injector::mutate`], in the order it goes through them;
/// the first reason to skip ends the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Not injected already, and not opted out by a label or an annotation.
    Wanted,
    /// Selected by the namespace's pod selector, when it has one.
    Selected,
    /// The sidecar can safely join the pod, and a container takes the
    /// statsd settings.
    Fits,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Wanted, Stage::Selected, Stage::Fits];
}

/// What was injected, recorded in the pod's status annotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InjectionStatus {
    pub version: String,
    pub sidecar: String,
    pub mode: ResolvedMode,
    pub prefix: String,
    pub containers: Vec<String>,
    /// [`ConfigHashes::config`] the pod was injected with (or its exporter
    /// last reloaded); empty for pods injected before hashes existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config_hash: String,
    /// [`ConfigHashes::sidecar`] the pod was injected with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sidecar_hash: String,
}

impl InjectionStatus {
    /// The annotation's JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a status serializes")
    }
}

/// Short hashes of what shapes the sidecar. `sidecar` covers the container
/// and volume as injected (image, args, ports, resources, probes, mode);
/// `mapping` the mapping's content; `config` both. Either change makes
/// running pods outdated: the mapping travels in the pod's own annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigHashes {
    pub sidecar: String,
    pub mapping: String,
    pub config: String,
}

/// Hex characters kept of each SHA-256.
const HASH_LEN: usize = 10;

fn short_hash(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..HASH_LEN].to_string()
}

impl ConfigHashes {
    pub fn new(sidecar: &Value, volume: &Value, mapping: &str) -> Self {
        let sidecar = short_hash(&[
            sidecar.to_string().as_bytes(),
            volume.to_string().as_bytes(),
        ]);
        let mapping = short_hash(&[mapping.as_bytes()]);
        let config = Self::combine(&sidecar, &mapping);
        Self {
            sidecar,
            mapping,
            config,
        }
    }

    /// The config hash of a sidecar hash and a mapping hash.
    pub fn combine(sidecar: &str, mapping: &str) -> String {
        short_hash(&[sidecar.as_bytes(), mapping.as_bytes()])
    }
}

/// The outcome of [`Injector::mutate`].
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Inject {
        patch: PodPatch,
        status: InjectionStatus,
        /// Containers left alone, for the response's warnings.
        warnings: Vec<String>,
    },
    Skip(SkipReason),
}

/// Holds the config and the pre-built sidecar; `mutate` is pure and cheap.
#[derive(Debug, Clone)]
pub struct Injector {
    config: Config,
    keys: Keys,
    mode: ResolvedMode,
    sidecar: Appendable,
    volume: Appendable,
    marks: Marks,
    hashes: ConfigHashes,
}

/// The labels and annotations the injector sets, with their pointers built
/// once per config.
#[derive(Debug, Clone)]
struct Marks {
    labels: PointerBuf,
    annotations: PointerBuf,
    injected: Entry,
    status: Entry,
    mapping: Entry,
    default_container: Entry,
    skipped: Entry,
}

/// A key of `metadata.labels` or `metadata.annotations` and its pointer.
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    path: PointerBuf,
}

impl Entry {
    fn new(field: &str, key: &str) -> Self {
        Self {
            key: key.to_string(),
            path: pointer(&["metadata", field, key]),
        }
    }
}

impl Marks {
    fn new(keys: &Keys) -> Self {
        Self {
            labels: pointer(&["metadata", "labels"]),
            annotations: pointer(&["metadata", "annotations"]),
            injected: Entry::new("labels", &keys.injected),
            status: Entry::new("annotations", &keys.status),
            mapping: Entry::new("annotations", &keys.mapping),
            default_container: Entry::new("annotations", keys::DEFAULT_CONTAINER),
            skipped: Entry::new("annotations", &keys.skipped),
        }
    }
}

/// An item the patch appends to the list at one path, prebuilt alone (for
/// a list the pod has) and as a one-item list (for one it lacks), with both
/// pointers.
#[derive(Debug, Clone)]
struct Appendable {
    item: Arc<Prebuilt>,
    list: Arc<Prebuilt>,
    item_path: PointerBuf,
    list_path: PointerBuf,
}

impl Appendable {
    /// `view` reads the item's view for the patch check, once.
    fn new(item: Value, view: fn(&Value) -> Option<ItemView>, list_path: &[&str]) -> Self {
        let mut item_path = list_path.to_vec();
        item_path.push("-");
        let prebuilt_view = |in_list| view(&item).map(|item| PrebuiltView { item, in_list });
        Self {
            list: Prebuilt::with_view(Value::Array(vec![item.clone()]), prebuilt_view(true)),
            item: Prebuilt::with_view(item.clone(), prebuilt_view(false)),
            item_path: pointer(&item_path),
            list_path: pointer(list_path),
        }
    }

    /// Adds the item to the list, creating the list if it does not exist.
    fn append(&self, list_exists: bool) -> Operation {
        if list_exists {
            Operation::add(self.item_path.clone(), self.item.clone())
        } else {
            Operation::add(self.list_path.clone(), self.list.clone())
        }
    }
}

impl Injector {
    pub fn new(config: Config, mode: ResolvedMode) -> Self {
        let sidecar = serde_json::to_value(sidecar_container(
            &config.sidecar,
            mode == ResolvedMode::Native,
        ))
        .expect("a Container always serializes");
        let keys = config.keys();
        let volume = serde_json::to_value(mapping_volume(&config.sidecar, &keys.mapping))
            .expect("a Volume always serializes");
        let hashes = ConfigHashes::new(&sidecar, &volume, &config.mapping);
        let sidecar_list = match mode {
            ResolvedMode::Native => "initContainers",
            ResolvedMode::Container => "containers",
        };
        Self {
            marks: Marks::new(&keys),
            keys,
            config,
            mode,
            sidecar: Appendable::new(sidecar, ItemView::container, &["spec", sidecar_list]),
            volume: Appendable::new(volume, ItemView::volume, &["spec", "volumes"]),
            hashes,
        }
    }

    /// The hashes pods injected now record.
    pub fn hashes(&self) -> &ConfigHashes {
        &self.hashes
    }

    /// The patch recording a skip on the pod (`<domain>/skipped: <reason>`),
    /// for reasons that deserve a warning; `None` for routine skips, and
    /// when the pod already says so (a second pass changes nothing).
    pub fn skip_mark(&self, pod: &PodView<'_>, reason: &SkipReason) -> Option<PodPatch> {
        let label = reason.metric_label();
        if !reason.warrants_warning() || pod.annotation(&self.keys.skipped) == Some(label) {
            return None;
        }
        let exists = pod.metadata.annotations.is_some();
        let entries = [(&self.marks.skipped, label.to_string())];
        Some(PodPatch(set_entries(
            &self.marks.annotations,
            exists,
            entries,
        )))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn mode(&self) -> ResolvedMode {
        self.mode
    }

    /// Decides what to do with `pod` and builds the patch. Paths address the
    /// pod object (`/metadata/…`, `/spec/…`), so the same patch also applies
    /// to a pod template. `pod` is a [`PodView`] (as the webhook and the
    /// `inject` command read it) or a typed `Pod`, which is viewed first.
    pub fn mutate<P: AsPodView + ?Sized>(&self, pod: &P, ctx: PodContext<'_>) -> Decision {
        pod.with_view(|view| match self.plan(view, ctx) {
            Ok((patch, status, warnings)) => Decision::Inject {
                patch,
                status,
                warnings,
            },
            Err(reason) => Decision::Skip(reason),
        })
    }

    fn plan(
        &self,
        pod: &PodView<'_>,
        ctx: PodContext<'_>,
    ) -> Result<(PodPatch, InjectionStatus, Vec<String>), SkipReason> {
        let keys = &self.keys;
        let sidecar_name = self.config.sidecar.name.as_str();
        let labels = pod.metadata.labels.as_ref();
        let annotations = pod.metadata.annotations.as_ref();
        let spec = pod.spec.as_ref();
        let containers = pod.app_containers();

        // 1. Already done, or not wanted (Stage::Wanted).
        let has_sidecar = pod.containers().any(|c| c.name == sidecar_name);
        let marked =
            pod.label(&keys.injected) == Some("true") || pod.annotation(&keys.status).is_some();
        if has_sidecar && marked {
            return Err(SkipReason::AlreadyInjected);
        }
        if pod.label(&keys.inject) == Some(keys::DISABLED) {
            return Err(SkipReason::OptedOutByLabel(keys.inject.clone()));
        }
        if pod.annotation(&keys.inject) == Some("false") {
            return Err(SkipReason::OptedOutByAnnotation(keys.inject.clone()));
        }
        // Not selected by the namespace (Stage::Selected).
        if let Some(selector_text) = ctx.namespace.and_then(|ns| ns.pod_selector.as_deref()) {
            let selector =
                parse_selector(selector_text).map_err(SkipReason::InvalidNamespaceSelector)?;
            let labels: BTreeMap<String, String> = labels
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if !selector.matches(&labels) {
                return Err(SkipReason::NotSelected {
                    selector: selector_text.to_string(),
                    unmet: selector
                        .into_iter()
                        .filter(|term| !term.matches(&labels))
                        .map(|term| term.to_string())
                        .collect(),
                });
            }
        }

        // 2. Pods the sidecar cannot safely join (Stage::Fits, as is 3).
        if self.mode == ResolvedMode::Container && runs_to_completion(pod, ctx) {
            return Err(SkipReason::JobNeedsNativeSidecar);
        }
        if spec.and_then(|s| s.host_network) == Some(true) {
            return Err(SkipReason::HostNetwork);
        }
        if spec
            .and_then(|s| s.os.as_ref())
            .is_some_and(|os| os.name == "windows")
        {
            return Err(SkipReason::WindowsPod);
        }
        safety::check_room_for_sidecar(pod, &self.config.sidecar)?;

        // 3. Which containers get the gunicorn settings.
        let targets = gunicorn::target_containers(containers, pod.annotation(&keys.containers))
            .map_err(|missing| SkipReason::UnknownContainers {
                annotation: keys.containers.clone(),
                missing,
            })?;
        let prefix = statsd_prefix(pod, keys, ctx.owner_hint);
        let flags = format!(
            "--statsd-host={}:{} --statsd-prefix={prefix}",
            self.config.gunicorn.statsd_host, self.config.sidecar.statsd_port
        );
        let mut ops = Vec::new();
        let mut injected = Vec::new();
        let mut skipped = Vec::new();
        for index in targets {
            let container = &containers[index];
            match gunicorn::env_patch(container, index, &flags) {
                Ok((op, note)) => {
                    ops.push(op);
                    injected.push(container.name.to_string());
                    skipped.extend(note.map(|n| format!("container {:?}: {n}", container.name)));
                }
                Err(skip) => skipped.push(format!("container {:?}: {skip}", container.name)),
            }
        }
        if injected.is_empty() {
            return Err(SkipReason::NoTargetContainer(skipped.join("; ")));
        }

        // 4. The sidecar, its volume, and the marks.
        let existing = match self.mode {
            ResolvedMode::Native => spec.and_then(|s| s.init_containers.as_ref()).is_some(),
            ResolvedMode::Container => true,
        };
        ops.insert(0, self.sidecar.append(existing));
        let has_volumes = spec.and_then(|s| s.volumes.as_ref()).is_some();
        ops.insert(1, self.volume.append(has_volumes));

        let status = InjectionStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            sidecar: sidecar_name.to_string(),
            mode: self.mode,
            prefix,
            containers: injected,
            config_hash: self.hashes.config.clone(),
            sidecar_hash: self.hashes.sidecar.clone(),
        };
        let marks = &self.marks;
        let new_labels = [(&marks.injected, "true".to_string())];
        let mut new_annotations = vec![
            (&marks.status, status.to_json()),
            (&marks.mapping, self.config.mapping.clone()),
        ];
        // Pin the container `kubectl logs` picked before injection (the first
        // one), so the sidecar never becomes the default.
        if pod.annotation(keys::DEFAULT_CONTAINER).is_none() {
            new_annotations.push((&marks.default_container, containers[0].name.to_string()));
        }
        ops.extend(set_entries(&marks.labels, labels.is_some(), new_labels));
        ops.extend(set_entries(
            &marks.annotations,
            annotations.is_some(),
            new_annotations,
        ));
        Ok((PodPatch(ops), status, skipped))
    }
}

/// Job pods, and any pod that is meant to finish.
fn runs_to_completion(pod: &PodView<'_>, ctx: PodContext<'_>) -> bool {
    let owned_by_job = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.kind == "Job" && r.api_version.starts_with("batch/"));
    let restart_policy = pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref());
    ctx.job_template || owned_by_job || matches!(restart_policy, Some("Never" | "OnFailure"))
}

/// The JSON Pointer to `tokens`, escaped (RFC 6901), in one allocation.
fn pointer(tokens: &[&str]) -> PointerBuf {
    let mut text = String::with_capacity(tokens.iter().map(|t| t.len() + 4).sum());
    for token in tokens {
        text.push('/');
        let mut rest = *token;
        while let Some(at) = rest.find(['~', '/']) {
            text.push_str(&rest[..at]);
            text.push_str(if rest.as_bytes()[at] == b'~' {
                "~0"
            } else {
                "~1"
            });
            rest = &rest[at + 1..];
        }
        text.push_str(rest);
    }
    PointerBuf::parse(text).expect("escaped tokens form a JSON Pointer")
}

/// Sets entries of the map at `map` (`metadata.labels` or `.annotations`),
/// creating the map if it does not exist.
fn set_entries<'e>(
    map: &PointerBuf,
    map_exists: bool,
    entries: impl IntoIterator<Item = (&'e Entry, String)>,
) -> Vec<Operation> {
    let entries = entries.into_iter();
    if map_exists {
        entries
            .map(|(entry, value)| Operation::add(entry.path.clone(), Value::String(value)))
            .collect()
    } else {
        let map_value = entries
            .map(|(entry, value)| (entry.key.clone(), Value::String(value)))
            .collect();
        vec![Operation::add(map.clone(), Value::Object(map_value))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_escape_as_from_tokens_does() {
        for tokens in [
            &["metadata", "annotations", "metrics.chiller.io/status"][..],
            &["metadata", "labels", "a~b/c~1"],
            &["spec", "containers", "0", "env", "-"],
            &[],
            &[""],
        ] {
            assert_eq!(
                pointer(tokens),
                PointerBuf::from_tokens(tokens.iter().copied()),
                "{tokens:?}"
            );
        }
    }

    #[test]
    fn auto_mode_uses_native_sidecars_from_1_29_and_without_a_cluster() {
        let auto = SidecarMode::Auto;
        assert_eq!(
            ResolvedMode::resolve(auto, Some((1, 28))),
            ResolvedMode::Container
        );
        assert_eq!(
            ResolvedMode::resolve(auto, Some((1, 29))),
            ResolvedMode::Native
        );
        assert_eq!(
            ResolvedMode::resolve(auto, Some((1, 37))),
            ResolvedMode::Native
        );
        assert_eq!(ResolvedMode::resolve(auto, None), ResolvedMode::Native);
    }

    /// The views the patch check takes from the prebuilt sidecar and volume
    /// are the views their JSON gives.
    #[test]
    fn prebuilt_views_are_what_their_json_reads_as() {
        for mode in [ResolvedMode::Native, ResolvedMode::Container] {
            let injector = Injector::new(Config::default(), mode);
            for (appendable, is_container) in [(&injector.sidecar, true), (&injector.volume, false)]
            {
                for (prebuilt, in_list) in [(&appendable.item, false), (&appendable.list, true)] {
                    let view = prebuilt.view().expect("the sidecar and volume have views");
                    assert_eq!(view.in_list, in_list);
                    let value = PatchValue::Prebuilt(prebuilt.clone());
                    let item = if in_list {
                        &value.value()[0]
                    } else {
                        value.value()
                    };
                    match &view.item {
                        ItemView::Container(container) => {
                            assert!(is_container);
                            assert_eq!(
                                container.reborrow(),
                                ContainerView::deserialize(item).unwrap()
                            );
                        }
                        ItemView::Volume(volume) => {
                            assert!(!is_container);
                            assert_eq!(volume.reborrow(), VolumeView::deserialize(item).unwrap());
                        }
                    }
                    if in_list {
                        assert_eq!(value.value().as_array().map(Vec::len), Some(1));
                    }
                }
            }
        }
    }

    #[test]
    fn hashes_follow_what_shapes_the_sidecar() {
        let hashes = |config: Config, mode| Injector::new(config, mode).hashes().clone();
        let base = hashes(Config::default(), ResolvedMode::Native);
        assert_eq!(base, hashes(Config::default(), ResolvedMode::Native));
        assert_eq!(base.config.len(), HASH_LEN);

        let mut image = Config::default();
        image.sidecar.image = "prom/statsd-exporter:v0.28.1".into();
        let image = hashes(image, ResolvedMode::Native);
        assert_ne!(image.sidecar, base.sidecar);
        assert_ne!(image.config, base.config);
        assert_eq!(image.mapping, base.mapping);

        let mode = hashes(Config::default(), ResolvedMode::Container);
        assert_ne!(mode.sidecar, base.sidecar, "restartPolicy differs");

        let mut probe = Config::default();
        probe.sidecar.readiness_probe = false;
        assert_ne!(hashes(probe, ResolvedMode::Native).sidecar, base.sidecar);

        let mut mapping = Config::default();
        mapping.mapping.push_str("\n# changed\n");
        let mapping = hashes(mapping, ResolvedMode::Native);
        assert_eq!(mapping.sidecar, base.sidecar);
        assert_ne!(mapping.mapping, base.mapping);
        assert_ne!(mapping.config, base.config);
        assert_eq!(
            ConfigHashes::combine(&mapping.sidecar, &mapping.mapping),
            mapping.config
        );

        // A setting that does not reach the pod leaves the hashes alone.
        let mut unrelated = Config::default();
        unrelated.reconcile.resync_seconds = 7;
        assert_eq!(hashes(unrelated, ResolvedMode::Native), base);
    }

    /// A pod with a reason to skip at every stage is skipped at the first;
    /// without it, at the next.
    #[test]
    fn mutate_goes_through_the_stages_in_order() {
        let injector = Injector::new(Config::default(), ResolvedMode::Native);
        let policy = NamespacePolicy {
            pod_selector: Some("app=web".into()),
        };
        let ctx = PodContext {
            namespace: Some(&policy),
            ..Default::default()
        };
        let stage = |labels: Value| {
            let pod = serde_json::json!({
                "metadata": {"labels": labels},
                "spec": {"hostNetwork": true, "containers": [{"name": "api", "image": "api:1"}]},
            });
            match injector.mutate(&PodView::deserialize(&pod).unwrap(), ctx) {
                Decision::Skip(reason) => reason.stage(),
                other => panic!("skipped, not {other:?}"),
            }
        };
        let stages = [
            serde_json::json!({"app": "api", "metrics.chiller.io/inject": "disabled"}),
            serde_json::json!({"app": "api"}),
            serde_json::json!({"app": "web"}),
        ]
        .map(stage);
        assert_eq!(stages, Stage::ALL);
    }

    #[test]
    fn explicit_modes_ignore_the_server_version() {
        assert_eq!(
            ResolvedMode::resolve(SidecarMode::Container, Some((1, 33))),
            ResolvedMode::Container
        );
        assert_eq!(
            ResolvedMode::resolve(SidecarMode::Native, Some((1, 27))),
            ResolvedMode::Native
        );
    }
}
