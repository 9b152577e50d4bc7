//! The log filter: the start-up filter, replaceable at runtime through the
//! admin listener, except that the audit trail ([`AUDIT_TARGETS`]) never
//! gets quieter than it started.

use std::sync::Arc;

/// Sets the log filter (an `EnvFilter` directive such as `debug` or
/// `moat_proxy=debug,info`); returns an error text for a bad directive.
pub type LogLevelHandle = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The levels a runtime log filter may name, alone or as `target=level`.
pub const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// The audit trail: the access log (`moat::access`), authorization
/// decisions and policy reloads (`moat::policy`), and changes made through
/// the admin listener (`moat::admin`). A filter set at runtime can make
/// these louder but never quieter than the filter the process started with.
pub const AUDIT_TARGETS: [&str; 3] = ["moat::access", "moat::policy", "moat::admin"];

/// Why a runtime log filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogFilterError {
    /// Nothing was given.
    #[error("no level given: use one of {}, alone or as target=level (e.g. moat_proxy=debug,info)", LOG_LEVELS.join(", "))]
    Empty,
    /// A level that is not one of [`LOG_LEVELS`].
    #[error("unknown level {0:?}: use one of {levels}, alone or as target=level (e.g. moat_proxy=debug,info)", levels = LOG_LEVELS.join(", "))]
    UnknownLevel(String),
    /// A target that is not a Rust module path.
    #[error("{0:?} is not a log target (letters, digits, _ and ::)")]
    BadTarget(String),
}

/// Checks a log filter given at runtime: comma-separated directives, each
/// a level from [`LOG_LEVELS`] or `target=level`. Narrower than what
/// `RUST_LOG` takes (no span or field directives), so that a word that is
/// not a level (`verbose`) is refused instead of being read as a target
/// name, which would switch every other line off.
pub fn check_log_filter(filter: &str) -> Result<(), LogFilterError> {
    let mut any = false;
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        any = true;
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        if let Some(target) = target {
            let ok = !target.is_empty()
                && target.split("::").all(|part| {
                    !part.is_empty()
                        && part
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                });
            if !ok {
                return Err(LogFilterError::BadTarget(target.to_owned()));
            }
        }
        if !LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(LogFilterError::UnknownLevel(level.to_owned()));
        }
    }
    if any {
        Ok(())
    } else {
        Err(LogFilterError::Empty)
    }
}

/// The log filter for the log output: `startup` (an `EnvFilter` directive
/// string: `RUST_LOG` or the configured `log_level`), which the returned
/// handle replaces at runtime, *or* `startup` restricted to the
/// [`AUDIT_TARGETS`]. Whatever is set at runtime, an audit line that the
/// start-up filter let through still gets through: `PUT /logging?level=off`
/// quiets everything else, never the access or decision log. The handle
/// takes only what [`check_log_filter`] accepts.
pub fn log_filter<S>(
    startup: &str,
) -> (
    impl tracing_subscriber::layer::Filter<S> + Send + Sync + 'static,
    LogLevelHandle,
)
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::filter::{EnvFilter, FilterExt, FilterFn, LevelFilter};
    use tracing_subscriber::reload;
    let parse = |s: &str| {
        EnvFilter::try_new(quiet_dependencies(s)).unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let (runtime, handle) = reload::Layer::new(parse(startup));
    // With a level hint: `filter_fn` alone gives none (FilterFn caches its
    // answer per callsite, so the hint was what was missing), and with it
    // every h2 `trace_span!` became a span in the registry and every h2
    // `trace!` ran the EnvFilter: HTTP/2 cost 219,700 instructions a
    // request instead of 73,800 (benches/load/callgrind.sh, in_h2).
    let audit_targets = FilterFn::new(|meta| is_audit_target(meta.target()))
        .with_max_level_hint(LevelFilter::TRACE);
    let audit = parse(startup).and(audit_targets);
    let set: LogLevelHandle = Arc::new(move |level: &str| {
        check_log_filter(level).map_err(|e| e.to_string())?;
        let next =
            EnvFilter::try_new(quiet_dependencies(level)).map_err(|e| format!("{level:?}: {e}"))?;
        handle.reload(next).map_err(|e| e.to_string())
    });
    (runtime.or(audit), set)
}

