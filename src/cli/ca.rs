//! `moat ca ...`: create, serve and operate the workload CA.

use std::path::PathBuf;

use super::args::{CaCommand, CaLocation, LogFormat, ServeArgs};
use super::{Failure, config_err, config_msg, init_logging, runtime, shutdown_signal};

/// The names always in the CA's serving certificate; `--san` adds to them.
const DEFAULT_SANS: [&str; 2] = ["localhost", "127.0.0.1"];

/// Every `moat ca` command but `serve`: one short conversation with the store.
pub(crate) fn run_ca(command: CaCommand) -> Result<(), Failure> {
    use moat_ca::store::CaDir;
    let runtime = runtime(Some(1))?;
    runtime.block_on(async move {
        match command {
            CaCommand::Serve(_) => unreachable!("moat ca serve has its own runtime (run_ca_serve)"),
            CaCommand::Init {
                at,
                trust_domain,
                root_ttl,
            } => {
                let td = moat_ca::TrustDomain::parse(&trust_domain)
                    .map_err(|e| config_msg(format!("--trust-domain {trust_domain:?}: {e}")))?;
                check_root_ttl(root_ttl)?;
                let (_, engine) = ca_config(&at)?;
                let ca = CaDir::init(&at.dir, &engine, td, root_ttl)
                    .await
                    .map_err(store_err)?;
                println!(
                    "initialized CA for trust domain {} in {} (state: {} {})",
                    ca.trust_domain(),
                    at.dir.display(),
                    ca.store().engine(),
                    ca.store().location()
                );
                print!("{}", next_steps(&at, ca.trust_domain()));
                Ok(())
            }
            CaCommand::Token { at, id, ttl } => {
                if ttl.value.is_zero() || ttl.value > moat_ca::token::MAX_JOIN_TTL {
                    return Err(config_msg(format!(
                        "--ttl: a join token's lifetime must be more than 0 and at most {}, not {}",
                        moat_ca::format_duration(moat_ca::token::MAX_JOIN_TTL),
                        ttl.text
                    )));
                }
                let ca = open_ca(&at).await?;
                let id = moat_ca::SpiffeId::parse(&id)
                    .map_err(|e| config_msg(format!("--id {id:?}: {e}")))?;
                // The CA would refuse the token's use (403 revoked): refuse
                // it now, as `moat ca issue` does, while the operator is here.
                if ca.revocation_for(None, &id).await.map_err(store_err)?.is_some() {
                    return Err(config_msg(format!(
                        "{id} is revoked; `moat ca unrevoke --id {id}` first"
                    )));
                }
                let token = ca.mint_join_token(&id, ttl.value).map_err(store_err)?;
                println!("{token}");
                Ok(())
            }
            CaCommand::Issue {
                at,
                id,
                ttl,
                cert_out,
                key_out,
                out,
                force,
            } => {
                // clap makes sure of one of --out or --cert-out with --key-out.
                let (cert_out, key_out) = match (out, cert_out, key_out) {
                    (Some(both), _, _) => (both.clone(), both),
                    (None, Some(cert), Some(key)) => (cert, key),
                    _ => return Err(config_msg("give --out, or --cert-out and --key-out")),
                };
                for path in [&cert_out, &key_out] {
                    // Said the same with or without --force, which cannot help.
                    if path.is_dir() {
                        return Err(config_msg(format!(
                            "{}: cannot create the file: it is a directory; nothing was issued",
                            path.display()
                        )));
                    }
                }
                if !force {
                    for path in [&cert_out, &key_out] {
                        if path.exists() {
                            return Err(config_msg(format!(
                                "{} exists; pass --force to replace it (each file is replaced atomically)",
                                path.display()
                            )));
                        }
                    }
                }
                let (config, path, engine) = ca_config_at(&at)?;
                let ttl = issue_ttl(ttl, &config.issuance, path.as_deref())?;
                let ca = moat_ca::store::CaDir::open(&at.dir, &engine)
                    .await
                    .map_err(store_err)?;
                let id = moat_ca::SpiffeId::parse(&id)
                    .map_err(|e| config_msg(format!("--id {id:?}: {e}")))?;
                let asked_until = std::time::SystemTime::now() + ttl;
                let (svid, key) = ca
                    .issue_to_files(&id, ttl, &cert_out, &key_out)
                    .await
                    .map_err(store_err)?;
                let files = if cert_out == key_out {
                    format!("{}, certificate and key", cert_out.display())
                } else {
                    format!("{} and {}", cert_out.display(), key_out.display())
                };
                println!(
                    "issued {} serial {} valid until {} ({files})",
                    svid.id,
                    svid.serial,
                    moat_ca::store::format_time(svid.not_after),
                );
                // Signing ends the certificate no later than its root
                // (a second's slack for the time the issuance took).
                if svid.not_after + std::time::Duration::from_secs(1) < asked_until {
                    println!(
                        "note: --ttl {} was cut to end with the signing root, which expires at {}; \
                         rotate the CA (moat ca rotate --prepare, then --activate)",
                        moat_ca::format_duration(ttl),
                        moat_ca::store::format_time(svid.not_after),
                    );
                }
                drop(key);
                Ok(())
            }
            CaCommand::Bundle { at } => {
                let ca = open_ca(&at).await?;
                print!("{}", ca.bundle().await.map_err(store_err)?.to_pem());
                Ok(())
            }
            CaCommand::Rotate {
                at,
                step,
                root_ttl,
                force,
            } => {
                if step.prepare {
                    check_root_ttl(root_ttl)?;
                }
                if force && !step.retire {
                    return Err(config_msg("--force applies to --retire only"));
                }
                let ca = open_ca(&at).await?;
                let msg = if step.prepare {
                    ca.rotate_prepare(root_ttl).await
                } else if step.activate {
                    ca.rotate_activate().await
                } else {
                    ca.rotate_retire(force).await
                }
                .map_err(store_err)?;
                println!("{msg}");
                Ok(())
            }
            CaCommand::Migrate { at, from_sqlite } => run_migrate(&at, from_sqlite).await,
            CaCommand::Revoke { at, args } => crate::revoke::revoke(&open_ca(&at).await?, args)
                .await
                .map_err(store_err),
            CaCommand::Unrevoke { at, args } => crate::revoke::unrevoke(&open_ca(&at).await?, args)
                .await
                .map_err(store_err),
        }
    })
}

