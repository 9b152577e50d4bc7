//! `moat doctor --config proxy.toml`: checks a proxy configuration and
//! everything it points at, without serving traffic, and says how to fix
//! each problem it finds.
//!
//! What it checks, in order: the configuration parses; the identity
//! (certificate, key and bundle readable, fitting together, valid with time
//! left, the chain leading to the bundle; or, with a CA, the bundle, each CA
//! reachable under the name in `ca_url`, the token file present and not
//! expired); `allow_peers` and outbound peers in the proxy's own trust
//! domain; the listen ports are free; each forward target is reachable and
//! speaks the HTTP version `app_protocol` says; each outbound upstream
//! resolves; each route policy is valid and its JWKS reachable.
//!
//! A configuration that does not parse is an error (exit 64), as for `moat
//! proxy`; everything after that is a finding (exit 1) or fine (exit 0).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use moat_ca::TrustBundle;
use moat_ca::client::Svid;
use moat_proxy::config::{AppProtocol, Config, Identity, Protocol};
use serde_json::json;

/// How the checks came out.
pub(crate) enum Outcome {
    /// Nothing to fix (exit 0).
    Healthy,
    /// At least one warning or problem, printed (exit 1).
    Findings,
}

/// Why `moat doctor` could not check anything (exit 64).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DoctorError {
    /// The configuration file does not parse.
    #[error(transparent)]
    Config(#[from] moat_proxy::config::ConfigError),
    /// The runtime for the network checks could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// How a check came out.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    /// Fine.
    Ok,
    /// Not checked, or nothing to say either way.
    Info,
    /// Works now, but will not for long or not everywhere.
    Warning,
    /// Will not work.
    Problem,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Info => "info",
            Status::Warning => "warning",
            Status::Problem => "problem",
        }
    }
}

/// One check's result.
struct Finding {
    check: String,
    status: Status,
    message: String,
    fix: Option<String>,
}

/// The findings, in the order checked.
#[derive(Default)]
struct Report {
    findings: Vec<Finding>,
}

impl Report {
    fn ok(&mut self, check: impl Into<String>, message: impl Into<String>) {
        self.push(check, Status::Ok, message, None::<String>);
    }

    fn info(&mut self, check: impl Into<String>, message: impl Into<String>) {
        self.push(check, Status::Info, message, None::<String>);
    }

    fn warn(
        &mut self,
        check: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(check, Status::Warning, message, Some(fix));
    }

    fn problem(
        &mut self,
        check: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(check, Status::Problem, message, Some(fix));
    }

    fn push(
        &mut self,
        check: impl Into<String>,
        status: Status,
        message: impl Into<String>,
        fix: Option<impl Into<String>>,
    ) {
        self.findings.push(Finding {
            check: check.into(),
            status,
            message: message.into(),
            fix: fix.map(Into::into),
        });
    }

    fn healthy(&self) -> bool {
        self.findings.iter().all(|f| f.status <= Status::Info)
    }

    fn text(&self, config: &Path) -> String {
        let mut out = format!("moat doctor: {}\n", config.display());
        for f in &self.findings {
            let _ = writeln!(out, "{:<8} {}: {}", f.status.as_str(), f.check, f.message);
            if let Some(fix) = &f.fix {
                let _ = writeln!(out, "{:<8}   fix: {fix}", "");
            }
        }
        let count = |s: Status| self.findings.iter().filter(|f| f.status == s).count();
        let _ = match (count(Status::Problem), count(Status::Warning)) {
            (0, 0) => writeln!(out, "all well: {} checks passed", count(Status::Ok)),
            (p, w) => writeln!(out, "{p} problem(s), {w} warning(s)"),
        };
        out
    }

