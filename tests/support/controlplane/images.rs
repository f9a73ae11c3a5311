//! Container images for a node without a registry. [`write_archive`] writes
//! images into one OCI image-layout tar that `ctr -n k8s.io images import`
//! takes, each under the name containerd's CRI knows it by
//! ([`normalized`]), so `imagePullPolicy: IfNotPresent` finds it.
//!
//! What takes long to make is made once per machine and cached under
//! `$HOME/.cache/chiller-metrics` ([`cache_dir`]): a Debian 12 root filesystem
//! with python3 and PostgreSQL ([`debian_rootfs`]), the test app's Python
//! packages ([`app_packages`]) and the static pause program ([`pause_image`]).
//!
//! The test app's image, for example, is [`debian_rootfs`] as a
//! [`Layer::Tar`], [`app_packages_layer`] and a layer with app.py at /app,
//! with tests/e2e/app/Dockerfile's shell-form entrypoint, user 10001 and
//! working folder /app, and a PATH with /usr/local/bin and [`app_pythonpath`]
//! in its environment. Postgres's is [`debian_rootfs`] with
//! tests/e2e/local/postgres-entrypoint.sh as its entrypoint; the two share
//! the root filesystem's layer.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ffi::OsStr,
    fs::{self, File},
    io::{self, BufWriter, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::Instant,
};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// An image, as a pod references it, and what it is made of.
pub struct Image {
    /// As a pod references it, e.g. `postgres:17-alpine`.
    pub name: String,
    /// Bottom layer first.
    pub layers: Vec<Layer>,
    pub config: ImageConfig,
}

/// The parts of an image's config that a container runtime uses.
#[derive(Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value` pairs.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// `uid[:gid]`, or a user of the image's /etc/passwd.
    pub user: Option<String>,
}

/// One filesystem layer of an image.
pub enum Layer {
    /// An existing uncompressed tar, used as the layer as is.
    Tar(PathBuf),
    /// A layer of these entries, owned by root. Folders above them that are
    /// not listed are added with mode 0755.
    Files(Vec<Entry>),
}

/// A file or folder of a [`Layer::Files`].
pub struct Entry {
    /// Absolute path in the image.
    pub path: String,
    pub source: Source,
    /// Permission bits, e.g. `0o755`.
    pub mode: u32,
}

/// What an [`Entry`] holds.
pub enum Source {
    /// The contents of a file on this machine.
    File(PathBuf),
    Bytes(Vec<u8>),
    /// A folder.
    Dir,
}

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// The annotation `ctr images import` names an image by.
const IMAGE_NAME_ANNOTATION: &str = "io.containerd.image.name";
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// The name containerd's CRI knows the image by, as Docker normalizes
/// references: `postgres:17-alpine` -> `docker.io/library/postgres:17-alpine`,
/// `prom/statsd-exporter:v0.28.0` -> `docker.io/prom/statsd-exporter:v0.28.0`,
/// `quay.io/x/y:v1` unchanged; without a tag or digest, `:latest`.
pub fn normalized(reference: &str) -> String {
    let (domain, remainder) = match reference.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            (first, rest.to_string())
        }
        _ => ("docker.io", reference.to_string()),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    let remainder = if domain == "docker.io" && !remainder.contains('/') {
        format!("library/{remainder}")
    } else {
        remainder
    };
    let last = remainder.rsplit('/').next().unwrap_or_default();
    if remainder.contains('@') || last.contains(':') {
        format!("{domain}/{remainder}")
    } else {
        format!("{domain}/{remainder}:latest")
    }
}

/// The tag (or digest) of a normalized reference.
fn ref_name(normalized: &str) -> &str {
    if let Some((_, digest)) = normalized.split_once('@') {
        return digest;
    }
    let last = normalized.rsplit('/').next().unwrap_or_default();
    last.split_once(':').map_or("latest", |(_, tag)| tag)
}

