//! The release binary, built as users build it, starts on the oldest glibc
//! we support: 2.34 (RHEL 9, Ubuntu 22.04). It needs no symbol version above
//! that, and not `GLIBC_ABI_DT_RELR` (packed relocations, glibc 2.36+), which
//! only the image build turns on (build.rs, `CHILLER_METRICS_PACK_RELOCS`).

use crate::support;

use std::process::Command;

/// The newest glibc the binary may ask for.
const OLDEST_GLIBC: (u32, u32) = (2, 34);
/// The glibc versions in the "Version needs" section of `readelf -V`.
fn needed_glibc_versions(readelf: &str) -> Vec<String> {
    let needs = readelf
        .split_once("Version needs section")
        .map_or("", |(_, rest)| rest);
    needs
        .split_whitespace()
        .filter(|word| word.starts_with("GLIBC_"))
        .map(str::to_string)
        .collect()
}

/// `GLIBC_2.36` → (2, 36); `None` for names that are not a version.
fn glibc_version(name: &str) -> Option<(u32, u32)> {
    let (major, minor) = name.strip_prefix("GLIBC_")?.split_once('.')?;
    let minor = minor.split('.').next()?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[test]
fn the_release_binary_needs_no_glibc_newer_than_2_34() {
    let readelf = support::tool("readelf");
    let binary = support::release_binary();
    let output = Command::new(&readelf)
        .arg("-V")
        .arg(&binary)
        .output()
        .expect("running readelf -V");
    assert!(
        output.status.success(),
        "readelf -V {} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let needed = needed_glibc_versions(&String::from_utf8_lossy(&output.stdout));
    assert!(
        needed.iter().any(|name| name.starts_with("GLIBC_2.")),
        "readelf -V listed no GLIBC_2.x version needed by {}: is it dynamically linked?",
        binary.display()
    );
    let too_new: Vec<&String> = needed
        .iter()
        .filter(|name| glibc_version(name).is_none_or(|version| version > OLDEST_GLIBC))
        .collect();
    assert!(
        too_new.is_empty(),
        "{} needs {too_new:?}, which glibc {}.{} does not have",
        binary.display(),
        OLDEST_GLIBC.0,
        OLDEST_GLIBC.1
    );
}
