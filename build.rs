//! How the `moat` binary's code is laid out when it is linked (issue 22).
//!
//! A sidecar's idle RSS is mostly its own binary's code pages, and those are
//! not the code it runs: the kernel maps code in 64 KiB blocks (page-cache
//! folios and fault-around), and the ~1.8 MiB of functions a sidecar runs to
//! start and serve its first requests is spread over ~190 such blocks of a
//! release build's text (12 MiB resident). Laid out next to each other, they
//! take ~3 MiB (benches/results/analysis.md, "Idle RSS is the code layout").
//!
//! - `scripts/moat.order` (made by `benches/load/orderfile.sh` from a plain
//!   `cargo build --release`): the functions a sidecar pair runs, first, for
//!   rust-lld's `--symbol-ordering-file`. The names carry a hash of their
//!   crate's build (toolchain, dependency versions and features), so they fit
//!   this lockfile and toolchain; names the linker does not find are skipped
//!   silently, and a stale file costs memory, never correctness.
//!   `MOAT_SYMBOL_ORDER=FILE` uses another file (`scripts/pgo-build.sh` gives
//!   the profile-guided build its own, from `scripts/moat-pgo.order` and this
//!   one); `MOAT_SYMBOL_ORDER=` (empty), none.
//! - `-z keep-text-section-prefix`: a profile-guided build puts functions
//!   training never ran in `.text.unlikely` and hot ones in `.text.hot`; kept
//!   as separate output sections, the code that never runs stays together.
//!
//! Only for x86_64-unknown-linux-gnu, where rustc links with rust-lld.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=MOAT_SYMBOL_ORDER");
    if std::env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu") {
        return;
    }
    println!("cargo:rustc-link-arg-bin=moat=-Wl,-z,keep-text-section-prefix");
    let order = match std::env::var_os("MOAT_SYMBOL_ORDER") {
        Some(file) if file.is_empty() => return,
        Some(file) => PathBuf::from(file),
        None => {
            let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
            dir.join("scripts/moat.order")
        }
    };
    println!("cargo:rerun-if-changed={}", order.display());
    if order.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=moat=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=moat=-Wl,--no-warn-symbol-ordering");
    }
}
