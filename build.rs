//! Hands the linker the functions `serve` runs (layout/hot-symbols.txt, made
//! by scripts/hot-symbols.sh), so they sit together in the binary and the
//! kernel maps fewer pages of code. Only for release builds on the target
//! whose default linker is rust-lld; `CHILLER_METRICS_PLAIN_LINK=1` leaves it
//! out (for a linker without it). `CHILLER_METRICS_PACK_RELOCS=1` (the image
//! build, whose glibc is 2.36) also packs the relative relocations, which
//! would make the binary need glibc 2.36: left out by default, so a plain
//! `cargo build --release` runs on glibc 2.34 (RHEL 9, Ubuntu 22.04).

const ORDER: &str = "layout/hot-symbols.txt";

fn main() {
    println!("cargo::rerun-if-changed={ORDER}");
    println!("cargo::rerun-if-env-changed=CHILLER_METRICS_PLAIN_LINK");
    println!("cargo::rerun-if-env-changed=CHILLER_METRICS_PACK_RELOCS");
    if std::env::var_os("CHILLER_METRICS_PLAIN_LINK").is_some_and(|v| v == "1") {
        return;
    }
    let target = std::env::var("TARGET").unwrap_or_default();
    let release = std::env::var("PROFILE").is_ok_and(|profile| profile == "release");
    if target != "x86_64-unknown-linux-gnu" || !release {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let order = std::path::Path::new(&dir).join(ORDER);
    if !order.is_file() {
        return;
    }
    let bin = "chiller-metrics";
    println!(
        "cargo::rustc-link-arg-bin={bin}=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // Symbols renamed since the list was made are skipped, not errors.
    println!("cargo::rustc-link-arg-bin={bin}=-Wl,--no-warn-symbol-ordering");
    // Relative relocations packed (DT_RELR, glibc 2.36+): the loader reads
    // a few KB instead of the 700 KB of .rela.dyn at every start.
    if std::env::var_os("CHILLER_METRICS_PACK_RELOCS").is_some_and(|v| v == "1") {
        println!("cargo::rustc-link-arg-bin={bin}=-Wl,-z,pack-relative-relocs");
    }
}
