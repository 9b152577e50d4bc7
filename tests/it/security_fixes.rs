//! Fixes for what outside testing found (issue 15), each checked the way it
//! was found: the real `moat` binary, real sockets, `openssl s_client` with
//! saved sessions, a process out of file descriptors.
//!
//! - The CA resumes no TLS session, and `/v1/renew` refuses a lapsed
//!   certificate whatever the TLS layer did.
//! - The admin listener takes changes only from loopback; unknown log levels
//!   are refused; the audit trail cannot be switched off at runtime.
//! - Accept loops back off when out of file descriptors; admin listeners
//!   hold a bounded number of connections.
//! - Independent CAs of one trust domain have distinct root names, so a
//!   foreign CA's certificate is `unknown_ca` in the alert and the metric.
//! - An inbound listener accepts only once it holds a certificate.
//! - JWKS fetches never resume a TLS session.

use crate::support;
use crate::support::hostile as hostile_support;
use crate::support::proxy as proxy_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use hostile_support::{ClientAuth, client_auth, metric, scrape};
use proxy_support::*;
use support::{Running, TestCa, echo_service, moat_ok, path_str, tool};

const SERVER_ID: &str = "spiffe://example.org/ns/prod/sa/api";
const CLIENT_ID: &str = "spiffe://example.org/ns/prod/sa/web";

// ---------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------

/// A CA directory made with `moat ca init` and used offline (`moat ca
/// issue`, `moat ca bundle`): no server.
struct OfflineCa {
    dir: PathBuf,
}

impl OfflineCa {
    fn init(dir: &Path) -> Self {
        support::ca_init(dir);
        Self {
            dir: dir.to_owned(),
        }
    }

    fn issue(&self, id: &str, ttl: &str, out: &Path, name: &str) -> CertFiles {
        let cert = out.join(format!("{name}.crt"));
        let key = out.join(format!("{name}.key"));
        moat_ok(&[
            "ca",
            "issue",
            "--dir",
            path_str(&self.dir),
            "--id",
            id,
            "--ttl",
            ttl,
            "--cert-out",
            path_str(&cert),
            "--key-out",
            path_str(&key),
        ]);
        CertFiles { cert, key }
    }

    fn bundle_pem(&self) -> String {
        moat_ok(&["ca", "bundle", "--dir", path_str(&self.dir)])
    }
}

/// A file-mode sidecar: inbound `api` in front of the echo service, admin
/// at `admin`; `fd_limit` caps its open file descriptors.
struct FileSidecar {
    proxy: Running,
    inbound: SocketAddr,
    admin: SocketAddr,
    client: CertFiles,
}

fn file_sidecar(dir: &Path, ca: &OfflineCa, admin: &str, fd_limit: Option<u64>) -> FileSidecar {
    let server = ca.issue(SERVER_ID, "1h", dir, "server");
    let client = ca.issue(CLIENT_ID, "1h", dir, "client");
    let bundle = write(dir, "bundle.pem", &ca.bundle_pem());
    let config = format!(
        "{identity}[admin]\nlisten = \"{admin}\"\n\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{echo}\"\n",
        identity = file_identity(&server, &bundle),
        echo = echo_service(),
    );
    let path = write(dir, "proxy.toml", &config);
    let args = ["proxy", "--config", path_str(&path)];
    let mut proxy = match fd_limit {
        Some(n) => Running::start_with_fd_limit(&args, n),
        None => Running::start(&args),
    };
    let inbound = proxy.listening_addr("api");
    let admin = proxy.listening_addr("admin");
    FileSidecar {
        proxy,
        inbound,
        admin,
        client,
    }
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the parenthesised command name: state is the first,
    // utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat format")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second.max(1))
}

/// Open file descriptors of the process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(std::iter::Iterator::count)
        .unwrap_or(0)
}

