//! The config `serve` runs with, reloaded when its file changes. A mounted
//! ConfigMap changes by an atomic swap of its `..data` symlink, so its
//! folder is watched and the file compared by content hash (as the serving
//! certificate is). A new config that does not load or validate never
//! replaces the running one. Each replacement is announced on
//! [`LiveInjector::changes`], so the reconcile loop acts on it at once.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use sha2::{Digest, Sha256};

use crate::{
    admin::{Metrics, metrics_labels::ResultLabels},
    config::{Config, ConfigError, Overrides},
    inject::{Injector, ResolvedMode},
};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "domain changed from {running:?} to {new:?}; every watch and key depends on it, restart to change it"
    )]
    DomainChanged { running: String, new: String },
}

/// Where the config comes from, to load it again.
#[derive(Debug, Clone)]
struct Source {
    path: PathBuf,
    overrides: Overrides,
}

#[derive(Debug)]
struct Current {
    injector: Arc<Injector>,
    fingerprint: Option<[u8; 32]>,
}

/// The current [`Injector`]; every reader gets the last good one.
#[derive(Debug)]
pub struct LiveInjector {
    source: Option<Source>,
    current: RwLock<Current>,
    /// The content last rejected: reported once, not on every poll.
    rejected: std::sync::Mutex<Option<[u8; 32]>>,
    /// Bumped each time the injector is replaced.
    generation: tokio::sync::watch::Sender<u64>,
    /// Resolves `auto` mode; known once the API server has answered.
    server_version: RwLock<Option<(u32, u32)>>,
}

impl From<Injector> for Arc<LiveInjector> {
    fn from(injector: Injector) -> Self {
        LiveInjector::fixed(injector)
    }
}

impl LiveInjector {
    /// An injector that never changes (no config file).
    pub fn fixed(injector: Injector) -> Arc<Self> {
        Arc::new(Self {
            source: None,
            current: RwLock::new(Current {
                injector: Arc::new(injector),
                fingerprint: None,
            }),
            rejected: Default::default(),
            generation: tokio::sync::watch::Sender::new(0),
            server_version: RwLock::new(None),
        })
    }

    /// Loads `path` with `overrides`; `server_version` resolves `auto` mode
    /// for every later load too.
    pub fn load(
        path: Option<&Path>,
        overrides: Overrides,
        server_version: Option<(u32, u32)>,
    ) -> Result<Arc<Self>, ConfigError> {
        let Some(path) = path else {
            let config = Config::load(None, &overrides)?;
            let mode = ResolvedMode::resolve(config.sidecar.mode, server_version);
            return Ok(Self::fixed(Injector::new(config, mode)));
        };
        let source = Source {
            path: path.to_path_buf(),
            overrides,
        };
        let (injector, fingerprint) = source.load(server_version)?;
        Ok(Arc::new(Self {
            source: Some(source),
            current: RwLock::new(Current {
                injector: Arc::new(injector),
                fingerprint: Some(fingerprint),
            }),
            rejected: Default::default(),
            generation: tokio::sync::watch::Sender::new(0),
            server_version: RwLock::new(server_version),
        }))
    }

    pub fn current(&self) -> Arc<Injector> {
        self.current.read().expect("lock").injector.clone()
    }

    /// Records the API server's version, which resolves `auto` mode for this
    /// and every later config; replaces the injector if its mode changes.
    pub fn set_server_version(&self, version: (u32, u32)) {
        *self.server_version.write().expect("lock") = Some(version);
        let mut current = self.current.write().expect("lock");
        let config = current.injector.config();
        let mode = ResolvedMode::resolve(config.sidecar.mode, Some(version));
        if mode == current.injector.mode() {
            return;
        }
        current.injector = Arc::new(Injector::new(config.clone(), mode));
        drop(current);
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// Changes each time a new config replaces the running one.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Loads the file again if its content changed; returns whether the
    /// injector was replaced. On error the running one stays.
    pub fn reload_if_changed(&self) -> Result<bool, ReloadError> {
        let Some(source) = &self.source else {
            return Ok(false);
        };
        let text = source.read()?;
        let fingerprint = fingerprint(&text);
        if self.current.read().expect("lock").fingerprint == Some(fingerprint)
            || *self.rejected.lock().expect("lock") == Some(fingerprint)
        {
            return Ok(false);
        }
        let reject = |error: ReloadError| {
            *self.rejected.lock().expect("lock") = Some(fingerprint);
            Err(error)
        };
        let server_version = *self.server_version.read().expect("lock");
        let injector = match source.parse(&text, server_version) {
            Ok(injector) => injector,
            Err(error) => return reject(error.into()),
        };
        let mut current = self.current.write().expect("lock");
        let running = &current.injector.config().domain;
        if *running != injector.config().domain {
            return reject(ReloadError::DomainChanged {
                running: running.clone(),
                new: injector.config().domain.clone(),
            });
        }
        *current = Current {
            injector: Arc::new(injector),
            fingerprint: Some(fingerprint),
        };
        drop(current);
        self.generation.send_modify(|generation| *generation += 1);
        Ok(true)
    }

    /// Reloads the file when its folder changes, and at least every
    /// `interval`, until the task is dropped.
    pub async fn watch(self: Arc<Self>, interval: Duration, metrics: Arc<Metrics>) {
        if self.source.is_none() {
            return;
        }
        let this = self.clone();
        let label = |result| ResultLabels { result };
        let path = self
            .source
            .as_ref()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        crate::file_watch::watch(
            &[&path],
            interval,
            move || this.reload_if_changed(),
            |result| match result {
                Ok(true) => {
                    metrics
                        .config_reloads
                        .get_or_create(&label("success"))
                        .inc();
                    let injector = self.current();
                    tracing::info!(config_hash = %injector.hashes().config, "config file changed: reloaded");
                }
                Ok(false) => {}
                Err(error) => {
                    metrics
                        .config_reloads
                        .get_or_create(&label("failure"))
                        .inc();
                    tracing::error!(%error, "changed config rejected; keeping the running config");
                }
            },
        )
        .await;
    }
}

impl Source {
    fn read(&self) -> Result<String, ConfigError> {
        std::fs::read_to_string(&self.path).map_err(|source| ConfigError::Read {
            path: self.path.display().to_string(),
            source,
        })
    }