/// The OCI name of this machine's architecture (`amd64` on x86_64).
fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes one OCI image-layout tar holding all `images`: one blob per
/// distinct layer (a layer shared by images is stored once), uncompressed so
/// that each layer's diff_id is its digest, a config per image with
/// `rootfs.diff_ids`, and in index.json a manifest per image with its platform
/// and its name ([`normalized`]) and tag as annotations. The archive appears
/// at `path` only once it is complete.
pub fn write_archive(path: &Path, images: &[Image]) -> io::Result<()> {
    let mut blobs = Blobs::default();
    let mut names = BTreeSet::new();
    let mut manifests = Vec::new();
    for image in images {
        let name = normalized(&image.name);
        if !names.insert(name.clone()) {
            return Err(invalid_input(format!("two images are named {name}")));
        }
        let layers = image
            .layers
            .iter()
            .map(|layer| blobs.add_layer(layer))
            .collect::<io::Result<Vec<_>>>()?;
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
        let config = blobs.add_json(&config_json(&image.config, &diff_ids));
        let manifest = blobs.add_json(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.json(CONFIG_MEDIA_TYPE),
            "layers": layers.iter().map(|l| l.json(LAYER_MEDIA_TYPE)).collect::<Vec<_>>(),
        }));
        let mut descriptor = manifest.json(MANIFEST_MEDIA_TYPE);
        descriptor["platform"] = json!({"architecture": oci_architecture(), "os": "linux"});
        descriptor["annotations"] = json!({
            IMAGE_NAME_ANNOTATION: name,
            REF_NAME_ANNOTATION: ref_name(&name),
        });
        manifests.push(descriptor);
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": manifests,
    });

    let file_name = path
        .file_name()
        .ok_or_else(|| invalid_input(format!("{} names no file", path.display())))?;
    // Per process: two test processes may write the same archive at once;
    // the rename makes either whole copy the archive.
    let mut partial_name = file_name.to_os_string();
    partial_name.push(format!(".{}.partial", std::process::id()));
    let partial = path.with_file_name(partial_name);
    let written = write_layout(&partial, &index, &blobs).and_then(|()| fs::rename(&partial, path));
    if written.is_err() {
        let _ = fs::remove_file(&partial);
    }
    written
}

/// The image config: architecture, os, the runtime settings and diff_ids.
fn config_json(config: &ImageConfig, diff_ids: &[&str]) -> Value {
    let mut runtime = serde_json::Map::new();
    for (key, list) in [
        ("Entrypoint", &config.entrypoint),
        ("Cmd", &config.cmd),
        ("Env", &config.env),
    ] {
        if !list.is_empty() {
            runtime.insert(key.into(), json!(list));
        }
    }
    for (key, value) in [("WorkingDir", &config.working_dir), ("User", &config.user)] {
        if let Some(value) = value {
            runtime.insert(key.into(), json!(value));
        }
    }
    json!({
        "architecture": oci_architecture(),
        "os": "linux",
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
}

/// Writes the image layout's files as a tar at `path`.
fn write_layout(path: &Path, index: &Value, blobs: &Blobs) -> io::Result<()> {
    let mut archive = tar::Builder::new(BufWriter::new(File::create(path)?));
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    append_bytes(&mut archive, "oci-layout", 0o644, layout)?;
    append_bytes(
        &mut archive,
        "index.json",
        0o644,
        &serde_json::to_vec(index)?,
    )?;
    append_dir(&mut archive, "blobs/", 0o755)?;
    append_dir(&mut archive, "blobs/sha256/", 0o755)?;
    for (digest, (descriptor, contents)) in &blobs.by_digest {
        let name = format!("blobs/{}", digest.replacen(':', "/", 1));
        match contents {
            BlobContents::Bytes(bytes) => append_bytes(&mut archive, &name, 0o644, bytes)?,
            BlobContents::File(source) => {
                let file = File::open(source)?;
                if file.metadata()?.len() != descriptor.size {
                    return Err(io::Error::other(format!(
                        "{} changed while the archive was written",
                        source.display()
                    )));
                }
                let mut header = file_header(descriptor.size, 0o644);
                archive.append_data(&mut header, &name, file)?;
            }
        }
    }
    archive.into_inner()?.flush()
}

/// The blobs of an archive by digest, each stored once.
#[derive(Default)]
struct Blobs {
    by_digest: BTreeMap<String, (Descriptor, BlobContents)>,
    /// [`Layer::Tar`] files already hashed.
    tars: HashMap<PathBuf, Descriptor>,
}

enum BlobContents {
    Bytes(Vec<u8>),
    File(PathBuf),
}

#[derive(Clone)]
struct Descriptor {
    /// `sha256:<hex>`.
    digest: String,
    size: u64,
}

impl Descriptor {
    fn json(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.size})
    }
}