/// Asserts that the process uses well under one core over ~2 s. A busy
/// accept loop uses most of one (or more: the CA spun on two listeners at
/// once, 1.1 s of CPU in 2 s on a loaded two-core machine); a backing-off
/// one about 1 %. The bound is loose so that a busy machine cannot fail it.
fn assert_not_spinning(pid: u32, what: &str) {
    let (cpu0, t0) = (cpu_time(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let (used, elapsed) = (cpu_time(pid) - cpu0, t0.elapsed());
    assert!(
        used.as_secs_f64() < 0.30 * elapsed.as_secs_f64(),
        "{what}: used {used:?} of CPU in {elapsed:?} while out of file descriptors (a spinning accept loop)"
    );
}

/// Opens up to `n` TCP connections to `addr` (stops early when the kernel
/// refuses more).
fn connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map_while(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
        .collect()
}

/// Waits until `f` holds, or panics with `what` after `timeout`.
fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A non-loopback IPv4 address of this host, from `ip`.
fn non_loopback_ipv4() -> Option<std::net::Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// The `valid until` of a PEM certificate file.
fn not_after(cert: &Path) -> SystemTime {
    let pem = std::fs::read(cert).unwrap();
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64)
}

use rustls_pki_types::pem::PemObject;

/// `openssl s_client` to `addr` sending `request`; waits for the server to
/// close. Returns stdout and stderr together.
fn s_client(addr: SocketAddr, args: &[&str], request: &[u8]) -> String {
    let target = addr.to_string();
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &target, "-ign_eof"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run openssl");
    child.stdin.take().unwrap().write_all(request).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------
// 1. The CA renews no lapsed certificate, resumed session or not
// ---------------------------------------------------------------------

/// A CA, a short-lived certificate from it (`ttl`), a CSR for its key, and
/// the HTTP request that renews with it.
struct Renewal {
    ca: TestCa,
    cert: CertFiles,
    bundle: PathBuf,
    request: Vec<u8>,
}

fn short_lived(ttl: &str) -> Renewal {
    let ca = TestCa::start();
    let (cert, key) = ca.issue_files(CLIENT_ID, ttl, "short");
    let cert = CertFiles { cert, key };
    let csr_path = ca.dir.path().join("renew.csr");
    let out = tool(
        "openssl",
        &[
            "req",
            "-new",
            "-key",
            path_str(&cert.key),
            "-subj",
            "/CN=ignored",
            "-out",
            path_str(&csr_path),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let csr = std::fs::read(&csr_path).unwrap();
    let mut request = format!(
        "POST /v1/renew HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/pkcs10\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        csr.len()
    )
    .into_bytes();
    request.extend_from_slice(&csr);
    let bundle = ca.bundle_file();
    Renewal {
        ca,
        cert,
        bundle,
        request,
    }
}

impl Renewal {
    fn tls_args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "-tls1_3",
            "-servername",
            "localhost",
            "-CAfile",
            path_str(&self.bundle),
            "-cert",
            path_str(&self.cert.cert),
            "-key",
            path_str(&self.cert.key),
        ];
        args.extend_from_slice(extra);
        args
    }

    /// Waits until the certificate has expired (by a second or more).
    fn wait_for_expiry(&self) {
        let expiry = not_after(&self.cert.cert) + Duration::from_secs(1);
        while SystemTime::now() < expiry {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn renewals_refused(&mut self, reason: &str) -> f64 {
        let admin = self.ca.admin_addr();
        metric(
            &scrape(admin),
            "moat_ca_issuances_total",
            &[("credential", "renewal"), ("result", reason)],
        )
    }
}

/// The issue's reproduction: one full handshake with a short-lived
/// certificate saving the session (`-sess_out`), the certificate expires,
/// then `POST /v1/renew` offering the saved session (`-sess_in`). The CA
/// sends no session ticket, so there is nothing to resume; and were a
/// session resumed, `/v1/renew` would still refuse the lapsed certificate
/// (`renewal_checks_the_presented_certificate_itself` in ca/src/server.rs).
#[test]
fn ca_sends_no_session_ticket_and_a_saved_session_cannot_renew_an_expired_certificate() {
    if !support::require("openssl") {
        return;
    }
    let mut r = short_lived("6s");
    let sess = r.ca.dir.path().join("sess.pem");
    let first = s_client(
        r.ca.addr,
        &r.tls_args(&["-sess_out", path_str(&sess)]),
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nconnection: close\r\n\r\n",
    );
    assert!(
        first.contains("HTTP/1.1 200"),
        "the first handshake, with the certificate still valid, is served:\n{first}"
    );
    assert!(
        !first.contains("New Session Ticket"),
        "the CA sends no TLS 1.3 session ticket:\n{first}"
    );
    r.wait_for_expiry();
    let mut extra = Vec::new();
    if sess.exists() {
        extra.extend(["-sess_in", path_str(&sess)]);
    }
    let second = s_client(r.ca.addr, &r.tls_args(&extra), &r.request);
    assert!(
        !second.contains("Reused, TLSv1.3"),
        "no session is resumed:\n{second}"
    );
    assert!(
        !second.contains("HTTP/1.1 200"),
        "an expired certificate renews nothing:\n{second}"
    );
    assert_eq!(r.renewals_refused("ok"), 0.0);
}

/// Without any saved session: the expired certificate is refused in the
/// handshake (alert certificate_expired) and nothing is issued.
#[test]
fn ca_refuses_renewal_with_an_expired_certificate_over_a_fresh_handshake() {
    if !support::require("openssl") {
        return;
    }
    let mut r = short_lived("3s");
    r.wait_for_expiry();
    let out = s_client(r.ca.addr, &r.tls_args(&[]), &r.request);
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains("certificate expired") || out.contains("alert number 45"),
        "refused in the handshake as expired:\n{out}"
    );
    assert_eq!(r.renewals_refused("ok"), 0.0);
    r.ca.server.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "TLS handshake failed"
    });
}

// ---------------------------------------------------------------------
// 2. The admin listener: changes from loopback only, known levels only,
//    and the audit trail stays on
// ---------------------------------------------------------------------

/// With the admin listener on every address (as in Kubernetes), reads
/// answer anyone, but `PUT /logging` from a non-loopback address is 403,
/// counted and logged, and changes nothing; from loopback it works.
#[test]
fn admin_changes_are_taken_only_from_loopback() {
    let Some(ip) = non_loopback_ipv4() else {
        let msg = "SKIPPED: this host has no non-loopback IPv4 address (`ip -4 addr show scope global`); admin exposure not checked";
        assert!(
            std::env::var("MOAT_TEST_REQUIRE_ALL").as_deref() != Ok("1"),
            "{msg}"
        );
        eprintln!("{msg}");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = OfflineCa::init(&dir.path().join("ca"));
    let mut s = file_sidecar(dir.path(), &ca, "0.0.0.0:0", None);
    let remote = SocketAddr::new(ip.into(), s.admin.port());
    let local = SocketAddr::new([127, 0, 0, 1].into(), s.admin.port());

    let (status, body) = curl_http(remote, "/logging?level=off", &["-X", "PUT"]);
    assert_eq!(status, 403, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON refusal");
    assert_eq!(body["reason"], "not_loopback", "{body}");
    let line = s.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["reason"] == "not_loopback" && v["target"] == "moat::admin"
    });
    assert_eq!(
        line["peer_addr"].as_str().unwrap().split(':').next(),
        Some(ip.to_string().as_str())
    );
    assert_eq!(
        metric(
            &scrape(local),
            "moat_admin_refusals_total",
            &[("reason", "not_loopback")]
        ),
        1.0
    );
    // Nothing changed: info lines still come.
    let before = s.proxy.logs().len();
    assert_eq!(
        curl(s.inbound, "/after-refusal", Some(&s.client), &["--http1.1"]).0,
        200
    );
    s.proxy
        .wait_for_log(Duration::from_secs(10), |v| v["path"] == "/after-refusal");
    assert!(s.proxy.logs().len() > before);

    // Reads answer off-host (probes, scrapes).
    assert_eq!(curl_http(remote, "/live", &[]).0, 200);
    assert_eq!(curl_http(remote, "/ready", &[]).0, 200);
    assert_eq!(curl_http(remote, "/metrics", &[]).0, 200);
    // From loopback the change is taken.
    let (status, body) = curl_http(local, "/logging?level=debug", &["-X", "PUT"]);
    assert_eq!(status, 200, "{body}");
    s.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "log level changed" && v["target"] == "moat::admin"
    });
}

