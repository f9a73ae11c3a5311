//! `uninject` is the inverse of the mutation: `uninject(inject(x)) == x` for
//! the golden fixtures (the webhook's patched pods), and as a property over
//! variations of their pods and of the pod templates of
//! tests/fixtures/manifests (sidecar mode, existing env, labels, annotations,
//! init containers, volumes).

use std::path::{Path, PathBuf};

use chiller_metrics::{
    cluster::policy_from_namespace,
    config::Config,
    inject::{Decision, Injector, NamespacePolicy, PodContext, PodView, ResolvedMode},
    manifest::{pod_targets, with_metadata},
    uninject::uninject_patch,
};
use k8s_openapi::api::core::v1::Namespace;
use proptest::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// A golden request's pod with the config and namespace policy it runs with.
#[derive(Debug, Clone)]
struct FixturePod {
    name: String,
    pod: Value,
    config: Config,
    policy: Option<NamespacePolicy>,
    /// For a pod template: its workload's name, and whether it runs to completion.
    owner: Option<String>,
    job: bool,
}

fn golden_pods() -> Vec<FixturePod> {
    let requests = golden().join("requests");
    let mut names: Vec<String> = std::fs::read_dir(&requests)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let stem = name.strip_suffix(".json")?;
            (!stem.contains('.')).then(|| stem.to_string())
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let request: Value = serde_json::from_str(
                &std::fs::read_to_string(requests.join(format!("{name}.json"))).unwrap(),
            )
            .unwrap();
            let pod = request["request"]["object"].clone();
            if request["request"]["kind"]["kind"] != "Pod" || !pod.is_object() {
                return None;
            }
            let config_path = requests.join(format!("{name}.config.yaml"));
            let config = if config_path.exists() {
                Config::from_yaml(&std::fs::read_to_string(config_path).unwrap()).unwrap()
            } else {
                Config::default()
            };
            let namespace_path = requests.join(format!("{name}.namespace.yaml"));
            let policy = namespace_path.exists().then(|| {
                let namespace: Namespace =
                    serde_norway::from_str(&std::fs::read_to_string(namespace_path).unwrap())
                        .unwrap();
                policy_from_namespace(&namespace, &config.keys())
            });
            Some(FixturePod {
                name,
                pod,
                config,
                policy,
                owner: None,
                job: false,
            })
        })
        .collect()
}

/// The pods and pod templates of the rendered-chart fixture.
fn manifest_templates() -> Vec<FixturePod> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/manifests/chiller-rendered.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let object = Value::deserialize(document).unwrap();
        let mut targets = Vec::new();
        pod_targets(&object, "", &mut targets);
        for target in targets {
            out.push(FixturePod {
                name: target.label,
                pod: with_metadata(object.pointer(&target.pointer).unwrap()),
                config: Config::default(),
                policy: None,
                owner: target.owner,
                job: target.job,
            });
        }
    }
    out
}

fn all_fixtures() -> Vec<FixturePod> {
    let mut all = golden_pods();
    all.extend(manifest_templates());
    all
}

/// The pod after the mutation, or `None` when it is skipped.
fn inject(fixture: &FixturePod, pod: &Value, mode: ResolvedMode) -> Option<Value> {
    let injector = Injector::new(fixture.config.clone(), mode);
    let view = PodView::deserialize(pod).unwrap();
    let ctx = PodContext {
        namespace: fixture.policy.as_ref(),
        owner_hint: fixture.owner.as_deref(),
        job_template: fixture.job,
    };
    match injector.mutate(&view, ctx) {
        Decision::Inject { patch, .. } => {
            let mut patched = pod.clone();
            json_patch::patch(&mut patched, &patch.to_json_patch()).unwrap();
            Some(patched)
        }
        Decision::Skip(_) => None,
    }
}

fn uninject(config: &Config, pod: &Value) -> Value {
    let patch = uninject_patch(config, pod).expect("an injected pod has something to remove");
    let mut restored = pod.clone();
    json_patch::patch(&mut restored, &patch).unwrap();
    restored
}

#[test]
fn uninject_restores_every_template_of_the_manifest_fixture() {
    let templates = manifest_templates();
    let mut round_trips = 0;
    for fixture in &templates {
        for mode in [ResolvedMode::Native, ResolvedMode::Container] {
            if let Some(injected) = inject(fixture, &fixture.pod, mode) {
                assert_eq!(
                    uninject(&fixture.config, &injected),
                    fixture.pod,
                    "{}",
                    fixture.name
                );
                round_trips += 1;
            }
        }
    }
    // 7 workloads in native mode, 5 in container mode (no Jobs).
    assert_eq!(round_trips, 12, "{} templates", templates.len());
}

#[test]
fn uninject_restores_every_golden_patched_pod() {
    let expected = golden().join("expected");
    let mut round_trips = 0;
    for fixture in golden_pods() {
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(expected.join(format!("{}.json", fixture.name))).unwrap(),
        )
        .unwrap();
        match golden.get("patchedPod") {
            Some(patched) => {
                assert_eq!(
                    uninject(&fixture.config, patched),
                    fixture.pod,
                    "{}: uninject(inject(x)) == x",
                    fixture.name
                );
                round_trips += 1;
            }
            // Skipped pods: only an already injected one has something to remove.
            None if fixture.name == "already-injected" => {
                assert!(uninject_patch(&fixture.config, &fixture.pod).is_some());
            }
            None => assert_eq!(
                uninject_patch(&fixture.config, &fixture.pod),
                None,
                "{}: nothing was injected, nothing is removed",
                fixture.name
            ),
        }
    }
    assert!(
        round_trips >= 9,
        "only {round_trips} golden pods are injected"
    );
}