impl Blobs {
    fn add_layer(&mut self, layer: &Layer) -> io::Result<Descriptor> {
        match layer {
            Layer::Tar(path) => {
                if let Some(descriptor) = self.tars.get(path) {
                    return Ok(descriptor.clone());
                }
                let descriptor = file_descriptor(path).map_err(|error| {
                    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
                })?;
                self.tars.insert(path.clone(), descriptor.clone());
                self.by_digest
                    .entry(descriptor.digest.clone())
                    .or_insert_with(|| (descriptor.clone(), BlobContents::File(path.clone())));
                Ok(descriptor)
            }
            Layer::Files(entries) => Ok(self.add_bytes(files_layer(entries)?)),
        }
    }

    fn add_json(&mut self, value: &Value) -> Descriptor {
        self.add_bytes(serde_json::to_vec(value).expect("JSON values serialize"))
    }

    fn add_bytes(&mut self, bytes: Vec<u8>) -> Descriptor {
        let descriptor = Descriptor {
            digest: format!("sha256:{:x}", Sha256::digest(&bytes)),
            size: bytes.len() as u64,
        };
        self.by_digest
            .entry(descriptor.digest.clone())
            .or_insert_with(|| (descriptor.clone(), BlobContents::Bytes(bytes)));
        descriptor
    }
}

/// The digest and size of a file, read once.
fn file_descriptor(path: &Path) -> io::Result<Descriptor> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let size = io::copy(&mut file, &mut hasher)?;
    Ok(Descriptor {
        digest: format!("sha256:{:x}", hasher.finalize()),
        size,
    })
}

/// A layer tar of `entries` and the folders above them, parents first,
/// owned by root, with the same bytes for the same entries.
fn files_layer(entries: &[Entry]) -> io::Result<Vec<u8>> {
    let mut listed = BTreeMap::new();
    for entry in entries {
        let path = layer_path(&entry.path)?;
        if listed.insert(path, entry).is_some() {
            return Err(invalid_input(format!("{} is listed twice", entry.path)));
        }
    }
    let mut implied = BTreeSet::new();
    for path in listed.keys() {
        let mut child = path.as_str();
        while let Some((parent, _)) = child.rsplit_once('/') {
            match listed.get(parent) {
                Some(Entry {
                    source: Source::Dir,
                    ..
                }) => {}
                Some(_) => {
                    return Err(invalid_input(format!(
                        "/{parent} is a file, yet /{path} is inside it"
                    )));
                }
                None => {
                    implied.insert(parent.to_string());
                }
            }
            child = parent;
        }
    }
    let paths: BTreeSet<&String> = listed.keys().chain(&implied).collect();

    let mut layer = tar::Builder::new(Vec::new());
    for path in paths {
        let Some(entry) = listed.get(path) else {
            append_dir(&mut layer, &format!("{path}/"), 0o755)?;
            continue;
        };
        match &entry.source {
            Source::Dir => append_dir(&mut layer, &format!("{path}/"), entry.mode)?,
            Source::Bytes(bytes) => append_bytes(&mut layer, path, entry.mode, bytes)?,
            Source::File(source) => {
                let file = File::open(source).map_err(|error| {
                    io::Error::new(error.kind(), format!("{}: {error}", source.display()))
                })?;
                let mut header = file_header(file.metadata()?.len(), entry.mode);
                layer.append_data(&mut header, path, file)?;
            }
        }
    }
    layer.into_inner()
}

/// `/usr/bin/x` -> `usr/bin/x`; refuses relative paths, `.`, `..` and empty
/// components.
fn layer_path(absolute: &str) -> io::Result<String> {
    let relative = absolute
        .strip_prefix('/')
        .ok_or_else(|| invalid_input(format!("{absolute:?} is not an absolute path")))?;
    let relative = relative.strip_suffix('/').unwrap_or(relative);
    if relative
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(invalid_input(format!(
            "{absolute:?} is not a plain path below /"
        )));
    }
    Ok(relative.to_string())
}

