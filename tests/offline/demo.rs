//! `make demo` (scripts/demo.sh): its build shows progress, a summary of what
//! was injected comes first, and the no-cluster fallback is one info line.
//! The build step runs a stand-in for cargo (the binaries are already built
//! for this test), so the test sees exactly what the script shows of a build.

use std::{path::Path, process::Command};

#[test]
fn demo_shows_build_progress_a_summary_first_and_one_no_cluster_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let fake_cargo = dir.path().join("cargo");
    std::fs::write(
        &fake_cargo,
        "#!/bin/sh\necho \"   Compiling chiller-metrics (stand-in: $*)\" >&2\n",
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake_cargo, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    assert!(
        root.join("target/debug/examples/admission_client").exists(),
        "the demo's client is built: `cargo build --example admission_client` (make test does)"
    );
    let output = Command::new(root.join("scripts/demo.sh"))
        .env("CARGO", &fake_cargo)
        // A kubeconfig that names a cluster must not be used either.
        .env("KUBECONFIG", root.join("no-such-kubeconfig"))
        .output()
        .expect("running scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let all = format!("{stdout}{stderr}");

    // The build's own output is shown, with the bin and the example it builds.
    assert!(
        stderr.contains("Compiling chiller-metrics (stand-in: build --locked --bin chiller-metrics --example admission_client)"),
        "{stderr}"
    );
    assert!(stdout.contains("== building chiller-metrics"), "{stdout}");

    // The summary comes before the details, and says what went where.
    let lines: Vec<&str> = stdout.lines().collect();
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{stdout}"))
    };
    let summary = at("# summary: injected statsd-exporter as a native sidecar");
    assert!(
        lines[summary].contains("statsd prefix \"chiller-api\""),
        "{stdout}"
    );
    assert!(
        lines[summary + 1].contains("container api: GUNICORN_CMD_ARGS=\"--statsd-host=localhost:9125 --statsd-prefix=chiller-api\""),
        "{stdout}"
    );
    assert!(summary < at("# HTTP 200"));
    assert!(summary < at("# decoded JSONPatch"));
    assert!(summary > at("== POST /mutate"));

    // No cluster: one info line, no error chain, no second warning.
    assert_eq!(all.matches("info: no cluster").count(), 1, "{all}");
    for chain in [
        "in-cluster",
        "Failed to infer",
        "kubeconfig:",
        "no cluster reachable",
        "WARN",
    ] {
        assert!(!all.contains(chain), "{chain:?} shown:\n{all}");
    }
    assert!(stdout.contains("chiller_metrics_admissions_total{outcome=\"injected\""));
}