/// `moat ca serve`: its own runtime and logging, with the trace exporter.
pub(crate) fn run_ca_serve(args: ServeArgs, log_format: LogFormat) -> Result<(), Failure> {
    let (config, engine) = ca_config(&args.at)?;
    let mut sans: Vec<String> = DEFAULT_SANS.iter().map(|s| (*s).to_owned()).collect();
    for san in args.sans {
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    let runtime = runtime(None)?;
    let _inside = runtime.enter();
    let traces = moat_proxy::telemetry::TelemetryConfig {
        service_name: Some(std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "moat-ca".into())),
        ..Default::default()
    }
    .resolve(|k| std::env::var(k).ok())
    .map_err(config_err)?;
    let tracing = traces
        .as_ref()
        .map(|t| moat_proxy::telemetry::Tracing::start(t, Default::default()))
        .transpose()
        .map_err(config_err)?;
    init_logging(log_format, None, tracing.as_ref());
    // One descriptor per client connection; the store's are in the margin.
    super::nofile::raise(
        config.limits.max_connections as u64,
        "the CA's [limits] max_connections",
    );
    runtime.block_on(async move {
        // One process serves a SQLite CA; held until this returns. Not
        // taken for a directory with no ca.db: `open` says what is missing.
        let _lock = match engine {
            moat_ca::store::config::Engine::Sqlite if args.at.dir.join("ca.db").exists() => Some(
                moat_ca::store::ServeLock::acquire(&args.at.dir, "serve this CA")
                    .map_err(store_err)?,
            ),
            _ => None,
        };
        let ca = moat_ca::store::CaDir::open(&args.at.dir, &engine)
            .await
            .map_err(store_err)?;
        tracing::info!(
            engine = ca.store().engine(),
            store = ca.store().location(),
            "state store opened"
        );
        warn_on_readable_keys(&args.at.dir);
        let roots = ca.roots().await.map_err(store_err)?;
        let active = roots
            .iter()
            .find(|r| r.state == moat_ca::store::RootState::Active);
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            trust_domain = %ca.trust_domain(),
            root = active.map(|r| r.id),
            root_expires = active.map(|r| moat_ca::store::format_unix(r.not_after)),
            sans = sans.join(","),
            "starting the CA"
        );
        let mut server = moat_ca::server::CaServer::bind(ca, config, args.listen, sans)
            .await
            .map_err(|e| listener_err("ca (--listen)", e))?;
        if args.admin != "off" {
            let addr: std::net::SocketAddr = args
                .admin
                .parse()
                .map_err(|e| config_msg(format!("--admin {:?}: {e}", args.admin)))?;
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "--admin listens beyond loopback: /metrics, /live and /ready are plain HTTP, \
                     without authentication, to anyone who can reach {addr}; give a loopback or \
                     private address, or firewall the port"
                );
            }
            server
                .bind_admin(addr)
                .await
                .map_err(|e| listener_err("admin (--admin; --admin off disables it)", e))?;
        }
        server.run(shutdown_signal()).await?;
        Ok(())
    })
}

