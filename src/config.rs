//! The one configuration file (YAML), its defaults and validation.
//!
//! Precedence: built-in defaults < config file < flags and `CHILLER_METRICS_*` env.

use std::{collections::BTreeMap, path::Path, str::FromStr};

use k8s_openapi::{
    api::core::v1::ResourceRequirements, apimachinery::pkg::api::resource::Quantity,
};
use serde::{Deserialize, Serialize};

use crate::keys::Keys;

pub use crate::keys::DEFAULT_DOMAIN;
/// The statsd mapping the sidecar loads (see `chiller-metrics mapping`).
pub const DEFAULT_MAPPING: &str = include_str!("inject/statsd-mapping.yaml");
pub const DEFAULT_SIDECAR_IMAGE: &str = "prom/statsd-exporter:v0.28.0";
pub const DEFAULT_POSTGRES_EXPORTER_IMAGE: &str =
    "quay.io/prometheuscommunity/postgres-exporter:v0.17.1";
/// The key the mapping file has inside its ConfigMap.
pub const MAPPING_FILE: &str = "statsd-mapping.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_norway::Error,
    },
    #[error("invalid setting {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// How the statsd exporter is added to a pod.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    Default,
    clap::ValueEnum,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SidecarMode {
    /// Ask the API server: native from Kubernetes 1.29 on, and with no cluster.
    #[default]
    Auto,
    /// An init container with `restartPolicy: Always`.
    Native,
    /// A regular container (Job pods are then skipped).
    Container,
}

impl FromStr for SidecarMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "container" => Ok(Self::Container),
            other => Err(invalid(
                "sidecar.mode",
                format!("{other:?} is not one of auto, native, container"),
            )),
        }
    }
}

impl std::fmt::Display for SidecarMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Container => "container",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// Domain of every label and annotation key.
    pub domain: String,
    pub sidecar: SidecarConfig,
    pub gunicorn: GunicornConfig,
    /// statsd_exporter mapping config (YAML text).
    pub mapping: String,
    pub reconcile: ReconcileConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SidecarConfig {
    pub name: String,
    pub image: String,
    pub image_pull_policy: String,
    pub mode: SidecarMode,
    /// statsd listen port, UDP and TCP.
    pub statsd_port: u16,
    /// Prometheus `/metrics` port.
    pub metrics_port: u16,
    pub metrics_port_name: String,
    pub resources: ResourceRequirements,
    /// ConfigMap (in the pod's namespace) holding the mapping.
    pub mapping_config_map: String,
    pub volume_name: String,
    /// UID and GID the exporter runs as.
    pub run_as_user: i64,
    /// Give the sidecar a readiness probe. A sidecar's readiness counts towards
    /// the pod's Ready condition, so `false` keeps a failing exporter from
    /// taking the app out of its Service (liveness still restarts it).
    pub readiness_probe: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GunicornConfig {
    /// Host gunicorn sends statsd to; the sidecar shares the pod's network.
    pub statsd_host: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Namespace for dashboard and datasource ConfigMaps; `None` = the app namespace.
    pub grafana_namespace: Option<String>,
    pub prometheus: PrometheusConfig,
    pub postgres_exporter: PostgresExporterConfig,
    /// Seconds between full resyncs of a healthy namespace.
    pub resync_seconds: u64,
    /// How long a workload restarted for an outdated config may take to be
    /// available again before the rollout stops with an error.
    pub rollout_timeout_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PrometheusConfig {
    pub replicas: i32,
    pub retention: String,
    pub retention_size: String,
    pub scrape_interval: String,
    pub resources: ResourceRequirements,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PostgresExporterConfig {
    pub image: String,
    pub resources: ResourceRequirements,
}

fn resources(req_cpu: &str, req_mem: &str, lim_mem: &str) -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q(req_cpu)),
            ("memory".to_string(), q(req_mem)),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), q(lim_mem))])),
        ..Default::default()
    }
}

impl Config {
    /// The config file's JSON Schema (draft-07, every subschema inline), as
    /// the chart's `values.schema.json` embeds it under `config`.
    pub fn json_schema() -> serde_json::Value {
        let generator = schemars::generate::SchemaSettings::draft07()
            .with(|settings| settings.inline_subschemas = true)
            .into_generator();
        let mut schema = generator.into_root_schema_for::<Config>().to_value();
        if let Some(root) = schema.as_object_mut() {
            root.remove("$schema");
        }
        schema
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            domain: DEFAULT_DOMAIN.to_string(),
            sidecar: SidecarConfig::default(),
            gunicorn: GunicornConfig::default(),
            mapping: DEFAULT_MAPPING.to_string(),
            reconcile: ReconcileConfig::default(),
        }
    }
}

