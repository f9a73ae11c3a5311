//! A webhook's `matchConditions`, evaluated with the `cel` crate on the
//! variables the API server binds for a pod CREATE: `object` (the pod as
//! admitted), `oldObject` (null), `request` (the admission request) and
//! `authorizer`.
//!
//! What explain cannot know is bound as an opaque unknown: who creates the
//! pod (`request.userInfo`), the create options (`request.options`), and the
//! authorization checks (`authorizer`). An expression whose value does not
//! depend on them (`true || request.userInfo.username == 'x'`) is still
//! decided; one that reads them is reported as unknown, never guessed.

use std::{collections::HashMap, sync::Arc};

use cel::{Context, Env, ExecutionError, Value as Cel, objects::Opaque};
use serde_json::Value;

/// The outcome of one expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CelOutcome {
    True,
    False,
    /// A runtime error the API server would also hit (a missing key, an
    /// index out of range, ...); the webhook's failurePolicy decides.
    Error(String),
    /// Reads what explain does not know, or uses what the `cel` crate does
    /// not evaluate like the API server.
    Unknown(String),
}

/// What explain does not know, bound where the API server binds a value.
#[derive(Debug, PartialEq, Eq)]
struct NotKnown(&'static str);

impl Opaque for NotKnown {
    fn runtime_type_name(&self) -> &str {
        "chiller_metrics.explain.NotKnown"
    }
}

fn not_known(what: &'static str) -> Cel {
    Cel::Opaque(Arc::new(NotKnown(what)))
}

/// The variables of a pod CREATE, ready for any number of expressions.
pub struct Admission {
    env: Arc<Env>,
    object: Cel,
    request: Cel,
}

impl Admission {
    /// `pod` as the API server admits it (see [`admitted_pod`]), created in
    /// `namespace`.
    pub fn pod_create(pod: &Value, namespace: &str) -> Self {
        let mut env = Env::stdlib();
        // Kubernetes adds CEL's string extension to its environment.
        env.add_extension(cel::extensions::strings)
            .expect("the string extension declares nothing twice");
        let pods = |field: &str, value: &str| {
            json_to_cel(&serde_json::json!({"group": "", "version": "v1", field: value}))
        };
        let mut request: HashMap<&str, Cel> = HashMap::from([
            ("uid", Cel::from("")),
            ("kind", pods("kind", "Pod")),
            ("resource", pods("resource", "pods")),
            ("requestKind", pods("kind", "Pod")),
            ("requestResource", pods("resource", "pods")),
            ("namespace", Cel::from(namespace)),
            ("operation", Cel::from("CREATE")),
            ("userInfo", not_known("request.userInfo")),
            ("dryRun", Cel::Bool(false)),
            ("options", not_known("request.options")),
        ]);
        // A pod created from a workload has only a generateName yet.
        if let Some(name) = pod
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            request.insert("name", Cel::from(name));
        }
        Self {
            env: Arc::new(env),
            object: json_to_cel(pod),
            request: Cel::from(request),
        }
    }

    /// Evaluates one matchCondition expression.
    pub fn evaluate(&self, expression: &str) -> CelOutcome {
        let program = match self.env.compile(expression) {
            Ok(program) => program,
            Err(error) => {
                return CelOutcome::Unknown(format!("the cel crate does not parse it: {error}"));
            }
        };
        let mut context = Context::with_env(Arc::clone(&self.env));
        context.add_variable_from_value("object", self.object.clone());
        context.add_variable_from_value("oldObject", Cel::Null);
        context.add_variable_from_value("request", self.request.clone());
        context.add_variable_from_value("authorizer", not_known("authorizer"));
        let reads_unknown = ["authorizer", "userInfo", "options"]
            .iter()
            .any(|name| expression.contains(name));
        match program.execute(&context) {
            Ok(Cel::Bool(true)) => CelOutcome::True,
            Ok(Cel::Bool(false)) => CelOutcome::False,
            Ok(other) => CelOutcome::Unknown(format!("not a boolean: {other:?}")),
            Err(_) if reads_unknown => CelOutcome::Unknown(
                "it reads who creates the pod, the create options or the authorizer, which explain does not know"
                    .into(),
            ),
            Err(
                error @ (ExecutionError::NoSuchKey(_)
                | ExecutionError::IndexOutOfBounds(_)
                | ExecutionError::DivisionByZero(_)
                | ExecutionError::RemainderByZero(_)
                | ExecutionError::Overflow(..)),
            ) => CelOutcome::Error(error.to_string()),
            Err(error) => CelOutcome::Unknown(format!("the cel crate cannot evaluate it: {error}")),
        }
    }
}