/// Warns about each key file in the CA directory that its group or others
/// may read: a copy of a root key signs for every workload. A warning, not
/// a refusal, as a key managed by a Secret or configuration management may
/// be mode 0640 to a group on purpose.
fn warn_on_readable_keys(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut keys = vec![dir.join("token.key")];
    if let Ok(entries) = std::fs::read_dir(dir.join("roots")) {
        keys.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "key")),
        );
    }
    keys.sort();
    for key in keys {
        // Symlinks followed: a Kubernetes Secret's files are links.
        let Ok(meta) = std::fs::metadata(&key) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %key.display(),
                mode = format!("{mode:04o}"),
                "the key is readable by its group or others: `chmod 600 {}`",
                key.display()
            );
        }
    }
}

/// `moat ca migrate`: the schema alone, or a SQLite CA copied into PostgreSQL.
async fn run_migrate(at: &CaLocation, from_sqlite: Option<PathBuf>) -> Result<(), Failure> {
    use moat_ca::store::config::Engine;
    use moat_ca::store::{CaDir, SqliteStore, copy_sqlite_to_postgres};
    let (_, engine) = ca_config(at)?;
    let Some(source) = from_sqlite else {
        let store = CaDir::open_store(&at.dir, &engine)
            .await
            .map_err(store_err)?;
        let version = store.schema_version().await.map_err(store_err)?;
        println!(
            "{} {} is at schema version {version}",
            store.engine(),
            store.location()
        );
        return Ok(());
    };
    let Engine::Postgres(settings) = &engine else {
        return Err(config_msg(
            "--from-sqlite copies into PostgreSQL: set [store] url in the configuration (--config)",
        ));
    };
    let db = if source.is_dir() {
        source.join("ca.db")
    } else {
        source.clone()
    };
    if !db.is_file() {
        return Err(config_msg(format!(
            "--from-sqlite {}: no SQLite CA there (expected DIR/ca.db)",
            source.display()
        )));
    }
    let source_dir = db.parent().unwrap_or(std::path::Path::new("."));
    // Held until the copy is done: a CA still serving from the SQLite
    // database would go on spending join tokens the copy has already read.
    let _lock = moat_ca::store::ServeLock::acquire(
        source_dir,
        &format!("copy {} into PostgreSQL", db.display()),
    )
    .map_err(store_err)?;
    let roots = source_dir.join("roots");
    let src = SqliteStore::open(&db, &roots).map_err(store_err)?;
    let dst = moat_ca::store::PgStore::connect(settings)
        .await
        .map_err(store_err)?;
    let report = copy_sqlite_to_postgres(&src, &dst)
        .await
        .map_err(store_err)?;
    println!(
        "copied the CA for {} from {} into {}: {} roots, {} issuances, {} spent join tokens, {} revocations. \
         Serve it with this configuration; keep {} (its keys) as the CA directory of every replica.",
        report.trust_domain,
        db.display(),
        settings.display,
        report.roots,
        report.issued,
        report.used_tokens,
        report.revocations,
        at.dir.display()
    );
    Ok(())
}

/// `moat ca issue --ttl`: as asked, else `[issuance] default_ttl`; longer
/// than `[issuance] max_ttl` is refused naming the file. Without a ca.toml
/// the issuer's own limit (24h) says so.
fn issue_ttl(
    ttl: Option<super::args::TypedDuration>,
    issuance: &moat_ca::server::IssuanceConfig,
    config: Option<&std::path::Path>,
) -> Result<std::time::Duration, Failure> {
    let Some(ttl) = ttl else {
        return Ok(issuance.default_ttl);
    };
    if let Some(config) = config
        && ttl.value > issuance.max_ttl
    {
        return Err(config_msg(format!(
            "--ttl {}: longer than [issuance] max_ttl = \"{}\" in {}",
            ttl.text,
            moat_ca::format_duration(issuance.max_ttl),
            config.display()
        )));
    }
    Ok(ttl.value)
}