    fn json(&self, config: &Path) -> String {
        let items: Vec<_> = self
            .findings
            .iter()
            .map(|f| {
                json!({
                    "check": f.check,
                    "status": f.status.as_str(),
                    "message": f.message,
                    "fix": f.fix,
                })
            })
            .collect();
        let findings: Vec<_> = items
            .iter()
            .zip(&self.findings)
            .filter(|(_, f)| f.status > Status::Info)
            .map(|(j, _)| j.clone())
            .collect();
        let doc = json!({
            "config": config.display().to_string(),
            "healthy": self.healthy(),
            "checks": items,
            "findings": findings,
        });
        format!("{doc:#}\n")
    }
}

/// Runs every check on the configuration at `path` and prints the report
/// (text, or JSON with `json`) on standard output. Each network check is
/// given `timeout`.
pub(crate) fn run(path: &Path, json: bool, timeout: Duration) -> Result<Outcome, DoctorError> {
    // `Config::parse`, not `load`: a broken policy is a finding of its own
    // below, with the others, rather than the end of the checks.
    let text =
        std::fs::read_to_string(path).map_err(|source| moat_proxy::config::ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
    let config = Config::parse(path, &text)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DoctorError::Runtime)?;
    let report = runtime.block_on(check(&config, timeout));
    if json {
        print!("{}", report.json(path));
    } else {
        print!("{}", report.text(path));
    }
    Ok(if report.healthy() {
        Outcome::Healthy
    } else {
        Outcome::Findings
    })
}

async fn check(config: &Config, timeout: Duration) -> Report {
    let mut r = Report::default();
    r.ok(
        "config",
        format!(
            "parses: {} inbound and {} outbound listener(s)",
            config.inbound.len(),
            config.outbound.len()
        ),
    );
    for warning in config.warnings() {
        r.warn(
            "config",
            warning,
            "if this is intended, nothing; otherwise change the field named (config/proxy.toml explains each)",
        );
    }
    match &config.identity {
        Identity::Files(files) => check_files(&mut r, files),
        Identity::Ca(ca) => check_ca(&mut r, ca, timeout).await,
    }
    if let Some(td) = own_trust_domain(&config.identity) {
        check_peer_trust_domains(&mut r, config, &td);
    }
    check_ports(&mut r, config);
    for l in &config.inbound {
        check_forward(&mut r, l, timeout).await;
    }
    for l in &config.outbound {
        check_upstream(&mut r, l, timeout).await;
    }
    for l in &config.inbound {
        if let Some(policy) = &l.policy {
            check_policy(&mut r, &l.name, policy, timeout).await;
        }
    }
    r
}

/// `[identity]` with `cert`, `key` and `bundle`.
fn check_files(r: &mut Report, files: &moat_proxy::config::FileIdentity) {
    use moat_proxy::tls::{CredentialError, Credentials};
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let issue = "issue a new one: moat ca issue --dir <CA directory> --id <SPIFFE ID> --cert-out <cert> --key-out <key> --force";
    let Some(svid) = read_file(r, "identity.cert", &files.cert, "the certificate", |b| {
        Svid::from_pem(b).map_err(|e| e.to_string())
    }) else {
        return;
    };
    let key = read_file(r, "identity.key", &files.key, "the private key", |b| {
        PrivateKeyDer::from_pem_slice(b).map_err(|e| e.to_string())
    });
    let bundle = read_bundle(r, &files.bundle);
    let (Some(key), Some(bundle)) = (key, bundle) else {
        return;
    };
    check_validity(r, &svid, issue);
    match Credentials::new(svid.clone(), key, bundle) {
        Ok(_) => r.ok(
            "identity",
            format!(
                "{} and {} fit together; the chain leads to the bundle",
                files.cert.display(),
                files.key.display()
            ),
        ),
        Err(CredentialError::Key(e)) => r.problem(
            "identity",
            format!(
                "the key in {} does not fit the certificate in {}: {e}",
                files.key.display(),
                files.cert.display()
            ),
            format!("install the key issued with this certificate, or {issue}"),
        ),
        Err(CredentialError::Chain(e)) if svid.not_after > SystemTime::now() => r.problem(
            "identity.chain",
            format!("{}: {e}", files.cert.display()),
            format!(
                "install the bundle of the CA that issued the certificate (moat ca bundle --dir <CA directory> > {}), or a certificate from the CA of this bundle",
                files.bundle.display()
            ),
        ),
        // Expired: already said by check_validity.
        Err(CredentialError::Chain(_)) => {}
        Err(e) => r.problem(
            "identity.bundle",
            format!("{}: {e}", files.bundle.display()),
            "write the CA's bundle there: moat ca bundle --dir <CA directory>",
        ),
    }
}

