//! The data plane with real gunicorn: a Flask app started through a shell-form
//! entrypoint, with exactly the environment the webhook's patch gives the
//! container. gunicorn's statsd lines must carry the prefix the injector chose
//! and be turned into well-named Prometheus metrics by the sidecar's mapping.

use crate::support;
use crate::support::controlplane;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use chiller_metrics::{
    config::{Config, DEFAULT_MAPPING},
    inject::{Decision, GUNICORN_CMD_ARGS, Injector, PodContext, ResolvedMode},
};
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};

const CRATE_DIR: &str = env!("CARGO_MANIFEST_DIR");
/// A setting the container already had; the patch must keep it.
const EXISTING_ARGS: &str = "--timeout 17";
/// Requests sent, by path and the status the app answers with.
const REQUESTS: [(&str, u16); 6] = [
    ("/", 200),
    ("/missing", 404),
    ("/fail", 500),
    ("/", 200),
    ("/missing", 404),
    ("/", 200),
];

/// gunicorn and its process log; stopped on drop, also when the test fails.
struct Gunicorn {
    child: Child,
    log_path: PathBuf,
}

impl Gunicorn {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits for gunicorn's "Listening at: http://ADDR" line.
    fn wait_listening(&mut self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            let address = log.lines().find_map(|line| {
                let rest = line.split("Listening at: http://").nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
            });
            if let Some(address) = address {
                return address;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "gunicorn exited with {status} before listening (flask missing? `make tools` \
                     installs both into .tools/venv); its log:\n{log}"
                );
            }
            assert!(
                Instant::now() < deadline,
                "gunicorn did not start listening within a minute; its log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SIGTERM lets the master stop its workers; SIGKILL only if it hangs.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The chiller API pod of the AdmissionReview fixture, with `EXISTING_ARGS`.
fn chiller_api_pod() -> Value {
    let review = support::https::chiller_api_review();
    let mut pod = review["request"]["object"].clone();
    pod["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": GUNICORN_CMD_ARGS, "value": EXISTING_ARGS}));
    pod
}

/// The app container's literal env values after the injector's patch.
fn patched_env(statsd_port: u16) -> BTreeMap<String, String> {
    let mut config = Config::default();
    config.sidecar.statsd_port = statsd_port;
    config.validate().expect("the test config is valid");
    let injector = Injector::new(config, ResolvedMode::Native);
    let mut pod = chiller_api_pod();
    let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
    let Decision::Inject { patch, status, .. } = injector.mutate(&typed, PodContext::default())
    else {
        panic!("the chiller API pod was not injected");
    };
    assert_eq!(status.prefix, "chiller-api");
    json_patch::patch(&mut pod, &patch.to_json_patch()).expect("the patch applies");
    let env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
    env.iter()
        .filter_map(|var| Some((var["name"].as_str()?.into(), var["value"].as_str()?.into())))
        .collect()
}

/// `sh -c "exec gunicorn app:app ..."` in `tests/dataplane`, with only `env`
/// plus what any image has (PATH, HOME).
fn start_gunicorn(env: &BTreeMap<String, String>, scratch: &Path) -> Gunicorn {
    let gunicorn = support::tool("gunicorn");
    // gunicorn's own directory first, so `sh` finds the one we found.
    let inherited = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(gunicorn.parent().unwrap().to_path_buf())
        .chain(std::env::split_paths(&inherited));
    let search_path = std::env::join_paths(dirs).expect("PATH entries");
    let log_path = scratch.join("gunicorn.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg("exec gunicorn app:app --bind 127.0.0.1:0 --workers 2 --log-level debug")
        .current_dir(format!("{CRATE_DIR}/tests/dataplane"))
        .env_clear()
        .envs(env)
        .env("PATH", search_path)
        .env("HOME", scratch)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("running sh");
    Gunicorn { child, log_path }
}

fn http_get(addr: SocketAddr, path: &str) -> u16 {
    http_request(addr, "GET", path).0
}

/// One request with `Connection: close`: the status and the whole answer.
fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status_line = response.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response to {method} {path}: {response:?}"));
    (status, response)
}

/// One statsd line: `name:value|type[|@rate]`.
#[derive(Debug, Clone)]
struct StatsdLine {
    name: String,
    value: f64,
    kind: String,
}

