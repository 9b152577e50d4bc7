//! `moat`: the mTLS sidecar proxy and workload certificate authority in one
//! binary. The command line is in `cli` (start at `cli::main`); `demo`,
//! `doctor` and `inject` are the commands that are not thin wrappers over a
//! library crate.

mod cli;
mod demo;
mod doctor;
mod inject;
mod revoke;

fn main() -> std::process::ExitCode {
    cli::main()
}
