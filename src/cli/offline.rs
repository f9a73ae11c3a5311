//! The commands that need no cluster: `inject`, `certs`, `mapping`, `config`.

use std::io::Read;

use crate::{
    certs::{self, CertsError},
    cli::{CertsArgs, ConfigArgs, InjectArgs},
    config::ConfigError,
    inject::{Injector, ResolvedMode},
    manifest::{self, ManifestError},
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
    let mode = ResolvedMode::resolve(args.mode.unwrap_or(config.sidecar.mode), None);
    let injector = Injector::new(config, mode);
    let path = args.file.display().to_string();
    let input_error = |source| OfflineError::Input {
        path: path.clone(),
        source,
    };
    let input = if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(input_error)?;
        text
    } else {
        std::fs::read_to_string(&args.file).map_err(input_error)?
    };
    let injected = manifest::inject_yaml(&injector, &input)?;
    for result in &injected.results {
        match &result.skipped {
            None => notes(format!("injected {}", result.object)),
            Some(reason) => notes(format!("skipped {}: {reason}", result.object)),
        }
    }
    Ok(injected.yaml)
}

/// Writes the certificates and returns the caBundle.
pub fn certs(args: &CertsArgs) -> Result<String, OfflineError> {
    let generated = certs::generate(&args.dns)?;
    certs::write(&args.out, &generated)?;
    Ok(generated.ca_bundle())
}

pub fn mapping(args: &ConfigArgs) -> Result<String, OfflineError> {
    Ok(args.load()?.mapping)
}

pub fn config(args: &ConfigArgs) -> Result<String, OfflineError> {
    let config = args.load()?;
    Ok(serde_norway::to_string(&config).expect("config serializes"))
}
