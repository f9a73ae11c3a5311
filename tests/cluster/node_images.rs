//! Self-tests of the image archives of tests/support/controlplane/images.rs, read back
//! as containerd reads them: blobs named by their sha256, layers stored once,
//! configs whose diff_ids are their layers, images named as the CRI knows
//! them. Nothing here needs root, a network or containerd.

use crate::support::controlplane;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read,
    path::Path,
};

use controlplane::images::{
    Entry, Image, ImageConfig, Layer, Source, deb822_sources, normalized, one_line_sources,
    write_archive,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The files of a tar by path, in order; panics on a path stored twice.
fn tar_files(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let mut archive = tar::Archive::new(bytes);
    let mut files = Vec::new();
    let mut seen = BTreeSet::new();
    for entry in archive.entries().expect("a tar") {
        let mut entry = entry.expect("a tar entry");
        let path = entry.path().unwrap().display().to_string();
        assert!(seen.insert(path.clone()), "{path} is stored twice");
        let mode = entry.header().mode().unwrap();
        let mut contents = Vec::new();
        entry.read_to_end(&mut contents).unwrap();
        files.push((path, mode, contents));
    }
    files
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// A layer tar as an image tool writes one: a folder and a file.
fn write_base_layer(path: &Path) {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    builder
        .append_data(&mut header, "etc/", std::io::empty())
        .unwrap();
    let os_release = b"ID=test\n";
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(os_release.len() as u64);
    builder
        .append_data(&mut header, "etc/os-release", &os_release[..])
        .unwrap();
    std::fs::write(path, builder.into_inner().unwrap()).unwrap();
}

#[test]
fn an_archive_names_blobs_by_digest_stores_a_shared_layer_once_and_names_images_as_the_cri_does() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.tar");
    write_base_layer(&base);
    let tool = dir.path().join("tool");
    std::fs::write(&tool, "#!/bin/sh\necho tool\n").unwrap();
    let images = [
        Image {
            name: "postgres:17-alpine".to_string(),
            layers: vec![
                Layer::Tar(base.clone()),
                Layer::Files(vec![Entry {
                    path: "/etc/motd".to_string(),
                    source: Source::Bytes(b"hello\n".to_vec()),
                    mode: 0o644,
                }]),
            ],
            config: ImageConfig {
                entrypoint: vec!["/bin/sh".to_string(), "-c".to_string()],
                cmd: vec!["postgres".to_string()],
                env: vec!["PGDATA=/var/lib/postgresql/data".to_string()],
                working_dir: Some("/var/lib/postgresql".to_string()),
                user: Some("999:999".to_string()),
            },
        },
        Image {
            name: "quay.io/x/y:v1".to_string(),
            layers: vec![
                Layer::Tar(base.clone()),
                Layer::Files(vec![
                    Entry {
                        path: "/usr/local/bin/tool".to_string(),
                        source: Source::File(tool.clone()),
                        mode: 0o755,
                    },
                    Entry {
                        path: "/tmp".to_string(),
                        source: Source::Dir,
                        mode: 0o1777,
                    },
                ]),
            ],
            config: ImageConfig::default(),
        },
    ];
    let archive_path = dir.path().join("images.tar");
    write_archive(&archive_path, &images).unwrap();

    let archive = std::fs::read(&archive_path).unwrap();
    let files: BTreeMap<String, Vec<u8>> = tar_files(&archive)
        .into_iter()
        .map(|(path, _, contents)| (path, contents))
        .collect();
    let layout: Value = serde_json::from_slice(&files["oci-layout"]).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");

    let mut blobs = BTreeMap::new();
    for (path, contents) in &files {
        if let Some(hex) = path.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
            assert_eq!(
                sha256(contents),
                format!("sha256:{hex}"),
                "{path} is not named by its sha256"
            );
            blobs.insert(format!("sha256:{hex}"), contents.clone());
        }
    }
    let blob_json = |digest: &Value| -> Value {
        let digest = digest.as_str().expect("a digest");
        serde_json::from_slice(
            blobs
                .get(digest)
                .unwrap_or_else(|| panic!("no blob {digest}")),
        )
        .unwrap()
    };

    let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    let names: Vec<(&str, &str)> = manifests
        .iter()
        .map(|m| {
            assert_eq!(m["platform"]["os"], "linux");
            let architecture = if cfg!(target_arch = "aarch64") {
                "arm64"
            } else {
                "amd64"
            };
            assert_eq!(m["platform"]["architecture"], architecture);
            let annotations = &m["annotations"];
            (
                annotations["io.containerd.image.name"].as_str().unwrap(),
                annotations["org.opencontainers.image.ref.name"]
                    .as_str()
                    .unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("docker.io/library/postgres:17-alpine", "17-alpine"),
            ("quay.io/x/y:v1", "v1")
        ]
    );

    let base_digest = sha256(&std::fs::read(&base).unwrap());
    let mut layer_digests = Vec::new();
    for descriptor in manifests {
        let manifest = blob_json(&descriptor["digest"]);
        let layers: Vec<&str> = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|layer| {
                assert_eq!(layer["mediaType"], "application/vnd.oci.image.layer.v1.tar");
                layer["digest"].as_str().unwrap()
            })
            .collect();
        let config = blob_json(&manifest["config"]["digest"]);
        assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!(layers));
        assert_eq!(config["os"], "linux");
        assert_eq!(layers[0], base_digest, "the base tar is the layer as is");
        layer_digests.extend(layers.iter().map(|d| d.to_string()));
    }
    // Two base references, one blob; two manifests, configs and own layers.
    assert_eq!(layer_digests.iter().collect::<BTreeSet<_>>().len(), 3);
    assert_eq!(blobs.len(), 3 + 2 + 2);

    let postgres = blob_json(&blob_json(&manifests[0]["digest"])["config"]["digest"]);
    assert_eq!(
        postgres["config"],
        serde_json::json!({
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["postgres"],
            "Env": ["PGDATA=/var/lib/postgresql/data"],
            "WorkingDir": "/var/lib/postgresql",
            "User": "999:999",
        })
    );
    let tool_layer = tar_files(&blobs[&layer_digests[3]]);
    let listing: Vec<(&str, u32)> = tool_layer
        .iter()
        .map(|(path, mode, _)| (path.as_str(), *mode))
        .collect();
    assert_eq!(
        listing,
        [
            ("tmp/", 0o1777),
            ("usr/", 0o755),
            ("usr/local/", 0o755),
            ("usr/local/bin/", 0o755),
            ("usr/local/bin/tool", 0o755),
        ],
        "folders above the files come first"
    );
    assert_eq!(tool_layer[4].2, std::fs::read(&tool).unwrap());
}