/// Reads and parses one identity file; a finding if it cannot.
fn read_file<T>(
    r: &mut Report,
    check: &str,
    path: &Path,
    what: &str,
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Option<T> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            r.problem(
                check,
                format!("{}: cannot read {what}: {e}", path.display()),
                format!(
                    "write {what} there, readable by the user moat runs as (the systemd unit's User=moat)"
                ),
            );
            return None;
        }
    };
    match parse(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            r.problem(
                check,
                format!("{}: not {what} (PEM): {e}", path.display()),
                format!("write {what} there as PEM"),
            );
            None
        }
    }
}

fn read_bundle(r: &mut Report, path: &Path) -> Option<TrustBundle> {
    let bundle = read_file(r, "identity.bundle", path, "the trust bundle", |b| {
        TrustBundle::from_pem(b).map_err(|e| e.to_string())
    })?;
    match bundle.root_store() {
        Ok(_) => {
            r.ok(
                "identity.bundle",
                format!("{}: {} root(s)", path.display(), bundle.roots().len()),
            );
            Some(bundle)
        }
        Err(e) => {
            r.problem(
                "identity.bundle",
                format!("{}: {e}", path.display()),
                "write the CA's bundle there: moat ca bundle --dir <CA directory>",
            );
            None
        }
    }
}

/// Valid now, and with more than a quarter of its lifetime left (renewal
/// is due at half).
fn check_validity(r: &mut Report, svid: &Svid, fix: &str) {
    let now = SystemTime::now();
    let until = moat_ca::store::format_time(svid.not_after);
    if svid.not_before > now {
        r.problem(
            "identity.validity",
            format!(
                "{} (serial {}) is not valid before {}",
                svid.id,
                svid.serial,
                moat_ca::store::format_time(svid.not_before)
            ),
            "check this host's clock (timedatectl), or the CA's",
        );
        return;
    }
    let Ok(left) = svid.not_after.duration_since(now) else {
        r.problem(
            "identity.validity",
            format!("{} (serial {}) expired at {until}", svid.id, svid.serial),
            fix,
        );
        return;
    };
    let lifetime = svid.lifetime();
    let message = format!(
        "{} (serial {}) valid until {until} ({} left of {})",
        svid.id,
        svid.serial,
        human(left),
        human(lifetime)
    );
    if left < lifetime / 4 {
        r.warn(
            "identity.validity",
            message,
            format!("it should have been renewed at half its lifetime: {fix}"),
        );
    } else {
        r.ok("identity.validity", message);
    }
}

/// `[identity]` with `ca_url`: the bundle, each CA, the token.
async fn check_ca(r: &mut Report, ca: &moat_proxy::config::CaIdentity, timeout: Duration) {
    let Some(bundle) = read_bundle(r, &ca.bundle) else {
        return;
    };
    for url in &ca.ca_urls {
        check_ca_url(r, url, &bundle, timeout).await;
    }
    check_token(r, ca);
}

