//! A local Kubernetes control plane for the tests, in the manner of
//! controller-runtime's envtest: real etcd, kube-apiserver and
//! kube-controller-manager, built from the modules pinned in `tools/cluster`,
//! on free loopback ports. There is no kubelet: pods stay Pending.
//!
//! The API server runs with RBAC, the default admission plugins, a
//! service-account issuer (TokenRequest works) and a Metadata-level audit log.
//! Each test process gets one control plane ([`ControlPlane::shared`]), for
//! the tests of one module; its processes die with the process, even when a
//! test panics.
#![allow(dead_code)]

pub mod cluster_images;
pub mod images;
pub mod node;
pub mod nodes;
pub mod operator;
pub mod pki;
pub mod process;
pub mod services;

use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use super::crate_dir;
use process::{Lifetime, Process};

/// How long one component may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// The Service CIDR; `10.0.0.1` is the `kubernetes` Service.
pub const SERVICE_CIDR: &str = "10.0.0.0/24";
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
";

pub struct ControlPlane {
    /// State folder: pki, etcd data, logs, kubeconfig, audit log.
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    pub api_port: u16,
    /// Admin kubeconfig (system:masters).
    pub kubeconfig: PathBuf,
    pub ca_cert: PathBuf,
    pub audit_log: PathBuf,
    pki: pki::PkiFiles,
    etcd_client_url: String,
    etcd: Mutex<Process>,
    apiserver: Mutex<Process>,
    controller_manager: Mutex<Process>,
    /// Started by [`ControlPlane::add_nodes`].
    scheduler: Mutex<Process>,
    kwok: Mutex<Process>,
    lifetime: Lifetime,
}

