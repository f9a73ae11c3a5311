//! chiller-metrics: make gunicorn apps observable with Prometheus and Grafana
//! without touching their code or charts.
//!
//! - [`inject`]: the pure mutation (pod + config → JSONPatch or a skip reason).
//! - [`webhook`]: the admission HTTP adapter, TLS with hot reload, and serving.
//! - [`admin`]: the plain-HTTP admin endpoints and process metrics.
//! - [`cluster`]: everything that talks to the API server for the webhook.
//! - [`reconcile`]: the per-namespace monitoring reconcile loop.
//! - [`http_client`]: the one plain-HTTP GET, with time limits and a body cap.
//! - [`live_config`]: the config `serve` runs with, reloaded when its file changes.
//! - [`uninject`]: the inverse of the mutation.
//! - [`cli`]: the commands: `serve` wiring, offline `inject`/`uninject`/`render`/`certs`,
//!   and `check`/`explain` through the user's kubeconfig.

pub mod admin;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod file_watch;
pub mod http_client;
pub mod inject;
pub mod keys;
pub mod live_config;
pub mod manifest;
pub mod reconcile;
#[cfg(test)]
mod test_support;
pub mod uninject;
pub mod webhook;
