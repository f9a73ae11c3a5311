//! `make cluster-up` / `make cluster-down` / `make cluster-load`: the tests'
//! cluster, node included (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kubelet, containerd, kube-proxy, CoreDNS), left running
//! for you as `kind create cluster` leaves one, with our chart's, the
//! operator's and the test app's images already on the node.
//!
//! It runs in a network namespace of its own (`chiller-cluster`), joined to
//! the host by one veth: the host reaches the API server at the node's
//! address, and nothing else of the cluster touches the host's interfaces.
//! Needs root.
//!
//! ```text
//! cargo run --example local_cluster -- up [STATE_DIR]
//! cargo run --example local_cluster -- load NAME --archive OCI_ARCHIVE [STATE_DIR]
//! cargo run --example local_cluster -- load NAME --rootfs DIR -- ENTRYPOINT... [STATE_DIR]
//! cargo run --example local_cluster -- down [STATE_DIR]
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use support::controlplane::{
    self as controlplane, ControlPlane, cluster_images,
    images::{self, Image, ImageConfig, Layer},
    node::{self, HostState, NODE_IP, Node, sh},
    nodes::build,
    process::Lifetime,
};

/// The cluster's network namespace, and the host's end of its veth.
const NETNS: &str = "chiller-cluster";
const HOST_LINK: &str = "chiller-host";
const HOST_ADDRESS: &str = "10.88.0.1/24";
const START_TIMEOUT: Duration = Duration::from_secs(600);
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let state = |index: usize| {
        args.get(index)
            .map(PathBuf::from)
            .unwrap_or_else(|| support::crate_dir().join(".tools/cluster/state"))
    };
    match args.first().map(String::as_str) {
        Some("up") => up(&state(1)),
        Some("down") => down(&state(1)),
        Some("load") => load(&args[1..]),
        Some("supervise") => supervise(&state(1)),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: local_cluster up [STATE_DIR]\n       local_cluster load NAME --archive OCI_ARCHIVE [--state STATE_DIR]\n       local_cluster load NAME --rootfs DIR [--state STATE_DIR] -- ENTRYPOINT...\n       local_cluster down [STATE_DIR]"
    );
    std::process::exit(2)
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the local cluster needs root (network namespaces, cgroups, mounts)");
        std::process::exit(1);
    }
}

/// The kubeconfig users get: the API server at the node's address.
fn user_kubeconfig(dir: &Path) -> PathBuf {
    dir.join("kubeconfig")
}