impl ControlPlane {
    /// The control plane of this test process, started on first use. It
    /// belongs to the tests of the module (file) that first asks for it: a
    /// test of another file panics, for two modules' tests on one control
    /// plane would see each other's objects. `make test` runs one module a
    /// process (scripts/test-timeout.sh); by hand, name the module:
    /// `cargo test --test cluster -- apiserver_webhook::`.
    #[track_caller]
    pub fn shared() -> &'static ControlPlane {
        static OWNER: OnceLock<&'static str> = OnceLock::new();
        let caller = std::panic::Location::caller().file();
        let owner = *OWNER.get_or_init(|| caller);
        assert_eq!(
            owner, caller,
            "this process's control plane belongs to the tests of {owner}; run the tests of \
             {caller} in a process of their own: `cargo test --test cluster -- MODULE::` \
             (make test runs one module a process)"
        );
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| {
            let root = crate_dir().join("target").join("controlplane");
            remove_stale_states(&root);
            let binary = std::env::current_exe()
                .ok()
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "test".into());
            let dir = root.join(format!("{binary}-{}", std::process::id()));
            ControlPlane::start(&dir, Lifetime::TestBinary)
        })
    }

    /// Builds the binaries if needed, then starts etcd, kube-apiserver and
    /// kube-controller-manager with their state in `dir`, and waits for each.
    pub fn start(dir: &Path, lifetime: Lifetime) -> ControlPlane {
        let bin = binaries();
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("creating the control plane folder");
        let pki = pki::write(&dir.join("pki"));

        let with_node = node::in_isolated_network();
        if with_node {
            // Loopback first: etcd listens there.
            node::prepare_network();
        }
        let etcd_client_url = format!("http://127.0.0.1:{}", free_port());
        let etcd_peer_url = format!("http://127.0.0.1:{}", free_port());
        let etcd = Process::start(
            "etcd",
            bin.join("etcd"),
            args(&[
                "--name=default",
                &format!("--data-dir={}", dir.join("etcd").display()),
                &format!("--listen-client-urls={etcd_client_url}"),
                &format!("--advertise-client-urls={etcd_client_url}"),
                &format!("--listen-peer-urls={etcd_peer_url}"),
                &format!("--initial-advertise-peer-urls={etcd_peer_url}"),
                &format!("--initial-cluster=default={etcd_peer_url}"),
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ]),
            dir,
            lifetime,
        );
        let etcd = Mutex::new(etcd);
        wait_ready("etcd /health", &etcd, || {
            curl(&[&format!("{etcd_client_url}/health")])
                .is_some_and(|body| body.contains("\"health\":\"true\""))
        });

        let api_port = free_port();
        let server = format!("https://127.0.0.1:{api_port}");
        // In the test's own network namespace the API server serves the
        // node and its pods on the node's address (see node.rs), and the
        // `kubernetes` Service leads there; elsewhere only loopback, where
        // no pod could reach it.
        let (bind_address, advertise_address, endpoint_reconciler) = if with_node {
            ("0.0.0.0", node::NODE_IP, "lease")
        } else {
            ("127.0.0.1", "127.0.0.1", "none")
        };
        let audit_policy = dir.join("audit-policy.yaml");
        std::fs::write(&audit_policy, AUDIT_POLICY).unwrap();
        let audit_log = dir.join("audit.log");
        let p = |path: &Path| path.display().to_string();
        let apiserver = Process::start(
            "kube-apiserver",
            bin.join("kube-apiserver"),
            args(&[
                &format!("--etcd-servers={etcd_client_url}"),
                &format!("--bind-address={bind_address}"),
                &format!("--advertise-address={advertise_address}"),
                &format!("--secure-port={api_port}"),
                &format!("--cert-dir={}", p(&dir.join("apiserver-certs"))),
                &format!("--tls-cert-file={}", p(&pki.serving_cert)),
                &format!("--tls-private-key-file={}", p(&pki.serving_key)),
                &format!("--client-ca-file={}", p(&pki.ca_cert)),
                // Lets kube-controller-manager delegate authentication quietly.
                &format!("--requestheader-client-ca-file={}", p(&pki.ca_cert)),
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                "--authorization-mode=Node,RBAC",
                &format!(
                    "--kubelet-client-certificate={}",
                    p(&pki.kubelet_client_cert)
                ),
                &format!("--kubelet-client-key={}", p(&pki.kubelet_client_key)),
                // logs, exec and stats reach the kubelet by address, not by a name no DNS knows.
                "--kubelet-preferred-address-types=InternalIP",
                &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                &format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
                &format!(
                    "--service-account-key-file={}",
                    p(&pki.service_account_public_key)
                ),
                &format!(
                    "--service-account-signing-key-file={}",
                    p(&pki.service_account_key)
                ),
                "--allow-privileged=true",
                // Without a node, no pod could reach 127.0.0.1, and a
                // loopback endpoint is invalid.
                &format!("--endpoint-reconciler-type={endpoint_reconciler}"),
                // Webhooks addressed by Service go to the endpoint, not the ClusterIP.
                "--enable-aggregator-routing=true",
                &format!("--audit-policy-file={}", p(&audit_policy)),
                &format!("--audit-log-path={}", p(&audit_log)),
                "--audit-log-mode=blocking",
                "--audit-log-format=json",
                // Never rotated (the default rotates at 100 MB, which a
                // 1,000-namespace run passes): offsets into it stay valid.
                "--audit-log-maxsize=1000000",
                "--v=1",
            ]),
            dir,
            lifetime,
        );
        let kubeconfig = dir.join("admin.kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(
                &server,
                &pki.ca_cert,
                &format!(
                    "client-certificate: {}\n      client-key: {}",
                    p(&pki.admin_cert),
                    p(&pki.admin_key)
                ),
            ),
        )
        .unwrap();

        let mut plane = ControlPlane {
            dir: dir.to_path_buf(),
            server,
            api_port,
            kubeconfig,
            ca_cert: pki.ca_cert.clone(),
            audit_log,
            pki,
            etcd_client_url,
            etcd,
            apiserver: Mutex::new(apiserver),
            controller_manager: Mutex::new(Process::not_started("kube-controller-manager")),
            scheduler: Mutex::new(Process::not_started("kube-scheduler")),
            kwok: Mutex::new(Process::not_started("kwok")),
            lifetime,
        };
        plane.wait_apiserver_ready();

        let kcm_port = free_port();
        let controller_manager = Process::start(
            "kube-controller-manager",
            bin.join("kube-controller-manager"),
            args(&[
                &format!("--kubeconfig={}", p(&plane.kubeconfig)),
                &format!("--authentication-kubeconfig={}", p(&plane.kubeconfig)),
                &format!("--authorization-kubeconfig={}", p(&plane.kubeconfig)),
                "--bind-address=127.0.0.1",
                &format!("--secure-port={kcm_port}"),
                &format!("--cert-dir={}", p(&dir.join("kcm-certs"))),
                "--leader-elect=false",
                &format!(
                    "--service-account-private-key-file={}",
                    p(&plane.pki.service_account_key)
                ),
                &format!("--root-ca-file={}", p(&plane.pki.ca_cert)),
                &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                // Thousands of pods from Deployments (tests/apiserver_scale.rs)
                // in minutes, not the default 20 requests per second.
                "--kube-api-qps=300",
                "--kube-api-burst=600",
                "--v=1",
            ]),
            dir,
            lifetime,
        );
        plane.controller_manager = Mutex::new(controller_manager);
        // The service-account controller runs: pods can be created in "default".
        wait_ready(
            "the default ServiceAccount",
            &plane.controller_manager,
            || {
                plane
                    .get("/api/v1/namespaces/default/serviceaccounts/default")
                    .0
                    == 200
            },
        );
        plane
    }

    /// `(status, body)` of an admin GET on the API server.
    pub fn get(&self, path: &str) -> (u16, String) {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(&self.pki.ca_cert)
            .arg("--cert")
            .arg(&self.pki.admin_cert)
            .arg("--key")
            .arg(&self.pki.admin_key)
            .arg(format!("{}{path}", self.server))
            .output()
            .expect("running curl (install the curl package)");
        let text = String::from_utf8_lossy(&output.stdout);
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (status.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Waits until `/readyz` answers ok.
    pub fn wait_apiserver_ready(&self) {
        wait_ready("kube-apiserver /readyz", &self.apiserver, || {
            let (status, body) = self.get("/readyz");
            status == 200 && body.trim() == "ok"
        });
    }

    /// An admin client.
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig).await
    }

    /// A kubeconfig that authenticates as `namespace/service_account`, with a
    /// token from the TokenRequest API.
    pub fn service_account_kubeconfig(&self, namespace: &str, service_account: &str) -> PathBuf {
        let output = self
            .kubectl()
            .args(["create", "token", service_account, "-n", namespace])
            .args(["--duration=2h"])
            .output()
            .expect("running kubectl create token");
        assert!(
            output.status.success(),
            "kubectl create token {namespace}/{service_account}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let token = String::from_utf8(output.stdout).unwrap();
        let path = self
            .dir
            .join(format!("{namespace}-{service_account}.kubeconfig"));
        std::fs::write(
            &path,
            kubeconfig_yaml(
                &self.server,
                &self.pki.ca_cert,
                &format!("token: {}", token.trim()),
            ),
        )
        .unwrap();
        path
    }

    /// kubectl with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(kubectl_binary());
        command.env("KUBECONFIG", &self.kubeconfig);
        command
    }

    /// Kills kube-apiserver and starts it again on the same port; returns
    /// once it is ready.
    pub fn restart_apiserver(&self) {
        self.apiserver.lock().unwrap().restart();
        self.wait_apiserver_ready();
    }

    /// Kills kube-apiserver; [`Self::start_apiserver_again`] brings it back.
    pub fn stop_apiserver(&self) {
        self.apiserver.lock().unwrap().kill();
    }

    pub fn start_apiserver_again(&self) {
        self.apiserver.lock().unwrap().restart();
        self.wait_apiserver_ready();
    }

    /// Kills etcd (SIGKILL) and starts it again on the same data; returns
    /// once the API server is ready again.
    pub fn restart_etcd(&self, down_for: Duration) {
        self.etcd.lock().unwrap().kill();
        std::thread::sleep(down_for);
        self.etcd.lock().unwrap().restart();
        let url = self.etcd_client_url.clone();
        wait_ready("etcd /health", &self.etcd, || {
            curl(&[&format!("{url}/health")]).is_some_and(|b| b.contains("\"health\":\"true\""))
        });
        self.wait_apiserver_ready();
    }

    /// The pid of each of its processes that runs, by name.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        [
            &self.etcd,
            &self.apiserver,
            &self.controller_manager,
            &self.scheduler,
            &self.kwok,
        ]
        .iter()
        .filter_map(|process| {
            let process = process.lock().unwrap_or_else(|e| e.into_inner());
            Some((process.name, process.pid()?))
        })
        .collect()
    }

    /// How many writes each user made after byte `offset` of the audit log.
    pub fn audit_writes_by_user_since(&self, offset: u64) -> BTreeMap<String, usize> {
        use std::io::{BufRead, Seek};
        let mut writes = BTreeMap::new();
        let Ok(mut file) = std::fs::File::open(&self.audit_log) else {
            return writes;
        };
        file.seek(std::io::SeekFrom::Start(offset))
            .expect("seeking in the audit log");
        for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if matches!(
                event["verb"].as_str(),
                Some("create" | "update" | "patch" | "delete" | "deletecollection")
            ) {
                let user = event["user"]["username"].as_str().unwrap_or("?");
                *writes.entry(user.to_string()).or_insert(0) += 1;
            }
        }
        writes
    }

    /// The audit events so far, parsed.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The audit log's length so far: where [`Self::audit_events_since`] starts.
    pub fn audit_offset(&self) -> u64 {
        std::fs::metadata(&self.audit_log).map_or(0, |m| m.len())
    }

    /// The audit events of `username` written after byte `offset` of the
    /// audit log (a large cluster's log is read once, not parsed whole).
    pub fn audit_events_since(&self, offset: u64, username: &str) -> Vec<serde_json::Value> {
        use std::io::{BufRead, Seek};
        let Ok(mut file) = std::fs::File::open(&self.audit_log) else {
            return Vec::new();
        };
        file.seek(std::io::SeekFrom::Start(offset))
            .expect("seeking in the audit log");
        let needle = format!("\"username\":\"{username}\"");
        std::io::BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter(|line| line.contains(&needle))
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
            .filter(|event| event["user"]["username"] == username)
            .collect()
    }

    /// The last lines of each component's log.
    pub fn log_tails(&self, lines: usize) -> String {
        [
            &self.apiserver,
            &self.controller_manager,
            &self.etcd,
            &self.scheduler,
            &self.kwok,
        ]
        .iter()
        .filter_map(|process| {
            let process = process.lock().unwrap_or_else(|p| p.into_inner());
            process.pid().is_some().then_some(process)
        })
        .map(|process| {
            format!(
                "----- last {lines} lines of {} ({}) -----\n{}",
                process.name,
                process.log_path().display(),
                process.tail(lines)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
    }

    /// A guard that prints the control plane's last log lines, and those of
    /// the `extra` sources, if the test panics while it lives.
    pub fn logs_on_failure(&self) -> LogsOnFailure<'_> {
        LogsOnFailure {
            plane: self,
            extra: Vec::new(),
        }
    }
}

/// Prints log tails when dropped during a panic.
pub struct LogsOnFailure<'a> {
    plane: &'a ControlPlane,
    extra: Vec<(String, Box<dyn Fn() -> String + 'a>)>,
}

impl<'a> LogsOnFailure<'a> {
    pub fn with(mut self, name: &str, log_tail: impl Fn() -> String + 'a) -> Self {
        self.extra.push((name.to_string(), Box::new(log_tail)));
        self
    }
}

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        eprintln!("{}", self.plane.log_tails(30));
        for (name, log_tail) in &self.extra {
            eprintln!("----- last lines of {name} -----\n{}", log_tail());
        }
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> kube::Client {
    let file = kube::config::Kubeconfig::read_from(kubeconfig).expect("reading a kubeconfig");
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .expect("a usable kubeconfig");
    kube::Client::try_from(config).expect("a kube client")
}

fn kubeconfig_yaml(server: &str, ca: &Path, credentials: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
  - name: local
    cluster:
      server: {server}
      certificate-authority: {ca}
users:
  - name: user
    user:
      {credentials}
contexts:
  - name: local
    context: {{cluster: local, user: user}}
current-context: local
",
        ca = ca.display()
    )
}

