//! Helpers for the proxy's end-to-end tests: configuration files, starting
//! `moat proxy`, curl against an inbound listener, and certificates that the
//! CA would never issue (another CA, a wrong identity), made with rcgen.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::support::{Running, TestCa, echo_service, path_str, tool};
use moat_testkit::pki;

/// A workload certificate and key on disk.
pub(crate) struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes `text` to `dir/name` and returns the path.
pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `moat proxy --config PATH` and waits until every named listener is bound.
pub(crate) fn start_proxy(config: &Path, listeners: &[&str]) -> (Running, Vec<SocketAddr>) {
    let mut proxy = Running::start(&["proxy", "--config", path_str(config)]);
    let addrs = listeners.iter().map(|l| proxy.listening_addr(l)).collect();
    (proxy, addrs)
}

/// Issues `id` from the CA into files named `name.crt`/`name.key`.
pub(crate) fn issue(ca: &TestCa, id: &str, ttl: &str, name: &str) -> CertFiles {
    let (cert, key) = ca.issue_files(id, ttl, name);
    CertFiles { cert, key }
}

/// A file-mode `[identity]` section.
pub(crate) fn file_identity(files: &CertFiles, bundle: &Path) -> String {
    format!(
        "[identity]\ncert = {:?}\nkey = {:?}\nbundle = {:?}\n",
        path_str(&files.cert),
        path_str(&files.key),
        path_str(bundle)
    )
}

/// `[admin]` on a free loopback port.
pub(crate) const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

/// Status and body of `curl` against `https://addr/path` with a client
/// certificate (`None`: without one). Extra curl arguments go last. Server
/// identity is not checked here (`-k`): these tests are about the client side.
pub(crate) fn curl(
    addr: SocketAddr,
    path: &str,
    client: Option<&CertFiles>,
    extra: &[&str],
) -> (u16, String) {
    let out = curl_raw(addr, path, client, extra);
    parse_status(&out)
}

/// The raw curl output (`-w` appends the status on the last line).
pub(crate) fn curl_raw(
    addr: SocketAddr,
    path: &str,
    client: Option<&CertFiles>,
    extra: &[&str],
) -> Output {
    let url = format!("https://{addr}{path}");
    let mut args: Vec<&str> = vec!["-sS", "-k", "--max-time", "10", "-w", "\n%{http_code}"];
    if let Some(c) = client {
        args.extend(["--cert", path_str(&c.cert), "--key", path_str(&c.key)]);
    }
    args.extend(extra);
    args.push(&url);
    tool("curl", &args)
}

/// Plain-HTTP curl (outbound listeners, admin).
pub(crate) fn curl_http(addr: SocketAddr, path: &str, extra: &[&str]) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    let mut args: Vec<&str> = vec!["-sS", "--max-time", "10", "-w", "\n%{http_code}"];
    args.extend(extra);
    args.push(&url);
    parse_status(&tool("curl", &args))
}

fn parse_status(out: &Output) -> (u16, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// A CA that is not ours, and a leaf it signs for `id` (valid for an hour).
pub(crate) fn foreign_cert(dir: &Path, id: &str, name: &str) -> CertFiles {
    let (issuer, ca_pem) = pki::foreign_ca("not the moat CA").unwrap();
    leaf_signed_by(dir, id, name, &issuer, &ca_pem)
}

/// A leaf for `id` signed by `issuer`, with the workload EKUs.
pub(crate) fn leaf_signed_by(
    dir: &Path,
    id: &str,
    name: &str,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    chain_pem: &str,
) -> CertFiles {
    let pem = pki::leaf(issuer, chain_pem, |p| {
        p.subject_alt_names = vec![uri_san(id)];
    });
    cert_files(dir, name, &pem.unwrap())
}

/// Writes `pem` to `name.crt` and `name.key` in `dir`.
pub(crate) fn cert_files(dir: &Path, name: &str, pem: &pki::Pem) -> CertFiles {
    CertFiles {
        cert: write(dir, &format!("{name}.crt"), &pem.cert),
        key: write(dir, &format!("{name}.key"), &pem.key),
    }
}

/// Waits until `f` returns true, polling, or panics after `timeout`.
pub(crate) fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A leaf signed by the test CA's own root (read from its directory), with
/// whatever SANs the test wants: what the CA itself would never issue.
pub(crate) fn ca_signed(ca: &TestCa, sans: Vec<rcgen::SanType>, name: &str) -> CertFiles {
    let issuer = pki::ca_dir_issuer(&ca.ca_dir()).unwrap();
    let pem = pki::leaf(&issuer, "", |p| p.subject_alt_names = sans).unwrap();
    cert_files(ca.dir.path(), name, &pem)
}

/// A URI SAN.
pub(crate) fn uri_san(id: &str) -> rcgen::SanType {
    pki::uri_san(id).unwrap()
}

/// A CA-mode `[identity]` section: a join token for `id` in a file, short
/// retry delays, and `extra` lines (e.g. `ttl = "4s"`).
pub(crate) fn ca_identity(ca: &TestCa, id: &str, name: &str, extra: &str) -> String {
    let token = write(ca.dir.path(), &format!("{name}.token"), &ca.token(id));
    format!(
        "[identity]\nca_url = {:?}\nbundle = {:?}\ntoken_file = {:?}\nretry_base = \"100ms\"\nretry_max = \"500ms\"\n{extra}\n",
        ca.url(),
        path_str(&ca.bundle_file()),
        path_str(&token)
    )
}

/// An inbound sidecar `api` in front of the echo service, with an admin
/// listener, its identity `id` from `ca` (`identity_extra` goes into
/// `[identity]`); returns once its first certificate is issued, with the
/// `api` and admin addresses.
pub(crate) fn ca_inbound(
    ca: &TestCa,
    id: &str,
    identity_extra: &str,
) -> (Running, SocketAddr, SocketAddr) {
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\n",
        ca_identity(ca, id, "b", identity_extra),
        echo_service()
    );
    let (mut proxy, addrs) =
        start_proxy(&write(ca.dir.path(), "b.toml", &config), &["api", "admin"]);
    proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "certificate issued"
    });
    (proxy, addrs[0], addrs[1])
}