/// The entries of the folder `source` and everything in it, placed at `at`
/// in the image, with their permission bits; for a [`Layer::Files`].
pub fn directory_entries(source: &Path, at: &str) -> io::Result<Vec<Entry>> {
    let mut entries = vec![Entry {
        path: at.to_string(),
        source: Source::Dir,
        mode: fs::metadata(source)?.permissions().mode() & 0o7777,
    }];
    let mut children: Vec<_> = fs::read_dir(source)?.collect::<io::Result<_>>()?;
    children.sort_by_key(|child| child.file_name());
    for child in children {
        let name = child.file_name();
        let name = name.to_str().ok_or_else(|| {
            invalid_input(format!("{}: not a UTF-8 name", child.path().display()))
        })?;
        let path = format!("{}/{name}", at.trim_end_matches('/'));
        let metadata = fs::symlink_metadata(child.path())?;
        if metadata.is_dir() {
            entries.extend(directory_entries(&child.path(), &path)?);
        } else if metadata.is_file() {
            entries.push(Entry {
                path,
                source: Source::File(child.path()),
                mode: metadata.permissions().mode() & 0o7777,
            });
        } else {
            return Err(invalid_input(format!(
                "{}: only files and folders go into a layer",
                child.path().display()
            )));
        }
    }
    Ok(entries)
}

/// A header for a regular file owned by root, dated 1970 so that the same
/// contents make the same tar.
fn file_header(size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

fn append_bytes<W: Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    mode: u32,
    bytes: &[u8],
) -> io::Result<()> {
    let mut header = file_header(bytes.len() as u64, mode);
    archive.append_data(&mut header, path, bytes)
}

fn append_dir<W: Write>(archive: &mut tar::Builder<W>, path: &str, mode: u32) -> io::Result<()> {
    let mut header = file_header(0, mode);
    header.set_entry_type(tar::EntryType::Directory);
    archive.append_data(&mut header, path, io::empty())
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

// ---------------------------------------------------------------------------
// What the e2e images are made of, cached once per machine.

/// Where the made parts are kept: `$XDG_CACHE_HOME/chiller-metrics`, else
/// `$HOME/.cache/chiller-metrics`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .expect("neither XDG_CACHE_HOME nor HOME is set: set HOME for the image cache");
    base.join("chiller-metrics")
}

