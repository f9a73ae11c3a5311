//! The integration tests that start the real control plane (etcd,
//! kube-apiserver, kube-controller-manager; `apiserver_*`) or the real node
//! (`e2e_pods`, `node_images`). One test binary; `make test` runs it with
//! cargo-nextest, one process a test and one test at a time, each under a
//! time limit (`.config/nextest.toml`): every test gets a control plane of
//! its own.

#[path = "../support/mod.rs"]
mod support;

mod apiserver_check;
mod apiserver_explain;
mod apiserver_ha;
mod apiserver_nodes;
mod apiserver_own_writes;
mod apiserver_policy;
mod apiserver_reconcile;
mod apiserver_uninstall;
mod apiserver_webhook;
mod e2e_pods;
mod node_images;