async fn check_ca_url(r: &mut Report, url: &str, bundle: &TrustBundle, timeout: Duration) {
    use moat_ca::client::{CaClient, ClientError};
    let check = format!("ca {url}");
    let client = match CaClient::new(url, bundle.clone()) {
        Ok(c) => c.with_timeout(timeout),
        Err(e) => {
            r.problem(check, e.to_string(), "write ca_url as https://host:port");
            return;
        }
    };
    match client.fetch_bundle().await {
        Ok(theirs) => {
            let same = theirs.roots() == bundle.roots();
            r.ok(
                check.clone(),
                "reachable; its certificate verifies against the bundle and names this host",
            );
            if !same {
                r.info(
                    check,
                    format!(
                        "its bundle ({} root(s)) differs from the local one; the proxy fetches and uses the CA's after its first certificate (a rotation in progress?)",
                        theirs.roots().len()
                    ),
                );
            }
        }
        Err(ClientError::Tls(e)) if e.to_string().contains("not valid for name") => r.problem(
            check,
            format!("the CA's serving certificate does not name this URL's host: {e}"),
            "add the host of ca_url to the CA's names: moat ca serve ... --san <host> (edit --san in moat-ca.service), or use a name it has",
        ),
        Err(ClientError::Tls(e)) => r.problem(
            check,
            format!("TLS with the CA failed: {e}"),
            "the CA's certificate must come from the bundle's root: install its current bundle (moat ca bundle)",
        ),
        Err(e @ (ClientError::Connect { .. } | ClientError::Timeout(_))) => {
            // A name that does not resolve is not a CA that is down: say
            // which, since the fixes differ.
            let unresolved = match &e {
                ClientError::Connect { addr, .. } => {
                    tokio::net::lookup_host(addr.as_str()).await.is_err()
                }
                _ => false,
            };
            let fix = if unresolved {
                "ca_url's host does not resolve on this machine: fix the name in ca_url, or the resolver (/etc/hosts, /etc/resolv.conf)"
            } else {
                "start the CA (systemctl status moat-ca), or check ca_url's host and port and the firewall between here and there"
            };
            r.problem(check, e.to_string(), fix);
        }
        Err(e) => r.problem(
            check,
            e.to_string(),
            "is ca_url a moat CA? `curl --cacert <bundle> <ca_url>/v1/bundle` should print PEM",
        ),
    }
}

/// The token file: present, readable, and for a join token not expired.
/// Whether a join token was already spent only the CA knows; a state
/// directory holding a valid certificate says the token is not needed.
fn check_token(r: &mut Report, ca: &moat_proxy::config::CaIdentity) {
    let path = &ca.token_file;
    let stored = ca
        .state_dir
        .as_ref()
        .and_then(|d| std::fs::read(d.join("identity.pem")).ok())
        .and_then(|pem| Svid::from_pem(&pem).ok())
        .filter(|svid| svid.not_after > SystemTime::now());
    if let Some(svid) = &stored {
        r.ok(
            "identity.state_dir",
            format!(
                "holds a valid certificate for {} until {}: a restart needs no token",
                svid.id,
                moat_ca::store::format_time(svid.not_after)
            ),
        );
    }
    let token = match std::fs::read_to_string(path) {
        Ok(t) => t.trim().to_owned(),
        Err(e) if stored.is_some() => {
            r.info(
                "identity.token",
                format!(
                    "{}: {e} (not needed while the stored certificate is valid)",
                    path.display()
                ),
            );
            return;
        }
        // systemd's LoadCredential=: the file exists only inside the
        // running service; which file it copies only the unit says.
        Err(_) if is_systemd_credential(path) => {
            r.info(
                "identity.token",
                format!(
                    "{}: only the service can read it (LoadCredential= in the unit); not checked",
                    path.display()
                ),
            );
            return;
        }
        Err(e) => {
            r.problem(
                "identity.token",
                format!("{}: cannot read the token: {e}", path.display()),
                "mint one on the CA host (moat ca token --dir <CA directory> --id <SPIFFE ID>) and write it there",
            );
            return;
        }
    };
    let Some(claims) = jwt_claims(&token) else {
        r.problem(
            "identity.token",
            format!("{}: not a JWT", path.display()),
            "write the output of moat ca token (or a Kubernetes service-account token) there",
        );
        return;
    };
    let now = moat_ca::token::unix_now();
    let exp = claims.get("exp").and_then(serde_json::Value::as_u64);
    let join = claims.get("iss").and_then(|v| v.as_str()) == Some(moat_ca::token::JOIN_ISSUER);
    let sub = claims.get("sub").and_then(|v| v.as_str()).unwrap_or("?");
    match exp {
        Some(exp) if exp <= now => {
            let fix = if join {
                format!("mint a new one: moat ca token --dir <CA directory> --id {sub}")
            } else {
                "the kubelet refreshes a projected token; check the volume".to_owned()
            };
            if stored.is_some() {
                r.info(
                    "identity.token",
                    format!("{}: expired (not needed while the stored certificate is valid)", path.display()),
                );
            } else {
                r.problem(
                    "identity.token",
                    format!("{}: the token for {sub} expired {} ago", path.display(), human(Duration::from_secs(now - exp))),
                    fix,
                );
            }
        }
        _ if join && stored.is_none() => r.ok(
            "identity.token",
            format!(
                "{}: a join token for {sub}{}; single use: the CA refuses it once spent, which only the CA can tell",
                path.display(),
                exp.map(|e| format!(", valid for {}", human(Duration::from_secs(e - now))))
                    .unwrap_or_default()
            ),
        ),
        _ if join => r.info(
            "identity.token",
            format!("{}: a join token for {sub}, probably spent already (the stored certificate was issued with it or renewed since)", path.display()),
        ),
        _ => r.ok(
            "identity.token",
            format!("{}: a token for {sub} (reusable, not a join token)", path.display()),
        ),
    }
}