/// `filter` with `rustls=error` added unless it names `rustls` itself or
/// turns everything off. rustls logs at WARN per connection, without the
/// peer: `Illegal SNI extension: ignoring IP address presented as
/// hostname` for every client that sends an IP as SNI (legal clients do),
/// `Sending fatal alert ...` for every refused handshake, which moat logs
/// itself (`handshake failed`, with the peer and a reason).
fn quiet_dependencies(filter: &str) -> String {
    let directives = || filter.split(',').map(str::trim);
    let names_rustls = directives().any(|d| d.starts_with("rustls"));
    let all_off = directives().any(|d| d.eq_ignore_ascii_case("off"));
    if names_rustls || all_off {
        filter.to_owned()
    } else {
        format!("{filter},rustls=error")
    }
}

/// True for the targets of the audit trail (and their sub-targets).
pub fn is_audit_target(target: &str) -> bool {
    AUDIT_TARGETS.iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_per_connection_warnings_are_quiet_unless_asked_for() {
        assert_eq!(quiet_dependencies("info"), "info,rustls=error");
        assert_eq!(
            quiet_dependencies("moat_proxy=debug,warn"),
            "moat_proxy=debug,warn,rustls=error"
        );
        assert_eq!(quiet_dependencies("rustls=debug,info"), "rustls=debug,info");
        assert_eq!(quiet_dependencies("off"), "off");
        let filter = tracing_subscriber::filter::EnvFilter::try_new(quiet_dependencies("info"));
        assert!(filter.is_ok());
    }

    #[test]
    fn runtime_log_filters_name_known_levels_only() {
        for ok in [
            "debug",
            "WARN",
            "off",
            "moat_proxy=debug,info",
            " moat::access = trace , error ",
            "h2=off,hyper-util=warn,info",
        ] {
            assert_eq!(check_log_filter(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            check_log_filter("verbose"),
            Err(LogFilterError::UnknownLevel("verbose".into()))
        );
        assert_eq!(
            check_log_filter("moat_proxy=loud"),
            Err(LogFilterError::UnknownLevel("loud".into()))
        );
        assert_eq!(check_log_filter(" , "), Err(LogFilterError::Empty));
        assert!(matches!(
            check_log_filter("[span{x=1}]=debug"),
            Err(LogFilterError::BadTarget(_))
        ));
        let message = check_log_filter("verbose").unwrap_err().to_string();
        for level in LOG_LEVELS {
            assert!(message.contains(level), "{message}");
        }
    }

    #[test]
    fn audit_targets_include_their_sub_targets_only() {
        assert!(is_audit_target("moat::access"));
        assert!(is_audit_target("moat::policy::reload"));
        assert!(!is_audit_target("moat::accessory"));
        assert!(!is_audit_target("moat_proxy::inbound"));
    }

    /// Whatever the runtime filter says, an audit line the start-up filter
    /// passed still gets through; other lines follow the runtime filter.
    #[test]
    fn the_runtime_filter_cannot_quiet_the_audit_trail() {
        use tracing_subscriber::prelude::*;
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Lines::default();
        let writer = out.clone();
        let (filter, set) = log_filter("info");
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_filter(filter),
        );
        tracing::subscriber::with_default(subscriber, || {
            let emit = |n: u32| {
                tracing::info!(target: "moat::access", n, "audit_access");
                tracing::warn!(target: "moat::policy", n, "audit_decision");
                tracing::info!(target: "moat_proxy::inbound", n, "other_line");
                tracing::debug!(target: "moat::access", n, "debug_access");
            };
            emit(1);
            set("off").unwrap();
            emit(2);
            assert!(set("verbose").is_err());
            set("moat::access=debug,warn").unwrap();
            emit(3);
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let has = |msg: &str, n: u32| text.contains(&format!("{msg} n={n}"));
        for n in [1, 2, 3] {
            assert!(has("audit_access", n), "access line {n}:\n{text}");
            assert!(has("audit_decision", n), "decision line {n}:\n{text}");
        }
        assert!(has("other_line", 1), "{text}");
        assert!(!has("other_line", 2), "off quiets other targets:\n{text}");
        assert!(!has("other_line", 3), "{text}");
        assert!(!has("debug_access", 1) && !has("debug_access", 2), "{text}");
        assert!(has("debug_access", 3), "louder is allowed:\n{text}");
    }
}
