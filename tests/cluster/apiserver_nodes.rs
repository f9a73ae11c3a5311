//! Nodes on the local control plane: kube-scheduler binds pods to two kwok
//! nodes, kwok runs their lifecycle with pod IPs from each node's podCIDR,
//! and kube-controller-manager fills EndpointSlices from those IPs: pods
//! that exist and are bound but never run, for tests that need many of them
//! (the e2e journey runs on a real node, tests/support/controlplane/node.rs).

use crate::support::{controlplane, install};

use std::time::{Duration, Instant};

use controlplane::ControlPlane;
use install::kubectl_json;
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(90);
const NODES: [(&str, &str); 2] = [
    ("kwok-node-a", "10.244.1.0/24"),
    ("kwok-node-b", "10.244.2.0/24"),
];

fn in_cidr(ip: &str, cidr: &str) -> bool {
    let prefix = cidr.trim_end_matches(".0/24");
    ip.rsplit_once('.')
        .is_some_and(|(network, _)| network == prefix)
}

#[test]
fn pods_are_scheduled_run_on_kwok_nodes_and_fill_endpoint_slices() {
    let plane = ControlPlane::shared();
    let _logs = plane.logs_on_failure();
    plane.add_nodes(&NODES);

    let app = json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "replicas": 4,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "web", "image": "chiller-e2e-app:e2e",
                                                 "ports": [{"name": "http", "containerPort": 8000}]}]},
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
            },
        ],
    });
    let mut apply = plane.kubectl();
    apply.args(["apply", "-f", "-"]);
    let output = {
        use std::{io::Write, process::Stdio};
        let mut child = apply
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(app.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let deadline = Instant::now() + CONVERGE;
    let pods = loop {
        let pods = kubectl_json(plane, &["get", "pods", "-n", "default", "-l", "app=web"]);
        let pods = pods["items"].as_array().cloned().unwrap_or_default();
        let running = pods
            .iter()
            .filter(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
            .count();
        if pods.len() == 4 && running == 4 {
            break pods;
        }
        assert!(Instant::now() < deadline, "4 running pods; have {pods:#?}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let mut ips = Vec::new();
    for pod in &pods {
        let node = pod["spec"]["nodeName"]
            .as_str()
            .expect("bound by the scheduler");
        let ip = pod["status"]["podIP"].as_str().unwrap();
        let cidr = NODES
            .iter()
            .find(|(name, _)| *name == node)
            .expect("one of our nodes")
            .1;
        assert!(in_cidr(ip, cidr), "{ip} is in {node}'s podCIDR {cidr}");
        ips.push(ip.to_string());
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 4, "every pod has its own IP");

    let deadline = Instant::now() + CONVERGE;
    loop {
        let slices = kubectl_json(
            plane,
            &[
                "get",
                "endpointslices",
                "-n",
                "default",
                "-l",
                "kubernetes.io/service-name=web",
            ],
        );
        let mut ready: Vec<String> = slices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["conditions"]["ready"] == true)
            .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(String::from))
            .collect();
        ready.sort();
        if ready == ips {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "EndpointSlices list {ready:?}, pods have {ips:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
