//! The pod runner: what a kubelet would do for the pods kwok marks Running,
//! with real processes instead of containers. Each pod gets a network
//! namespace holding its IP on a bridge, so `localhost` in a pod is that pod
//! alone; each container's process runs in it with the container's command,
//! args, env and volumes (bubblewrap binds the volumes at their mountPaths).
//! Images map to local binaries through an explicit table; an image missing
//! from it fails the run, naming the image.
//!
//! It must run inside a network namespace the test made (see
//! [`isolated`]): the bridge and every pod address live there, never on the
//! host's interfaces.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::Value;

use super::{
    ControlPlane,
    process::Process,
    readiness::{self, ContainerReport, ExecTarget, ProbeState},
    services,
};

/// The bridge every pod's veth joins, and its address: the pods' gateway.
pub const BRIDGE: &str = "chiller0";
pub const BRIDGE_ADDRESS: &str = "10.244.0.1/16";
/// The ClusterIP of the `kubernetes` Service (first of the Service CIDR).
pub const KUBERNETES_SERVICE_IP: &str = "10.0.0.1";

/// How an image runs here: a program and the image's entrypoint arguments.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The image's ENTRYPOINT, with the program resolved to a local file.
    pub entrypoint: Vec<String>,
    /// The image's CMD, used when the container gives no args.
    pub default_args: Vec<String>,
    pub workdir: Option<PathBuf>,
    /// Extra PATH entries (a virtualenv's bin).
    pub path: Vec<PathBuf>,
    /// Programs inside the image a container's `command` may name, and the
    /// local file each is.
    pub programs: Vec<(String, PathBuf)>,
    /// Folders the image has to itself (an empty tmpfs per container).
    pub private_dirs: Vec<String>,
}

/// Image repository (without tag) to how it runs.
pub type ImageTable = BTreeMap<String, Launch>;

/// The repository part of an image reference.
pub fn repository(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    match without_digest.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => without_digest,
    }
}

struct RunningPod {
    netns: String,
    host_veth: String,
    processes: Vec<(String, Child)>,
    /// What a restart needs: the pod, its volumes and its state folder.
    pod: Value,
    volumes: HashMap<String, PathBuf>,
    dir: PathBuf,
    /// Readiness probe results per container, and what the API server was
    /// last told.
    probes: HashMap<String, ProbeState>,
    reported: Option<HashMap<String, ContainerReport>>,
    /// Restarts per container, as the kubelet counts them.
    restarts: HashMap<String, u32>,
}

/// Watches pods and runs those on our nodes; stops everything on drop.
pub struct PodRunner {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    errors: Arc<Mutex<Vec<String>>>,
    pods: Arc<Mutex<HashMap<String, RunningPod>>>,
    dir: PathBuf,
    kube_proxy: Process,
}

