//! A real node for the test cluster, as kind runs one: containerd, runc, the
//! CNI bridge plugin, kubelet and kube-proxy, built from the modules pinned in
//! `tools/`, and CoreDNS behind the `kube-dns` Service. Images come from
//! local OCI archives ([`super::images`]); nothing is pulled.
//!
//! Everything runs in the network and mount namespaces [`isolated`] makes:
//! the node's address is on a veth that leads nowhere, so no pod or node
//! traffic reaches the host's interfaces, and the paths containerd and the
//! kubelet hard-code (`/run/containerd`, `/var/lib/cni`,
//! `/var/log/containers`) are private tmpfs mounts. What cannot be private
//! (cgroups, the sysctls the kubelet rewrites, leftover processes) is put
//! back by [`isolated`] once the isolated run ends, however it ends.

use std::{
    ffi::OsString,
    io::BufRead,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{
    ControlPlane, binaries, crate_dir,
    nodes::build,
    pki::NODE_NAME,
    process::{Lifetime, Process},
    services, wait_ready,
};

/// The node's address, on the `node0` veth; the API server advertises it.
pub const NODE_IP: &str = "10.88.0.2";
const NODE_ADDRESS: &str = "10.88.0.2/24";
/// The pods' addresses, on the `cni0` bridge (gateway `.1`).
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The `kube-dns` Service, the kubelet's `clusterDNS`.
pub const CLUSTER_DNS_IP: &str = "10.0.0.10";
/// containerd's socket, in the private `/run/containerd` (cAdvisor looks
/// for it only there).
const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Host paths containerd, the CNI library and the kubelet hard-code; each is
/// a private tmpfs in the isolated run.
const PRIVATE_HOST_PATHS: &[&str] = &["/run/containerd", "/var/lib/cni", "/var/log/containers"];
/// Host-global sysctls the kubelet rewrites at start.
const KUBELET_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];
/// Prefix of the kubelet's `cgroupRoot`, in every hierarchy.
const CGROUP_PREFIX: &str = "chiller-node-";
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets up the node's network in the isolated namespace: loopback, the
/// `node0` veth with [`NODE_IP`] and a default route into it, forwarding,
/// and bridged traffic through iptables. In a test the veth's peer is a dead
/// end in the same namespace; `make cluster-up` makes `node0` beforehand,
/// with its peer on the host, so the host reaches the API server.
pub fn prepare_network() {
    sh(&["ip", "link", "set", "lo", "up"]);
    // (/sys/class/net shows the host's links: /sys was mounted there.)
    let exists = Command::new("ip")
        .args(["link", "show", "node0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        // This kernel has no `dummy` link type; a veth's peer is a dead end too.
        sh(&[
            "ip",
            "link",
            "add",
            "node0",
            "type",
            "veth",
            "peer",
            "name",
            "node0-end",
        ]);
        sh(&["ip", "link", "set", "node0-end", "up"]);
    }
    sh(&["ip", "addr", "replace", NODE_ADDRESS, "dev", "node0"]);
    sh(&["ip", "link", "set", "node0", "up"]);
    sh(&["ip", "route", "replace", "default", "dev", "node0"]);
    // Both are per network namespace.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enabling IPv4 forwarding");
    let bridged = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    if Path::new(bridged).exists() {
        std::fs::write(bridged, "1").expect("bridged traffic through iptables");
    }
}

/// The node: containerd, kubelet and kube-proxy, stopped in order on drop.
pub struct Node {
    pub dir: PathBuf,
    plane: &'static ControlPlane,
    containerd: Mutex<Process>,
    kubelet: Mutex<Process>,
    kube_proxy: Mutex<Process>,
    cgroup_root: String,
}

impl Node {
    /// Starts kube-scheduler, containerd (with `images` imported), kubelet,
    /// kube-proxy and CoreDNS; returns once the node is Ready and cluster
    /// DNS answers. Must run in the namespaces [`isolated`] made.
    pub fn start(plane: &'static ControlPlane, images: &[&Path]) -> Node {
        assert!(
            in_isolated_network(),
            "the node runs only inside the namespaces `isolated` makes"
        );
        let dir = plane.dir.join("node");
        for sub in ["etc", "cni-conf", "cni-state", "pod-logs", "kubelet"] {
            std::fs::create_dir_all(dir.join(sub)).expect("creating the node's folders");
        }
        // The cgroup first: from then on other nodes' cleanups count this
        // node as running and leave the host's paths and sysctls to it.
        let cgroup_root = format!("{CGROUP_PREFIX}{}", std::process::id());
        create_cgroup_root(&cgroup_root);
        make_host_paths_private();
        plane.start_scheduler();

        let containerd = start_containerd(&dir);
        for archive in images {
            let started = Instant::now();
            run_checked(ctr(&dir).args(["images", "import"]).arg(archive));
            eprintln!(
                "imported {} in {:.1} s",
                archive.display(),
                started.elapsed().as_secs_f64()
            );
        }
        let kubelet = start_kubelet(plane, &dir, &cgroup_root);
        let kube_proxy = services::start_kube_proxy(plane, NODE_NAME);
        let node = Node {
            dir,
            plane,
            containerd: Mutex::new(containerd),
            kubelet: Mutex::new(kubelet),
            kube_proxy: Mutex::new(kube_proxy),
            cgroup_root,
        };
        wait_ready(&format!("node {NODE_NAME} Ready"), &node.kubelet, || {
            plane.node_ready(NODE_NAME)
        });
        node.start_cluster_dns();
        node
    }

    /// crictl against this node's containerd.
    pub fn crictl(&self) -> Command {
        let mut command = Command::new(build("crictl").join("crictl"));
        command.arg("--config").arg(self.crictl_config());
        command
    }

    /// The config file that points crictl at this node's containerd.
    pub fn crictl_config(&self) -> PathBuf {
        self.dir.join("etc/crictl.yaml")
    }

    /// The kubelet's `/stats/summary`, through the API server.
    pub fn stats_summary(&self) -> serde_json::Value {
        let (status, body) = self
            .plane
            .get(&format!("/api/v1/nodes/{NODE_NAME}/proxy/stats/summary"));
        assert_eq!(status, 200, "kubelet /stats/summary: {body}");
        serde_json::from_str(&body).expect("/stats/summary is JSON")
    }

    /// Last lines of the node's daemons and `crictl ps -a`, for a failure.
    pub fn diagnostics(&self, lines: usize) -> String {
        let mut out = String::new();
        for process in [&self.kubelet, &self.containerd, &self.kube_proxy] {
            let process = process.lock().unwrap_or_else(|p| p.into_inner());
            out += &format!(
                "----- last {lines} lines of {} -----\n{}\n",
                process.name,
                process.tail(lines)
            );
        }
        out += "----- crictl ps -a -----\n";
        out += &output_text(self.crictl().args(["ps", "-a"]));
        out += &container_log_tails(&self.dir.join("pod-logs"), 5);
        out
    }

    /// CoreDNS as kind runs it: a Deployment in kube-system behind the
    /// `kube-dns` Service at the kubelet's `clusterDNS`. It answers for
    /// `cluster.local` only; nothing is forwarded.
    fn start_cluster_dns(&self) {
        let image = format!(
            "coredns/coredns:{}",
            super::cluster_images::coredns_version()
        );
        let manifest = COREDNS_MANIFEST
            .replace("{image}", &image)
            .replace("{cluster_dns}", CLUSTER_DNS_IP);
        let mut apply = self.plane.kubectl();
        apply.args(["apply", "-f", "-"]);
        super::run_with_input(apply, &manifest);
        run_checked(self.plane.kubectl().args([
            "rollout",
            "status",
            "-n",
            "kube-system",
            "deployment/coredns",
            "--timeout=180s",
        ]));
    }

    /// Stops the node: kube-proxy, kubelet, every pod sandbox (so no shim
    /// outlives containerd), containerd, then the cgroups.
    fn stop(&self) {
        let started = Instant::now();
        self.kube_proxy.lock().unwrap().kill();
        self.kubelet.lock().unwrap().kill();
        let _ = run_with_timeout(self.crictl().args(["rmp", "-fa"]), STOP_TIMEOUT);
        self.containerd.lock().unwrap().kill();
        kill_processes_of(&build("containerd"), &mount_namespace("self"));
        unmount_under(&self.dir);
        remove_cgroups(&self.cgroup_root);
        eprintln!("node stopped in {:.1} s", started.elapsed().as_secs_f64());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last lines of each container's current log file, as the kubelet
/// writes them (`<ns>_<pod>_<uid>/<container>/<restart>.log`).
fn container_log_tails(pod_logs: &Path, lines: usize) -> String {
    let mut out = String::new();
    for pod in std::fs::read_dir(pod_logs).into_iter().flatten().flatten() {
        for container in std::fs::read_dir(pod.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let latest = std::fs::read_dir(container.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|f| f.path())
                .max_by_key(|f| f.metadata().and_then(|m| m.modified()).ok());
            if let Some(file) = latest {
                out += &format!(
                    "----- {} -----\n{}\n",
                    file.strip_prefix(pod_logs).unwrap_or(&file).display(),
                    super::process::tail(&file, lines)
                );
            }
        }
    }
    out
}

fn start_containerd(dir: &Path) -> Process {
    let bin = build("containerd");
    let runc = build("runc").join("runc");
    let cni_bin = build("cni-plugins");
    let d = |sub: &str| dir.join(sub).display().to_string();
    let config = format!(
        r#"version = 4
root = "{root}"
state = "{state}"

[plugins]
  [plugins.'io.containerd.server.v1.grpc']
    address = "{CONTAINERD_SOCKET}"
  [plugins.'io.containerd.server.v1.ttrpc']
    address = "{CONTAINERD_SOCKET}.ttrpc"
  [plugins.'io.containerd.server.v1.debug']
    address = "/run/containerd/debug.sock"
  [plugins.'io.containerd.internal.v1.opt']
    path = "{opt}"
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "localhost/pause:local"
  [plugins.'io.containerd.cri.v1.runtime']
    netns_mounts_under_state_dir = true
    # The sandbox may lack CAP_SYS_RESOURCE: never lower oom_score_adj.
    restrict_oom_score_adj = true
    enable_unprivileged_ports = true
    enable_unprivileged_icmp = true
    cdi_spec_dirs = []
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        disable_pause_image_pull = true
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = "{runc}"
          Root = "{runc_root}"
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["{cni_bin}"]
      conf_dir = "{cni_conf}"
      max_conf_num = 1
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
"#,
        root = d("containerd/root"),
        state = d("containerd/state"),
        opt = d("containerd/opt"),
        runc = runc.display(),
        runc_root = d("containerd/runc"),
        cni_bin = cni_bin.display(),
        cni_conf = d("cni-conf"),
    );
    let config_path = dir.join("etc/containerd.toml");
    std::fs::write(&config_path, config).expect("writing containerd's configuration");
    std::fs::write(
        dir.join("cni-conf/10-chiller.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "chiller",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": d("cni-state"),
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        })
        .to_string(),
    )
    .expect("writing the CNI configuration");
    std::fs::write(
        dir.join("etc/crictl.yaml"),
        format!(
            "runtime-endpoint: unix://{CONTAINERD_SOCKET}\nimage-endpoint: unix://{CONTAINERD_SOCKET}\ntimeout: 30\n"
        ),
    )
    .expect("writing crictl's configuration");

    // The shim is found on containerd's PATH.
    let path = std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let mut process = Process::start_with_env(
        "containerd",
        bin.join("containerd"),
        vec![OsString::from("--config"), config_path.into_os_string()],
        &[("PATH", path)],
        dir,
        Lifetime::TestBinary,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Path::new(CONTAINERD_SOCKET).exists() {
        process.assert_running();
        assert!(
            Instant::now() < deadline,
            "containerd made no socket within 60 s:\n{}",
            process.tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    process
}

fn ctr(_dir: &Path) -> Command {
    let mut command = Command::new(build("containerd").join("ctr"));
    command.args(["--address", CONTAINERD_SOCKET, "--namespace", "k8s.io"]);
    command
}

fn start_kubelet(plane: &ControlPlane, dir: &Path, cgroup_root: &str) -> Process {
    let d = |sub: &str| dir.join(sub).display().to_string();
    std::fs::write(dir.join("etc/resolv.conf"), "nameserver 127.0.0.1\n")
        .expect("writing the node's resolv.conf");
    let config = format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# Kubernetes 1.35+ refuses cgroup v1 unless told.
failCgroupV1: false
# Matches containerd's SystemdCgroup = false.
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup_root}
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
containerRuntimeEndpoint: unix://{CONTAINERD_SOCKET}
podLogsDir: {pod_logs}
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
clusterDomain: cluster.local
clusterDNS: [{CLUSTER_DNS_IP}]
resolvConf: {resolv}
# The disk is shared with the host, and imported images cannot be pulled back.
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
# ConfigMap volumes follow their ConfigMap within seconds, not a minute.
syncFrequency: 10s
",
        pod_logs = d("pod-logs"),
        ca = plane.ca_cert.display(),
        resolv = d("etc/resolv.conf"),
    );
    let config_path = dir.join("etc/kubelet.yaml");
    std::fs::write(&config_path, config).expect("writing the kubelet's configuration");
    let kubeconfig = dir.join("etc/kubelet.kubeconfig");
    std::fs::write(
        &kubeconfig,
        super::kubeconfig_yaml(
            &plane.server,
            &plane.ca_cert,
            &format!(
                "client-certificate: {}\n      client-key: {}",
                plane.pki.node_cert.display(),
                plane.pki.node_key.display()
            ),
        ),
    )
    .expect("writing the kubelet's kubeconfig");
    Process::start(
        "kubelet",
        binaries().join("kubelet"),
        [
            format!("--config={}", config_path.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--root-dir={}", d("kubelet")),
            format!("--cert-dir={}", d("kubelet/pki")),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={NODE_IP}"),
            "--v=1".to_string(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect(),
        dir,
        Lifetime::TestBinary,
    )
}

const COREDNS_MANIFEST: &str = r#"apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 30
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      containers:
        - name: coredns
          image: {image}
          imagePullPolicy: IfNotPresent
          args: [-conf, /etc/coredns/Corefile]
          ports:
            - {name: dns, containerPort: 53, protocol: UDP}
            - {name: dns-tcp, containerPort: 53, protocol: TCP}
          readinessProbe:
            httpGet: {path: /ready, port: 8181}
            periodSeconds: 2
          livenessProbe:
            httpGet: {path: /health, port: 8080}
          resources:
            limits: {memory: 170Mi}
            requests: {cpu: 100m, memory: 70Mi}
          volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes:
        - name: config
          configMap: {name: coredns, items: [{key: Corefile, path: Corefile}]}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: {cluster_dns}
  selector: {k8s-app: kube-dns}
  ports:
    - {name: dns, port: 53, protocol: UDP}
    - {name: dns-tcp, port: 53, protocol: TCP}
"#;

/// Mounts a private tmpfs over each of [`PRIVATE_HOST_PATHS`] (in the
/// isolated mount namespace; a missing mount point is created, and
/// [`isolated`] removes it afterwards).
fn make_host_paths_private() {
    for path in PRIVATE_HOST_PATHS {
        std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("creating {path}: {e}"));
        sh(&["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path]);
    }
}

/// The kubelet's cgroupRoot in every cgroup v1 hierarchy (cpuset needs its
/// cpus and mems before anyone can join), or in the unified hierarchy.
fn create_cgroup_root(name: &str) {
    for hierarchy in cgroup_hierarchies() {
        let dir = hierarchy.join(name);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        if hierarchy.ends_with("cpuset") {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let value = std::fs::read_to_string(hierarchy.join(file)).unwrap();
                std::fs::write(dir.join(file), value.trim()).unwrap();
            }
        }
    }
}

/// `/sys/fs/cgroup` itself on cgroup v2, else each v1 hierarchy.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process in the cgroup tree `name` and removes it, deepest
/// first, in every hierarchy.
fn remove_cgroups(name: &str) {
    for hierarchy in cgroup_hierarchies() {
        let top = hierarchy.join(name);
        if !top.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        collect_dirs(&top, &mut dirs);
        // Deepest first.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in &dirs {
            for _ in 0..50 {
                for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|p| p.trim().parse::<i32>().ok())
                {
                    // SAFETY: SIGKILL to a process in our own cgroup tree.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}

/// The mount namespace of a process (`self` or a pid), as /proc names it.
pub fn mount_namespace(pid: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .map(|link| link.display().to_string())
        .unwrap_or_default()
}

/// Kills the processes whose executable lies in `folder` and that live in
/// the mount namespace `namespace`: containerd's shims daemonize and outlive
/// it, and another node of ours (`make cluster-up`) lives in another one.
fn kill_processes_of(folder: &Path, namespace: &str) {
    let Ok(folder) = folder.canonicalize() else {
        return;
    };
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<i32>() else {
            continue;
        };
        if std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| exe.starts_with(&folder))
            && mount_namespace(&name) == namespace
        {
            // SAFETY: SIGKILL to one of our own tools' processes.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Unmounts every mount under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else {
        return;
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter(|point| Path::new(point).starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}

/// Host state the isolated run may change and cannot keep private: the
/// kubelet's sysctls, its cgroups, mount points made for private paths, and
/// processes of our node tools. Taken before the run, put back after it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct HostState {
    sysctls: Vec<(String, String)>,
    missing_paths: Vec<String>,
    cgroups: Vec<String>,
    /// The isolated run's mount namespace, once it has one.
    mount_namespace: Option<String>,
}

/// The host's state from before the first of the nodes of ours that run at
/// once (test processes side by side, `make cluster-up`), kept for the last
/// of them to put back; [`HOST_STATE_LOCK`] orders takes and restores.
const SHARED_HOST_STATE: &str = "/run/chiller-metrics-nodes.json";
const HOST_STATE_LOCK: &str = "/run/chiller-metrics-nodes.lock";

fn host_state_lock() -> std::fs::File {
    let lock = std::fs::File::create(HOST_STATE_LOCK)
        .unwrap_or_else(|e| panic!("creating {HOST_STATE_LOCK}: {e}"));
    lock.lock()
        .unwrap_or_else(|e| panic!("locking {HOST_STATE_LOCK}: {e}"));
    lock
}

impl HostState {
    /// The state to put back after a node: the host's now, or, while an
    /// earlier node's state is still to be put back, that one.
    pub fn take() -> Self {
        let _lock = host_state_lock();
        let shared = std::fs::read_to_string(SHARED_HOST_STATE)
            .ok()
            .and_then(|text| serde_json::from_str::<HostState>(&text).ok());
        if let Some(first) = shared {
            return first;
        }
        let now = Self::now();
        std::fs::write(SHARED_HOST_STATE, serde_json::to_string(&now).unwrap())
            .unwrap_or_else(|e| panic!("writing {SHARED_HOST_STATE}: {e}"));
        now
    }

    fn now() -> Self {
        HostState {
            sysctls: KUBELET_SYSCTLS
                .iter()
                .filter_map(|name| {
                    std::fs::read_to_string(format!("/proc/sys/{name}"))
                        .ok()
                        .map(|value| (name.to_string(), value.trim().to_string()))
                })
                .collect(),
            missing_paths: PRIVATE_HOST_PATHS
                .iter()
                .filter(|path| !Path::new(path).exists())
                .map(|path| path.to_string())
                .collect(),
            cgroups: node_cgroups(),
            mount_namespace: None,
        }
    }

    pub fn set_mount_namespace(&mut self, namespace: Option<String>) {
        self.mount_namespace = namespace;
    }

    /// Notes the mount namespace of the isolated run `pid` (`unshare` makes
    /// it right after starting); waits up to 10 s for it.
    pub fn isolated_in(&mut self, pid: u32) {
        let own = mount_namespace("self");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let theirs = mount_namespace(&pid.to_string());
            if !theirs.is_empty() && theirs != own {
                self.mount_namespace = Some(theirs);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills what our node tools left running in the isolated run's mount
    /// namespace, removes the node cgroups made since [`Self::take`] whose
    /// node is gone, the mount points it created and writes the sysctls back,
    /// saying what it had to put back. While another node of ours runs, its
    /// mount points and sysctls are left to it.
    pub fn restore(&self) {
        if let Some(namespace) = &self.mount_namespace {
            for module in ["containerd", "runc"] {
                kill_processes_of(
                    &crate_dir().join(".tools").join(module).join("bin"),
                    namespace,
                );
            }
        }
        for cgroup in node_cgroups() {
            if !self.cgroups.contains(&cgroup) && !node_alive(&cgroup) {
                remove_cgroups(&cgroup);
            }
        }
        let _lock = host_state_lock();
        if node_cgroups().iter().any(|cgroup| node_alive(cgroup)) {
            eprintln!("another node of ours runs: its mount points and sysctls stay");
            return;
        }
        for path in &self.missing_paths {
            let _ = std::fs::remove_dir(path);
        }
        for (name, value) in &self.sysctls {
            let path = format!("/proc/sys/{name}");
            if std::fs::read_to_string(&path).is_ok_and(|now| now.trim() != value) {
                eprintln!("putting back {} = {value}", name.replace('/', "."));
                let _ = std::fs::write(&path, value);
            }
        }
        let _ = std::fs::remove_file(SHARED_HOST_STATE);
    }
}

/// What an earlier run killed before it could clean up left behind: the
/// cgroups of nodes whose process is gone (and what still runs in them), and
/// our tools' processes in a mount namespace that no running node of ours
/// (a test, `make cluster-up`) lives in.
fn remove_stale_nodes() {
    let host = mount_namespace("self");
    let mut live = vec![host];
    for cgroup in node_cgroups() {
        match cgroup.strip_prefix(CGROUP_PREFIX) {
            Some(pid) if node_alive(&cgroup) => live.push(mount_namespace(pid)),
            _ => remove_cgroups(&cgroup),
        }
    }
    for module in ["containerd", "runc"] {
        let Ok(folder) = crate_dir()
            .join(".tools")
            .join(module)
            .join("bin")
            .canonicalize()
        else {
            continue;
        };
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(pid) = name.parse::<i32>() else {
                continue;
            };
            let ours = std::fs::read_link(entry.path().join("exe"))
                .is_ok_and(|exe| exe.starts_with(&folder));
            let namespace = mount_namespace(&name);
            if ours && !namespace.is_empty() && !live.contains(&namespace) {
                eprintln!("stopping pid {pid}, left by an earlier node ({namespace})");
                // SAFETY: SIGKILL to a leftover of our own tools.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Whether the process that made the node cgroup `name` still runs.
fn node_alive(name: &str) -> bool {
    name.strip_prefix(CGROUP_PREFIX)
        .and_then(|pid| pid.parse::<i32>().ok())
        // SAFETY: signal 0 only checks that the pid exists.
        .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0)
}

fn node_cgroups() -> Vec<String> {
    let mut names: Vec<String> = cgroup_hierarchies()
        .iter()
        .flat_map(|h| std::fs::read_dir(h).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(CGROUP_PREFIX))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Whether this process runs inside the namespaces [`isolated`] made.
pub fn in_isolated_network() -> bool {
    std::env::var_os(ISOLATED).is_some()
}

pub const ISOLATED: &str = "CHILLER_TEST_ISOLATED";

/// Runs the current test again inside new network and mount namespaces,
/// with the node's network prepared; returns whether this process is already
/// that isolated run. `prepare` runs first, outside: the namespace has no
/// route to the Go module proxy, so everything the test builds or downloads
/// must be done there. Host state the run changes is put back afterwards,
/// even when it fails or is killed.
pub fn isolated(test_name: &str, prepare: impl FnOnce()) -> bool {
    if in_isolated_network() {
        prepare_network();
        return true;
    }
    require_root(test_name);
    // One node at a time per test process (modules run side by side, each
    // in its own process, and [`HostState`] lets their nodes share the host).
    static ONE_NODE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_node = ONE_NODE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    prepare();
    remove_stale_nodes();
    let mut host = HostState::take();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("unshare")
        .args(["--net", "--mount", "--propagation", "private", "--"])
        .arg(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ISOLATED, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("running unshare (util-linux)");
    host.isolated_in(child.id());
    // The inner run's own summary lines would count this test twice; they
    // are read instead, so a renamed test cannot pass having run nothing.
    let output = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut summary = None;
    for line in output.lines().map_while(Result::ok) {
        if line.starts_with("test result:") {
            summary = Some(line);
        } else if !line.starts_with("running ") {
            println!("{line}");
        }
    }
    let status = child.wait().expect("waiting for the isolated run");
    host.restore();
    assert!(
        status.success(),
        "the isolated run of {test_name} failed (see above)"
    );
    let summary = summary.unwrap_or_default();
    assert!(
        summary.contains(" 1 passed;"),
        "the isolated run of {test_name} should run exactly that test; it said: {summary:?}"
    );
    false
}

/// Stops the test, naming it, unless it runs as root.
fn require_root(test_name: &str) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "{test_name} runs a real node (network namespaces, cgroups, mounts) and needs root; run it as root"
    );
}

/// Runs a command; panics unless it succeeds.
pub fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", args[0]));
    assert!(status.success(), "{} failed: {status}", args.join(" "));
}

fn run_checked(command: &mut Command) {
    let output = run_with_timeout(command, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn output_text(command: &mut Command) -> String {
    match run_with_timeout(command, Duration::from_secs(30)) {
        Ok(o) => {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        }
        Err(e) => e,
    }
}

/// Runs `command` to completion, killing it after `limit`.
fn run_with_timeout(
    command: &mut Command,
    limit: Duration,
) -> Result<std::process::Output, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().map_err(|e| e.to_string()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let output = child.wait_with_output().map_err(|e| e.to_string())?;
                return Err(format!(
                    "timed out after {limit:?}: {}",
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        }
    }
}