    fn parse(
        &self,
        text: &str,
        server_version: Option<(u32, u32)>,
    ) -> Result<Injector, ConfigError> {
        let config = Config::from_text(text, &self.path, &self.overrides)?;
        let mode = ResolvedMode::resolve(config.sidecar.mode, server_version);
        Ok(Injector::new(config, mode))
    }

    fn load(
        &self,
        server_version: Option<(u32, u32)>,
    ) -> Result<(Injector, [u8; 32]), ConfigError> {
        let text = self.read()?;
        Ok((self.parse(&text, server_version)?, fingerprint(&text)))
    }
}

fn fingerprint(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        // Like the kubelet: a new file renamed over the old one.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn a_changed_file_replaces_the_config_and_a_bad_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        write(&path, "sidecar:\n  image: exporter:1\n");
        let live = LiveInjector::load(Some(&path), Overrides::default(), None).unwrap();
        assert_eq!(live.current().config().sidecar.image, "exporter:1");
        assert!(!live.reload_if_changed().unwrap(), "unchanged");

        write(&path, "sidecar:\n  image: exporter:2\n");
        assert!(live.reload_if_changed().unwrap());
        assert_eq!(live.current().config().sidecar.image, "exporter:2");

        write(&path, "sidecar:\n  imagee: exporter:3\n");
        assert!(matches!(
            live.reload_if_changed(),
            Err(ReloadError::Config(ConfigError::Parse { .. }))
        ));
        write(&path, "sidecar:\n  statsdPort: 0\n");
        assert!(matches!(
            live.reload_if_changed(),
            Err(ReloadError::Config(ConfigError::Invalid { .. }))
        ));
        assert!(
            !live.reload_if_changed().unwrap(),
            "rejected once, not again"
        );
        write(&path, "domain: example.com\n");
        assert!(matches!(
            live.reload_if_changed(),
            Err(ReloadError::DomainChanged { .. })
        ));
        assert_eq!(live.current().config().sidecar.image, "exporter:2");
    }

    #[test]
    fn only_a_config_that_replaces_the_running_one_is_announced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        write(&path, "sidecar:\n  image: exporter:1\n");
        let live = LiveInjector::load(Some(&path), Overrides::default(), None).unwrap();
        let changes = live.changes();
        live.reload_if_changed().unwrap();
        assert!(!changes.has_changed().unwrap(), "an unchanged file");
        write(&path, "sidecar:\n  statsdPort: 0\n");
        assert!(live.reload_if_changed().is_err());
        assert!(!changes.has_changed().unwrap(), "a rejected file");
        write(&path, "sidecar:\n  image: exporter:2\n");
        assert!(live.reload_if_changed().unwrap());
        assert!(changes.has_changed().unwrap(), "a new config");
    }

    #[test]
    fn overrides_apply_to_every_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        write(&path, "sidecar:\n  image: exporter:1\n");
        let overrides = Overrides {
            sidecar_image: Some("pinned:1".into()),
            ..Default::default()
        };
        let live = LiveInjector::load(Some(&path), overrides, None).unwrap();
        write(&path, "sidecar:\n  image: exporter:2\n  statsdPort: 9999\n");
        assert!(live.reload_if_changed().unwrap());
        let current = live.current();
        assert_eq!(current.config().sidecar.image, "pinned:1");
        assert_eq!(current.config().sidecar.statsd_port, 9999);
    }
}