/// `level=verbose` (no such level) is a 400 naming the valid levels, and
/// the filter stays as it was; `level=off` is taken, and still every
/// request gets its access-log line.
#[test]
fn unknown_log_levels_are_refused_and_the_access_log_cannot_be_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let ca = OfflineCa::init(&dir.path().join("ca"));
    let mut s = file_sidecar(dir.path(), &ca, "127.0.0.1:0", None);

    let (status, body) = curl_http(s.admin, "/logging?level=verbose", &["-X", "PUT"]);
    assert_eq!(status, 400, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    let error = body["error"].as_str().unwrap();
    for level in ["trace", "debug", "info", "warn", "error", "off"] {
        assert!(error.contains(level), "{error}");
        assert!(
            body["valid_levels"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l == level)
        );
    }
    assert_eq!(
        curl(s.inbound, "/one", Some(&s.client), &["--http1.1"]).0,
        200
    );
    s.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "access" && v["path"] == "/one"
    });

    let (status, body) = curl_http(s.admin, "/logging?level=off", &["-X", "PUT"]);
    assert_eq!(status, 200, "{body}");
    s.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "log level changed" && v["level"] == "WARN"
    });
    let quiet_from = s.proxy.json_logs().len();
    // A handshake failure would be logged at info by moat_proxy: not now.
    let _ = curl(s.inbound, "/no-cert", None, &["--http1.1"]);
    assert_eq!(
        curl(s.inbound, "/two", Some(&s.client), &["--http1.1"]).0,
        200
    );
    s.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "access" && v["path"] == "/two" && v["target"] == "moat::access"
    });
    let others: Vec<serde_json::Value> = s.proxy.json_logs()[quiet_from..]
        .iter()
        .filter(|v| !v["target"].as_str().unwrap_or("").starts_with("moat::"))
        .cloned()
        .collect();
    assert!(
        others.is_empty(),
        "only the audit trail at level off: {others:?}"
    );
}

