//! gunicorn's statsd settings, passed through `GUNICORN_CMD_ARGS`. This works
//! whatever the entrypoint is, shell form included, where args would not.

use super::Operation;
use serde_json::{Value, json};

use super::{ContainerView, pointer, view::Str};

pub const GUNICORN_CMD_ARGS: &str = "GUNICORN_CMD_ARGS";
const STATSD_HOST_FLAG: &str = "--statsd-host";

/// Why one container does not get the settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerSkip {
    #[error("{GUNICORN_CMD_ARGS} comes from valueFrom, so it cannot be extended")]
    ValueFrom,
    #[error("already sets {STATSD_HOST_FLAG} in {0}")]
    AlreadyConfigured(&'static str),
}

/// Indexes of the containers to configure: all app containers, or those the
/// annotation names (comma-separated). Unknown names are returned as the error.
pub fn target_containers(
    containers: &[ContainerView],
    annotation: Option<&str>,
) -> Result<Vec<usize>, Vec<String>> {
    let Some(names) = annotation else {
        return Ok((0..containers.len()).collect());
    };
    let wanted: Vec<&str> = names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|name| !containers.iter().any(|c| c.name == **name))
        .map(|name| name.to_string())
        .collect();
    if !missing.is_empty() || wanted.is_empty() {
        return Err(missing);
    }
    Ok((0..containers.len())
        .filter(|&i| wanted.contains(&containers[i].name.as_str()))
        .collect())
}

/// The operation that puts `flags` into container `index`'s `GUNICORN_CMD_ARGS`,
/// keeping any value it has, plus an optional note for the response's warnings.
pub fn env_patch(
    container: &ContainerView,
    index: usize,
    flags: &str,
) -> Result<(Operation, Option<String>), ContainerSkip> {
    let mentions_flag = |parts: &Option<Vec<Str>>| {
        parts
            .as_ref()
            .is_some_and(|p| p.iter().any(|a| a.contains(STATSD_HOST_FLAG)))
    };
    if mentions_flag(&container.command) {
        return Err(ContainerSkip::AlreadyConfigured("command"));
    }
    if mentions_flag(&container.args) {
        return Err(ContainerSkip::AlreadyConfigured("args"));
    }
    let index_s = index.to_string();
    let env = container.env.as_deref();
    // The kubelet uses the last definition of a duplicated name.
    let existing = env.and_then(|env| env.iter().rposition(|e| e.name == GUNICORN_CMD_ARGS));
    let note = container
        .env_from
        .as_ref()
        .filter(|sources| !sources.is_empty() && existing.is_none())
        .map(|_| {
            format!(
                "uses envFrom; a {GUNICORN_CMD_ARGS} set there is replaced by the statsd settings"
            )
        });
    let op = match (env, existing) {
        (Some(env), Some(at)) => {
            let var = &env[at];
            if var.value_from.is_some() {
                return Err(ContainerSkip::ValueFrom);
            }
            let current = var.value.as_deref().unwrap_or_default();
            if current.contains(STATSD_HOST_FLAG) {
                return Err(ContainerSkip::AlreadyConfigured(GUNICORN_CMD_ARGS));
            }
            let value = match current.trim_end() {
                "" => flags.to_string(),
                kept => format!("{kept} {flags}"),
            };
            let at_s = at.to_string();
            let path = pointer(&["spec", "containers", &index_s, "env", &at_s, "value"]);
            let value = Value::String(value);
            if var.value.is_some() {
                Operation::replace(path, value)
            } else {
                Operation::add(path, value)
            }
        }
        (Some(_), None) => Operation::add(
            pointer(&["spec", "containers", &index_s, "env", "-"]),
            json!({"name": GUNICORN_CMD_ARGS, "value": flags}),
        ),
        (None, _) => Operation::add(
            pointer(&["spec", "containers", &index_s, "env"]),
            json!([{"name": GUNICORN_CMD_ARGS, "value": flags}]),
        ),
    };
    Ok((op, note))
}
