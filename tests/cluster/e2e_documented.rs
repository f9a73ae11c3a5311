//! The README's quick start and docs/install.md's upgrade and uninstall,
//! run as written (tests/e2e/documented.sh) on a real node of their own, as
//! `make e2e-local` runs the kind journey (tests/cluster/e2e_pods.rs).

use crate::support;
use crate::support::controlplane;

use controlplane::{
    ControlPlane,
    node::{Node, isolated},
    nodes::build,
};
use support::e2e::{
    build_tools_and_images, dump_on_failure, e2e_script, images_archive,
    install_prometheus_operator,
};

/// The README's quick start and the upgrade and uninstall of
/// docs/install.md, their lines run as written (tests/e2e/documented.sh);
/// only `kind`, `docker build` and the kube-prometheus-stack install are
/// stood in for (tests/e2e/local/shims), as this machine has no Docker and
/// no chart repositories.
#[test]
fn the_documented_quick_start_upgrade_and_uninstall_work_as_written() {
    let name = "e2e_documented::the_documented_quick_start_upgrade_and_uninstall_work_as_written";
    // The chart's image holds the release binary, built here as the
    // README's `cargo build --release` would build it.
    let archive = images_archive("documented");
    let prepare = || build_tools_and_images(&archive, &support::release_binary());
    if !isolated(name, prepare) {
        return;
    }
    let plane = ControlPlane::shared();
    let node = Node::start(plane, &[&archive]);
    let _dump = dump_on_failure(plane, &node, &["chiller"]);

    install_prometheus_operator(plane);

    let shims = support::crate_dir().join("tests/e2e/local/shims");
    let status = e2e_script(plane, "documented.sh", &[shims])
        .env("CRICTL", build("crictl").join("crictl"))
        .env("CRI_CONFIG_FILE", node.crictl_config())
        .status()
        .expect("running tests/e2e/documented.sh");
    assert!(
        status.success(),
        "tests/e2e/documented.sh failed ({status})"
    );
}