/// Variations the mutation treats differently.
#[derive(Debug, Clone)]
struct Variation {
    mode: ResolvedMode,
    /// `GUNICORN_CMD_ARGS` set before injection on the first container:
    /// `None` leaves env alone, `Some(None)` removes env entirely.
    gunicorn_args: Option<Option<String>>,
    other_env: bool,
    extra_label: Option<(String, String)>,
    drop_labels: bool,
    extra_annotation: Option<(String, String)>,
    drop_annotations: bool,
    default_container_other: bool,
    existing_init_container: bool,
    existing_volume: bool,
}

fn variation() -> impl Strategy<Value = Variation> {
    let label = proptest::option::of(("[a-z]{1,8}(/[a-z]{1,5})?", "[a-z0-9]{0,6}"));
    let args = proptest::option::of(proptest::option::of("--[a-z]{2,8}( [0-9]{1,2})?"));
    (
        prop_oneof![Just(ResolvedMode::Native), Just(ResolvedMode::Container)],
        args,
        any::<bool>(),
        label.clone(),
        any::<bool>(),
        label,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                mode,
                gunicorn_args,
                other_env,
                extra_label,
                drop_labels,
                extra_annotation,
                drop_annotations,
                default_container_other,
                existing_init_container,
                existing_volume,
            )| Variation {
                mode,
                gunicorn_args,
                other_env,
                extra_label,
                drop_labels,
                extra_annotation,
                drop_annotations,
                default_container_other,
                existing_init_container,
                existing_volume,
            },
        )
}

fn vary(pod: &Value, v: &Variation) -> Value {
    let mut pod = pod.clone();
    let metadata = pod["metadata"].as_object_mut().unwrap();
    if v.drop_labels {
        metadata.remove("labels");
    }
    if v.drop_annotations {
        metadata.remove("annotations");
    }
    for (field, extra) in [
        ("labels", &v.extra_label),
        ("annotations", &v.extra_annotation),
    ] {
        if let Some((key, value)) = extra {
            metadata
                .entry(field)
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .unwrap()
                .insert(key.clone(), json!(value));
        }
    }
    let containers = pod["spec"]["containers"].as_array().unwrap().clone();
    if v.default_container_other && containers.len() > 1 {
        let other = containers[1]["name"].clone();
        pod["metadata"]
            .as_object_mut()
            .unwrap()
            .entry("annotations")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .unwrap()
            .insert("kubectl.kubernetes.io/default-container".into(), other);
    }
    let first = &mut pod["spec"]["containers"][0];
    match &v.gunicorn_args {
        None => {}
        Some(None) => {
            first.as_object_mut().unwrap().remove("env");
        }
        Some(Some(args)) => {
            let env = first
                .as_object_mut()
                .unwrap()
                .entry("env")
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .unwrap();
            env.retain(|e| e["name"] != "GUNICORN_CMD_ARGS");
            env.push(json!({"name": "GUNICORN_CMD_ARGS", "value": args}));
        }
    }
    if v.other_env {
        first
            .as_object_mut()
            .unwrap()
            .entry("env")
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"name": "LOG_LEVEL", "value": "info"}));
    }
    let spec = pod["spec"].as_object_mut().unwrap();
    if v.existing_init_container {
        spec.entry("initContainers")
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "migrate", "image": "migrate:1"}));
    }
    if v.existing_volume {
        spec.entry("volumes")
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "scratch", "emptyDir": {}}));
    }
    pod
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn uninject_inverts_inject(index in any::<prop::sample::Index>(), v in variation()) {
        let fixtures = all_fixtures();
        let fixture = &fixtures[index.index(fixtures.len())];
        let pod = vary(&fixture.pod, &v);
        if let Some(injected) = inject(fixture, &pod, v.mode) {
            prop_assert_ne!(&injected, &pod);
            prop_assert_eq!(uninject(&fixture.config, &injected), pod);
        } else {
            // A skipped pod is left alone by uninject too, unless it was
            // injected before.
            let marked = pod["metadata"]["labels"]["metrics.chiller.io/injected"] == "true"
                || pod["metadata"]["annotations"]["metrics.chiller.io/status"].is_string();
            if !marked {
                prop_assert_eq!(uninject_patch(&fixture.config, &pod), None);
            }
        }
    }
}

#[test]
fn a_pod_with_every_list_already_present_round_trips() {
    // Guards the property against passing by skipping everything.
    let fixture = golden_pods()
        .into_iter()
        .find(|f| f.name == "chiller-api")
        .unwrap();
    let variation = Variation {
        mode: ResolvedMode::Container,
        gunicorn_args: Some(Some("--workers 4".into())),
        other_env: true,
        extra_label: None,
        drop_labels: true,
        extra_annotation: None,
        drop_annotations: true,
        default_container_other: false,
        existing_init_container: true,
        existing_volume: true,
    };
    let pod = vary(&fixture.pod, &variation);
    let injected = inject(&fixture, &pod, variation.mode).expect("injected");
    assert_eq!(uninject(&fixture.config, &injected), pod);
}