/// True for a path under `.../run/credentials/`, where systemd puts a
/// unit's `LoadCredential=` files for the running service alone.
fn is_systemd_credential(path: &Path) -> bool {
    let parts: Vec<_> = path
        .components()
        .map(std::path::Component::as_os_str)
        .collect();
    parts
        .windows(2)
        .any(|w| w[0] == "run" && w[1] == "credentials")
}

/// A JWT's claims, unverified (the CA verifies it).
fn jwt_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

/// The trust domain this proxy's certificate will be in, where the files
/// tell: the certificate (files, or a state directory), else the join
/// token's subject. A Kubernetes token names no trust domain.
fn own_trust_domain(identity: &Identity) -> Option<String> {
    let svid_td = |path: &Path| {
        let svid = Svid::from_pem(&std::fs::read(path).ok()?).ok()?;
        Some(svid.id.trust_domain_name().to_owned())
    };
    match identity {
        Identity::Files(files) => svid_td(&files.cert),
        Identity::Ca(ca) => ca
            .state_dir
            .as_ref()
            .and_then(|d| svid_td(&d.join("identity.pem")))
            .or_else(|| {
                let token = std::fs::read_to_string(&ca.token_file).ok()?;
                let sub = jwt_claims(token.trim())?.get("sub")?.as_str()?.to_owned();
                let id = moat_ca::SpiffeId::parse(&sub).ok()?;
                Some(id.trust_domain_name().to_owned())
            }),
    }
}

/// Peers are verified against this proxy's bundle, in its own trust domain:
/// an `allow_peers` entry, an outbound `peer` or a `[[destination]] peer`
/// in another one can never match (a typo such as `exmaple.org` refuses
/// everyone it names).
fn check_peer_trust_domains(r: &mut Report, config: &Config, own: &str) {
    let fix = format!(
        "peers are verified against this proxy's bundle and must be in its trust domain, {own}: fix the entry's trust domain"
    );
    for l in &config.inbound {
        for pattern in l.allow_peers.iter().flatten() {
            let td = pattern.trust_domain_name();
            if td != own {
                r.warn(
                    format!("inbound {} allow_peers", l.name),
                    format!("{pattern} is in trust domain {td}, not {own}: no peer can match it"),
                    fix.clone(),
                );
            }
        }
    }
    let refused = |peer: &dyn std::fmt::Display, td: &str| {
        format!("{peer} is in trust domain {td}, not {own}: every connection will be refused")
    };
    for l in &config.outbound {
        let td = l.peer.trust_domain_name();
        if td != own {
            r.warn(
                format!("outbound {} peer", l.name),
                refused(&l.peer, td),
                fix.clone(),
            );
        }
    }
    for (i, d) in config.destination.iter().enumerate() {
        let td = d.peer.trust_domain_name();
        if td != own {
            r.warn(
                format!("destination {} peer", d.label(i)),
                refused(&d.peer, td),
                fix.clone(),
            );
        }
    }
}