/// The cache entry `name`, made by `make` if it is missing. `make` writes a
/// file or folder at the path it is given (`name.partial-PID`), which becomes
/// the entry only once `make` returns: a killed or failed run leaves no
/// half-made entry. An exclusive lock on `name.lock` makes a concurrent test
/// binary wait for the entry instead of making it too.
fn cached(name: &str, make: impl FnOnce(&Path)) -> PathBuf {
    let dir = cache_dir();
    fs::create_dir_all(&dir)
        .unwrap_or_else(|error| panic!("creating the cache folder {}: {error}", dir.display()));
    let entry = dir.join(name);
    let lock_path = dir.join(format!("{name}.lock"));
    let lock = File::create(&lock_path)
        .unwrap_or_else(|error| panic!("creating {}: {error}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|error| panic!("locking {}: {error}", lock_path.display()));
    if entry.exists() {
        return entry;
    }
    // What killed runs left.
    let leftover = format!("{name}.partial-");
    for stale in fs::read_dir(&dir).into_iter().flatten().flatten() {
        if stale.file_name().to_string_lossy().starts_with(&leftover) {
            RemovedOnDrop(stale.path()).remove();
        }
    }
    let partial = RemovedOnDrop(dir.join(format!("{leftover}{}", std::process::id())));
    make(&partial.0);
    fs::rename(&partial.0, &entry).unwrap_or_else(|error| {
        panic!(
            "renaming {} to {}: {error}",
            partial.0.display(),
            entry.display()
        )
    });
    entry
}

/// A file or folder removed when this goes out of scope.
struct RemovedOnDrop(PathBuf);

impl RemovedOnDrop {
    fn remove(&self) {
        let _ = fs::remove_dir_all(&self.0);
        let _ = fs::remove_file(&self.0);
    }
}

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The first 16 hex digits of the sha256 of `inputs`, for cache entry names.
fn inputs_hash<T: AsRef<[u8]>>(inputs: impl IntoIterator<Item = T>) -> String {
    let mut hasher = Sha256::new();
    for input in inputs {
        hasher.update((input.as_ref().len() as u64).to_le_bytes());
        hasher.update(input);
    }
    format!("{:x}", hasher.finalize())[..16].to_string()
}

/// `program` under `timeout`: stopped after `seconds`, or when this process
/// dies. `timeout` gets SIGTERM then and passes it on, so mmdebstrap still
/// cleans up its mounts, and no orphan goes on writing into a partial entry.
/// (The signal comes when the forking thread ends; [`run_to_end`] waits on
/// that thread.)
fn within(seconds: u32, program: impl AsRef<OsStr>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new("timeout");
    command
        .args(["--kill-after=30", &seconds.to_string()])
        .arg(program)
        .stdin(Stdio::null());
    let parent = std::process::id() as i32;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    command
}

/// Runs `command` (see [`within`]) to its end and returns its output; when
/// it cannot start, fails or times out, panics naming it, with the last lines
/// of its output and `hint`.
fn run_to_end(command: &mut Command, hint: &str) -> Output {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("running {shown}: {error}\n{hint}"));
    if output.status.success() {
        return output;
    }
    let text = [&output.stdout, &output.stderr]
        .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
        .join("\n");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    let outcome = match output.status.code() {
        Some(124 | 137) => "did not finish in time".to_string(),
        Some(127) => "did not start: program not found".to_string(),
        _ => format!("failed ({})", output.status),
    };
    panic!("{shown} {outcome}:\n{tail}\n{hint}")
}

/// The Debian release of the root filesystem; its python3 is 3.11.
const DEBIAN_SUITE: &str = "bookworm";
/// The suites of [`DEBIAN_SUITE`] that the root filesystem is made from.
const DEBIAN_SUITES: [&str; 3] = ["bookworm", "bookworm-updates", "bookworm-security"];
/// What the root filesystem holds besides Debian's essential packages (dash as
/// /bin/sh, coreutils): the app's python3, and PostgreSQL with util-linux's
/// runuser for tests/e2e/local/postgres-entrypoint.sh.
const DEBIAN_PACKAGES: &[&str] = &["python3", "postgresql", "util-linux"];
/// Where apt's sources are configured.
const APT_SOURCES_LIST: &str = "/etc/apt/sources.list";
const APT_SOURCES_DIR: &str = "/etc/apt/sources.list.d";
/// Used when apt's sources have no entry for [`DEBIAN_SUITES`].
const DEFAULT_DEBIAN_SOURCES: [&str; 3] = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

/// mmdebstrap's options, without the target and the sources.
fn mmdebstrap_options() -> Vec<String> {
    let mut options = vec![
        // Essential:yes packages and what DEBIAN_PACKAGES need; no apt.
        "--variant=essential".to_string(),
        format!("--include={}", DEBIAN_PACKAGES.join(",")),
        "--format=tar".to_string(),
        // Keeps /run/postgresql (made below): a pod's /run is the image's,
        // CRI mounts no tmpfs there.
        "--skip=cleanup/run".to_string(),
    ];
    let excluded = [
        // Documentation, manual pages, translations and locale definitions.
        "/usr/share/doc/*",
        "/usr/share/man/*",
        "/usr/share/info/*",
        "/usr/share/locale/*",
        "/usr/share/i18n/*",
        // PostgreSQL's optional JIT and the LLVM and Z3 libraries only it
        // needs (133 MB): without llvmjit.so the server runs with JIT off.
        "/usr/lib/postgresql/*/lib/llvmjit*",
        "/usr/lib/postgresql/*/lib/bitcode/*",
        "/usr/lib/*/libLLVM-*",
        "/usr/lib/*/libz3.so*",
    ];
    options.extend(
        excluded
            .iter()
            .map(|glob| format!("--dpkgopt=path-exclude={glob}")),
    );
    options.push("--dpkgopt=path-include=/usr/share/doc/*/copyright".to_string());
    options.extend([
        // The cluster the postgresql package creates; the entrypoint makes its own.
        r#"--customize-hook=rm -rf "$1"/etc/postgresql/* "$1"/var/lib/postgresql/*"#.to_string(),
        // Made at boot on Debian (tmpfiles.d); the entrypoint expects it.
        r#"--customize-hook=chroot "$1" install -d -o postgres -g postgres -m 2775 /run/postgresql"#
            .to_string(),
    ]);
    options
}

/// A Debian 12 root filesystem tar with python3 and PostgreSQL (and util-linux's
/// runuser, which tests/e2e/local/postgres-entrypoint.sh uses), made by
/// mmdebstrap as root from this machine's apt sources ([`debian_sources`]),
/// without documentation, manual pages and translations. Cached under
/// [`cache_dir`], keyed by a hash of its inputs: made once per machine.
pub fn debian_rootfs() -> PathBuf {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let options = mmdebstrap_options();
            let (sources, from_host) = debian_sources();
            let key = inputs_hash(options.iter().chain(&sources).map(String::as_bytes));
            cached(&format!("debian-{DEBIAN_SUITE}-{key}.tar"), |partial| {
                // SAFETY: geteuid has no preconditions.
                let root = unsafe { libc::geteuid() } == 0;
                assert!(
                    root,
                    "making the Debian root filesystem needs root (mmdebstrap's root mode): \
                     run the test as root once, and it is cached in {}",
                    cache_dir().display()
                );
                let origin = if from_host {
                    format!("from the apt sources in {APT_SOURCES_LIST} and {APT_SOURCES_DIR}")
                } else {
                    format!(
                        "from deb.debian.org, as {APT_SOURCES_LIST} and {APT_SOURCES_DIR} \
                         name no {DEBIAN_SUITE} source"
                    )
                };
                eprintln!("images: making a Debian {DEBIAN_SUITE} root filesystem {origin}");
                let started = Instant::now();
                run_to_end(
                    within(1800, "mmdebstrap")
                        .args(&options)
                        .arg(DEBIAN_SUITE)
                        .arg(partial)
                        .args(&sources),
                    &format!(
                        "mmdebstrap is in the Debian package of that name (`apt-get install \
                         mmdebstrap`); it got packages {origin}: {sources:?}"
                    ),
                );
                let size = fs::metadata(partial).map_or(0, |m| m.len());
                eprintln!(
                    "images: made the Debian root filesystem ({} MiB) in {:.0?}",
                    size >> 20,
                    started.elapsed()
                );
            })
        })
        .clone()
}