/// JSON as CEL reads a Kubernetes object: integers are `int`.
fn json_to_cel(value: &Value) -> Cel {
    match value {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Cel::Int(i),
            None => n
                .as_u64()
                .map_or_else(|| Cel::Float(n.as_f64().unwrap_or(f64::NAN)), Cel::UInt),
        },
        Value::String(s) => Cel::from(s.as_str()),
        Value::Array(items) => Cel::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Value::Object(map) => Cel::from(
            map.iter()
                .map(|(k, v)| (k.clone(), json_to_cel(v)))
                .collect::<HashMap<String, Cel>>(),
        ),
    }
}

/// The pod as the API server hands it to a mutating webhook on CREATE:
/// `apiVersion` and `kind` set, the namespace filled in, and nothing of what
/// the API server sets only once the pod is stored (uid, creation time,
/// resource version, status).
pub fn admitted_pod(pod: &Value, namespace: &str) -> Value {
    let mut pod = pod.clone();
    if let Some(object) = pod.as_object_mut() {
        object.insert("apiVersion".into(), "v1".into());
        object.insert("kind".into(), "Pod".into());
        object.remove("status");
        let metadata = object
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(metadata) = metadata.as_object_mut() {
            for stored in [
                "uid",
                "creationTimestamp",
                "resourceVersion",
                "generation",
                "managedFields",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                metadata.remove(stored);
            }
            metadata.insert("namespace".into(), namespace.into());
        }
    }
    pod
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const CHART: &str = "!has(object.metadata.labels) || !('metrics.chiller.io/injected' in object.metadata.labels)";

    fn admission(metadata: Value) -> Admission {
        let pod = json!({"metadata": metadata, "spec": {"containers": [
            {"name": "app", "image": "app:1", "ports": [{"containerPort": 8000}]},
        ]}});
        Admission::pod_create(&admitted_pod(&pod, "shop"), "shop")
    }

    #[test]
    fn the_charts_condition() {
        assert_eq!(admission(json!({})).evaluate(CHART), CelOutcome::True);
        let other = admission(json!({"labels": {"app": "api"}}));
        assert_eq!(other.evaluate(CHART), CelOutcome::True);
        let injected = admission(json!({"labels": {"metrics.chiller.io/injected": "true"}}));
        assert_eq!(injected.evaluate(CHART), CelOutcome::False);
    }

    #[test]
    fn the_pod_its_spec_and_the_request_are_read() {
        let admission = admission(json!({"name": "api-0", "labels": {"app": "api"}}));
        for (expression, expected) in [
            ("object.metadata.labels['app'] == 'api'", true),
            ("object.metadata.labels[\"app\"] != 'api'", false),
            ("object.metadata.namespace == 'shop'", true),
            ("object.spec.containers.size() > 1", false),
            (
                "object.spec.containers[0].ports[0].containerPort == 8000",
                true,
            ),
            (
                "object.spec.containers.exists(c, c.image.startsWith('app:'))",
                true,
            ),
            ("!has(object.status) && !has(object.metadata.uid)", true),
            ("request.operation == 'CREATE' && !request.dryRun", true),
            (
                "request.kind.kind == 'Pod' && request.resource.group == ''",
                true,
            ),
            (
                "request.namespace == 'shop' && request.name == 'api-0'",
                true,
            ),
            ("oldObject == null", true),
            ("'API'.lowerAscii() == 'api'", true),
            ("true || request.userInfo.username == 'admin'", true),
        ] {
            let expected = if expected {
                CelOutcome::True
            } else {
                CelOutcome::False
            };
            assert_eq!(admission.evaluate(expression), expected, "{expression}");
        }
    }

    #[test]
    fn a_missing_key_is_the_api_servers_error_too() {
        let admission = admission(json!({}));
        assert!(matches!(
            admission.evaluate("'a' in object.metadata.labels"),
            CelOutcome::Error(_)
        ));
        // Unless the other side of || is true, on either side.
        assert_eq!(
            admission.evaluate("'a' in object.metadata.labels || true"),
            CelOutcome::True
        );
        assert_eq!(
            admission.evaluate("false && object.metadata.labels['a'] == 'b'"),
            CelOutcome::False
        );
        // A pod created from a workload has no name yet.
        assert!(matches!(
            admission.evaluate("request.name == 'x'"),
            CelOutcome::Error(_)
        ));
    }

    #[test]
    fn what_explain_does_not_know_is_unknown() {
        let admission = admission(json!({}));
        for expression in [
            "request.userInfo.username != 'system:admin'",
            "'system:masters' in request.userInfo.groups",
            "false || request.userInfo.username == 'x'",
            "authorizer.requestResource.check('create').allowed()",
            "request.options.fieldManager == 'kubectl'",
            "object.metadata.namespace.unknownFunction()",
            "object.spec.(",
        ] {
            assert!(
                matches!(admission.evaluate(expression), CelOutcome::Unknown(_)),
                "{expression}: {:?}",
                admission.evaluate(expression)
            );
        }
    }
}
