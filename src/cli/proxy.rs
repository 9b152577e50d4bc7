//! `moat proxy`: load the configuration, start telemetry, run the sidecar.

use super::args::{LogFormat, ProxyArgs};
use super::{Failure, config_err, config_msg, init_logging, runtime};

pub(crate) fn run_proxy(args: ProxyArgs, log_format: LogFormat) -> Result<(), Failure> {
    use moat_proxy::telemetry::{Observability, ProxyMetrics, Tracing};
    let config = moat_proxy::config::Config::load(&args.config).map_err(config_err)?;
    let traces = config
        .telemetry
        .resolve(|k| std::env::var(k).ok())
        .map_err(|e| config_msg(format!("{}: {e}", args.config.display())))?;
    let runtime = runtime(config.runtime.worker_threads)?;
    // The gRPC exporter must be built inside the runtime.
    let _inside = runtime.enter();
    super::memory::spawn_release_task();
    let metrics = ProxyMetrics::new();
    let tracing = traces
        .as_ref()
        .map(|t| Tracing::start(t, metrics.spans_dropped.clone()))
        .transpose()
        .map_err(config_err)?;
    let log_level = init_logging(
        log_format,
        config.telemetry.log_level.as_deref(),
        tracing.as_ref(),
    );
    super::nofile::raise(descriptors_needed(&config), "[limits] max_connections");
    if let Some(t) = &traces {
        tracing::info!(endpoint = %t.endpoint, protocol = ?t.protocol, service = %t.service_name, sample_ratio = t.sample_ratio, "exporting traces");
    }
    let obs = Observability {
        metrics,
        tracing: tracing.is_some(),
        log_level: Some(log_level),
    };
    runtime
        .block_on(moat_proxy::run_with(config, obs))
        .map_err(proxy_err)?;
    drop(tracing);
    Ok(())
}

/// Descriptors the listeners may hold at once: two per connection (the
/// caller's and the upstream's) up to `[limits] max_connections` on each
/// listener, the transparent ones included (inbound, outbound over IPv4 and
/// IPv6).
fn descriptors_needed(config: &moat_proxy::config::Config) -> u64 {
    let transparent = if config.redirect.is_some() { 3 } else { 0 };
    let listeners = config.inbound.len() + config.outbound.len() + transparent;
    (listeners as u64)
        .saturating_mul(config.limits.max_connections as u64)
        .saturating_mul(2)
}

/// Which of the proxy's start failures are the operator's to fix (exit 64:
/// files the configuration names that are missing, unreadable, do not fit
/// together or have expired; a `state_dir` it cannot write in; a policy; a
/// privileged port) and which may pass by themselves (exit 1: a port still
/// in use). The `token_file` is not among them: the identity task reads it
/// again at each attempt (an orchestrator may write it later), so a missing
/// one never reaches here.
fn proxy_err(e: moat_proxy::Error) -> Failure {
    use moat_ca::client::ClientError;
    use moat_proxy::Error;
    use moat_proxy::identity::IdentityError;
    match e {
        Error::Bind {
            addr, ref source, ..
        } => {
            let privileged = super::privileged_port(addr, source);
            super::bind_failure(privileged, e)
        }
        Error::Identity(
            IdentityError::Read { .. }
            | IdentityError::StateDir { .. }
            | IdentityError::Invalid { .. }
            | IdentityError::Credentials(_)
            | IdentityError::Client(ClientError::BadUrl(_) | ClientError::Bundle(_)),
        )
        | Error::Policy { .. }
        | Error::Upstream(..)
        | Error::Tls(_) => config_err(e),
        other => Failure::Other(other.into()),
    }
}