// ---------------------------------------------------------------------
// 4. Accept loops out of file descriptors; admin connection limits
// ---------------------------------------------------------------------

/// `moat ca serve` allowed 64 file descriptors: connections are opened
/// until its `accept()` fails with EMFILE. It must not spin while that
/// lasts, and serves again once the connections close.
#[test]
fn ca_out_of_file_descriptors_does_not_spin_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    support::ca_init(&ca_dir);
    // Accepted connections would otherwise be cut at the handshake timeout
    // (10 s) and free their descriptors while the test measures.
    std::fs::write(
        ca_dir.join("ca.toml"),
        "[limits]\nhandshake_timeout = \"120s\"\n",
    )
    .unwrap();
    const LIMIT: u64 = 64;
    let mut server = Running::start_with_fd_limit(
        &[
            "ca",
            "serve",
            "--dir",
            path_str(&ca_dir),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        LIMIT,
    );
    let api = server.listening_addr("ca");
    let admin = server.listening_addr("admin");
    let pid = server.child.id();
    let held = connections(api, 2 * LIMIT as usize);
    let held_admin = connections(admin, 8);
    wait_until(
        Duration::from_secs(30),
        "the CA to run out of file descriptors",
        || fd_count(pid) as u64 >= LIMIT - 1,
    );
    assert_not_spinning(pid, "moat ca serve");
    drop(held);
    drop(held_admin);
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        moat_ok(&["ca", "bundle", "--dir", path_str(&ca_dir)]),
    )
    .unwrap();
    wait_until(Duration::from_secs(30), "the CA to serve again", || {
        let out = tool(
            "curl",
            &[
                "-sS",
                "--max-time",
                "5",
                "--cacert",
                path_str(&bundle),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("https://localhost:{}/healthz", api.port()),
            ],
        );
        String::from_utf8_lossy(&out.stdout) == "200"
    });
    assert_eq!(curl_http(admin, "/live", &[]).0, 200);
    server.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "accept failed; backing off until it works again"
    });
}