/// The one-line apt source entries (`deb [options] URI suite components`) for
/// [`DEBIAN_SUITES`] in this machine's apt configuration (one-line `.list`
/// and deb822 `.sources` files), so that a machine with an archive mirror
/// uses it, and `true`; when there are none, deb.debian.org's and `false`.
pub fn debian_sources() -> (Vec<String>, bool) {
    let mut files = vec![PathBuf::from(APT_SOURCES_LIST)];
    if let Ok(entries) = fs::read_dir(APT_SOURCES_DIR) {
        let mut more: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut sources = Vec::new();
    for file in files {
        let extension = file.extension().and_then(OsStr::to_str);
        let one_line = file == Path::new(APT_SOURCES_LIST) || extension == Some("list");
        let deb822 = extension == Some("sources");
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        if one_line {
            sources.extend(one_line_sources(&text));
        } else if deb822 {
            sources.extend(deb822_sources(&text));
        }
    }
    let mut seen = BTreeSet::new();
    sources.retain(|source| seen.insert(source.clone()));
    if sources.is_empty() {
        (DEFAULT_DEBIAN_SOURCES.map(String::from).to_vec(), false)
    } else {
        (sources, true)
    }
}

/// The `deb` lines of a one-line sources.list for [`DEBIAN_SUITES`], options
/// (`[signed-by=...]`) kept.
pub fn one_line_sources(text: &str) -> Vec<String> {
    let mut sources = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some(rest) = line
            .strip_prefix("deb")
            .filter(|r| r.starts_with([' ', '\t']))
        else {
            continue;
        };
        let rest = rest.trim_start();
        let (options, rest) = match rest.strip_prefix('[').map(|after| after.split_once(']')) {
            Some(Some((options, rest))) => (Some(options.trim()), rest),
            Some(None) => continue,
            None => (None, rest),
        };
        let mut fields = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (fields.next(), fields.next()) else {
            continue;
        };
        if DEBIAN_SUITES.contains(&suite) {
            let components: Vec<&str> = fields.collect();
            sources.push(source_line(options, uri, suite, &components));
        }
    }
    sources
}