fn parse_statsd(line: &str) -> StatsdLine {
    let (name, rest) = line
        .split_once(':')
        .unwrap_or_else(|| panic!("not a statsd line: {line:?}"));
    let mut fields = rest.split('|');
    let value = fields.next().unwrap().parse().unwrap();
    let kind = fields
        .next()
        .unwrap_or_else(|| panic!("no type in {line:?}"));
    StatsdLine {
        name: name.to_string(),
        value,
        kind: kind.to_string(),
    }
}

/// Receives statsd lines until `done` says the set is complete.
fn collect_statsd(socket: &UdpSocket, done: impl Fn(&[StatsdLine]) -> bool) -> Vec<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut raw = Vec::new();
    let mut parsed = Vec::new();
    let mut buffer = [0u8; 65536];
    while !done(&parsed) {
        assert!(
            Instant::now() < deadline,
            "gunicorn sent an incomplete set of statsd lines within a minute: {raw:#?}"
        );
        match socket.recv(&mut buffer) {
            Ok(n) => {
                // statsd allows several lines per datagram.
                for line in String::from_utf8_lossy(&buffer[..n]).lines() {
                    raw.push(line.to_string());
                    parsed.push(parse_statsd(line));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("receiving statsd: {e}"),
        }
    }
    raw
}

#[derive(Debug, Deserialize)]
struct MappingFile {
    defaults: MappingDefaults,
    mappings: Vec<Mapping>,
}

#[derive(Debug, Deserialize)]
struct MappingDefaults {
    match_type: String,
}

#[derive(Debug, Deserialize)]
struct Mapping {
    #[serde(rename = "match")]
    pattern: String,
    name: String,
    observer_type: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// statsd_exporter's glob match: the same number of dot-separated components,
/// `*` matching within one component. Returns what each `*` matched.
fn glob_match(pattern: &str, metric: &str) -> Option<Vec<String>> {
    let patterns: Vec<&str> = pattern.split('.').collect();
    let parts: Vec<&str> = metric.split('.').collect();
    if patterns.len() != parts.len() {
        return None;
    }
    let mut captures = Vec::new();
    for (pattern, part) in patterns.iter().zip(parts) {
        component_match(pattern, part, &mut captures)?;
    }
    Some(captures)
}

/// Matches one component; each `*` takes the shortest text that lets the rest match.
fn component_match(pattern: &str, text: &str, captures: &mut Vec<String>) -> Option<()> {
    match pattern.split_once('*') {
        None => (pattern == text).then_some(()),
        Some((literal, rest)) => {
            let text = text.strip_prefix(literal)?;
            for end in 0..=text.len() {
                let mut attempt = captures.clone();
                attempt.push(text[..end].to_string());
                if component_match(rest, &text[end..], &mut attempt).is_some() {
                    *captures = attempt;
                    return Some(());
                }
            }
            None
        }
    }
}

/// The first mapping matching `metric` (glob_disable_ordering is false), with
/// its labels expanded.
fn map_metric<'a>(
    mappings: &'a [Mapping],
    metric: &str,
) -> Option<(&'a Mapping, BTreeMap<String, String>)> {
    mappings.iter().find_map(|mapping| {
        let captures = glob_match(&mapping.pattern, metric)?;
        let labels = mapping
            .labels
            .iter()
            .map(|(name, template)| {
                let mut value = template.clone();
                for (i, captured) in captures.iter().enumerate().rev() {
                    value = value.replace(&format!("${}", i + 1), captured);
                }
                (name.clone(), value)
            })
            .collect();
        Some((mapping, labels))
    })
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    !name.starts_with("__") && is_metric_name(name) && !name.contains(':')
}

#[test]
fn glob_matching_follows_statsd_exporter() {
    assert_eq!(
        glob_match(
            "*.gunicorn.request.status.*",
            "api.gunicorn.request.status.200"
        ),
        Some(vec!["api".to_string(), "200".to_string()])
    );
    assert_eq!(
        glob_match("*.gunicorn.requests", "a.b.gunicorn.requests"),
        None
    );
    assert_eq!(
        glob_match("*.gunicorn.requests", "api.gunicorn.request"),
        None
    );
    assert_eq!(
        glob_match("*.gunicorn.log.*", "api.gunicorn.request.duration"),
        None
    );
    assert_eq!(glob_match("a*z.x", "abcz.x"), Some(vec!["bc".to_string()]));
}

#[test]
fn gunicorn_statsd_lines_match_the_sidecar_mapping() {
    let statsd = UdpSocket::bind("127.0.0.1:0").unwrap();
    let statsd_port = statsd.local_addr().unwrap().port();
    let env = patched_env(statsd_port);
    let prefix = "chiller-api";
    assert_eq!(
        env[GUNICORN_CMD_ARGS],
        format!("{EXISTING_ARGS} --statsd-host=localhost:{statsd_port} --statsd-prefix={prefix}")
    );

    let scratch = tempfile::tempdir().unwrap();
    let mut gunicorn = start_gunicorn(&env, scratch.path());
    let addr = gunicorn.wait_listening();
    for (path, status) in REQUESTS {
        assert_eq!(http_get(addr, path), status, "GET {path}");
    }

    let count = |lines: &[StatsdLine], name: &str| -> f64 {
        lines
            .iter()
            .filter(|l| l.name == format!("{prefix}.{name}"))
            .map(|l| l.value)
            .sum()
    };
    let expected_status = |code: u16| REQUESTS.iter().filter(|(_, s)| *s == code).count() as f64;
    let raw = collect_statsd(&statsd, |lines| {
        count(lines, "gunicorn.requests") >= REQUESTS.len() as f64
            && [200, 404, 500].iter().all(|&code| {
                count(lines, &format!("gunicorn.request.status.{code}")) >= expected_status(code)
            })
            && lines
                .iter()
                .filter(|l| l.name.ends_with(".gunicorn.request.duration"))
                .count()
                >= REQUESTS.len()
            && lines.iter().any(|l| l.name.ends_with(".gunicorn.workers"))
    });
    let lines: Vec<StatsdLine> = raw.iter().map(|l| parse_statsd(l)).collect();

    // gunicorn honoured the setting the container had before the patch.
    let log = gunicorn.log();
    assert!(
        log.lines().any(|l| l.trim() == "timeout: 17"),
        "gunicorn did not take {EXISTING_ARGS:?} from {GUNICORN_CMD_ARGS}; its log:\n{log}"
    );

    // What gunicorn sent, exactly.
    assert_eq!(count(&lines, "gunicorn.requests"), REQUESTS.len() as f64);
    for code in [200, 404, 500] {
        assert_eq!(
            count(&lines, &format!("gunicorn.request.status.{code}")),
            expected_status(code),
            "status {code}: {raw:#?}"
        );
    }
    let workers = lines
        .iter()
        .rfind(|l| l.name == format!("{prefix}.gunicorn.workers"))
        .unwrap();
    assert_eq!((workers.value, workers.kind.as_str()), (2.0, "g"));

    // Every line is under the prefix and mapped to a well-named metric.
    let mapping: MappingFile = serde_norway::from_str(DEFAULT_MAPPING).unwrap();
    assert_eq!(mapping.defaults.match_type, "glob");
    for line in &lines {
        assert!(
            line.name.starts_with(&format!("{prefix}.")),
            "{line:?} lacks the prefix {prefix}"
        );
        let (mapped, labels) = map_metric(&mapping.mappings, &line.name)
            .unwrap_or_else(|| panic!("no mapping matches {line:?}"));
        assert!(is_metric_name(&mapped.name), "{}", mapped.name);
        assert_eq!(labels.get("prefix").map(String::as_str), Some(prefix));
        for (name, value) in &labels {
            assert!(is_label_name(name), "label {name:?} of {}", mapped.name);
            assert!(!value.is_empty(), "label {name} of {line:?} is empty");
        }
        let metric = line.name.strip_prefix(&format!("{prefix}.")).unwrap();
        match (metric, line.kind.as_str()) {
            ("gunicorn.request.duration", "ms") => {
                assert_eq!(mapped.observer_type.as_deref(), Some("histogram"));
                assert!(mapped.name.ends_with("_seconds"), "{}", mapped.name);
                assert!(line.value >= 0.0, "{line:?}");
            }
            ("gunicorn.workers", "g") => {
                assert!(!mapped.name.ends_with("_total"), "{}", mapped.name);
            }
            (_, "c") => {
                assert!(mapped.name.ends_with("_total"), "{}", mapped.name);
                assert_eq!(mapped.observer_type, None, "{}", mapped.name);
            }
            _ => panic!("unexpected statsd line {line:?}"),
        }
        if let Some(code) = metric.strip_prefix("gunicorn.request.status.") {
            assert_eq!(mapped.name, "gunicorn_responses_total");
            assert_eq!(labels["status"], code);
        }
    }
    for (metric, name) in [
        ("gunicorn.requests", "gunicorn_requests_total"),
        ("gunicorn.request.status.500", "gunicorn_responses_total"),
        (
            "gunicorn.request.duration",
            "gunicorn_request_duration_seconds",
        ),
        ("gunicorn.workers", "gunicorn_workers"),
    ] {
        let full = format!("{prefix}.{metric}");
        assert!(
            lines.iter().any(|l| l.name == full),
            "no {full} line: {raw:#?}"
        );
        assert_eq!(map_metric(&mapping.mappings, &full).unwrap().0.name, name);
    }
    drop(gunicorn);
}

/// A process stopped on drop, also when the test fails.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real statsd_exporter, started with exactly the injected sidecar's
/// arguments (addresses moved to loopback) and the mapping file the kubelet
/// writes from the pod's own annotation (its downward-API volume), counts
/// every request of a real gunicorn from the first one on; and, with no
/// lifecycle API, nobody else can stop or reconfigure it.
#[test]
fn the_injected_exporter_counts_every_request_and_offers_no_lifecycle_api() {
    let statsd_port = controlplane::free_port();
    let injector = Injector::new(Config::default(), ResolvedMode::Native);
    let mut pod = chiller_api_pod();
    let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
    let Decision::Inject { patch, .. } = injector.mutate(&typed, PodContext::default()) else {
        panic!("the chiller API pod was not injected");
    };
    json_patch::patch(&mut pod, &patch.to_json_patch()).expect("the patch applies");
    let sidecar = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "statsd-exporter")
        .expect("the native sidecar");
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == sidecar["volumeMounts"][0]["name"])
        .expect("the mapping volume");
    // What the kubelet writes: the annotation the downward-API item names.
    let item = &volume["downwardAPI"]["items"][0];
    let field = item["fieldRef"]["fieldPath"].as_str().unwrap();
    let key = field
        .strip_prefix("metadata.annotations['")
        .and_then(|rest| rest.strip_suffix("']"))
        .unwrap_or_else(|| panic!("not an annotation: {field}"));
    let mapping = pod["metadata"]["annotations"][key].as_str().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mapping_file = scratch.path().join(item["path"].as_str().unwrap());
    std::fs::write(&mapping_file, mapping).unwrap();

    let web: SocketAddr = format!("127.0.0.1:{}", controlplane::free_port())
        .parse()
        .unwrap();
    let mut args = Vec::new();
    for arg in sidecar["args"].as_array().unwrap() {
        let arg = arg.as_str().unwrap();
        let (flag, _) = arg.split_once('=').unwrap();
        args.push(match flag {
            "--statsd.mapping-config" => format!("{flag}={}", mapping_file.display()),
            "--statsd.listen-udp" | "--statsd.listen-tcp" => {
                format!("{flag}=127.0.0.1:{statsd_port}")
            }
            "--web.listen-address" => format!("{flag}={web}"),
            _ => arg.to_string(),
        });
    }
    let exporter =
        Command::new(controlplane::nodes::build("statsd-exporter").join("statsd_exporter"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running statsd_exporter");
    let mut exporter = Stopped(exporter);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(web).is_err() {
        assert!(Instant::now() < deadline, "statsd_exporter did not listen");
        assert!(
            exporter.0.try_wait().unwrap().is_none(),
            "statsd_exporter exited at start with {args:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let env = patched_env(statsd_port);
    let mut gunicorn = start_gunicorn(&env, scratch.path());
    let addr = gunicorn.wait_listening();
    for (path, status) in REQUESTS {
        assert_eq!(http_get(addr, path), status, "GET {path}");
    }
    let counted = || -> Option<f64> {
        let (_, metrics) = http_request(web, "GET", "/metrics");
        metrics.lines().find_map(|line| {
            line.strip_prefix("gunicorn_requests_total{prefix=\"chiller-api\"} ")
                .and_then(|value| value.trim().parse().ok())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while counted() != Some(REQUESTS.len() as f64) {
        assert!(
            Instant::now() < deadline,
            "the exporter counted {:?} of {} requests",
            counted(),
            REQUESTS.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Without the lifecycle API these paths fall through to the landing
    // page (200, HTML): what counts is that the exporter keeps running.
    for path in ["/-/quit", "/-/reload"] {
        http_request(web, "POST", path);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        exporter.0.try_wait().unwrap().is_none(),
        "the exporter stopped"
    );
    assert_eq!(counted(), Some(REQUESTS.len() as f64));
}
