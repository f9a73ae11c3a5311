//! `make cluster-up` / `make cluster-down`: the tests' local control plane
//! (etcd, kube-apiserver, kube-controller-manager), left running for you.
//!
//! cargo run --example local_cluster -- up|down [STATE_DIR]

#[path = "../tests/controlplane/mod.rs"]
mod controlplane;

use std::path::PathBuf;

use controlplane::{ControlPlane, process};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| controlplane::crate_dir().join(".tools/cluster/state"));
    match args.first().map(String::as_str) {
        Some("up") => up(dir),
        Some("down") => down(dir),
        _ => {
            eprintln!("usage: local_cluster up|down [STATE_DIR]");
            std::process::exit(2);
        }
    }
}

fn up(dir: PathBuf) {
    let kubeconfig = dir.join("admin.kubeconfig");
    if kubeconfig.is_file() && answers(&kubeconfig) {
        eprintln!("the local control plane is already running");
    } else {
        process::stop_detached(&dir);
        let plane = ControlPlane::start(&dir, process::Lifetime::Detached);
        eprintln!(
            "local control plane ready at {} (logs in {})",
            plane.server,
            dir.display()
        );
    }
    println!("export KUBECONFIG={}", kubeconfig.display());
}

fn down(dir: PathBuf) {
    let stopped = process::stop_detached(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    if stopped.is_empty() {
        eprintln!("no local control plane was running");
    } else {
        eprintln!(
            "stopped {} and removed {}",
            stopped.join(", "),
            dir.display()
        );
    }
}

/// Whether the API server of this kubeconfig answers /readyz.
fn answers(kubeconfig: &std::path::Path) -> bool {
    std::process::Command::new(controlplane::kubectl_binary())
        .env("KUBECONFIG", kubeconfig)
        .args(["get", "--raw", "/readyz", "--request-timeout=5s"])
        .output()
        .is_ok_and(|o| o.status.success())
}