/// Every address the proxy will listen on can be bound now.
fn check_ports(r: &mut Report, config: &Config) {
    let mut listeners: Vec<(String, SocketAddr)> = vec![("admin".to_owned(), config.admin.listen)];
    listeners.extend(
        config
            .inbound
            .iter()
            .map(|l| (format!("inbound {}", l.name), l.listen)),
    );
    listeners.extend(
        config
            .outbound
            .iter()
            .map(|l| (format!("outbound {}", l.name), l.listen)),
    );
    if let Some(redirect) = &config.redirect {
        // The addresses the proxy binds (transparent::TransparentInbound
        // and TransparentOutbound::bind): IPv6 where the host has it.
        let ipv6 = std::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)).is_ok();
        let any = if ipv6 {
            std::net::IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)
        };
        if redirect.inbound_ports != moat_proxy::redirect::InboundPorts::Listed(Vec::new()) {
            listeners.push((
                "transparent inbound".to_owned(),
                SocketAddr::new(any, redirect.inbound_listener_port),
            ));
        }
        if redirect.outbound {
            let port = redirect.outbound_listener_port;
            listeners.push((
                "transparent outbound".to_owned(),
                SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)),
            ));
            if ipv6 {
                listeners.push((
                    "transparent outbound (IPv6)".to_owned(),
                    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                ));
            }
        }
    }
    for (name, addr) in listeners {
        let check = format!("listen {name}");
        if addr.port() == 0 {
            r.ok(check, format!("{addr}: a free port is picked at start"));
            continue;
        }
        match std::net::TcpListener::bind(addr) {
            Ok(_) => r.ok(check, format!("{addr} is free")),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => r.problem(
                check,
                format!("{addr} is in use"),
                format!(
                    "stop what holds it (ss -ltnp 'sport = :{}' shows it; a moat already running?) or pick another port",
                    addr.port()
                ),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && addr.port() < 1024 => r
                .problem(
                    check,
                    format!("{addr}: {e}"),
                    "ports below 1024 need CAP_NET_BIND_SERVICE: add AmbientCapabilities=CAP_NET_BIND_SERVICE and CapabilityBoundingSet=CAP_NET_BIND_SERVICE to the unit, or use a port above 1023",
                ),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => r.problem(
                check,
                format!("{addr}: {e}"),
                "that address is not on this host: use one of its addresses, 0.0.0.0 or 127.0.0.1",
            ),
            Err(e) => r.problem(check, format!("{addr}: {e}"), "pick another address"),
        }
    }
}

/// The local service: reachable, and speaking what `app_protocol` says.
async fn check_forward(r: &mut Report, l: &moat_proxy::config::Inbound, timeout: Duration) {
    let check = format!("inbound {} forward", l.name);
    let addr = l.forward;
    let connected = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await;
    match connected {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            r.warn(
                check,
                format!("{addr}: {e}"),
                "start the service (requests get 502 until it listens there), or fix forward",
            );
            return;
        }
        Err(_) => {
            r.warn(
                check,
                format!("{addr}: no answer within {}", human(timeout)),
                "start the service, or fix forward (a firewall dropping packets?)",
            );
            return;
        }
    }
    if l.protocol == Protocol::Tcp {
        r.ok(check, format!("{addr} accepts connections (protocol tcp)"));
        return;
    }
    let h2 = moat_proxy::app::probe_h2c(addr, timeout).await == Some(true);
    let h1 = speaks_http1(addr, timeout).await;
    let speaks = match (h1, h2) {
        (true, true) => "HTTP/1.1 and h2c",
        (true, false) => "HTTP/1.1",
        (false, true) => "h2c (HTTP/2 prior knowledge) only",
        (false, false) => "neither HTTP/1.1 nor h2c",
    };
    let configured = l.app_protocol();
    let message = format!(
        "{addr} speaks {speaks}; app_protocol = \"{}\"",
        configured.as_str()
    );
    match configured {
        AppProtocol::Http1 if !h1 && h2 => r.problem(
            check,
            message,
            "set app_protocol = \"http2\" (or \"grpc\") on this [[inbound]]: the service answers only HTTP/2",
        ),
        AppProtocol::Http2 | AppProtocol::Grpc if !h2 && h1 => r.problem(
            check,
            message,
            "set app_protocol = \"http1\" on this [[inbound]]: the service does not speak h2c",
        ),
        _ if !h1 && !h2 => r.warn(
            check,
            message,
            "is this an HTTP service? for other protocols set protocol = \"tcp\"",
        ),
        _ => r.ok(check, message),
    }
}