/// A TCP service that reads until the client half-closes, then answers
/// with `echo:` and every byte it read, then closes.
pub(crate) fn tcp_echo_after_eof() -> SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut data = Vec::new();
                if s.read_to_end(&mut data).is_ok() {
                    let _ = s.write_all(b"echo:");
                    let _ = s.write_all(&data);
                }
            });
        }
    });
    addr
}

/// One HTTP/1.1 keep-alive connection to a plaintext listener, reused for
/// every request (so it outlives certificate renewals).
pub(crate) struct KeepAlive {
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl KeepAlive {
    pub(crate) fn connect(addr: SocketAddr) -> Self {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self {
            reader: std::io::BufReader::new(s),
        }
    }

    /// The connection itself (to wait for the server to close it, say).
    pub(crate) fn stream(&mut self) -> &mut std::net::TcpStream {
        self.reader.get_mut()
    }

    /// Sends `GET path` and returns the status (0 if the connection failed).
    pub(crate) fn get(&mut self, path: &str) -> u16 {
        use std::io::{BufRead, Read, Write};
        let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        if self.reader.get_mut().write_all(req.as_bytes()).is_err() {
            return 0;
        }
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line).unwrap_or(0) == 0 {
            return 0;
        }
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
                return 0;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        if self.reader.read_exact(&mut body).is_err() {
            return 0;
        }
        status
    }
}

/// How many log lines so far have this message.
pub(crate) fn count_logs(proc: &Running, message: &str) -> usize {
    proc.json_logs()
        .iter()
        .filter(|v| v["message"] == message)
        .count()
}

/// Waits (up to 10 s) until `proc` has logged `message` at least `n` times:
/// for lines written after the event a test saw (a service that logs a
/// request once it has answered it).
pub(crate) fn wait_for_logs(proc: &Running, message: &str, n: usize) {
    eventually(
        Duration::from_secs(10),
        &format!("{n} `{message}` log lines"),
        || count_logs(proc, message) >= n,
    );
}

/// An HTTP/1.1 service that tells `arrived` when a request has come in, then
/// waits `delay` before answering 200 `slow`.
pub(crate) fn slow_service(delay: Duration) -> (SocketAddr, std::sync::mpsc::Receiver<()>) {
    answering_after(move || std::thread::sleep(delay))
}

/// An HTTP/1.1 service that tells `arrived` when a request has come in, then
/// answers 200 `slow` once `release` is sent to or dropped: a request held
/// in flight for as long as the test needs, however slow the machine.
pub(crate) fn held_service() -> (
    SocketAddr,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (release, held) = std::sync::mpsc::channel::<()>();
    let held = std::sync::Mutex::new(held);
    let (addr, arrived) = answering_after(move || {
        let _ = held.lock().unwrap().recv();
    });
    (addr, arrived, release)
}

/// An HTTP/1.1 service that tells `arrived` when a request has come in,
/// then runs `wait` before answering 200 `slow`.
fn answering_after(
    wait: impl Fn() + Send + Sync + 'static,
) -> (SocketAddr, std::sync::mpsc::Receiver<()>) {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wait = std::sync::Arc::new(wait);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (tx, wait) = (tx.clone(), wait.clone());
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let _ = tx.send(());
                wait();
                let _ = reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow");
            });
        }
    });
    (addr, rx)
}

