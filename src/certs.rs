//! `chiller-metrics certs`: a CA and a serving certificate signed by it (rcgen),
//! written under the names a `kubernetes.io/tls` Secret uses.

use std::{net::IpAddr, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("no --dns names given; the serving certificate needs at least one")]
    NoNames,
    #[error("{0:?} is neither a DNS name nor an IP address")]
    BadName(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// PEM text of the generated files.
#[derive(Debug, Clone)]
pub struct GeneratedCerts {
    pub ca_cert: String,
    pub cert: String,
    pub key: String,
}

impl GeneratedCerts {
    /// The `caBundle` of a webhook configuration: base64 of the CA's PEM.
    pub fn ca_bundle(&self) -> String {
        STANDARD.encode(self.ca_cert.as_bytes())
    }
}

fn san(name: &str) -> Result<SanType, CertsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
        });
    if !valid {
        return Err(CertsError::BadName(name.to_string()));
    }
    Ok(SanType::DnsName(
        name.try_into()
            .map_err(|_| CertsError::BadName(name.to_string()))?,
    ))
}

/// Generates a CA (10 years) and a serving certificate (1 year) for `names`.
pub fn generate(names: &[String]) -> Result<GeneratedCerts, CertsError> {
    if names.is_empty() {
        return Err(CertsError::NoNames);
    }
    let sans = names
        .iter()
        .map(|n| san(n))
        .collect::<Result<Vec<_>, _>>()?;
    let now = OffsetDateTime::now_utc();

    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "chiller-metrics webhook CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = now - Duration::hours(1);
    ca_params.not_after = now + Duration::days(3650);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(365);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(GeneratedCerts {
        ca_cert: ca_cert.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Writes `ca.crt`, `tls.crt` and `tls.key` (mode 0600) into `dir`.
pub fn write(dir: &Path, certs: &GeneratedCerts) -> Result<(), CertsError> {
    let fail = |path: &Path| {
        let path = path.display().to_string();
        move |source| CertsError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(fail(dir))?;
    for (name, text, private) in [
        ("ca.crt", &certs.ca_cert, false),
        ("tls.crt", &certs.cert, false),
        ("tls.key", &certs.key, true),
    ] {
        let path = dir.join(name);
        write_file(&path, text.as_bytes(), private).map_err(fail(&path))?;
    }
    Ok(())
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_file(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(matches!(generate(&[]), Err(CertsError::NoNames)));
        assert!(matches!(
            generate(&["bad name".into()]),
            Err(CertsError::BadName(_))
        ));
    }

    #[test]
    fn writes_a_loadable_pair() {
        let dir = tempfile::tempdir().unwrap();
        let certs = generate(&["svc.ns.svc".into(), "127.0.0.1".into()]).unwrap();
        write(dir.path(), &certs).unwrap();
        crate::webhook::tls::ReloadingCert::load(
            &dir.path().join("tls.crt"),
            &dir.path().join("tls.key"),
        )
        .unwrap();
        let decoded = STANDARD.decode(certs.ca_bundle()).unwrap();
        assert!(
            String::from_utf8(decoded)
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("tls.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