impl Default for SidecarConfig {
    fn default() -> Self {
        Self {
            name: "statsd-exporter".into(),
            image: DEFAULT_SIDECAR_IMAGE.into(),
            image_pull_policy: "IfNotPresent".into(),
            mode: SidecarMode::Auto,
            statsd_port: 9125,
            metrics_port: 9102,
            metrics_port_name: "statsd-metrics".into(),
            resources: resources("10m", "24Mi", "64Mi"),
            mapping_config_map: "chiller-metrics-statsd-mapping".into(),
            volume_name: "chiller-metrics-statsd-mapping".into(),
            run_as_user: 65534,
            readiness_probe: true,
        }
    }
}

impl Default for GunicornConfig {
    fn default() -> Self {
        Self {
            statsd_host: "localhost".into(),
        }
    }
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            grafana_namespace: None,
            prometheus: PrometheusConfig::default(),
            postgres_exporter: PostgresExporterConfig::default(),
            resync_seconds: 300,
            rollout_timeout_seconds: 600,
            // The kubelet's sync period (1 min) plus its ConfigMap cache.
        }
    }
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        Self {
            replicas: 1,
            retention: "7d".into(),
            retention_size: "4GiB".into(),
            scrape_interval: "15s".into(),
            resources: resources("100m", "256Mi", "1Gi"),
        }
    }
}

impl Default for PostgresExporterConfig {
    fn default() -> Self {
        Self {
            image: DEFAULT_POSTGRES_EXPORTER_IMAGE.into(),
            resources: resources("10m", "32Mi", "128Mi"),
        }
    }
}

/// Settings that flags and env variables may override.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub sidecar_mode: Option<SidecarMode>,
    pub sidecar_image: Option<String>,
    pub grafana_namespace: Option<String>,
}