impl PodRunner {
    /// Sets up the bridge and kube-proxy, and starts polling the API server
    /// for Running pods. Nodes must be registered first.
    pub fn start(plane: &'static ControlPlane, table: ImageTable) -> Self {
        remove_stale_network_namespaces();
        sh(&["ip", "link", "add", BRIDGE, "type", "bridge"]);
        sh(&["ip", "addr", "add", BRIDGE_ADDRESS, "dev", BRIDGE]);
        sh(&["ip", "link", "set", BRIDGE, "up"]);
        let nodes = kubectl_json(plane, &["get", "nodes"]).expect("listing nodes");
        let node = nodes["items"][0]["metadata"]["name"]
            .as_str()
            .expect("a node registered before the pod runner starts")
            .to_string();
        let kube_proxy = services::start_kube_proxy(plane, &node);
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let pods: Arc<Mutex<HashMap<String, RunningPod>>> = Arc::default();
        let dir = plane.dir.join("pods");
        std::fs::create_dir_all(&dir).unwrap();
        let thread = {
            let (stop, errors, pods, dir) =
                (stop.clone(), errors.clone(), pods.clone(), dir.clone());
            std::thread::spawn(move || {
                // Bounded: at most an hour of half-second rounds.
                for round in 0..7200 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    // Volumes follow their objects every 5 s, as a kubelet's sync.
                    let refresh = round % 10 == 9;
                    for error in sync_once(plane, &table, &pods, &dir, refresh) {
                        let mut errors = errors.lock().unwrap();
                        if !errors.contains(&error) {
                            errors.push(error);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
            errors,
            pods,
            dir,
            kube_proxy,
        }
    }

    /// kube-proxy's last log lines.
    pub fn kube_proxy_log(&self, lines: usize) -> String {
        self.kube_proxy.tail(lines)
    }

    /// Errors so far (an unknown image, a failed start).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// The last lines of a container's log.
    pub fn log_tail(&self, pod_uid: &str, container: &str, lines: usize) -> String {
        super::process::tail(
            &self.dir.join(pod_uid).join(format!("{container}.log")),
            lines,
        )
    }

    /// For a failed test: the last lines of every container's log.
    pub fn container_logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for pod in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            for log in std::fs::read_dir(pod.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = log.path();
                if path.extension().is_some_and(|e| e == "log") {
                    out.push_str(&format!(
                        "--- {}/{}\n{}\n",
                        pod.file_name().to_string_lossy(),
                        log.file_name().to_string_lossy(),
                        super::process::tail(&path, lines)
                    ));
                }
            }
        }
        out
    }

    /// The network namespace of a running pod, by uid.
    pub fn netns_of(&self, pod_uid: &str) -> Option<String> {
        self.pods
            .lock()
            .unwrap()
            .get(pod_uid)
            .map(|p| p.netns.clone())
    }
}

impl Drop for PodRunner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for (_, pod) in self.pods.lock().unwrap().drain() {
            stop_pod(pod);
        }
        self.kube_proxy.kill();
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
    }
}

