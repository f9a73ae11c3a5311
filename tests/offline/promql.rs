//! Every PromQL query of the Grafana dashboard, checked by `promtool` and
//! evaluated on series shaped as statsd_exporter (with our mapping) and
//! postgres_exporter expose them. Expected values: tests/promql/expected.yaml.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use chiller_metrics::{
    config::Config,
    reconcile::desired::{NamespaceSettings, PostgresTarget, desired_objects},
};
use serde_json::{Value, json};

use crate::support;

const INSTALL_HINT: &str = "promtool comes with the Debian package `prometheus`";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/promql")
        .join(name)
}

fn read_yaml(name: &str) -> Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// promtool on PATH or in `.tools/bin`; the test fails naming the package when missing.
fn promtool() -> PathBuf {
    support::tool("promtool")
}

/// One query of the dashboard.
#[derive(Debug, Clone)]
struct Query {
    panel: String,
    ref_id: String,
    expr: String,
}

/// The dashboard exactly as the reconcile loop writes it for namespace `chiller`.
fn dashboard() -> Value {
    let settings = NamespaceSettings {
        name: "chiller".into(),
        uid: None,
        postgres: Some(PostgresTarget::parse("db:5432/chiller", "db-auth").unwrap()),
    };
    let objects = desired_objects(&settings, &Config::default());
    let config_map = objects
        .iter()
        .find(|o| o.value["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("a dashboard ConfigMap");
    let text = config_map.value["data"]
        .as_object()
        .and_then(|data| data.values().next())
        .and_then(Value::as_str)
        .expect("the dashboard JSON");
    serde_json::from_str(text).expect("dashboard is JSON")
}

fn dashboard_queries() -> Vec<Query> {
    let dashboard = dashboard();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(Query {
                panel: panel["title"].as_str().expect("panel title").to_string(),
                ref_id: target["refId"].as_str().expect("refId").to_string(),
                expr: target["expr"].as_str().expect("expr").to_string(),
            });
        }
    }
    assert!(queries.len() >= 8, "{queries:?}");
    queries
}

/// Replaces `$name` and `${name}`, longest names first; fails on leftovers.
fn substitute(expr: &str, variables: &BTreeMap<String, String>) -> String {
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort_by_key(|name| std::cmp::Reverse(name.len()));
    let mut out = expr.to_string();
    for name in names {
        out = out
            .replace(&format!("${{{name}}}"), &variables[name])
            .replace(&format!("${name}"), &variables[name]);
    }
    assert!(!out.contains('$'), "unsubstituted variable in {out}");
    out
}

fn variables(overrides: &[(&str, &str)]) -> BTreeMap<String, String> {
    let expected = read_yaml("expected.yaml");
    let mut variables: BTreeMap<String, String> =
        serde_json::from_value(expected["variables"].clone()).expect("variables map");
    for (name, value) in overrides {
        variables.insert(name.to_string(), value.to_string());
    }
    variables
}

fn run(command: &mut Command) -> (bool, String) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}. {INSTALL_HINT}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn write_yaml(dir: &Path, name: &str, value: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_norway::to_string(value).unwrap()).unwrap();
    path
}

/// Each query as a recording rule, so `promtool check rules` parses them.
fn rules_file(queries: &[Query], variables: &BTreeMap<String, String>) -> Value {
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| json!({ "record": format!("dashboard:query_{i}"), "expr": substitute(&q.expr, variables) }))
        .collect();
    json!({ "groups": [{ "name": "dashboard", "rules": rules }] })
}

/// The expected samples of every query; panics if a query has none or an
/// expectation matches no query.
fn expectations(queries: &[Query]) -> Vec<(Query, Value)> {
    let expected = read_yaml("expected.yaml");
    let panels = expected["panels"].as_object().expect("panels map");
    let mut out = Vec::new();
    for query in queries {
        let samples = panels
            .get(&query.panel)
            .and_then(|p| p.get(&query.ref_id))
            .unwrap_or_else(|| {
                panic!(
                    "expected.yaml has no values for panel {:?} query {}: {}",
                    query.panel, query.ref_id, query.expr
                )
            });
        out.push((query.clone(), samples.clone()));
    }
    for (panel, targets) in panels {
        for ref_id in targets.as_object().expect("refId map").keys() {
            assert!(
                queries
                    .iter()
                    .any(|q| &q.panel == panel && &q.ref_id == ref_id),
                "expected.yaml has values for {panel:?} {ref_id}, which the dashboard lacks"
            );
        }
    }
    out
}