impl Config {
    /// Loads the file (if any), applies overrides and validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                Self::from_text(&text, path, overrides)
            }
            None => Self::default().overridden(overrides),
        }
    }

    /// Parses the text of the file at `path`, applies overrides and validates.
    pub fn from_text(text: &str, path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::from_yaml(text)
            .map_err(|source| ConfigError::Parse {
                path: path.display().to_string(),
                source,
            })?
            .overridden(overrides)
    }

    fn overridden(mut self, overrides: &Overrides) -> Result<Self, ConfigError> {
        let config = &mut self;
        if let Some(mode) = overrides.sidecar_mode {
            config.sidecar.mode = mode;
        }
        if let Some(image) = &overrides.sidecar_image {
            config.sidecar.image = image.clone();
        }
        if let Some(ns) = &overrides.grafana_namespace {
            config.reconcile.grafana_namespace = Some(ns.clone()).filter(|ns| !ns.is_empty());
        }
        config.validate()?;
        Ok(self)
    }

    /// Parses YAML; an empty document gives the defaults.
    pub fn from_yaml(text: &str) -> Result<Self, serde_norway::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_norway::from_str(text)
    }

    pub fn keys(&self) -> Keys {
        Keys::new(&self.domain)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_dns_subdomain(&self.domain) {
            return Err(invalid(
                "domain",
                format!("{:?} is not a DNS subdomain", self.domain),
            ));
        }
        let s = &self.sidecar;
        if !is_dns_label(&s.name) {
            return Err(invalid(
                "sidecar.name",
                format!("{:?} is not a DNS label", s.name),
            ));
        }
        if !is_dns_label(&s.volume_name) {
            return Err(invalid(
                "sidecar.volumeName",
                format!("{:?} is not a DNS label", s.volume_name),
            ));
        }
        if !is_dns_subdomain(&s.mapping_config_map) {
            return Err(invalid(
                "sidecar.mappingConfigMap",
                format!("{:?} is not a valid ConfigMap name", s.mapping_config_map),
            ));
        }
        if s.image.trim().is_empty() || s.image.contains(char::is_whitespace) {
            return Err(invalid(
                "sidecar.image",
                format!("{:?} is not an image reference", s.image),
            ));
        }
        if !matches!(
            s.image_pull_policy.as_str(),
            "Always" | "IfNotPresent" | "Never"
        ) {
            return Err(invalid(
                "sidecar.imagePullPolicy",
                format!(
                    "{:?} is not one of Always, IfNotPresent, Never",
                    s.image_pull_policy
                ),
            ));
        }
        if s.statsd_port == 0 || s.metrics_port == 0 || s.statsd_port == s.metrics_port {
            return Err(invalid(
                "sidecar.statsdPort/metricsPort",
                "ports must be non-zero and different",
            ));
        }
        if !is_port_name(&s.metrics_port_name) {
            return Err(invalid(
                "sidecar.metricsPortName",
                format!(
                    "{:?} must be 1-15 lowercase letters, digits and '-', with a letter",
                    s.metrics_port_name
                ),
            ));
        }
        if s.run_as_user <= 0 {
            return Err(invalid("sidecar.runAsUser", "must be a non-root UID"));
        }
        if self.gunicorn.statsd_host.trim().is_empty()
            || self.gunicorn.statsd_host.contains(char::is_whitespace)
        {
            return Err(invalid("gunicorn.statsdHost", "must be a host name"));
        }
        validate_mapping(&self.mapping)?;
        if let Some(ns) = &self.reconcile.grafana_namespace
            && !is_dns_label(ns)
        {
            return Err(invalid(
                "reconcile.grafanaNamespace",
                format!("{ns:?} is not a namespace name"),
            ));
        }
        if self.reconcile.prometheus.replicas < 1 {
            return Err(invalid(
                "reconcile.prometheus.replicas",
                "must be at least 1",
            ));
        }
        let prom = &self.reconcile.prometheus;
        for (field, value) in [
            ("reconcile.prometheus.retention", &prom.retention),
            ("reconcile.prometheus.scrapeInterval", &prom.scrape_interval),
        ] {
            if !is_prometheus_duration(value) {
                return Err(invalid(
                    field,
                    format!("{value:?} is not a duration like 15s, 7d or 1h30m"),
                ));
            }
        }
        if !is_byte_size(&prom.retention_size) {
            return Err(invalid(
                "reconcile.prometheus.retentionSize",
                format!("{:?} is not a size like 4GiB or 500MB", prom.retention_size),
            ));
        }
        let exporter_image = &self.reconcile.postgres_exporter.image;
        if exporter_image.trim().is_empty() || exporter_image.contains(char::is_whitespace) {
            return Err(invalid(
                "reconcile.postgresExporter.image",
                format!("{exporter_image:?} is not an image reference"),
            ));
        }
        if self.reconcile.rollout_timeout_seconds == 0 {
            return Err(invalid(
                "reconcile.rolloutTimeoutSeconds",
                "must be at least 1",
            ));
        }
        if self.reconcile.resync_seconds == 0 {
            return Err(invalid("reconcile.resyncSeconds", "must be at least 1"));
        }
        Ok(())
    }
}

/// The largest mapping accepted: it travels in every injected pod's
/// annotations, which the API server caps at 256 KiB in all.
pub const MAX_MAPPING_BYTES: usize = 64 * 1024;

/// Checks that the mapping fits in a pod annotation and is YAML with a
/// non-empty `mappings` list, each with `match` and `name`.
pub fn validate_mapping(text: &str) -> Result<(), ConfigError> {
    if text.len() > MAX_MAPPING_BYTES {
        return Err(invalid(
            "mapping",
            format!(
                "is {} bytes; at most {MAX_MAPPING_BYTES} fit in the pod annotation that carries it",
                text.len()
            ),
        ));
    }
    let value: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| invalid("mapping", format!("not YAML: {e}")))?;
    let mappings = value
        .get("mappings")
        .and_then(|m| m.as_sequence())
        .ok_or_else(|| invalid("mapping", "needs a `mappings` list"))?;
    if mappings.is_empty() {
        return Err(invalid("mapping", "`mappings` is empty"));
    }
    for (i, m) in mappings.iter().enumerate() {
        for field in ["match", "name"] {
            if m.get(field).and_then(|v| v.as_str()).is_none() {
                return Err(invalid(
                    "mapping",
                    format!("mappings[{i}] has no `{field}`"),
                ));
            }
        }
    }
    Ok(())
}

/// RFC 1123 label: what namespace and container names must be.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what ConfigMap names and label-key prefixes must be.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// IANA_SVC_NAME: what container port names must be.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// A Prometheus duration as the Prometheus CRD accepts it: `0`, or units
/// y, w, d, h, m, s, ms in that order, each with a number (`1h30m`).
pub fn is_prometheus_duration(s: &str) -> bool {
    if s == "0" {
        return true;
    }
    let mut rest = s;
    let mut units = ["y", "w", "d", "h", "m", "s", "ms"].iter();
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = if rest.starts_with("ms") {
            "ms"
        } else {
            &rest[..rest.len().min(1)]
        };
        if !units.any(|u| *u == unit) {
            return false;
        }
        rest = &rest[unit.len()..];
    }
    !s.is_empty()
}

