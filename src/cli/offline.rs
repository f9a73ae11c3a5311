//! The commands that need no cluster: `inject`, `uninject`, `certs`,
//! `mapping`, `config`, `render`.

use std::io::Read;

use crate::{
    certs::{self, CertsError},
    cli::{CertsArgs, ConfigArgs, ConfigFileArgs, InjectArgs, RenderArgs, UninjectArgs},
    config::{Config, ConfigError, Overrides, is_dns_label},
    inject::{Injector, ResolvedMode},
    manifest::{self, ManifestError},
    reconcile::desired::{
        DesiredError, NamespaceSettings, PostgresTarget, desired_objects, render_yaml,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read {path}: {source}")]
    Input {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Certs(#[from] CertsError),
}

/// Injects into the manifests and returns the YAML; notes go to `notes`.
pub fn inject(args: &InjectArgs, notes: &mut dyn FnMut(String)) -> Result<String, OfflineError> {
    let config = args.config.load()?;
    // No cluster is asked: auto means native.
    let mode = ResolvedMode::resolve(config.sidecar.mode, None);
    let injector = Injector::new(config, mode);
    let input = read_input(&args.file)?;
    let injected = manifest::inject_yaml(&injector, &input)?;
    for result in &injected.results {
        match &result.skipped {
            None => notes(format!("injected {}", result.object)),
            Some(reason) => notes(format!("skipped {}: {reason}", result.object)),
        }
    }
    Ok(injected.yaml)
}

/// Removes what injection added and returns the YAML; notes go to `notes`.
pub fn uninject(
    args: &UninjectArgs,
    notes: &mut dyn FnMut(String),
) -> Result<String, OfflineError> {
    let config = Config::load(args.config.as_deref(), &Overrides::default())?;
    let input = read_input(&args.file)?;
    let uninjected = manifest::uninject_yaml(&config, &input)?;
    for result in &uninjected.results {
        if result.skipped.is_none() {
            notes(format!("uninjected {}", result.object));
        }
    }
    Ok(uninjected.yaml)
}

/// A file, or standard input for `-`.
pub fn read_input(file: &std::path::Path) -> Result<String, OfflineError> {
    let path = file.display().to_string();
    let input_error = |source| OfflineError::Input {
        path: path.clone(),
        source,
    };
    if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(input_error)?;
        Ok(text)
    } else {
        std::fs::read_to_string(file).map_err(input_error)
    }
}

/// Writes the certificates and returns the caBundle.
pub fn certs(args: &CertsArgs) -> Result<String, OfflineError> {
    let generated = certs::generate(&args.dns)?;
    certs::write(&args.out, &generated)?;
    Ok(generated.ca_bundle())
}

pub fn mapping(args: &ConfigFileArgs) -> Result<String, OfflineError> {
    Ok(args.load()?.mapping)
}

pub fn config(args: &ConfigArgs) -> Result<String, OfflineError> {
    if args.schema {
        let schema =
            serde_json::to_string_pretty(&Config::json_schema()).expect("a schema serializes");
        return Ok(schema + "\n");
    }
    let config = args.load()?;
    Ok(serde_norway::to_string(&config).expect("config serializes"))
}

/// `chiller-metrics render`: the objects the reconcile loop applies for a namespace.
pub fn render(args: &RenderArgs) -> Result<String, DesiredError> {
    let config = args.config.load()?;
    if !is_dns_label(&args.namespace) {
        return Err(DesiredError::Namespace(args.namespace.clone()));
    }
    let postgres = match (&args.postgres, &args.postgres_secret) {
        (Some(address), Some(secret)) => Some(PostgresTarget::parse(address, secret)?),
        _ => None,
    };
    let settings = NamespaceSettings {
        name: args.namespace.clone(),
        uid: None,
        postgres,
    };
    render_yaml(&desired_objects(&settings, &config))
}