/// The same for `moat proxy`: out of descriptors on its inbound and admin
/// listeners, it does not spin, and afterwards probes and peers are served.
#[test]
fn proxy_out_of_file_descriptors_does_not_spin_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = OfflineCa::init(&dir.path().join("ca"));
    const LIMIT: u64 = 64;
    let mut s = file_sidecar(dir.path(), &ca, "127.0.0.1:0", Some(LIMIT));
    let pid = s.proxy.child.id();
    let held = connections(s.inbound, 2 * LIMIT as usize);
    let held_admin = connections(s.admin, 16);
    wait_until(
        Duration::from_secs(30),
        "the proxy to run out of file descriptors",
        || fd_count(pid) as u64 >= LIMIT - 1,
    );
    assert_not_spinning(pid, "moat proxy");
    drop(held);
    drop(held_admin);
    wait_until(
        Duration::from_secs(30),
        "the admin listener to answer again",
        || curl_http(s.admin, "/ready", &["--max-time", "3"]).0 == 200,
    );
    wait_until(
        Duration::from_secs(30),
        "the inbound listener to serve again",
        || {
            curl(
                s.inbound,
                "/again",
                Some(&s.client),
                &["--http1.1", "--max-time", "3"],
            )
            .0 == 200
        },
    );
    s.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "accept failed; backing off until it works again"
    });
}

/// An admin listener (the CA's and the proxy's) holds at most 64
/// connections at once: more wait in the backlog, and the process's open
/// descriptors stay bounded however many connect.
#[test]
fn admin_listeners_hold_a_bounded_number_of_connections() {
    const ADMIN_MAX: usize = 64;
    let mut ca = TestCa::start();
    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(&dir.path().join("ca"));
    let s = file_sidecar(dir.path(), &offline, "127.0.0.1:0", None);
    let ca_admin = ca.admin_addr();
    for (pid, admin, what) in [
        (ca.server.child.id(), ca_admin, "CA admin"),
        (s.proxy.child.id(), s.admin, "proxy admin"),
    ] {
        let baseline = fd_count(pid);
        let held = connections(admin, 3 * ADMIN_MAX);
        assert_eq!(held.len(), 3 * ADMIN_MAX, "the backlog takes them all");
        wait_until(
            Duration::from_secs(30),
            "the admin listener to fill up",
            || fd_count(pid) >= baseline + ADMIN_MAX,
        );
        // Give a listener without a limit time to take the rest.
        std::thread::sleep(Duration::from_millis(500));
        let open = fd_count(pid);
        assert!(
            open <= baseline + ADMIN_MAX + 8,
            "{what}: {open} descriptors open with {} connections (baseline {baseline}, limit {ADMIN_MAX})",
            held.len()
        );
        drop(held);
        wait_until(
            Duration::from_secs(30),
            "the admin listener to answer again",
            || curl_http(admin, "/live", &["--max-time", "3"]).0 == 200,
        );
    }
}

// ---------------------------------------------------------------------
// 5. A certificate from an independent CA of the same trust domain
// ---------------------------------------------------------------------