/// Named network namespaces are files in /run/netns, which outlive a killed
/// test: remove those of test processes that are gone.
fn remove_stale_network_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("chiller-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks that the pid exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

fn stop_pod(mut pod: RunningPod) {
    for (_, child) in pod.processes.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = Command::new("ip")
        .args(["link", "del", &pod.host_veth])
        .status();
    let _ = Command::new("ip")
        .args(["netns", "del", &pod.netns])
        .status();
}

fn sh(args: &[&str]) {
    let output = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn try_sh(args: &[&str]) -> Result<(), String> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn kubectl_json(plane: &ControlPlane, args: &[&str]) -> Result<Value, String> {
    let output = plane
        .kubectl()
        .args(args)
        .args(["-o", "json"])
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
}

/// One round: start pods that are Running with an IP and not started yet;
/// stop pods being deleted and then remove them; stop pods that are gone.
fn sync_once(
    plane: &ControlPlane,
    table: &ImageTable,
    pods: &Mutex<HashMap<String, RunningPod>>,
    dir: &Path,
    refresh: bool,
) -> Vec<String> {
    let mut errors = Vec::new();
    let list = match kubectl_json(plane, &["get", "pods", "-A"]) {
        Ok(list) => list,
        Err(error) => return vec![error],
    };
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let mut services: Option<Value> = None;
    let mut services_now = || -> Result<Value, String> {
        if services.is_none() {
            services = Some(kubectl_json(plane, &["get", "services", "-A"])?);
        }
        Ok(services.clone().unwrap_or_default())
    };
    let mut seen = Vec::new();
    for pod in &items {
        let uid = pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !pod["metadata"]["deletionTimestamp"].is_null() && pod["spec"]["nodeName"].is_string() {
            // As the kubelet does: the object goes only once the processes
            // are stopped, so a pod that is gone no longer answers anyone.
            if let Some(running) = pods.lock().unwrap().remove(&uid) {
                stop_pod(running);
            }
            if let Err(error) = remove_deleted(plane, pod, &uid, dir) {
                errors.push(error);
            }
            continue;
        }
        let running = pod["status"]["phase"] == "Running" && pod["status"]["podIP"].is_string();
        if !running {
            continue;
        }
        seen.push(uid.clone());
        if pods.lock().unwrap().contains_key(&uid) {
            // Like the kubelet's sync: ConfigMap and Secret volumes follow
            // their objects (a config reloader watches for that).
            // Like the kubelet with restartPolicy Always: a container whose
            // process ended starts again (once per round at most).
            if let Some(running) = pods.lock().unwrap().get_mut(&uid) {
                restart_exited(plane, table, running, &mut errors);
                if let Err(error) = report_readiness(plane, running) {
                    errors.push(error);
                }
            }
            if refresh {
                if let Err(error) =
                    materialize_volumes(plane, pod, &dir.join(&uid).join("volumes"), true)
                {
                    errors.push(error);
                }
                if let Err(error) = services_now().and_then(|services| {
                    services::write_in_place(
                        &dir.join(&uid).join("hosts"),
                        &services::hosts_file(pod, &services),
                    )
                }) {
                    errors.push(error);
                }
            }
            continue;
        }
        let hosts = match services_now() {
            Ok(services) => services::hosts_file(pod, &services),
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        // One pod failing to start does not hold up the others; it is tried
        // again next round.
        let index = NEXT_POD.fetch_add(1, Ordering::SeqCst);
        match start_pod(plane, table, pod, index, &dir.join(&uid), &hosts) {
            Ok(started) => {
                pods.lock().unwrap().insert(uid, started);
            }
            Err(error) => errors.push(error),
        }
    }
    let gone: Vec<String> = pods
        .lock()
        .unwrap()
        .keys()
        .filter(|uid| !seen.contains(uid))
        .cloned()
        .collect();
    for uid in gone {
        if let Some(pod) = pods.lock().unwrap().remove(&uid) {
            stop_pod(pod);
        }
    }
    errors
}

/// Deletes a pod whose deletion has begun for good (grace period 0), on the
/// condition that it is still the same pod (uid).
fn remove_deleted(plane: &ControlPlane, pod: &Value, uid: &str, dir: &Path) -> Result<(), String> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let options = dir.join(format!("delete-{uid}.json"));
    let body = serde_json::json!({
        "kind": "DeleteOptions",
        "apiVersion": "v1",
        "gracePeriodSeconds": 0,
        "preconditions": {"uid": uid},
    });
    std::fs::write(&options, body.to_string()).map_err(|e| e.to_string())?;
    let output = plane
        .kubectl()
        .args(["delete", "--raw"])
        .arg(format!("/api/v1/namespaces/{namespace}/pods/{name}"))
        .arg("-f")
        .arg(&options)
        .output()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&options);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Gone already, or a new pod by the same name: nothing left to do.
    if output.status.success() || stderr.contains("NotFound") || stderr.contains("Conflict") {
        Ok(())
    } else {
        Err(format!("deleting pod {namespace}/{name}: {stderr}"))
    }
}

fn restart_exited(
    plane: &ControlPlane,
    table: &ImageTable,
    running: &mut RunningPod,
    errors: &mut Vec<String>,
) {
    let containers: Vec<Value> = containers_in_start_order(&running.pod)
        .into_iter()
        .cloned()
        .collect();
    for (name, child) in running.processes.iter_mut() {
        if !matches!(child.try_wait(), Ok(Some(_))) {
            continue;
        }
        let Some(container) = containers.iter().find(|c| c["name"] == name.as_str()) else {
            continue;
        };
        match start_container(
            plane,
            table,
            &running.pod,
            container,
            &running.netns,
            &running.volumes,
            &running.dir,
        ) {
            Ok(restarted) => {
                *child = restarted;
                *running.restarts.entry(name.clone()).or_default() += 1;
            }
            Err(error) => errors.push(error),
        }
    }
}

/// Probes the pod's long-running containers and reports their readiness
/// when it changed.
fn report_readiness(plane: &ControlPlane, running: &mut RunningPod) -> Result<(), String> {
    let ip = running.pod["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut ready = HashMap::new();
    for container in containers_in_start_order(&running.pod) {
        if is_init_to_completion(&running.pod, container) {
            continue;
        }
        let name = container["name"].as_str().unwrap_or_default().to_string();
        let pid = running
            .processes
            .iter_mut()
            .find(|(n, _)| *n == name)
            .and_then(|(_, child)| matches!(child.try_wait(), Ok(None)).then(|| child.id()));
        let state = running.probes.entry(name.clone()).or_default();
        match (pid, container["readinessProbe"].as_object()) {
            (None, _) => *state = ProbeState::default(),
            (Some(pid), Some(_)) => {
                let exec = readiness::sandbox_pid(pid).map(|pid| ExecTarget {
                    pid,
                    path: std::env::var("PATH").unwrap_or_default(),
                });
                let probe = &container["readinessProbe"];
                let passed = readiness::probe_passes(probe, container, &ip, exec.as_ref());
                state.record(passed, probe);
            }
            (Some(_), None) => state.ready = true,
        }
        let restarts = running.restarts.get(&name).copied().unwrap_or_default();
        ready.insert(
            name,
            ContainerReport {
                ready: state.ready,
                restarts,
            },
        );
    }
    readiness::report(plane, &running.pod, &ready, running.reported.as_ref())?;
    running.reported = Some(ready);
    Ok(())
}

/// Numbers network namespaces and veths uniquely, failed starts included.
static NEXT_POD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn start_pod(
    plane: &ControlPlane,
    table: &ImageTable,
    pod: &Value,
    index: usize,
    dir: &Path,
    hosts: &str,
) -> Result<RunningPod, String> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let ip = pod["status"]["podIP"].as_str().unwrap_or_default();
    // Fail before touching the network when an image is unknown.
    let containers = containers_in_start_order(pod);
    for container in &containers {
        let image = container["image"].as_str().unwrap_or_default();
        if !table.contains_key(repository(image)) {
            return Err(format!(
                "pod {namespace}/{name}: image {image:?} is not in the pod runner's table"
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    services::write_in_place(&dir.join("hosts"), hosts)?;
    let netns = format!("chiller-{}-pod-{index}", std::process::id());
    let host_veth = format!("cpv{index}");
    try_sh(&["ip", "netns", "add", &netns])?;
    try_sh(&[
        "ip", "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
    ])?;
    try_sh(&["ip", "link", "set", &host_veth, "master", BRIDGE, "up"])?;
    let in_pod = |args: &[&str]| {
        let mut full = vec!["ip", "netns", "exec", netns.as_str()];
        full.extend_from_slice(args);
        try_sh(&full)
    };
    in_pod(&["ip", "link", "set", "lo", "up"])?;
    in_pod(&["ip", "addr", "add", &format!("{ip}/16"), "dev", "eth0"])?;
    // kwok hands a deleted pod's IP to the next pod at once: announce the
    // new owner (a gratuitous ARP when eth0 comes up), or neighbours keep
    // sending to the old pod's veth until their ARP entries expire.
    in_pod(&[
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/conf/eth0/arp_notify",
    ])?;
    in_pod(&["ip", "link", "set", "eth0", "up"])?;
    try_sh(&["ip", "neigh", "flush", "to", ip])?;
    let gateway = BRIDGE_ADDRESS.split('/').next().unwrap();
    in_pod(&["ip", "route", "add", "default", "via", gateway])?;
    // What kube-proxy does for the `kubernetes` Service: its ClusterIP leads
    // to the API server, which serves the bridge.
    let service = format!("{KUBERNETES_SERVICE_IP}/32");
    let api_server = format!("{gateway}:{}", plane.api_port);
    in_pod(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        &service,
        "-p",
        "tcp",
        "--dport",
        "443",
        "-j",
        "DNAT",
        "--to-destination",
        &api_server,
    ])?;

    let mut started = RunningPod {
        netns,
        host_veth,
        processes: Vec::new(),
        pod: pod.clone(),
        volumes: HashMap::new(),
        dir: dir.to_path_buf(),
        probes: HashMap::new(),
        reported: None,
        restarts: HashMap::new(),
    };
    match run_containers(plane, table, pod, &containers, dir, &mut started) {
        Ok(()) => Ok(started),
        Err(error) => {
            stop_pod(started);
            Err(error)
        }
    }
}

/// Starts the containers of a pod whose network is set up, in order.
fn run_containers(
    plane: &ControlPlane,
    table: &ImageTable,
    pod: &Value,
    containers: &[&Value],
    dir: &Path,
    started: &mut RunningPod,
) -> Result<(), String> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let netns = started.netns.clone();
    let volumes = materialize_volumes(plane, pod, &dir.join("volumes"), false)?;
    started.volumes = volumes.clone();
    let processes = &mut started.processes;
    for container in containers.iter().copied() {
        let mut child = start_container(plane, table, pod, container, &netns, &volumes, dir)?;
        let name = container["name"].as_str().unwrap_or_default().to_string();
        if is_init_to_completion(pod, container) {
            // Like the kubelet: the next container starts once this one succeeded.
            let deadline = std::time::Instant::now() + INIT_TIMEOUT;
            let status = loop {
                if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                    break status;
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    return Err(format!(
                        "init container {name} of {namespace}/{pod_name} ran over {INIT_TIMEOUT:?}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if !status.success() {
                return Err(format!(
                    "init container {name} of {namespace}/{pod_name} failed: {status}"
                ));
            }
            continue;
        }
        processes.push((name, child));
    }
    Ok(())
}

/// Init containers in their order (native sidecars, with `restartPolicy:
/// Always`, among them), then the app containers.
fn containers_in_start_order(pod: &Value) -> Vec<&Value> {
    let spec = &pod["spec"];
    spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten())
        .collect()
}

fn is_init_to_completion(pod: &Value, container: &Value) -> bool {
    container["restartPolicy"] != "Always"
        && pod["spec"]["initContainers"]
            .as_array()
            .is_some_and(|init| init.iter().any(|c| c["name"] == container["name"]))
}

/// How long a plain init container may run before the pod counts as failed.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes ConfigMap, Secret and emptyDir volumes into `dir`; their paths.
/// With `refresh`, only ConfigMap and Secret contents are written again.
fn materialize_volumes(
    plane: &ControlPlane,
    pod: &Value,
    dir: &Path,
    refresh: bool,
) -> Result<HashMap<String, PathBuf>, String> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let mut paths = HashMap::new();
    for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or_default();
        let path = dir.join(name);
        std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
        if let Some(sources) = volume["projected"]["sources"].as_array() {
            if !refresh {
                project(plane, pod, sources, &path)?;
            }
            paths.insert(name.to_string(), path);
            continue;
        }
        if let Some(items) = volume["downwardAPI"]["items"].as_array() {
            write_downward_api(pod, items, &path)?;
            paths.insert(name.to_string(), path);
            continue;
        }
        let (kind, object, data_key) = if let Some(cm) = volume["configMap"]["name"].as_str() {
            ("configmap", cm, "data")
        } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
            ("secret", secret, "data")
        } else {
            // emptyDir and the rest: an empty folder.
            paths.insert(name.to_string(), path);
            continue;
        };
        let optional =
            volume["configMap"]["optional"] == true || volume["secret"]["optional"] == true;
        let object = match kubectl_json(plane, &["get", kind, object, "-n", namespace]) {
            Ok(object) => object,
            // Like the kubelet: a missing optional source is an empty volume.
            Err(error) if optional && error.contains("NotFound") => {
                paths.insert(name.to_string(), path);
                continue;
            }
            Err(error) => return Err(error),
        };
        for (key, value) in object[data_key].as_object().into_iter().flatten() {
            let text = value.as_str().unwrap_or_default();
            let bytes = if kind == "secret" {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| e.to_string())?
            } else {
                text.as_bytes().to_vec()
            };
            write_if_changed(&path.join(key), &bytes)?;
        }
        paths.insert(name.to_string(), path);
    }
    Ok(paths)
}