/// A byte size as the Prometheus CRD's `retentionSize` accepts it: `4GiB`, `1.5TB`, `512MB`.
pub fn is_byte_size(s: &str) -> bool {
    let Some(number) = s.strip_suffix('B') else {
        return false;
    };
    const UNITS: [char; 6] = ['K', 'M', 'G', 'T', 'P', 'E'];
    let number = match number.strip_suffix('i') {
        Some(binary) => match binary.strip_suffix(UNITS) {
            Some(n) => n,
            None => return false,
        },
        None => number.strip_suffix(UNITS).unwrap_or(number),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or(("", number));
    whole.bytes().all(|b| b.is_ascii_digit())
        && !fraction.is_empty()
        && fraction.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let config = Config::default();
        config.validate().unwrap();
        let yaml = serde_norway::to_string(&config).unwrap();
        assert_eq!(Config::from_yaml(&yaml).unwrap(), config);
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_yaml("  \n").unwrap(), Config::default());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = Config::from_yaml("sidecar:\n  imagee: x\n").unwrap_err();
        assert!(err.to_string().contains("imagee"), "{err}");
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let config = Config::from_yaml("sidecar:\n  mode: container\n").unwrap();
        assert_eq!(config.sidecar.mode, SidecarMode::Container);
        assert_eq!(config.sidecar.image, DEFAULT_SIDECAR_IMAGE);
    }

    #[test]
    fn bad_values_are_named() {
        let mut config = Config::default();
        config.sidecar.metrics_port_name = "a-very-long-port-name".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("sidecar.metricsPortName"), "{err}");

        let mut config = Config::default();
        config.sidecar.statsd_port = config.sidecar.metrics_port;
        assert!(config.validate().is_err());

        let config = Config {
            mapping: "mappings: []".into(),
            ..Default::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("mapping")
        );
    }

    #[test]
    fn a_mapping_too_large_for_a_pod_annotation_is_refused() {
        let mut mapping = DEFAULT_MAPPING.to_string();
        while mapping.len() <= MAX_MAPPING_BYTES {
            mapping.push_str("# padding to grow the mapping past its limit\n");
        }
        let config = Config {
            mapping,
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("pod annotation"), "{err}");
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn overrides_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "sidecar:\n  mode: container\n  image: a/b:1\n").unwrap();
        let overrides = Overrides {
            sidecar_mode: Some(SidecarMode::Native),
            ..Default::default()
        };
        let config = Config::load(Some(&path), &overrides).unwrap();
        assert_eq!(config.sidecar.mode, SidecarMode::Native);
        assert_eq!(config.sidecar.image, "a/b:1");
    }

    #[test]
    fn mode_parses() {
        assert_eq!(
            "native".parse::<SidecarMode>().unwrap(),
            SidecarMode::Native
        );
        assert!("sidecar".parse::<SidecarMode>().is_err());
    }

    #[test]
    fn prometheus_durations_and_sizes() {
        for good in ["15s", "7d", "1h30m", "2w", "0", "500ms", "1y2w3d4h5m6s7ms"] {
            assert!(is_prometheus_duration(good), "{good}");
        }
        for bad in ["", "7days", "30m1h", "1.5h", "s", "15", "1h1h"] {
            assert!(!is_prometheus_duration(bad), "{bad}");
        }
        for good in ["4GiB", "500MB", "1.5TB", "1024B", "2KiB"] {
            assert!(is_byte_size(good), "{good}");
        }
        for bad in ["4G", "4 GiB", "GiB", "4XB", "4iB", "4KGiB", "1.B", ""] {
            assert!(!is_byte_size(bad), "{bad}");
        }
        let mut config = Config::default();
        config.reconcile.prometheus.retention = "7days".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("reconcile.prometheus.retention"), "{err}");
    }

    #[test]
    fn name_rules() {
        assert!(is_port_name("statsd-metrics"));
        assert!(!is_port_name("statsd-metrics-x"));
        assert!(!is_port_name("9102"));
        assert!(is_dns_label("chiller-prod"));
        assert!(!is_dns_label("Chiller"));
        assert!(is_dns_subdomain("metrics.chiller.io"));
    }
}