/// The entries of a deb822 `.sources` file for [`DEBIAN_SUITES`], as one-line
/// entries; `Signed-By` (when it names keyring files) and `Trusted` kept.
pub fn deb822_sources(text: &str) -> Vec<String> {
    let mut sources = Vec::new();
    for stanza in deb822_stanzas(text) {
        let field = |name: &str| stanza.get(name).map(String::as_str).unwrap_or_default();
        let enabled = !field("enabled").eq_ignore_ascii_case("no");
        if !enabled || !field("types").split_whitespace().any(|t| t == "deb") {
            continue;
        }
        let mut options = Vec::new();
        let signed_by = field("signed-by");
        if signed_by.starts_with('/') && !signed_by.contains('\n') {
            options.push(format!("signed-by={}", signed_by.replace(' ', ",")));
        }
        if field("trusted").eq_ignore_ascii_case("yes") {
            options.push("trusted=yes".to_string());
        }
        let options = options.join(" ");
        let options = (!options.is_empty()).then_some(options.as_str());
        let components: Vec<&str> = field("components").split_whitespace().collect();
        for uri in field("uris").split_whitespace() {
            for suite in field("suites").split_whitespace() {
                if DEBIAN_SUITES.contains(&suite) {
                    sources.push(source_line(options, uri, suite, &components));
                }
            }
        }
    }
    sources
}

/// The stanzas of a deb822 file, as fields by lowercase name; continuation
/// lines (an inline key) are joined with newlines.
fn deb822_stanzas(text: &str) -> Vec<HashMap<String, String>> {
    let mut stanzas: Vec<HashMap<String, String>> = vec![HashMap::new()];
    let mut last_field: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            stanzas.push(HashMap::new());
            last_field = None;
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let stanza = stanzas.last_mut().expect("one stanza at least");
        if line.starts_with([' ', '\t']) {
            if let Some(value) = last_field.as_ref().and_then(|name| stanza.get_mut(name)) {
                value.push('\n');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            stanza.insert(name.clone(), value.trim().to_string());
            last_field = Some(name);
        }
    }
    stanzas.retain(|stanza| !stanza.is_empty());
    stanzas
}

fn source_line(options: Option<&str>, uri: &str, suite: &str, components: &[&str]) -> String {
    let options = options.map_or(String::new(), |o| format!("[{o}] "));
    format!("deb {options}{uri} {suite} {}", components.join(" "))
}

/// Where [`app_packages`] go in an image.
pub const APP_PACKAGES_DIR: &str = "/opt/app-packages";
/// `gunicorn` on PATH, as the app's shell-form entrypoint runs it.
pub const GUNICORN_LAUNCHER: &str = "#!/bin/sh\nexec python3 -m gunicorn \"$@\"\n";
/// The Python of [`debian_rootfs`] (Debian 12's python3).
const APP_PYTHON_VERSION: &str = "3.11";
/// The newest manylinux wheels Debian 12 runs: its glibc is 2.36.
const DEBIAN_GLIBC_MINOR: u32 = 36;

fn pip_options() -> Vec<String> {
    let arch = std::env::consts::ARCH;
    let mut options: Vec<String> = [
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--no-compile",
        // Wheels for the image's Python, whatever Python runs pip.
        "--only-binary=:all:",
        "--implementation=cp",
    ]
    .map(String::from)
    .to_vec();
    options.push(format!("--python-version={APP_PYTHON_VERSION}"));
    options.push(format!("--abi=cp{}", APP_PYTHON_VERSION.replace('.', "")));
    options.push(format!("--platform=manylinux2014_{arch}"));
    options.extend(
        (17..=DEBIAN_GLIBC_MINOR).map(|minor| format!("--platform=manylinux_2_{minor}_{arch}")),
    );
    options
}

