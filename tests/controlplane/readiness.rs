//! Readiness, as a kubelet reports it: each container's readiness probe
//! (httpGet, tcpSocket or exec) runs against the pod, a container without
//! one is ready while its process runs, and the pod's Ready and
//! ContainersReady conditions and its containers' `ready` go to the API
//! server's status subresource whenever they change.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use serde_json::{Value, json};

use super::ControlPlane;

/// Probe results of one container so far.
#[derive(Debug, Default, Clone)]
pub struct ProbeState {
    pub ready: bool,
    successes: u32,
    failures: u32,
}

impl ProbeState {
    /// Records one probe result, with the probe's thresholds.
    pub fn record(&mut self, passed: bool, probe: &Value) {
        let threshold =
            |key: &str, default: u32| probe[key].as_u64().map_or(default, |n| n.max(1) as u32);
        if passed {
            self.failures = 0;
            self.successes += 1;
            if self.successes >= threshold("successThreshold", 1) {
                self.ready = true;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if !self.ready || self.failures >= threshold("failureThreshold", 3) {
                self.ready = false;
            }
        }
    }
}

/// Where and how an exec probe runs: the container's process, whose mount
/// and network namespaces it enters.
pub struct ExecTarget {
    pub pid: u32,
    pub path: String,
}

/// Runs `probe` (a container's readinessProbe) against the pod at `ip`.
pub fn probe_passes(probe: &Value, container: &Value, ip: &str, exec: Option<&ExecTarget>) -> bool {
    let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1).max(1));
    let get = &probe["httpGet"];
    if get.is_object() {
        let Some(port) = port_of(&get["port"], container) else {
            return false;
        };
        let host = get["host"].as_str().unwrap_or(ip);
        let path = get["path"].as_str().unwrap_or("/");
        if get["scheme"].as_str() == Some("HTTPS") {
            // Like the kubelet: no certificate verification.
            return Command::new("curl")
                .args(["-skf", "-o", "/dev/null", "--max-time"])
                .arg(timeout.as_secs().to_string())
                .arg(format!("https://{host}:{port}{path}"))
                .status()
                .is_ok_and(|s| s.success());
        }
        return http_status(host, port, path, timeout)
            .is_some_and(|code| (200..400).contains(&code));
    }
    let tcp = &probe["tcpSocket"];
    if tcp.is_object() {
        let Some(port) = port_of(&tcp["port"], container) else {
            return false;
        };
        return format!("{ip}:{port}")
            .parse::<SocketAddr>()
            .is_ok_and(|address| TcpStream::connect_timeout(&address, timeout).is_ok());
    }
    if let Some(command) = probe["exec"]["command"].as_array() {
        let Some(target) = exec else {
            return false;
        };
        let argv: Vec<&str> = command.iter().filter_map(Value::as_str).collect();
        return Command::new("timeout")
            .arg(timeout.as_secs().to_string())
            .args(["nsenter", "-t", &target.pid.to_string(), "-m", "-n", "--"])
            .args(["env", "-i", &format!("PATH={}", target.path)])
            .args(&argv)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    }
    // A probe kind we do not know (grpc) never passes: the test then shows it.
    false
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port_of(port: &Value, container: &Value) -> Option<u64> {
    port.as_u64().or_else(|| {
        let name = port.as_str()?;
        container["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)?["containerPort"]
            .as_u64()
    })
}

/// The status code of a plain HTTP GET.
fn http_status(host: &str, port: u64, path: &str, timeout: Duration) -> Option<u16> {
    let address: SocketAddr = format!("{host}:{port}").parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&address, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 32];
    let mut read = 0;
    while read < 12 {
        let n = stream.read(&mut head[read..]).ok()?;
        if n == 0 {
            break;
        }
        read += n;
    }
    std::str::from_utf8(&head[..read])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The pid inside a container's sandbox (bubblewrap's child), whose
/// namespaces an exec probe enters.
pub fn sandbox_pid(bwrap: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{bwrap}/task/{bwrap}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sends the pod's readiness (ready per container) to the API server when
/// it differs from what was `reported` last.
/// What the kubelet reports of one container: ready, and restarted how often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerReport {
    pub ready: bool,
    pub restarts: u32,
}

pub fn report(
    plane: &ControlPlane,
    pod: &Value,
    containers: &HashMap<String, ContainerReport>,
    reported: Option<&HashMap<String, ContainerReport>>,
) -> Result<(), String> {
    if reported == Some(containers) {
        return Ok(());
    }
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    // Native sidecars count; init containers that ran to completion do not.
    let all_ready = containers.values().all(|report| report.ready);
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let status = if all_ready { "True" } else { "False" };
    let statuses = |key: &str| -> Value {
        let list: Vec<Value> = pod["status"][key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let mut s = s.clone();
                if let Some(report) = s["name"].as_str().and_then(|n| containers.get(n)) {
                    s["ready"] = json!(report.ready);
                    s["restartCount"] = json!(report.restarts);
                }
                s
            })
            .collect();
        json!(list)
    };
    let patch = json!({"status": {
        "conditions": [
            {"type": "Ready", "status": status, "lastTransitionTime": now},
            {"type": "ContainersReady", "status": status, "lastTransitionTime": now},
        ],
        "containerStatuses": statuses("containerStatuses"),
        "initContainerStatuses": statuses("initContainerStatuses"),
    }});
    let output = plane
        .kubectl()
        .args([
            "patch",
            "pod",
            name,
            "-n",
            namespace,
            "--subresource=status",
        ])
        .args(["--type=strategic", "-p", &patch.to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "reporting readiness of {namespace}/{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
