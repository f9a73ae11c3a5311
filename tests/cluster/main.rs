//! The integration tests that start the real control plane (etcd,
//! kube-apiserver, kube-controller-manager; `apiserver_*`) or the real node
//! (`e2e_pods`, `e2e_documented`, `node_images`). One test binary;
//! `make test` runs each module in a process of its own (as a process holds
//! one control plane), modules one after another, each test under the time
//! limit tests/time-limits gives it (scripts/test-timeout.sh).

#[path = "../support/mod.rs"]
mod support;

mod apiserver_check;
mod apiserver_explain;
mod apiserver_ha;
mod apiserver_nodes;
mod apiserver_own_writes;
mod apiserver_policy;
mod apiserver_reconcile;
mod apiserver_scale;
mod apiserver_uninstall;
mod apiserver_webhook;
mod e2e_documented;
mod e2e_pods;
mod node_images;
