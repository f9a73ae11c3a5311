//! Nodes without a kubelet: kube-scheduler binds pods, and kwok (built from
//! `tools/kwok`, with kwok's own stages) keeps the nodes Ready and turns
//! bound pods Running, with pod IPs from each node's `podCIDR`. No process
//! of a pod runs; node.rs has the real node.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use super::{ControlPlane, crate_dir, free_port, process::Process, run_with_input, wait_ready};

/// The annotation kwok manages nodes by.
pub const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";

/// kwok's stages, as shipped in its module: node initialization and lease
/// heartbeats, and the fast pod lifecycle.
const STAGES: &[&str] = &[
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
];

impl ControlPlane {
    /// Whether the node `name` reports Ready.
    pub fn node_ready(&self, name: &str) -> bool {
        let (status, body) = self.get(&format!("/api/v1/nodes/{name}"));
        status == 200
            && serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|node| {
                node["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    }

    /// Starts kube-scheduler (once), which binds pods to nodes.
    pub fn start_scheduler(&self) {
        let p = |path: &Path| path.display().to_string();
        let mut scheduler = self.scheduler.lock().unwrap();
        if scheduler.pid().is_some() {
            return;
        }
        *scheduler = Process::start(
            "kube-scheduler",
            super::binaries().join("kube-scheduler"),
            args(&[
                &format!("--kubeconfig={}", p(&self.kubeconfig)),
                &format!("--authentication-kubeconfig={}", p(&self.kubeconfig)),
                &format!("--authorization-kubeconfig={}", p(&self.kubeconfig)),
                "--bind-address=127.0.0.1",
                &format!("--secure-port={}", free_port()),
                "--leader-elect=false",
                // Binds thousands of pods in minutes (tests/apiserver_scale.rs).
                "--kube-api-qps=300",
                "--kube-api-burst=600",
                "--v=1",
            ]),
            &self.dir,
            self.lifetime,
        );
    }

    /// Starts kube-scheduler and kwok, and registers `nodes` as
    /// `(name, podCIDR)`; returns once every node is Ready.
    pub fn add_nodes(&self, nodes: &[(&str, &str)]) {
        let kwok_bin = build("kwok");
        let stages = self.dir.join("kwok-stages.yaml");
        std::fs::write(&stages, kwok_stages()).expect("writing kwok's stages");
        let p = |path: &Path| path.display().to_string();
        let lifetime = self.lifetime;
        self.start_scheduler();
        {
            let mut kwok = self.kwok.lock().unwrap();
            *kwok = Process::start(
                "kwok",
                kwok_bin.join("kwok"),
                args(&[
                    &format!("--kubeconfig={}", p(&self.kubeconfig)),
                    &format!("--config={}", p(&stages)),
                    "--manage-all-nodes=false",
                    &format!("--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake"),
                    &format!("--server-address=127.0.0.1:{}", free_port()),
                    "--node-ip=127.0.0.1",
                    // Leases keep the nodes Ready between the rare status
                    // heartbeats of the heartbeat-with-lease stage.
                    "--node-lease-duration-seconds=40",
                ]),
                &self.dir,
                lifetime,
            );
        }
        for (name, cidr) in nodes {
            let node = serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                    "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok"},
                },
                "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            });
            let mut apply = self.kubectl();
            apply.args([
                "apply",
                "--server-side",
                "--field-manager=chiller-tests",
                "-f",
                "-",
            ]);
            run_with_input(apply, &node.to_string());
        }
        for (name, _) in nodes {
            wait_ready(&format!("node {name} Ready"), &self.kwok, || {
                self.node_ready(name)
            });
        }
    }
}

/// Builds (once per machine) the tools of `tools/MODULE`; their folder.
pub fn build(module: &str) -> PathBuf {
    let bin = crate_dir().join(".tools").join(module).join("bin");
    let status = Command::new(crate_dir().join("tools/build.sh"))
        .arg(module)
        .arg(&bin)
        .status()
        .expect("running tools/build.sh");
    assert!(
        status.success(),
        "building tools/{module} failed (see above); it needs Go 1.26+"
    );
    bin
}

/// The Dir of a module pinned in `tools/MODULE` (downloaded and verified
/// against its go.sum).
pub fn module_dir(tools_module: &str, module: &str) -> PathBuf {
    let output = Command::new("go")
        .args(["mod", "download", "-json", module])
        .current_dir(crate_dir().join("tools").join(tools_module))
        .output()
        .expect("running go mod download (Go 1.26+ is needed)");
    assert!(
        output.status.success(),
        "go mod download {module}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("go prints JSON");
    PathBuf::from(info["Dir"].as_str().expect("a module Dir"))
}

fn kwok_stages() -> String {
    let dir = module_dir("kwok", "sigs.k8s.io/kwok");
    STAGES
        .iter()
        .map(|file| {
            std::fs::read_to_string(dir.join(file))
                .unwrap_or_else(|e| panic!("kwok stage {file}: {e}"))
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}
