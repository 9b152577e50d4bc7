//! Records the compiler version for `moat_build_info{rustc}`. The commit
//! label comes from `MOAT_GIT_COMMIT` in the build's environment, read by
//! `option_env!` (cargo rebuilds when it changes).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    if let Ok(out) = Command::new(rustc).arg("--version").output()
        && out.status.success()
        && let Ok(version) = String::from_utf8(out.stdout)
    {
        // `rustc 1.95.0 (abcdef 2026-01-01)` -> `1.95.0`
        if let Some(v) = version.split_whitespace().nth(1) {
            println!("cargo:rustc-env=MOAT_RUSTC_VERSION={v}");
        }
    }
}