/// Replaces `file` through a rename when its content differs.
fn write_if_changed(file: &Path, bytes: &[u8]) -> Result<(), String> {
    if std::fs::read(file).is_ok_and(|current| current == bytes) {
        return Ok(());
    }
    let tmp = file.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, file).map_err(|e| e.to_string())
}

/// A projected volume: service-account token (TokenRequest), ConfigMap
/// items and downward-API fields, as the kubelet writes them.
fn project(plane: &ControlPlane, pod: &Value, sources: &[Value], dir: &Path) -> Result<(), String> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let account = pod["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default");
    for source in sources {
        if let Some(token) = source["serviceAccountToken"].as_object() {
            let output = plane
                .kubectl()
                .args(["create", "token", account, "-n", namespace, "--duration=2h"])
                .output()
                .map_err(|e| e.to_string())?;
            if !output.status.success() {
                return Err(format!(
                    "token for {namespace}/{account}: {}",
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            let path = token["path"].as_str().unwrap_or("token");
            std::fs::write(dir.join(path), output.stdout).map_err(|e| e.to_string())?;
        } else if let Some(name) = source["configMap"]["name"].as_str() {
            let cm = kubectl_json(plane, &["get", "configmap", name, "-n", namespace])?;
            for item in source["configMap"]["items"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let key = item["key"].as_str().unwrap_or_default();
                let path = item["path"].as_str().unwrap_or(key);
                std::fs::write(dir.join(path), cm["data"][key].as_str().unwrap_or_default())
                    .map_err(|e| e.to_string())?;
            }
        } else if let Some(items) = source["downwardAPI"]["items"].as_array() {
            write_downward_api(pod, items, dir)?;
        }
    }
    Ok(())
}

/// Downward-API items: each field of the pod, as the kubelet writes it.
fn write_downward_api(pod: &Value, items: &[Value], dir: &Path) -> Result<(), String> {
    for item in items {
        let path = item["path"].as_str().unwrap_or_default();
        let value = field(
            pod,
            item["fieldRef"]["fieldPath"].as_str().unwrap_or_default(),
        );
        write_if_changed(&dir.join(path), value.as_bytes())?;
    }
    Ok(())
}

/// Where a mount lands on this machine: symlinks in the existing part of
/// the path resolved (bubblewrap cannot create directories through them),
/// and the missing directories created, so bubblewrap can bind over them.
fn mount_point(target: &str, file: bool) -> Result<PathBuf, String> {
    let target = Path::new(target);
    let mut existing = target;
    let mut missing = Vec::new();
    while !existing.exists() {
        missing.push(existing.file_name().unwrap_or_default().to_owned());
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    let mut resolved = existing.canonicalize().map_err(|e| e.to_string())?;
    for part in missing.iter().rev() {
        resolved.push(part);
    }
    let fail = |e: std::io::Error| format!("mount point {}: {e}", resolved.display());
    if file {
        // A subPath file is bound over a file.
        if let Some(parent) = resolved.parent() {
            std::fs::create_dir_all(parent).map_err(fail)?;
        }
        if !resolved.exists() {
            std::fs::write(&resolved, b"").map_err(fail)?;
        }
    } else {
        std::fs::create_dir_all(&resolved).map_err(fail)?;
    }
    Ok(resolved)
}

fn env_of(
    plane: &ControlPlane,
    pod: &Value,
    container: &Value,
) -> Result<Vec<(String, String)>, String> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let mut env = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_string();
        let value = if let Some(value) = var["value"].as_str() {
            value.to_string()
        } else if let Some(key) = var["valueFrom"]["configMapKeyRef"].as_object() {
            let cm = kubectl_json(
                plane,
                &[
                    "get",
                    "configmap",
                    key["name"].as_str().unwrap_or_default(),
                    "-n",
                    namespace,
                ],
            )?;
            cm["data"][key["key"].as_str().unwrap_or_default()]
                .as_str()
                .unwrap_or_default()
                .to_string()
        } else if let Some(key) = var["valueFrom"]["secretKeyRef"].as_object() {
            let secret = kubectl_json(
                plane,
                &[
                    "get",
                    "secret",
                    key["name"].as_str().unwrap_or_default(),
                    "-n",
                    namespace,
                ],
            )?;
            let encoded = secret["data"][key["key"].as_str().unwrap_or_default()]
                .as_str()
                .unwrap_or_default();
            use base64::Engine;
            String::from_utf8_lossy(
                &base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|e| e.to_string())?,
            )
            .into_owned()
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            field(pod, path)
        } else {
            String::new()
        };
        env.push((name, value));
    }
    Ok(env)
}

