//! The release binary is linked with the code `serve` runs placed together
//! (build.rs hands the linker layout/hot-symbols.txt). The list names
//! functions by their mangled symbols, which another compiler, a dependency
//! update or a profile change renames, and the linker skips the names it
//! does not find without a word. These tests do not.

use crate::support;

use std::{collections::HashSet, process::Command};

const LIST: &str = "layout/hot-symbols.txt";
/// The header line naming the compiler the list was made with.
const MADE_WITH: &str = "# Made with ";
/// How many of the listed functions the binary must hold, in percent.
const LEAST_FOUND_PERCENT: usize = 90;

fn list() -> String {
    std::fs::read_to_string(support::crate_dir().join(LIST)).expect("reading the hot-code list")
}

/// The compiler the list was made with, e.g. `rustc 1.95.0 (59807616e 2026-04-14)`.
fn made_with(list: &str) -> &str {
    list.lines()
        .find_map(|line| line.strip_prefix(MADE_WITH))
        .unwrap_or_else(|| {
            panic!("{LIST} does not say which rustc made it (scripts/hot-symbols.sh)")
        })
}

fn this_rustc() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = Command::new(&rustc)
        .arg("--version")
        .current_dir(support::crate_dir())
        .output()
        .expect("running rustc --version");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn the_release_binary_holds_most_functions_of_the_hot_code_list() {
    let list = list();
    let made_with = made_with(&list);
    let rustc = this_rustc();
    if made_with != rustc {
        // Every symbol differs with another compiler: not a stale list.
        eprintln!("{LIST} was made with {made_with}, this is {rustc}: not compared");
        return;
    }
    let listed: Vec<&str> = list
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    assert!(
        listed.len() > 100,
        "{LIST} lists {} functions",
        listed.len()
    );
    let binary = support::release_binary();
    let output = Command::new(support::tool("nm"))
        .arg("--defined-only")
        .arg(&binary)
        .output()
        .expect("running nm");
    assert!(output.status.success(), "nm {} failed", binary.display());
    let symbols = String::from_utf8_lossy(&output.stdout);
    let defined: HashSet<&str> = symbols
        .lines()
        .filter_map(|line| line.split_whitespace().last())
        .collect();
    let found = listed.iter().filter(|name| defined.contains(*name)).count();
    assert!(
        found * 100 >= listed.len() * LEAST_FOUND_PERCENT,
        "{} holds {found} of the {} functions {LIST} orders: the list is stale \
         (a dependency, profile or code change renamed them); regenerate it with \
         `make hot-symbols`",
        binary.display(),
        listed.len()
    );
}

/// The image, which users run, is built with the compiler the list was made
/// with; with another, none of the list's names would match.
#[test]
fn the_image_is_built_with_the_rustc_the_hot_code_list_was_made_with() {
    let list = list();
    let version = made_with(&list)
        .split_whitespace()
        .nth(1)
        .expect("a version after `rustc`");
    let dockerfile = std::fs::read_to_string(support::crate_dir().join("Dockerfile")).unwrap();
    let build_image = dockerfile
        .lines()
        .find(|line| line.starts_with("FROM rust:"))
        .expect("the Dockerfile builds FROM rust:");
    assert!(
        build_image.starts_with(&format!("FROM rust:{version}-")),
        "the Dockerfile builds with `{build_image}`, the hot-code list was made with rustc {version}"
    );
}
