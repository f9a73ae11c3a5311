//! `make e2e-local`: the kind journey of `make e2e` on a real node. The
//! control plane, kube-scheduler, a kubelet with containerd, runc and the
//! CNI bridge, kube-proxy and CoreDNS all run (tests/support/controlplane/node.rs),
//! with images built locally and imported, nothing pulled: the Prometheus
//! Operator (as its upstream Deployment), chiller-metrics (the chart's pods,
//! generated certificates, called through the chart's Service), the test
//! app under gunicorn, the injected statsd_exporter sidecars, Prometheus with
//! its config reloader, Postgres and postgres_exporter. Then it runs the
//! same scenario script as `make e2e` (tests/e2e/scenario.sh). The test
//! runs in network and mount namespaces it creates itself, as root.

use crate::support;
use crate::support::controlplane;
use crate::support::install;

use std::{path::Path, process::Command};

use controlplane::{
    ControlPlane,
    node::{Node, isolated},
};
use install::{RELEASE, RELEASE_NAMESPACE, WEBHOOK_CONFIGURATION, kubectl_json, run};
use support::e2e::{
    build_tools_and_images, dump_on_failure, e2e_script, images_archive,
    install_prometheus_operator,
};
use support::https::ServeProcess;

/// chiller-metrics as the README installs it, with the chart's
/// generated-certificate mode (no cert-manager here).
fn install_chiller_metrics(plane: &ControlPlane) {
    run(install::helm(plane)
        .args(["install", RELEASE])
        .arg(support::crate_dir().join("manifests/chart/chiller-metrics"))
        .args(["--namespace", RELEASE_NAMESPACE, "--create-namespace"])
        .args(["--set", "certs.mode=generated"])
        .args(["--wait", "--timeout", "5m"]));
    let configuration = kubectl_json(
        plane,
        &["get", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION],
    );
    let client = &configuration["webhooks"][0]["clientConfig"];
    assert!(
        client["service"].is_object() && client["url"].is_null(),
        "the API server calls the chart's Service, no url: {client:#}"
    );
}

/// tests/e2e/scenario.sh against this cluster.
fn scenario(plane: &ControlPlane) -> Command {
    let mut command = e2e_script(plane, "scenario.sh", &[]);
    command
        .env("APP_IMAGE", "chiller-e2e-app:e2e")
        .env("APP_PULL_POLICY", "IfNotPresent")
        .env("CHILLER_NAMESPACE", RELEASE_NAMESPACE)
        .env("NAMESPACES", "shop-a shop-b");
    command
}

#[test]
fn the_kind_journey_on_a_real_node() {
    // The chart's image holds the build `cargo test` made: the release
    // binary runs in e2e_documented, which builds it as the README does.
    let archive = images_archive("journey");
    let prepare = || build_tools_and_images(&archive, Path::new(ServeProcess::BINARY));
    if !isolated("e2e_pods::the_kind_journey_on_a_real_node", prepare) {
        return;
    }
    let plane = ControlPlane::shared();
    let node = Node::start(plane, &[&archive]);
    let _dump = dump_on_failure(plane, &node, &["shop-a", "shop-b"]);

    install_prometheus_operator(plane);
    install_chiller_metrics(plane);

    let status = scenario(plane)
        .status()
        .expect("running tests/e2e/scenario.sh");
    assert!(status.success(), "tests/e2e/scenario.sh failed ({status})");
}
