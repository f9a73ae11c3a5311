//! TLS to the webhook: the certificate chain it presents, and whether a
//! caBundle verifies it (webpki, as the API server's Go TLS client would).

use std::{sync::Arc, time::Duration};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::CheckError;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any chain, so that the chain can be judged afterwards against the
/// caBundle with a precise reason; the handshake signatures are still
/// verified, so the peer holds the key of the certificate it presents.
#[derive(Debug)]
struct AcceptAnyChain(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyChain {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The server name a webhook client verifies: a DNS name or an IP address.
pub fn server_name(name: &str) -> Result<ServerName<'static>, CheckError> {
    ServerName::try_from(name.to_string()).map_err(|_| CheckError::Resolve {
        message: format!("{name:?} is neither a DNS name nor an IP address"),
    })
}

/// Handshakes with `address` (SNI `name`) and returns the presented chain,
/// leaf first.
pub async fn presented_chain(
    address: &str,
    name: &str,
    timeout: Duration,
) -> Result<Vec<CertificateDer<'static>>, CheckError> {
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| CheckError::Tls {
            address: address.to_string(),
            message: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyChain(provider)))
        .with_no_client_auth();
    let server_name = server_name(name)?;
    let handshake = async {
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|source| CheckError::Connect {
                address: address.to_string(),
                source,
            })?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|e| CheckError::Tls {
                address: address.to_string(),
                message: e.to_string(),
            })?;
        Ok::<_, CheckError>(
            tls.get_ref()
                .1
                .peer_certificates()
                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default(),
        )
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| CheckError::Timeout {
            what: format!("TLS handshake with {address}"),
            seconds: timeout.as_secs(),
        })?
}

/// Whether `ca_bundle` (PEM) verifies `chain` (leaf first) for `name` at
/// `now`; the error says why not, in words.
pub fn verify(
    chain: &[CertificateDer<'_>],
    ca_bundle: &[u8],
    name: &str,
    now: UnixTime,
) -> Result<(), String> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| "the webhook presented no certificate".to_string())?;
    let cas = CertificateDer::pem_slice_iter(ca_bundle)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the caBundle is not PEM: {e}"))?;
    if cas.is_empty() {
        return Err("the caBundle holds no certificate".into());
    }
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| format!("the caBundle holds an unusable certificate: {e}"))?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| format!("cannot use the caBundle: {e}"))?;
    let server_name = server_name(name).map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(leaf, intermediates, &server_name, &[], now)
        .map(|_| ())
        .map_err(|error| match error {
            rustls::Error::InvalidCertificate(reason) => describe(&reason, name),
            other => other.to_string(),
        })
}

fn describe(reason: &rustls::CertificateError, name: &str) -> String {
    use rustls::CertificateError as E;
    match reason {
        E::UnknownIssuer => "the certificate is not signed by a CA in the caBundle".into(),
        E::BadSignature => "the certificate is not signed by a CA in the caBundle (one there has the issuer's name, but another key)".into(),
        E::Expired | E::ExpiredContext { .. } => "the certificate has expired".into(),
        E::NotValidYet | E::NotValidYetContext { .. } => "the certificate is not valid yet".into(),
        E::NotValidForName | E::NotValidForNameContext { .. } => {
            format!("the certificate is not valid for {name}")
        }
        other => format!("the certificate does not verify: {other:?}"),
    }
}

/// notAfter of a DER certificate, in seconds since the epoch.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("cannot parse the presented certificate: {e}"))?;
    Ok(parsed.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated(names: &[&str]) -> crate::certs::GeneratedCerts {
        crate::certs::generate(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn the_own_ca_verifies_and_another_does_not() {
        let certs = generated(&["chiller-metrics.chiller-metrics.svc", "127.0.0.1"]);
        let other = generated(&["chiller-metrics.chiller-metrics.svc"]);
        let chain = chain(&certs.cert);
        let now = UnixTime::now();
        for name in ["chiller-metrics.chiller-metrics.svc", "127.0.0.1"] {
            assert_eq!(verify(&chain, certs.ca_cert.as_bytes(), name, now), Ok(()));
        }
        // Same CA name, another key.
        let error = verify(&chain, other.ca_cert.as_bytes(), "127.0.0.1", now).unwrap_err();
        assert!(
            error.starts_with("the certificate is not signed by a CA in the caBundle"),
            "{error}"
        );
        assert_eq!(
            verify(&chain, certs.ca_cert.as_bytes(), "other.example", now),
            Err("the certificate is not valid for other.example".into())
        );
        assert!(verify(&chain, b"", "127.0.0.1", now).is_err());
        assert!(verify(&[], certs.ca_cert.as_bytes(), "127.0.0.1", now).is_err());
    }

    #[test]
    fn not_after_is_a_year_ahead() {
        let certs = generated(&["a.example"]);
        let seconds = not_after(&chain(&certs.cert)[0]).unwrap();
        let now = UnixTime::now().as_secs() as i64;
        let days = (seconds - now) / 86_400;
        assert!((360..=366).contains(&days), "{days}");
    }
}
