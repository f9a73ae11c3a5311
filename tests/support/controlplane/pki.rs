//! Certificates and keys of the local control plane: one CA, the API
//! server's serving certificate, the admin's client certificate, the
//! node's and the API server's kubelet-client certificates, and the
//! service-account signing key.

use std::{net::IpAddr, path::Path};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Files written by [`Pki::write`], under the state folder.
pub struct PkiFiles {
    pub ca_cert: std::path::PathBuf,
    pub serving_cert: std::path::PathBuf,
    pub serving_key: std::path::PathBuf,
    pub admin_cert: std::path::PathBuf,
    pub admin_key: std::path::PathBuf,
    /// `system:node:<NODE_NAME>` in `system:nodes`: what the Node authorizer knows.
    pub node_cert: std::path::PathBuf,
    pub node_key: std::path::PathBuf,
    /// The API server's identity towards kubelets (logs, exec, stats).
    pub kubelet_client_cert: std::path::PathBuf,
    pub kubelet_client_key: std::path::PathBuf,
    pub service_account_key: std::path::PathBuf,
    pub service_account_public_key: std::path::PathBuf,
}

/// The name the test node registers as.
pub const NODE_NAME: &str = "chiller-node";

pub fn write(dir: &Path) -> PkiFiles {
    std::fs::create_dir_all(dir).expect("creating the pki folder");
    let now = OffsetDateTime::now_utc();
    let valid = |params: &mut CertificateParams| {
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(30);
    };
    let named = |cn: &str, org: Option<&str>| {
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, cn);
        if let Some(org) = org {
            name.push(DnType::OrganizationName, org);
        }
        name
    };

    let mut ca = CertificateParams::default();
    ca.distinguished_name = named("chiller-metrics test control plane CA", None);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    valid(&mut ca);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut serving = CertificateParams::default();
    serving.distinguished_name = named("kube-apiserver", None);
    serving.subject_alt_names = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
    ]
    .iter()
    .map(|n| SanType::DnsName((*n).try_into().unwrap()))
    .chain(
        ["127.0.0.1", "10.0.0.1", super::node::NODE_IP]
            .iter()
            .map(|ip| SanType::IpAddress(ip.parse::<IpAddr>().unwrap())),
    )
    .collect();
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    valid(&mut serving);
    let serving_key = KeyPair::generate().unwrap();
    let serving_cert = serving.signed_by(&serving_key, &issuer).unwrap();

    let mut admin = CertificateParams::default();
    admin.distinguished_name = named("chiller-metrics-test-admin", Some("system:masters"));
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    valid(&mut admin);
    let admin_key = KeyPair::generate().unwrap();
    let admin_cert = admin.signed_by(&admin_key, &issuer).unwrap();

    let client = |cn: &str, org: &str| {
        let mut params = CertificateParams::default();
        params.distinguished_name = named(cn, Some(org));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        valid(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let node = client(&format!("system:node:{NODE_NAME}"), "system:nodes");
    let kubelet_client = client("kube-apiserver-kubelet-client", "system:masters");

    let service_account_key = KeyPair::generate().unwrap();

    let files = PkiFiles {
        ca_cert: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        node_cert: dir.join("node.crt"),
        node_key: dir.join("node.key"),
        kubelet_client_cert: dir.join("apiserver-kubelet-client.crt"),
        kubelet_client_key: dir.join("apiserver-kubelet-client.key"),
        service_account_key: dir.join("service-account.key"),
        service_account_public_key: dir.join("service-account.pub"),
    };
    for (path, text) in [
        (&files.ca_cert, ca_cert.pem()),
        (&files.serving_cert, serving_cert.pem()),
        (&files.serving_key, serving_key.serialize_pem()),
        (&files.admin_cert, admin_cert.pem()),
        (&files.admin_key, admin_key.serialize_pem()),
        (&files.node_cert, node.0),
        (&files.node_key, node.1),
        (&files.kubelet_client_cert, kubelet_client.0),
        (&files.kubelet_client_key, kubelet_client.1),
        (
            &files.service_account_key,
            service_account_key.serialize_pem(),
        ),
        (
            &files.service_account_public_key,
            service_account_key.public_key_pem(),
        ),
    ] {
        std::fs::write(path, text).expect("writing a pki file");
    }
    files
}
