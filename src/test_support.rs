//! Helpers shared by the unit tests.

use std::collections::BTreeMap;

/// A label (or annotation) map from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