/// A downward-API field such as `metadata.name`, `status.podIP` or
/// `metadata.annotations['example.com/key']`.
fn field(pod: &Value, path: &str) -> String {
    if let Some((map, key)) = path
        .strip_suffix("']")
        .and_then(|rest| rest.split_once("['"))
    {
        let mut value = pod;
        for part in map.split('.') {
            value = &value[part];
        }
        return value[key].as_str().unwrap_or_default().to_string();
    }
    let mut value = pod;
    for part in path.split('.') {
        value = &value[part];
    }
    value.as_str().unwrap_or_default().to_string()
}

fn start_container(
    plane: &ControlPlane,
    table: &ImageTable,
    pod: &Value,
    container: &Value,
    netns: &str,
    volumes: &HashMap<String, PathBuf>,
    dir: &Path,
) -> Result<Child, String> {
    let image = container["image"].as_str().unwrap_or_default();
    let launch = &table[repository(image)];
    let strings = |key: &str| -> Option<Vec<String>> {
        container[key].as_array().map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
    };
    // Kubernetes: `command` replaces ENTRYPOINT (and drops CMD); `args` replaces CMD.
    let mut argv = match strings("command") {
        Some(command) => command,
        None => launch.entrypoint.clone(),
    };
    match strings("args") {
        Some(args) => argv.extend(args),
        None if container["command"].is_null() => argv.extend(launch.default_args.clone()),
        None => {}
    }
    if let Some(program) = argv.first_mut()
        && let Some((_, local)) = launch.programs.iter().find(|(name, _)| name == program)
    {
        *program = local.display().to_string();
    }
    let mut command = Command::new("ip");
    // Its own PID namespace, ended with the runner: no process outlives its pod.
    command.args([
        "netns",
        "exec",
        netns,
        "bwrap",
        "--die-with-parent",
        "--unshare-pid",
    ]);
    command.args(["--dev-bind", "/", "/", "--proc", "/proc"]);
    // The pod's hosts file, as the kubelet mounts one into every container.
    command
        .arg("--bind")
        .arg(dir.join("hosts"))
        .arg("/etc/hosts");
    for private in &launch.private_dirs {
        command.args(["--tmpfs", private]);
    }
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume = mount["name"].as_str().unwrap_or_default();
        let target = mount["mountPath"].as_str().unwrap_or_default();
        let Some(source) = volumes.get(volume) else {
            return Err(format!("volume {volume} is not materialized"));
        };
        let source = match mount["subPath"].as_str() {
            Some(sub) => source.join(sub),
            None => source.clone(),
        };
        let target = mount_point(target, source.is_file())?;
        command.arg("--bind").arg(source).arg(target);
    }
    if let Some(workdir) = container["workingDir"]
        .as_str()
        .map(PathBuf::from)
        .or(launch.workdir.clone())
    {
        command.arg("--chdir").arg(workdir);
    }
    command.arg("--").args(&argv);
    let path = launch
        .path
        .iter()
        .map(|p| p.display().to_string())
        .chain(std::env::var("PATH").ok())
        .collect::<Vec<_>>()
        .join(":");
    command
        .env_clear()
        .env("PATH", path)
        .env("HOME", "/tmp")
        // As the kubelet sets them in every container.
        .env("KUBERNETES_SERVICE_HOST", KUBERNETES_SERVICE_IP)
        .env("KUBERNETES_SERVICE_PORT", "443");
    for (name, value) in env_of(plane, pod, container)? {
        command.env(name, value);
    }
    let name = container["name"].as_str().unwrap_or_default();
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .map_err(|e| e.to_string())?;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    super::process::spawn_tied_to_this_process(command).map_err(|e| format!("starting {name}: {e}"))
}

/// Whether this process runs inside the network namespace [`isolated`] made.
pub fn in_isolated_network() -> bool {
    std::env::var_os(ISOLATED).is_some()
}

const ISOLATED: &str = "CHILLER_TEST_ISOLATED";

/// Runs the current test again inside new network and mount namespaces
/// (loopback up), so every address it creates is its own; returns whether
/// this process is already that isolated run. `prepare` runs first, outside:
/// the namespace has no route to the Go module proxy, so everything the test
/// builds or downloads must be done there.
pub fn isolated(test_name: &str, prepare: impl FnOnce()) -> bool {
    if in_isolated_network() {
        sh(&["ip", "link", "set", "lo", "up"]);
        return true;
    }
    prepare();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("unshare")
        .args(["--net", "--mount", "--propagation", "private", "--"])
        .arg(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ISOLATED, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("running unshare (util-linux)");
    // The inner run's own summary lines would count this test twice; they
    // are read instead, so a renamed test cannot pass having run nothing.
    use std::io::BufRead;
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