/// A `promtool test rules` file evaluating each query on series.yaml.
fn test_file(
    rules: &Path,
    cases: &[(Query, Value)],
    variables: &BTreeMap<String, String>,
) -> Value {
    let series = read_yaml("series.yaml");
    let eval_time = read_yaml("expected.yaml")["eval_time"].clone();
    let tests: Vec<Value> = cases
        .iter()
        .map(|(query, samples)| {
            json!({
                // promtool compares floats exactly; the fixture has 4 decimals.
                "expr": format!("round(({}), 0.0001)", substitute(&query.expr, variables)),
                "eval_time": eval_time,
                "exp_samples": samples,
            })
        })
        .collect();
    json!({
        "rule_files": [rules.file_name().unwrap().to_str().unwrap()],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": series["interval"],
            "input_series": series["input_series"],
            "promql_expr_test": tests,
        }],
    })
}

/// Runs `promtool test rules` with these expectations; returns success and output.
fn promtool_test(cases: &[(Query, Value)], variables: &BTreeMap<String, String>) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let queries: Vec<Query> = cases.iter().map(|(q, _)| q.clone()).collect();
    let rules = write_yaml(dir.path(), "rules.yaml", &rules_file(&queries, variables));
    let test = write_yaml(
        dir.path(),
        "test.yaml",
        &test_file(&rules, cases, variables),
    );
    run(Command::new(promtool())
        .current_dir(dir.path())
        .args(["test", "rules"])
        .arg(&test))
}

#[test]
fn every_dashboard_query_parses() {
    let promtool = promtool();
    let queries = dashboard_queries();
    let dir = tempfile::tempdir().unwrap();
    let rules = write_yaml(
        dir.path(),
        "rules.yaml",
        &rules_file(&queries, &variables(&[])),
    );
    let (ok, output) = run(Command::new(&promtool).args(["check", "rules"]).arg(&rules));
    assert!(ok, "promtool check rules failed:\n{output}");
    assert!(
        output.contains(&format!("{} rules found", queries.len())),
        "{output}"
    );

    // The same check rejects a query with a syntax error.
    let broken = vec![Query {
        expr: "sum by (prefix) (rate(gunicorn_requests_total[5m])".into(),
        ..queries[0].clone()
    }];
    let rules = write_yaml(
        dir.path(),
        "broken.yaml",
        &rules_file(&broken, &variables(&[])),
    );
    let (ok, output) = run(Command::new(&promtool).args(["check", "rules"]).arg(&rules));
    assert!(!ok, "a broken query passed promtool check rules:\n{output}");
}

#[test]
fn every_dashboard_query_returns_the_expected_values() {
    let cases = expectations(&dashboard_queries());
    let (ok, output) = promtool_test(&cases, &variables(&[]));
    assert!(ok, "promtool test rules failed:\n{output}");
    assert!(output.contains("SUCCESS"), "{output}");
}

#[test]
fn a_wrong_expectation_fails() {
    let mut cases = expectations(&dashboard_queries());
    let samples = &mut cases[0].1;
    let value = samples[0]["value"].as_f64().expect("a number");
    samples[0]["value"] = json!(value + 1.0);
    let (ok, output) = promtool_test(&cases, &variables(&[]));
    assert!(
        !ok,
        "promtool accepted a wrong value for {}: {output}",
        cases[0].0.expr
    );
}

#[test]
fn choosing_one_app_shows_only_that_app() {
    let chosen = "chiller-api";
    let cases: Vec<(Query, Value)> = expectations(&dashboard_queries())
        .into_iter()
        .map(|(query, samples)| {
            let kept: Vec<Value> = samples
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| {
                    let labels = s["labels"].as_str().unwrap();
                    !labels.contains("prefix=") || labels.contains(&format!("prefix=\"{chosen}\""))
                })
                .cloned()
                .collect();
            (query, Value::Array(kept))
        })
        .collect();
    let removed: usize = expectations(&dashboard_queries())
        .iter()
        .map(|(_, s)| s.as_array().unwrap().len())
        .sum::<usize>()
        - cases
            .iter()
            .map(|(_, s)| s.as_array().unwrap().len())
            .sum::<usize>();
    assert!(removed >= 6, "the fixture has the other app in most panels");
    let (ok, output) = promtool_test(&cases, &variables(&[("prefix", chosen)]));
    assert!(ok, "promtool test rules failed:\n{output}");
}