/// 24 POSTs of 1 MiB each (more than HTTP/2's flow-control windows) sent at
/// once by curl (`--parallel`) to `{base}/stream/{i}` with `flags` (the
/// protocol, client certificate); asserts that all went over one HTTP/2
/// connection and that the echo service got every body whole.
pub(crate) fn assert_parallel_http2_posts(base: &str, dir: &Path, flags: &[&str]) {
    const N: usize = 24;
    let body = "x".repeat(1 << 20);
    let data = format!("@{}", path_str(&write(dir, "body.bin", &body)));
    let urls: Vec<String> = (0..N).map(|i| format!("{base}/stream/{i}")).collect();
    let mut args = vec![
        "-sS",
        "-k",
        "--max-time",
        "20",
        "--parallel",
        "--parallel-max",
        "24",
    ];
    args.extend(flags);
    args.extend(["--data-binary", &data]);
    args.extend(["-w", "\n%{http_version} %{http_code} %{num_connects}\n"]);
    args.extend(urls.iter().map(String::as_str));
    let out = tool("curl", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl: {err}");
    let done: Vec<&str> = text.lines().filter(|l| l.starts_with("2 ")).collect();
    assert_eq!(done.len(), N, "one HTTP/2 status line per stream: {text}");
    assert!(done.iter().all(|l| l.starts_with("2 200 ")), "{done:?}");
    let connects: u32 = done.iter().map(|l| l[6..].parse::<u32>().unwrap()).sum();
    assert_eq!(connects, 1, "all streams on one connection: {done:?}");
    let whole = text.matches(&format!("\"body_len\":{}", 1 << 20)).count();
    assert_eq!(whole, N, "every request body arrived whole: {text}");
    for i in 0..N {
        let path = format!("\"path\":\"/stream/{i}\"");
        assert!(text.contains(&path), "stream {i} answered: {text}");
    }
}

/// Two sidecars with file identities from a test CA of their own: B, an
/// inbound `api` in front of a service, and A, an outbound to B that pins
/// B's identity. Start one with [`SidecarPair::spec`].
pub(crate) struct SidecarPair {
    pub a: Running,
    pub b: Running,
    /// A's outbound listener (plain HTTP: where the app sends).
    pub a_addr: SocketAddr,
    /// B's inbound `api` (mutual TLS).
    pub b_addr: SocketAddr,
    pub ca: TestCa,
    a_id: String,
}

/// What a [`SidecarPair`] is made of; [`PairSpec::start`] starts it.
pub(crate) struct PairSpec<'a> {
    a_id: &'a str,
    b_id: &'a str,
    service: SocketAddr,
    outbound: &'a str,
    expect: Option<&'a str>,
    b_extra: &'a str,
    common: &'a str,
}

impl SidecarPair {
    /// A (identity `a_id`) to B (identity `b_id`) in front of `service`;
    /// A's outbound is named `out` and expects `b_id`, with nothing else
    /// in either file unless the [`PairSpec`] methods say so.
    pub(crate) fn spec<'a>(a_id: &'a str, b_id: &'a str, service: SocketAddr) -> PairSpec<'a> {
        PairSpec {
            a_id,
            b_id,
            service,
            outbound: "out",
            expect: None,
            b_extra: "",
            common: "",
        }
    }

    /// A client certificate for A's identity from the pair's CA (files
    /// `client.crt`/`client.key`), to call B's inbound straight.
    pub(crate) fn client(&self) -> CertFiles {
        issue(&self.ca, &self.a_id, "1h", "client")
    }
}

impl<'a> PairSpec<'a> {
    /// The name of A's outbound listener (metrics and logs carry it).
    pub(crate) fn outbound(mut self, name: &'a str) -> Self {
        self.outbound = name;
        self
    }

    /// The peer A's outbound expects, instead of B's own identity.
    pub(crate) fn expect_peer(mut self, id: &'a str) -> Self {
        self.expect = Some(id);
        self
    }

    /// Lines added to B's `[[inbound]]` (e.g. `app_protocol`, `policy`).
    pub(crate) fn b_extra(mut self, lines: &'a str) -> Self {
        self.b_extra = lines;
        self
    }

    /// TOML put into both files, before the listeners (e.g. `[limits]`).
    pub(crate) fn common(mut self, toml: &'a str) -> Self {
        self.common = toml;
        self
    }

    /// Starts the CA, then B, then A; returns once both listeners are bound.
    pub(crate) fn start(self) -> SidecarPair {
        let Self {
            a_id,
            b_id,
            service,
            outbound,
            expect,
            b_extra,
            common,
        } = self;
        moat_ca::install_crypto_provider();
        let ca = TestCa::start();
        let b_files = issue(&ca, b_id, "1h", "b");
        let b_config = format!(
            "{}{ADMIN}{common}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{service}\"\n{b_extra}\n",
            file_identity(&b_files, &ca.bundle_file())
        );
        let (b, b_addrs) = start_proxy(&write(ca.dir.path(), "b.toml", &b_config), &["api"]);
        let a_files = issue(&ca, a_id, "1h", "a");
        let a_config = format!(
            "{}{ADMIN}{common}\n[[outbound]]\nname = \"{outbound}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\npeer = \"{}\"\n",
            file_identity(&a_files, &ca.bundle_file()),
            b_addrs[0],
            expect.unwrap_or(b_id)
        );
        let (a, a_addrs) = start_proxy(&write(ca.dir.path(), "a.toml", &a_config), &[outbound]);
        SidecarPair {
            a,
            b,
            a_addr: a_addrs[0],
            b_addr: b_addrs[0],
            ca,
            a_id: a_id.to_owned(),
        }
    }
}
