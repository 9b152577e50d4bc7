//! `moat proxy`: load the configuration, start telemetry, run the sidecar.

use super::args::{LogFormat, ProxyArgs};
use super::{Failure, config_err, init_logging, runtime};

pub fn run_proxy(args: ProxyArgs, log_format: LogFormat) -> Result<(), Failure> {
    use moat_proxy::telemetry::{Observability, ProxyMetrics, Tracing};
    let config = moat_proxy::config::Config::load(&args.config).map_err(config_err)?;
    let traces = config
        .telemetry
        .resolve(|k| std::env::var(k).ok())
        .map_err(|e| config_err(format!("{}: {e}", args.config.display())))?;
    let runtime = runtime(config.runtime.worker_threads)?;
    // The gRPC exporter must be built inside the runtime.
    let _inside = runtime.enter();
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
    if let Some(t) = &traces {
        tracing::info!(endpoint = %t.endpoint, protocol = ?t.protocol, service = %t.service_name, sample_ratio = t.sample_ratio, "exporting traces");
    }
    let obs = Observability {
        metrics,
        tracing: tracing.is_some(),
        log_level: Some(log_level),
    };
    runtime.block_on(moat_proxy::run_with(config, obs))?;
    drop(tracing);
    Ok(())
}
