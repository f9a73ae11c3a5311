//! The admission webhook: protocol adapter, router, TLS and serving.
//!
//! - [`admission`]: AdmissionReview bytes in, AdmissionReview out (no I/O).
//! - [`envelope`]: the AdmissionReview body read in one pass, pod included.
//! - [`router`]: the axum router for `/mutate`, callable with `oneshot`.
//! - [`tls`]: rustls config whose certificate reloads when its files change.
//! - [`server`]: the HTTPS accept loop, limits, timeouts and graceful shutdown.

pub mod admission;
mod envelope;
pub mod router;
pub mod server;
pub mod tls;

pub use admission::{NamespacePolicies, NoCluster, Outcome, ReviewError};
pub use router::{WebhookState, router};
