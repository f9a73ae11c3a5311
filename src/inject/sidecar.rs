//! The statsd_exporter sidecar and its mapping volume, built once from the config.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, DownwardAPIVolumeFile, DownwardAPIVolumeSource,
    HTTPGetAction, ObjectFieldSelector, Probe, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::config::{MAPPING_FILE, SidecarConfig};

/// Where the mapping volume is mounted inside the sidecar.
pub const MAPPING_DIR: &str = "/etc/statsd-exporter";

/// The sidecar container. `native` makes it an init container with `restartPolicy: Always`.
pub fn sidecar_container(cfg: &SidecarConfig, native: bool) -> Container {
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(cfg.metrics_port.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let port = |number: u16, protocol: &str, name: Option<&str>| ContainerPort {
        container_port: number.into(),
        protocol: Some(protocol.to_string()),
        name: name.map(str::to_string),
        ..Default::default()
    };
    Container {
        name: cfg.name.clone(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        args: Some(vec![
            format!("--statsd.mapping-config={MAPPING_DIR}/{MAPPING_FILE}"),
            format!("--statsd.listen-udp=:{}", cfg.statsd_port),
            format!("--statsd.listen-tcp=:{}", cfg.statsd_port),
            format!("--web.listen-address=:{}", cfg.metrics_port),
            // No `--web.enable-lifecycle`: nothing else can stop or
            // reconfigure the exporter. A changed mapping reaches running
            // pods through the outdated-pod rollout.
        ]),
        ports: Some(vec![
            port(cfg.metrics_port, "TCP", Some(&cfg.metrics_port_name)),
            port(cfg.statsd_port, "UDP", None),
            port(cfg.statsd_port, "TCP", None),
        ]),
        // A sidecar's readiness gates the pod's Ready condition (native or
        // not): `sidecar.readinessProbe: false` trades it for app availability.
        readiness_probe: cfg.readiness_probe.then(|| probe("/-/ready", 10, 3)),
        liveness_probe: Some(probe("/-/healthy", 20, 3)),
        // The kubelet starts the containers after a native sidecar only once
        // its startup probe passes: gunicorn's first statsd line finds the
        // exporter listening. Up to 30 s, polled every second.
        startup_probe: native.then(|| probe("/-/ready", 1, 30)),
        resources: Some(cfg.resources.clone()),
        restart_policy: native.then(|| "Always".to_string()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(cfg.run_as_user),
            run_as_group: Some(cfg.run_as_user),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        volume_mounts: Some(vec![VolumeMount {
            name: cfg.volume_name.clone(),
            mount_path: MAPPING_DIR.to_string(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The volume holding the mapping: the pod's own `mapping_annotation`,
/// which the webhook sets in the same patch. The kubelet writes the file
/// before any container starts, so there is no window in which the sidecar
/// runs without its mapping, whatever the reconcile loop has done yet.
pub fn mapping_volume(cfg: &SidecarConfig, mapping_annotation: &str) -> Volume {
    Volume {
        name: cfg.volume_name.clone(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![DownwardAPIVolumeFile {
                path: MAPPING_FILE.to_string(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{mapping_annotation}']"),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_probe_follows_the_setting() {
        let mut cfg = SidecarConfig::default();
        let probe = sidecar_container(&cfg, true)
            .readiness_probe
            .expect("probe by default");
        assert_eq!(probe.http_get.unwrap().path.as_deref(), Some("/-/ready"));
        cfg.readiness_probe = false;
        let container = sidecar_container(&cfg, true);
        assert!(container.readiness_probe.is_none());
        assert!(container.liveness_probe.is_some());
        assert_eq!(container.restart_policy.as_deref(), Some("Always"));
        assert_eq!(sidecar_container(&cfg, false).restart_policy, None);
    }

    #[test]
    fn a_native_sidecar_must_be_ready_before_the_app_starts() {
        let cfg = SidecarConfig::default();
        let probe = sidecar_container(&cfg, true)
            .startup_probe
            .expect("a native sidecar has a startup probe");
        assert_eq!(probe.http_get.unwrap().path.as_deref(), Some("/-/ready"));
        assert_eq!(probe.period_seconds, Some(1));
        // A regular container's startup probe holds back no other container.
        assert!(sidecar_container(&cfg, false).startup_probe.is_none());
    }

    #[test]
    fn the_exporter_offers_no_lifecycle_api() {
        let args = sidecar_container(&SidecarConfig::default(), true)
            .args
            .unwrap();
        assert!(
            !args.iter().any(|a| a.contains("enable-lifecycle")),
            "{args:?}"
        );
    }

    #[test]
    fn the_mapping_file_comes_from_the_pods_own_annotation() {
        let volume = mapping_volume(
            &SidecarConfig::default(),
            "metrics.chiller.io/statsd-mapping",
        );
        assert!(volume.config_map.is_none());
        let items = volume.downward_api.unwrap().items.unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].path, MAPPING_FILE);
        assert_eq!(
            items[0].field_ref.as_ref().unwrap().field_path,
            "metadata.annotations['metrics.chiller.io/statsd-mapping']"
        );
    }
}