/// The folder of the control plane binaries, built by `tools/build.sh cluster`
/// (a no-op when they are current). Panics with the build's message, e.g. when
/// Go is missing.
pub fn binaries() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| nodes::build("cluster")).clone()
}

/// kubectl from PATH or `.tools/bin` (`make tools` installs it).
pub fn kubectl_binary() -> PathBuf {
    let local = crate_dir().join(".tools/bin/kubectl");
    if local.is_file() {
        return local;
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("kubectl"))
        .find(|file| file.is_file())
        .expect("kubectl not found: run `make tools`")
}

/// A port that was free a moment ago on 127.0.0.1.
/// A loopback port for a server that takes a number, free for TCP and UDP.
/// Ports come from below the kernel's ephemeral range, so no outgoing
/// connection is handed one meanwhile; each at most once per process (the
/// tests of a binary run in parallel), from an offset of the pid (binaries
/// that run one after another start elsewhere).
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = 10_000;
    let high = ephemeral_ports_start().clamp(low + 1_000, 32_768) - 1;
    let span = high - low + 1;
    let start = std::process::id().wrapping_mul(97) % span;
    for _ in 0..span {
        let next = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(low + (start + next) % span).expect("below 32768");
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port between {low} and {high}");
}

/// The first port the kernel hands out for outgoing connections.
fn ephemeral_ports_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

/// Runs `command` (kubectl apply -f -) with `input` on stdin; panics with
/// its stderr if it fails.
fn run_with_input(mut command: Command, input: &str) {
    let output = try_with_input(&mut command, input);
    assert!(
        output.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a command with `input` on stdin and returns its output, whatever it is.
pub fn try_with_input(command: &mut Command, input: &str) -> std::process::Output {
    use std::{io::Write, process::Stdio};
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn curl(args: &[&str]) -> Option<String> {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Polls `ready` until it holds; panics with the process's log if the
/// process exits or [`READY_TIMEOUT`] passes.
fn wait_ready(what: &str, process: &Mutex<Process>, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if ready() {
            return;
        }
        let mut process = process.lock().unwrap();
        process.assert_running();
        assert!(
            Instant::now() < deadline,
            "{what} not ready within {READY_TIMEOUT:?}; last lines of {}:\n{}",
            process.name,
            process.tail(40)
        );
        drop(process);
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Removes the state of control planes whose test binary is gone.
fn remove_stale_states(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let alive = name
            .rsplit_once('-')
            .and_then(|(_, pid)| pid.parse::<i32>().ok())
            // SAFETY: signal 0 only checks that the pid exists.
            .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
