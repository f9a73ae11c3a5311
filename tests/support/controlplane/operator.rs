//! The Prometheus Operator v0.93.0 (built from `tools/prometheus-operator`)
//! as a process beside the control plane, as kube-prometheus-stack runs it:
//! every CRD of the pinned module, watching every namespace. It talks to
//! the API server with the admin certificate; with kwok nodes its
//! Prometheus StatefulSets get pods that are bound but never run.

use std::{ffi::OsString, path::Path};

use super::{
    ControlPlane, free_port,
    nodes::{build, module_dir},
    process::Process,
};

const MODULE: &str = "github.com/prometheus-operator/prometheus-operator";

impl ControlPlane {
    /// Applies every CRD of the pinned operator and starts it; returns once
    /// its Prometheus CRD is established.
    pub fn start_prometheus_operator(&self) -> Process {
        let bin = build("prometheus-operator");
        let crds =
            module_dir("prometheus-operator", MODULE).join("example/prometheus-operator-crd");
        let output = self
            .kubectl()
            .args([
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=chiller-tests",
                "-f",
            ])
            .arg(&crds)
            .output()
            .expect("running kubectl apply");
        assert!(
            output.status.success(),
            "applying the operator's CRDs: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let output = self
            .kubectl()
            .args([
                "wait",
                "--for=condition=Established",
                "--timeout=120s",
                "crd/prometheuses.monitoring.coreos.com",
                "crd/servicemonitors.monitoring.coreos.com",
            ])
            .output()
            .expect("running kubectl wait");
        assert!(
            output.status.success(),
            "the operator's CRDs are not established: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let p = |path: &Path| path.display().to_string();
        Process::start(
            "prometheus-operator",
            bin.join("operator"),
            [
                format!("-apiserver={}", self.server),
                format!("-ca-file={}", p(&self.pki.ca_cert)),
                format!("-cert-file={}", p(&self.pki.admin_cert)),
                format!("-key-file={}", p(&self.pki.admin_key)),
                format!("-web.listen-address=127.0.0.1:{}", free_port()),
                "-log-level=warn".to_string(),
            ]
            .into_iter()
            .map(OsString::from)
            .collect(),
            &self.dir,
            self.lifetime,
        )
    }
}
