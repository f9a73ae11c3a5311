//! Serving TLS: rustls with the ring provider, ALPN h2 and http/1.1, and a
//! certificate that reloads when its files change (cert-manager rotations
//! swap a Secret volume's symlink; no restart needed).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use sha2::{Digest, Sha256};

use crate::admin::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not a PEM certificate chain: {detail}")]
    BadCertificate { path: PathBuf, detail: String },
    #[error("{path} is not a PEM private key: {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("key {key} does not fit certificate {cert}: {detail}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("TLS settings rejected: {0}")]
    Config(#[source] rustls::Error),
}

/// Lowest TLS version offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MinTlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[value(name = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    Tls13,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Loaded {
    key: Arc<CertifiedKey>,
    fingerprint: [u8; 32],
}

/// Resolves every handshake to the last good certificate from the files.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish()
    }
}

impl ReloadingCert {
    /// Loads the files once; fails if they are not a matching cert and key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        let (key, fingerprint) = read_pair(cert_path, key_path, &provider)?;
        Ok(Arc::new(Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider,
            current: RwLock::new(Loaded {
                key: Arc::new(key),
                fingerprint,
            }),
        }))
    }

    /// Reloads if the files changed. A pair that does not load (half written,
    /// mismatched) never replaces the good one. Returns whether it swapped.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let (cert_pem, key_pem) = read_files(&self.cert_path, &self.key_path)?;
        let fingerprint = fingerprint(&cert_pem, &key_pem);
        if self.current.read().expect("lock").fingerprint == fingerprint {
            return Ok(false);
        }
        let key = parse_pair(
            &cert_pem,
            &key_pem,
            &self.cert_path,
            &self.key_path,
            &self.provider,
        )?;
        *self.current.write().expect("lock") = Loaded {
            key: Arc::new(key),
            fingerprint,
        };
        Ok(true)
    }

    /// Reloads the files when their folder changes, and at least every
    /// `interval`, until the task is dropped.
    pub async fn watch(self: Arc<Self>, interval: Duration, metrics: Arc<Metrics>) {
        let this = self.clone();
        let mut failing = false;
        let files = [self.cert_path.as_path(), self.key_path.as_path()];
        crate::file_watch::watch(
            &files,
            interval,
            move || this.reload_if_changed(),
            |result| match result {
                Ok(true) => {
                    failing = false;
                    metrics
                        .tls_reloads
                        .get_or_create(&result_label("success"))
                        .inc();
                    tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded");
                }
                Ok(false) => failing = false,
                Err(error) => {
                    metrics
                        .tls_reloads
                        .get_or_create(&result_label("failure"))
                        .inc();
                    if !failing {
                        tracing::warn!(%error, "changed certificate not loaded; keeping the current one");
                    }
                    failing = true;
                }
            },
        )
        .await;
    }
}

fn result_label(result: &'static str) -> crate::admin::metrics_labels::ResultLabels {
    crate::admin::metrics_labels::ResultLabels { result }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("lock").key.clone())
    }
}

/// The rustls server config: AEAD suites only (rustls's defaults), ALPN h2 and http/1.1.
pub fn server_config(
    cert: Arc<ReloadingCert>,
    min_version: MinTlsVersion,
) -> Result<Arc<ServerConfig>, TlsError> {
    let versions: &[&rustls::SupportedProtocolVersion] = match min_version {
        MinTlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinTlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    // HTTP/1.1 first, as controller-runtime's webhooks (HTTP/2 off):
    // kube-apiserver, which offers both, then keeps a pool of connections
    // rather than multiplexing every review onto one. A client offering
    // only h2 still gets it.
    config.alpn_protocols = vec![b"http/1.1".to_vec(), b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn read_files(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    Ok((read(cert_path)?, read(key_path)?))
}

fn fingerprint(cert_pem: &[u8], key_pem: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(cert_pem);
    hasher.update([0]);
    hasher.update(key_pem);
    hasher.finalize().into()
}

fn read_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, [u8; 32]), TlsError> {
    let (cert_pem, key_pem) = read_files(cert_path, key_path)?;
    let key = parse_pair(&cert_pem, &key_pem, cert_path, key_path, provider)?;
    Ok((key, fingerprint(&cert_pem, &key_pem)))
}

fn parse_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::BadKey {
        path: key_path.to_path_buf(),
        detail: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Mismatch {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        detail: e.to_string(),
    })
}