fn supervisor_pid(dir: &Path) -> Option<i32> {
    let pid = std::fs::read_to_string(dir.join("supervisor.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: signal 0 only checks that the pid exists.
    (unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

fn up(dir: &Path) {
    require_root();
    if supervisor_pid(dir).is_some() && answers(&user_kubeconfig(dir)) {
        eprintln!("the local cluster is already running");
        println!("export KUBECONFIG={}", user_kubeconfig(dir).display());
        return;
    }
    if dir.exists() {
        down(dir);
    }
    std::fs::create_dir_all(dir).expect("creating the state folder");

    // Builds and downloads first: the cluster's namespace has no route out.
    eprintln!("building the cluster's tools and images (minutes the first time)");
    controlplane::binaries();
    for module in ["containerd", "runc", "cni-plugins", "crictl", "coredns"] {
        build(module);
    }
    for module in [
        "statsd-exporter",
        "prometheus",
        "prometheus-operator",
        "postgres-exporter",
    ] {
        build(module);
    }
    cluster_images::write(&dir.join("images/cluster.tar"), &release_binary());

    let host = HostState::take();
    std::fs::write(
        dir.join("host-state.json"),
        serde_json::to_string(&host).unwrap(),
    )
    .expect("saving the host's state");
    sh(&["ip", "netns", "add", NETNS]);
    sh(&[
        "ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", "node0", "netns", NETNS,
    ]);
    sh(&["ip", "addr", "add", HOST_ADDRESS, "dev", HOST_LINK]);
    sh(&["ip", "link", "set", HOST_LINK, "up"]);

    let log = std::fs::File::create(dir.join("supervisor.log")).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{NETNS}"))
        .args(["unshare", "--mount", "--propagation", "private", "--"])
        .arg(exe)
        .arg("supervise")
        .arg(dir)
        .env(node::ISOLATED, "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    // It outlives this command on purpose; `down` stops it by its pid file.
    #[allow(clippy::zombie_processes)]
    let mut supervisor = command.spawn().expect("starting the cluster's supervisor");

    let ready = dir.join("ready");
    let deadline = Instant::now() + START_TIMEOUT;
    while !ready.exists() {
        if let Ok(Some(status)) = supervisor.try_wait() {
            eprintln!(
                "the cluster failed to start ({status}); its log:\n{}",
                controlplane::process::tail(&dir.join("supervisor.log"), 60)
            );
            down(dir);
            std::process::exit(1);
        }
        if Instant::now() > deadline {
            eprintln!(
                "the cluster was not ready within {START_TIMEOUT:?}; its log:\n{}",
                controlplane::process::tail(&dir.join("supervisor.log"), 60)
            );
            down(dir);
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "local cluster ready: one node, images for our chart, the Prometheus Operator and the test app (logs in {})",
        dir.display()
    );
    println!("export KUBECONFIG={}", user_kubeconfig(dir).display());
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Inside the cluster's namespaces: runs the control plane and the node
/// until SIGTERM, then stops the node in order.
fn supervise(dir: &Path) {
    std::fs::write(dir.join("supervisor.pid"), std::process::id().to_string()).unwrap();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            request_stop as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGINT,
            request_stop as *const () as libc::sighandler_t,
        );
    }
    let plane: &'static ControlPlane = Box::leak(Box::new(ControlPlane::start(
        &dir.join("plane"),
        Lifetime::TestBinary,
    )));
    let node = Node::start(plane, &[&dir.join("images/cluster.tar")]);
    let admin = std::fs::read_to_string(&plane.kubeconfig).unwrap();
    std::fs::write(
        user_kubeconfig(dir),
        admin.replace(
            &plane.server,
            &format!("https://{NODE_IP}:{}", plane.api_port),
        ),
    )
    .unwrap();
    std::fs::write(dir.join("ready"), "").unwrap();
    eprintln!("ready");
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("stopping");
    drop(node);
}

fn down(dir: &Path) {
    require_root();
    let mut stopped = false;
    let mut namespace = None;
    if let Some(pid) = supervisor_pid(dir) {
        namespace = Some(node::mount_namespace(&pid.to_string()));
        // SAFETY: kill(2) with the pid our own supervisor wrote.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        unsafe { libc::kill(pid, libc::SIGKILL) };
        stopped = true;
    }
    if let Some(mut host) = std::fs::read_to_string(dir.join("host-state.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<HostState>(&text).ok())
    {
        host.set_mount_namespace(namespace);
        host.restore();
    }
    let _ = Command::new("ip")
        .args(["netns", "del", NETNS])
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("ip")
        .args(["link", "del", HOST_LINK])
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(dir);
    if stopped {
        eprintln!("stopped the local cluster and removed {}", dir.display());
    } else {
        eprintln!("no local cluster was running; removed {}", dir.display());
    }
}

/// Imports an image of one's own onto the node: an OCI archive as is, or a
/// root filesystem folder with an entrypoint, under NAME.
fn load(args: &[String]) {
    require_root();
    let (name, rest) = args.split_first().unwrap_or_else(|| usage());
    let mut archive = None;
    let mut rootfs = None;
    let mut dir = support::crate_dir().join(".tools/cluster/state");
    let mut entrypoint = Vec::new();
    let mut rest = rest.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--archive" => archive = rest.next().map(PathBuf::from),
            "--rootfs" => rootfs = rest.next().map(PathBuf::from),
            "--state" => dir = rest.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--" => {
                entrypoint = rest.by_ref().cloned().collect();
            }
            _ => usage(),
        }
    }
    let Some(pid) = supervisor_pid(&dir) else {
        eprintln!("no local cluster is running: make cluster-up");
        std::process::exit(1);
    };
    let file = match (archive, rootfs) {
        (Some(archive), None) => archive,
        (None, Some(rootfs)) if !entrypoint.is_empty() => {
            let stem = name.replace(['/', ':'], "_");
            let file = dir.join("images").join(format!("{stem}.tar"));
            // tar keeps what a root filesystem holds: symlinks, owners, modes.
            let layer = dir.join("images").join(format!("{stem}.layer.tar"));
            let status = Command::new("tar")
                .args(["--numeric-owner", "-C"])
                .arg(&rootfs)
                .arg("-cf")
                .arg(&layer)
                .arg(".")
                .status()
                .expect("running tar");
            assert!(status.success(), "tar of {} failed", rootfs.display());
            let image = Image {
                name: name.clone(),
                layers: vec![Layer::Tar(layer.clone())],
                config: ImageConfig {
                    entrypoint,
                    ..ImageConfig::default()
                },
            };
            images::write_archive(&file, &[image]).expect("writing the image archive");
            let _ = std::fs::remove_file(&layer);
            file
        }
        _ => usage(),
    };
    // containerd's socket lives in the cluster's private /run/containerd.
    let status = Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--net", "--mount", "--"])
        .arg(build("containerd").join("ctr"))
        .args([
            "--address",
            "/run/containerd/containerd.sock",
            "--namespace",
            "k8s.io",
        ])
        .args(["images", "import"])
        .arg(&file)
        .status()
        .expect("running ctr");
    if !status.success() {
        std::process::exit(1);
    }
    eprintln!(
        "loaded {} onto the node: use it with imagePullPolicy: IfNotPresent",
        images::normalized(name)
    );
}

/// Whether the API server of this kubeconfig answers /readyz.
fn answers(kubeconfig: &Path) -> bool {
    Command::new(controlplane::kubectl_binary())
        .env("KUBECONFIG", kubeconfig)
        .args(["get", "--raw", "/readyz", "--request-timeout=5s"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `cargo build --release --bin chiller-metrics`: the chart's image.
fn release_binary() -> PathBuf {
    let status = support::release_build()
        .status()
        .expect("running cargo build --release");
    assert!(status.success(), "the release build failed");
    support::crate_dir().join("target/release/chiller-metrics")
}