/// True if the service answers an HTTP/1.1 request with an HTTP/1.x status line.
async fn speaks_http1(addr: SocketAddr, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!(
            "OPTIONS * HTTP/1.1\r\nhost: {addr}\r\nuser-agent: moat-doctor\r\nconnection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 8];
        s.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1."))
    };
    matches!(tokio::time::timeout(timeout, ask).await, Ok(Some(true)))
}

/// An outbound's upstream resolves (its sidecar is checked by the TLS of
/// each connection, which needs this workload's identity).
async fn check_upstream(r: &mut Report, l: &moat_proxy::config::Outbound, timeout: Duration) {
    let check = format!("outbound {} upstream", l.name);
    let target = format!("{}:{}", l.upstream.host, l.upstream.port);
    match tokio::time::timeout(timeout, tokio::net::lookup_host(target.clone())).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<_> = addrs.map(|a| a.ip().to_string()).collect();
            r.ok(check, format!("{target} resolves to {}", addrs.join(", ")));
        }
        Ok(Err(e)) => r.warn(
            check,
            format!("{target} does not resolve: {e}"),
            "fix upstream, or the resolver (/etc/hosts, /etc/resolv.conf): requests get 502 until it resolves",
        ),
        Err(_) => r.warn(
            check,
            format!("{target}: no DNS answer within {}", human(timeout)),
            "check the resolver (/etc/resolv.conf)",
        ),
    }
}

/// A policy file: valid, and each issuer's keys readable or fetchable.
async fn check_policy(r: &mut Report, listener: &str, path: &Path, timeout: Duration) {
    use moat_proxy::policy::{JwksCache, Policy};
    let check = format!("inbound {listener} policy");
    let cache = JwksCache::new();
    let policy = match Policy::load_with(path, &cache) {
        Ok(p) => p,
        Err(e) => {
            r.problem(
                check,
                e.to_string(),
                format!(
                    "fix the lines named; moat policy check {} lists every problem",
                    path.display()
                ),
            );
            return;
        }
    };
    r.ok(
        check.clone(),
        format!(
            "{}: {} route(s), hash {}",
            path.display(),
            policy.route_count(),
            policy.hash()
        ),
    );
    for (issuer, keys) in policy.issuer_keys() {
        let origin = keys.source().origin();
        let check = format!("inbound {listener} policy issuer {issuer}");
        match tokio::time::timeout(timeout, keys.refresh_now()).await {
            Ok(Ok(n)) if n > 0 => r.ok(check, format!("{origin}: {n} key(s)")),
            Ok(Ok(_)) => r.problem(
                check,
                format!("{origin}: no usable key"),
                "the JWKS must hold the issuer's signing keys (RS256 or ES256)",
            ),
            Ok(Err(e)) => r.problem(
                check,
                format!("{origin}: {e}"),
                "requests on this issuer's routes are denied until its keys are read: fix jwks_url / jwks_file (or jwks_ca)",
            ),
            Err(_) => r.problem(
                check,
                format!("{origin}: no answer within {}", human(timeout)),
                "check that the JWKS URL is reachable from this host",
            ),
        }
    }
}

/// `1h 5m`, `42s`: enough to read at a glance.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}