/// The CA's configuration (DIR/ca.toml unless --config says otherwise) and
/// the store engine it chooses.
fn ca_config(
    at: &CaLocation,
) -> Result<
    (
        moat_ca::server::ServerConfig,
        moat_ca::store::config::Engine,
    ),
    Failure,
> {
    let (config, _, engine) = ca_config_at(at)?;
    Ok((config, engine))
}

/// [`ca_config`], with the file it was read from (`None`: defaults).
fn ca_config_at(
    at: &CaLocation,
) -> Result<
    (
        moat_ca::server::ServerConfig,
        Option<PathBuf>,
        moat_ca::store::config::Engine,
    ),
    Failure,
> {
    let path = at.config.clone().or_else(|| {
        let default = at.dir.join("ca.toml");
        default.exists().then_some(default)
    });
    let config = match &path {
        Some(path) => moat_ca::server::ServerConfig::load(path).map_err(config_msg)?,
        None => moat_ca::server::ServerConfig::default(),
    };
    let engine = config.store.engine().map_err(|e| match &path {
        Some(p) => config_msg(format!("{}: {e}", p.display())),
        None => config_msg(e),
    })?;
    Ok((config, path, engine))
}

async fn open_ca(at: &CaLocation) -> Result<moat_ca::store::CaDir, Failure> {
    let (_, engine) = ca_config(at)?;
    moat_ca::store::CaDir::open(&at.dir, &engine)
        .await
        .map_err(store_err)
}

/// Operator mistakes (bad flags, a missing or existing CA directory, a refused
/// rotation step) are configuration errors; anything else is a failure.
/// `--root-ttl` at least [`moat_ca::issuer::MIN_ROOT_TTL`] (checked before
/// anything is written).
fn check_root_ttl(ttl: std::time::Duration) -> Result<(), Failure> {
    let min = moat_ca::issuer::MIN_ROOT_TTL;
    if ttl < min {
        return Err(config_msg(format!(
            "--root-ttl {} is not allowed: it must be at least {} (twice the longest certificate \
             lifetime, {}), so that the root outlives what it signs and a rotation fits in its life",
            moat_ca::format_duration(ttl),
            moat_ca::format_duration(min),
            moat_ca::format_duration(moat_ca::issuer::MAX_SVID_TTL),
        )));
    }
    Ok(())
}

fn store_err(e: moat_ca::store::StoreError) -> Failure {
    if e.is_operator_error() {
        Failure::Config(e.into())
    } else {
        Failure::Other(e.into())
    }
}

/// Bad configuration and privileged ports exit 64; a port in use exits 1.
fn server_err(e: moat_ca::server::ServerError) -> Failure {
    use moat_ca::server::ServerError;
    match e {
        ServerError::Config(_) => config_err(e),
        ServerError::Store(e) => store_err(e),
        ServerError::Bind { addr, ref source } => {
            let denied = super::privileged_port(addr, source);
            super::bind_failure(denied, e)
        }
        other => Failure::Other(other.into()),
    }
}

/// A listener that could not be bound, named as the proxy names its own
/// (`listener admin: cannot listen on ...`): the CA has two, and the admin
/// one's default port is easy to find taken by another CA on the host.
fn listener_err(listener: &str, e: moat_ca::server::ServerError) -> Failure {
    use moat_ca::server::ServerError;
    match e {
        ServerError::Bind { addr, ref source } => {
            let denied = super::privileged_port(addr, source);
            super::bind_failure(
                denied,
                anyhow::Error::new(e).context(format!("listener {listener}")),
            )
        }
        e => server_err(e),
    }
}

/// What `moat ca init` suggests next.
fn next_steps(at: &CaLocation, td: &moat_ca::TrustDomain) -> String {
    let dir = at.dir.display();
    let config = at
        .config
        .as_deref()
        .map(|c| format!(" --config {}", c.display()))
        .unwrap_or_default();
    format!(
        "\nNext steps:\n\
         \x20 moat ca serve --dir {dir}{config} --listen 0.0.0.0:8443 --san <name workloads use in ca_url>\n\
         \x20 moat ca bundle --dir {dir}{config} > bundle.pem        # every workload's trust bundle\n\
         \x20 moat ca token --dir {dir}{config} --id spiffe://{td}/vm/<name> > <name>.token   # a VM's join token\n\
         Keep {dir} private: it holds the root key.\n"
    )
}