/// The test app's Python packages (tests/e2e/app/requirements.txt), installed
/// with pip `--target` into a folder for a layer at [`APP_PACKAGES_DIR`]
/// (see [`app_packages_layer`]), as wheels for [`debian_rootfs`]'s python3.
/// Cached under [`cache_dir`] like it.
pub fn app_packages() -> PathBuf {
    static PACKAGES: OnceLock<PathBuf> = OnceLock::new();
    PACKAGES
        .get_or_init(|| {
            let requirements = super::crate_dir().join("tests/e2e/app/requirements.txt");
            let pinned = fs::read(&requirements)
                .unwrap_or_else(|error| panic!("reading {}: {error}", requirements.display()));
            let options = pip_options();
            let key = inputs_hash(
                std::iter::once(pinned.as_slice()).chain(options.iter().map(String::as_bytes)),
            );
            cached(&format!("app-packages-{key}"), |partial| {
                let pip = super::crate_dir().join(".tools/venv/bin/pip");
                let started = Instant::now();
                run_to_end(
                    within(600, &pip)
                        .arg("install")
                        .args(&options)
                        .arg("--target")
                        .arg(partial)
                        .arg("-r")
                        .arg(&requirements),
                    "pip is .tools/venv's (`make tools` makes it), the packages come from PyPI",
                );
                // Console scripts that name the host's Python; the image has
                // its own gunicorn launcher.
                let _ = fs::remove_dir_all(partial.join("bin"));
                eprintln!(
                    "images: installed the app's Python packages in {:.0?}",
                    started.elapsed()
                );
            })
        })
        .clone()
}

/// A layer with [`app_packages`] at [`APP_PACKAGES_DIR`] and
/// [`GUNICORN_LAUNCHER`] at /usr/local/bin/gunicorn; an image with it sets
/// [`app_pythonpath`].
pub fn app_packages_layer() -> Layer {
    let packages = app_packages();
    let mut entries = directory_entries(&packages, APP_PACKAGES_DIR)
        .unwrap_or_else(|error| panic!("listing {}: {error}", packages.display()));
    entries.push(Entry {
        path: "/usr/local/bin/gunicorn".to_string(),
        source: Source::Bytes(GUNICORN_LAUNCHER.as_bytes().to_vec()),
        mode: 0o755,
    });
    Layer::Files(entries)
}

/// The environment entry that lets the image's python3 import [`app_packages`].
pub fn app_pythonpath() -> String {
    format!("PYTHONPATH={APP_PACKAGES_DIR}")
}

/// The pod sandbox program, compiled from this source.
const PAUSE_SOURCE: &str = include_str!("pause.c");
const PAUSE_CFLAGS: [&str; 4] = ["-Os", "-static", "-s", "-Wall"];
/// The name containerd's `pinned_images.sandbox` setting gives it.
pub const PAUSE_IMAGE: &str = "localhost/pause:local";

/// The static pause program (tests/support/controlplane/pause.c, `gcc -Os -static`),
/// cached under [`cache_dir`], and its image [`PAUSE_IMAGE`]: `/pause` as the
/// entrypoint, run as 65535:65535 like the upstream image.
pub fn pause_image() -> Image {
    static PAUSE: OnceLock<PathBuf> = OnceLock::new();
    let binary = PAUSE.get_or_init(|| {
        let key = inputs_hash([PAUSE_SOURCE].iter().chain(&PAUSE_CFLAGS));
        cached(&format!("pause-{key}"), |partial| {
            let source = PathBuf::from(format!("{}.c", partial.display()));
            let _removed = RemovedOnDrop(source.clone());
            fs::write(&source, PAUSE_SOURCE)
                .unwrap_or_else(|error| panic!("writing {}: {error}", source.display()));
            run_to_end(
                within(120, "gcc")
                    .args(PAUSE_CFLAGS)
                    .arg("-o")
                    .arg(partial)
                    .arg(&source),
                "gcc and the static C library are in Debian's gcc and libc6-dev packages",
            );
        })
    });
    Image {
        name: PAUSE_IMAGE.to_string(),
        layers: vec![Layer::Files(vec![Entry {
            path: "/pause".to_string(),
            source: Source::File(binary.clone()),
            mode: 0o755,
        }])],
        config: ImageConfig {
            entrypoint: vec!["/pause".to_string()],
            user: Some("65535:65535".to_string()),
            ..ImageConfig::default()
        },
    }
}
