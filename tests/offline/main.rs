//! The offline integration tests: nothing here starts a control plane or a
//! node. The webhook over real HTTPS, the CLI, golden files, schema checks,
//! properties, gunicorn with the injected sidecar, promtool, the reconciler
//! against a recording API. One test binary;
//! `make test` runs each module in a process of its own (as a process holds
//! one control plane), modules one after another, each test under the time
//! limit tests/time-limits gives it (scripts/test-timeout.sh).

#[path = "../support/mod.rs"]
mod support;

mod cli;
mod config_reload;
mod dataplane;
mod demo;
mod desired_objects;
mod golden;
mod hostile;
mod https;
mod inject_cli;
mod layout;
mod manifests;
mod namespace_cache;
mod portability;
mod promql;
mod properties;
mod reconciler;
mod rotation;
mod shutdown;
mod support_selftest;
mod uninject;