/// Two `moat ca init` for example.org have distinct root names (with a key
/// identifier in each), and a workload certificate of the second, shown to
/// a sidecar that trusts the first, is refused with alert unknown_ca and
/// counted as `reason="unknown_ca"`: the alert and the metric agree.
#[test]
fn a_certificate_from_an_independent_ca_of_the_same_trust_domain_is_unknown_ca() {
    if !support::require("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ours = OfflineCa::init(&dir.path().join("ca"));
    let theirs = OfflineCa::init(&dir.path().join("ca2"));
    let subject = |pem: &str| {
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.subject().to_string()
    };
    let (a, b) = (subject(&ours.bundle_pem()), subject(&theirs.bundle_pem()));
    assert_ne!(a, b, "two CAs of one trust domain have distinct root names");
    assert!(a.starts_with("O=moat, CN=moat root example.org #1 "), "{a}");

    let s = file_sidecar(dir.path(), &ours, "127.0.0.1:0", None);
    let foreign = theirs.issue(CLIENT_ID, "1h", dir.path(), "foreign");
    let out = s_client(
        s.inbound,
        &[
            "-tls1_3",
            "-cert",
            path_str(&foreign.cert),
            "-key",
            path_str(&foreign.key),
        ],
        b"GET / HTTP/1.1\r\nHost: api\r\n\r\n",
    );
    assert!(out.contains("alert unknown ca"), "alert unknown_ca:\n{out}");
    assert!(!out.contains("decrypt error"), "{out}");
    let text = scrape(s.admin);
    assert_eq!(
        metric(
            &text,
            "moat_tls_handshake_failures_total",
            &[("listener", "api"), ("reason", "unknown_ca")]
        ),
        1.0,
        "{text}"
    );
    // Our own client is served as ever.
    assert_eq!(curl(s.inbound, "/", Some(&s.client), &["--http1.1"]).0, 200);
}

// ---------------------------------------------------------------------
// 6. No accepting before the first certificate
// ---------------------------------------------------------------------

/// A TLS 1.3 client handshake plus one GET over an already connected
/// socket, waiting up to `within` for each read. Returns the first line.
fn get_over(tcp: TcpStream, auth: ClientAuth, within: Duration) -> std::io::Result<String> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let signer = provider.key_provider.load_private_key(auth.1).unwrap();
    let certified = Arc::new(rustls::sign::CertifiedKey::new(auth.0, signer));
    #[derive(Debug)]
    struct Fixed(Arc<rustls::sign::CertifiedKey>);
    impl rustls::client::ResolvesClientCert for Fixed {
        fn resolve(
            &self,
            _: &[&[u8]],
            _: &[rustls::SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            moat_proxy::tls::verify::AnyServerCertificate::new(provider),
        ))
        .with_client_cert_resolver(Arc::new(Fixed(certified)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn = rustls::ClientConnection::new(
        Arc::new(config),
        rustls_pki_types::ServerName::try_from("api").unwrap(),
    )
    .map_err(std::io::Error::other)?;
    tcp.set_read_timeout(Some(within))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /first HTTP/1.1\r\nHost: api\r\nconnection: close\r\n\r\n")?;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if text.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    Ok(text.lines().next().unwrap_or("").to_owned())
}

/// A sidecar whose CA is not up yet binds its inbound port but does not
/// accept: a client that connects meanwhile waits in the backlog, nothing
/// is counted as a handshake failure, and once the CA comes up and the
/// certificate is issued the same connection is served.
#[test]
fn inbound_waits_for_its_first_certificate_instead_of_failing_peers() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = OfflineCa::init(&ca_dir);
    let ca_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let bundle = write(dir.path(), "bundle.pem", &ca.bundle_pem());
    let token = moat_ok(&["ca", "token", "--dir", path_str(&ca_dir), "--id", SERVER_ID]);
    let token = write(dir.path(), "token", token.trim());
    let client = ca.issue(CLIENT_ID, "1h", dir.path(), "client");
    let config = format!(
        "[identity]\nca_url = \"https://127.0.0.1:{ca_port}\"\nbundle = {:?}\ntoken_file = {:?}\nretry_base = \"100ms\"\nretry_max = \"300ms\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\n",
        path_str(&bundle),
        path_str(&token),
        echo_service(),
    );
    let (proxy, addrs) = start_proxy(&write(dir.path(), "proxy.toml", &config), &["api", "admin"]);
    let (inbound, admin) = (addrs[0], addrs[1]);

    // Connected (the kernel's backlog took it) while no certificate is held.
    let tcp = TcpStream::connect(inbound).unwrap();
    let auth = client_auth(&client);
    let waiting = std::thread::spawn(move || get_over(tcp, auth, Duration::from_secs(60)));
    wait_until(
        Duration::from_secs(30),
        "a failed attempt to reach the CA",
        || count_logs(&proxy, "cannot get a certificate from the CA yet") >= 2,
    );
    let (status, _) = curl_http(admin, "/ready", &[]);
    assert_eq!(status, 503, "not ready without a certificate");
    let before = scrape(admin);
    assert_eq!(
        metric(&before, "moat_tls_handshake_failures_total", &[]),
        0.0,
        "nothing is counted against the peer: {before}"
    );

    let mut ca_server = Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(&ca_dir),
        "--listen",
        &format!("127.0.0.1:{ca_port}"),
        "--admin",
        "off",
    ]);
    ca_server.listening_addr("ca");
    let first = waiting
        .join()
        .unwrap()
        .expect("the waiting connection is served once the certificate is held");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let after = scrape(admin);
    assert_eq!(
        metric(&after, "moat_tls_handshake_failures_total", &[]),
        0.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "moat_tls_handshakes_total", &[("listener", "api")]),
        1.0,
        "{after}"
    );
}

