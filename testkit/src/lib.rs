//! # moat-testkit
//!
//! What the end-to-end tests (`tests/it`), `moat demo` (`src/demo.rs`) and
//! the PGO trainer (`tools/pgo_train.rs`) share to drive the real `moat`
//! binary: [`Moat`] runs it (one-shot commands, or a [`Process`] whose JSON
//! log is kept and optionally written to a file, waited on for a log line
//! such as the `listening` address of a port-0 listener, stopped with
//! SIGTERM, killed on drop); [`Ca`] is a CA directory made with
//! `moat ca init`, with its tokens, bundle, offline issuance and
//! `moat ca serve`; [`pki`] makes the certificates the CA would never issue
//! (another CA, odd SANs); [`http::serve`] runs an HTTP service on a
//! loopback port 0; [`netns`] makes network namespaces joined by a bridge
//! (root only) and runs commands and threads inside them.
//!
//! Not shipped (`publish = false`); its dependencies are all the `moat`
//! binary's own.

mod ca;
pub mod http;
pub mod netns;
pub mod pki;
mod process;

pub use ca::Ca;
pub use libc::{SIGCONT, SIGHUP, SIGKILL, SIGSTOP, SIGTERM};
pub use process::{Moat, Process};

/// Where every listener the harness starts binds: loopback, a port the
/// kernel picks. The real port is read back from the `listening` log line
/// ([`Process::listening`]) or the bound socket.
pub const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";
