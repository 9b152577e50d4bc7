//! moat's end-to-end tests, in one test binary: a change to the code links
//! this crate once, not once per file. Each module is what used to be its
//! own `tests/NAME.rs`; `support` holds what they share (the `moat` binary
//! as a child process, a CA, sidecars, clients, the OTLP receiver).
//!
//! All modules run in one process, on cargo's test threads. A test must not
//! change process-wide state (environment variables, the working
//! directory, resource limits, signal dispositions): anything like that
//! goes to the `moat` child processes it starts (`Running::start_with_env`),
//! never to this process.
//!
//! Run one module with `cargo test --test it MODULE::`, one test by its
//! name as before (`cargo test --test it NAME`).

mod support;

mod app_probes;
mod ca;
mod ca_cli;
mod ca_postgres;
mod cli;
mod demo;
mod deploy;
mod doctor;
mod examples;
mod faults;
mod hostile_authz;
mod hostile_ca;
mod hostile_head;
mod hostile_http;
mod hostile_tls;
mod http_fidelity;
mod inject;
mod kubernetes_path;
mod netns;
mod observability_config;
mod pgo_train;
mod policy_cli;
mod policy_jwks;
mod policy_live;
mod policy_reload;
mod proxy_config_examples;
mod proxy_identity;
mod proxy_inbound;
mod proxy_lifecycle;
mod proxy_limits;
mod proxy_outbound;
mod proxy_policy;
mod proxy_state;
mod redirect;
mod revocation;
mod security_fixes;
mod systemd;
mod telemetry;
mod transparent;
mod vm_path;
mod websocket;