#[test]
fn the_same_images_make_the_same_archive() {
    let dir = tempfile::tempdir().unwrap();
    let image = || Image {
        name: "localhost/hello:v1".to_string(),
        layers: vec![Layer::Files(vec![Entry {
            path: "/hello".to_string(),
            source: Source::Bytes(b"hello".to_vec()),
            mode: 0o755,
        }])],
        config: ImageConfig::default(),
    };
    let (first, second) = (dir.path().join("1.tar"), dir.path().join("2.tar"));
    write_archive(&first, &[image()]).unwrap();
    write_archive(&second, &[image()]).unwrap();
    assert_eq!(
        std::fs::read(first).unwrap(),
        std::fs::read(second).unwrap()
    );
}

#[test]
fn paths_that_are_not_plain_absolute_paths_and_names_given_twice_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("images.tar");
    for path in ["relative", "/a/../b", "/a//b", "/"] {
        let image = Image {
            name: "localhost/bad:v1".to_string(),
            layers: vec![Layer::Files(vec![Entry {
                path: path.to_string(),
                source: Source::Dir,
                mode: 0o755,
            }])],
            config: ImageConfig::default(),
        };
        let error = write_archive(&archive, &[image]).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{path}");
    }
    let image = || Image {
        name: "postgres".to_string(),
        layers: vec![],
        config: ImageConfig::default(),
    };
    let error = write_archive(&archive, &[image(), image()]).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("docker.io/library/postgres:latest"),
        "{error}"
    );
    assert!(!archive.exists(), "no archive is left after an error");
}

#[test]
fn references_are_normalized_to_the_names_containerd_gives_images() {
    for (reference, name) in [
        ("postgres:17-alpine", "docker.io/library/postgres:17-alpine"),
        ("postgres", "docker.io/library/postgres:latest"),
        (
            "prom/statsd-exporter:v0.28.0",
            "docker.io/prom/statsd-exporter:v0.28.0",
        ),
        ("docker.io/postgres:17", "docker.io/library/postgres:17"),
        ("quay.io/x/y:v1", "quay.io/x/y:v1"),
        ("quay.io/x/y", "quay.io/x/y:latest"),
        ("localhost/pause:local", "localhost/pause:local"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
        (
            "chiller-e2e-app:e2e",
            "docker.io/library/chiller-e2e-app:e2e",
        ),
        (
            "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "docker.io/library/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ),
    ] {
        assert_eq!(normalized(reference), name, "{reference}");
    }
}

#[test]
fn apt_sources_in_either_format_give_their_bookworm_entries() {
    let one_line = "\
# deb http://old.example/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm main contrib
deb-src http://mirror.example/debian bookworm main
deb http://mirror.example/debian trixie main
deb http://mirror.example/debian-security bookworm-security main # security
";
    assert_eq!(
        one_line_sources(one_line),
        [
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm main contrib",
            "deb http://mirror.example/debian-security bookworm-security main",
        ]
    );
    let deb822 = "\
Types: deb deb-src
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 -----END PGP PUBLIC KEY BLOCK-----

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb
URIs: https://packages.example/apt
Suites: nodistro
Components: main
";
    assert_eq!(
        deb822_sources(deb822),
        [
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm main",
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm-updates main",
            "deb http://mirror.example/debian-security bookworm-security main",
        ]
    );
}