// ---------------------------------------------------------------------
// Same class: JWKS fetches never resume a TLS session
// ---------------------------------------------------------------------

/// A JWKS server that offers session tickets (rustls' defaults) and
/// records, for each connection, whether the client resumed.
async fn jwks_server(
    body: String,
) -> (
    SocketAddr,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<bool>>>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                .unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let resumed = Arc::new(Mutex::new(Vec::new()));
    let seen = resumed.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, seen, body) = (acceptor.clone(), seen.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let kind = tls.get_ref().1.handshake_kind();
                seen.lock()
                    .unwrap()
                    .push(kind == Some(rustls::HandshakeKind::Resumed));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                    body.len(),
                    body
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, ca_cert.pem(), resumed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_fetches_never_resume_a_tls_session() {
    use moat_proxy::policy::{JwksCache, Policy};
    moat_ca::install_crypto_provider();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let mut jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, jsonwebtoken::Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let body = serde_json::json!({ "keys": [jwk] }).to_string();
    let (addr, ca_pem, resumed) = jwks_server(body).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks-ca.pem"), ca_pem).unwrap();
    let policy = write(
        dir.path(),
        "policy.toml",
        &format!(
            r#"
[[issuer]]
name        = "idp"
issuer      = "https://idp.test"
audiences   = ["svc"]
jwks_url    = "https://{addr}/.well-known/jwks.json"
jwks_ca     = "jwks-ca.pem"
algorithms  = ["ES256"]
refresh     = "1h"
min_refetch = "1s"

[[route]]
name  = "api"
path  = "/api/*"
allow = "any-peer"
jwt   = {{ issuer = "idp" }}
"#
        ),
    );
    let cache = JwksCache::new();
    let policy = Policy::load_with(&policy, &cache).unwrap();
    let (_, keys) = policy.issuer_keys().next().unwrap();
    for _ in 0..3 {
        keys.refresh_now().await.expect("fetch");
    }
    let seen = resumed.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter().all(|r| !r),
        "every fetch verified the server in a full handshake: {seen:?}"
    );
}
