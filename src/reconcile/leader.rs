//! Leader election with a coordination.k8s.io/v1 Lease, so that only one
//! replica reconciles. kube-runtime 5 has no leader election of its own.
//!
//! Like client-go: the lease is taken when it is free or when its record has
//! not changed for `leaseDurationSeconds` (measured on our own clock, so clock
//! skew between replicas does not matter); writes carry the resourceVersion
//! they read, so two candidates cannot both win.

use std::{future::Future, sync::Arc, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::{sync::watch, time::Instant};

use crate::admin::Readiness;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("lease {namespace}/{name}: the API server did not answer within {timeout:?}")]
    Timeout {
        namespace: String,
        name: String,
        timeout: Duration,
    },
}

impl LeaderError {
    /// The API server (or etcd behind it) did not answer: no answer in time,
    /// no connection, or a 5xx. A 4xx such as Forbidden is an answer.
    pub fn is_outage(&self) -> bool {
        match self {
            LeaderError::Timeout { .. } => true,
            LeaderError::Api { source, .. } => match source {
                kube::Error::Api(status) => status.code >= 500,
                _ => true,
            },
        }
    }
}

/// How long a lease lasts, how long a leader keeps trying to renew, and how often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// One candidate's view of the lease.
pub struct LeaseLock {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    timings: LeaseTimings,
    /// resourceVersion of the record last seen, and when we first saw it.
    observed: Option<(String, Instant)>,
    health: Option<Arc<Readiness>>,
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_conflict() || status.is_already_exists())
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: LeaseTimings,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            timings,
            observed: None,
            health: None,
        }
    }

    /// Reports each round's reachability of the API server to `readiness`:
    /// every replica reads the lease each retry period, so this is the
    /// heartbeat that shows an API server or etcd outage in `/readyz`.
    pub fn reporting_to(mut self, readiness: Arc<Readiness>) -> Self {
        self.health = Some(readiness);
        self
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn api_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    async fn read(&self) -> Result<Option<Lease>, LeaderError> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.api_error(e))
    }

    /// Replaces the lease, conditional on the resourceVersion it carries;
    /// `None` when another writer got there first.
    async fn write(&self, lease: &Lease) -> Result<Option<Lease>, LeaderError> {
        match self
            .api
            .replace(&self.name, &PostParams::default(), lease)
            .await
        {
            Ok(written) => Ok(Some(written)),
            Err(error) if is_conflict(&error) => Ok(None),
            Err(error) => Err(self.api_error(error)),
        }
    }

    fn observe(&mut self, lease: &Lease, now: Instant) {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        match &self.observed {
            Some((seen, _)) if *seen == version => {}
            _ => self.observed = Some((version, now)),
        }
    }

    /// One election round at `now`: creates, renews or takes over the lease.
    /// `Ok(true)` means we hold it.
    pub async fn try_acquire_or_renew(&mut self, now: Instant) -> Result<bool, LeaderError> {
        let wall_clock = MicroTime(Timestamp::now());
        let duration_seconds = self.timings.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.read().await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(wall_clock.clone()),
                    renew_time: Some(wall_clock),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created, now);
                    Ok(true)
                }
                Err(error) if is_conflict(&error) => Ok(false),
                Err(error) => Err(self.api_error(error)),
            };
        };
        self.observe(&lease, now);
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let ours = holder == Some(self.identity.as_str());
        let lease_duration = spec
            .lease_duration_seconds
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(self.timings.lease_duration);
        let unchanged_since = self.observed.as_ref().map(|(_, at)| *at).unwrap_or(now);
        let expired = holder.is_none() || now.duration_since(unchanged_since) >= lease_duration;
        if !ours && !expired {
            return Ok(false);
        }
        let mut spec = spec;
        if ours {
            spec.renew_time = Some(wall_clock);
        } else {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(wall_clock.clone());
            spec.renew_time = Some(wall_clock);
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(duration_seconds);
        lease.spec = Some(spec);
        let Some(updated) = self.write(&lease).await? else {
            return Ok(false);
        };
        self.observe(&updated, now);
        Ok(true)
    }

    /// Gives the lease up if we hold it, so that another replica takes over
    /// at once instead of after the lease duration (as client-go does on
    /// `ReleaseOnCancel`). `Ok(true)` means it was ours and is now free.
    pub async fn release(&mut self) -> Result<bool, LeaderError> {
        let Some(mut lease) = self.read().await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        let now = MicroTime(Timestamp::now());
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        let released = self.write(&lease).await?.is_some();
        if released {
            self.observed = None;
        }
        Ok(released)
    }

    /// Campaigns until `stop` resolves, publishing whether we lead on
    /// `leading`. A leader that cannot renew within the renew deadline steps
    /// down; on `stop` it steps down and releases the lease.
    pub async fn run(mut self, leading: watch::Sender<bool>, stop: impl Future<Output = ()>) {
        tokio::select! {
            () = self.campaign(&leading) => {}
            () = stop => {}
        }
        let was_leading = leading.send_replace(false);
        if !was_leading {
            return;
        }
        let deadline = self.timings.renew_deadline;
        match tokio::time::timeout(deadline, self.release()).await {
            Ok(Ok(true)) => {
                tracing::info!(identity = %self.identity, "released the reconcile lease")
            }
            Ok(Ok(false)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "could not release the reconcile lease"),
            Err(_) => tracing::warn!(
                timeout = ?deadline,
                "could not release the reconcile lease: the API server did not answer"
            ),
        }
    }

    async fn campaign(&mut self, leading: &watch::Sender<bool>) {
        let mut last_renewal: Option<Instant> = None;
        loop {
            let deadline = self.timings.renew_deadline;
            let round = tokio::time::timeout(deadline, self.try_acquire_or_renew(Instant::now()))
                .await
                .unwrap_or_else(|_| {
                    Err(LeaderError::Timeout {
                        namespace: self.namespace.clone(),
                        name: self.name.clone(),
                        timeout: deadline,
                    })
                });
            if let Some(health) = &self.health {
                health
                    .mark_api_server_reachable(!round.as_ref().is_err_and(LeaderError::is_outage));
            }
            let now = Instant::now();
            let was_leading = *leading.borrow();
            let lead = match round {
                Ok(true) => {
                    last_renewal = Some(now);
                    true
                }
                Ok(false) => false,
                Err(error) => {
                    tracing::warn!(%error, "leader election round failed");
                    was_leading && last_renewal.is_some_and(|at| now.duration_since(at) < deadline)
                }
            };
            if lead != was_leading {
                if lead {
                    tracing::info!(identity = %self.identity, "acquired the reconcile lease: leading");
                } else {
                    tracing::warn!(identity = %self.identity, "lost the reconcile lease: stepping down");
                }
                if leading.send(lead).is_err() {
                    return;
                }
            }
            tokio::time::sleep(self.timings.retry_period).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> LeaderError {
        LeaderError::Api {
            namespace: "ns".into(),
            name: "lease".into(),
            source: kube::Error::Api(
                kube::core::Status::failure("test", "Test")
                    .with_code(code)
                    .boxed(),
            ),
        }
    }

    #[test]
    fn only_silence_and_server_errors_count_as_an_outage() {
        let timeout = LeaderError::Timeout {
            namespace: "ns".into(),
            name: "lease".into(),
            timeout: Duration::from_secs(10),
        };
        assert!(timeout.is_outage());
        assert!(api_error(503).is_outage());
        assert!(api_error(500).is_outage());
        assert!(!api_error(403).is_outage(), "Forbidden is an answer");
        assert!(!api_error(409).is_outage());
    }
}
