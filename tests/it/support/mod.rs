//! Shared end-to-end test support: run the real `moat` binary, read its JSON
//! logs, and stand up a CA on a port-0 listener.
#![allow(dead_code)]

pub(crate) mod hostile;
pub(crate) mod netns;
pub(crate) mod otlp;
pub(crate) mod pg;
pub(crate) mod proxy;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use moat_testkit::{Ca, Moat, Process};
use serde_json::Value;

/// The `moat` binary cargo built for these tests.
pub(crate) fn moat_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moat"))
}

/// The harness around it: `RUST_LOG=info`, and every child's log echoed
/// with `MOAT_TEST_ECHO=1`.
pub(crate) fn harness() -> Moat {
    Moat::new(moat_bin())
        .env("RUST_LOG", "info")
        .echo(std::env::var_os("MOAT_TEST_ECHO").is_some())
}

/// Runs `moat ARGS...` to completion and returns its output.
pub(crate) fn moat(args: &[&str]) -> Output {
    harness().output(args).expect("run moat")
}

/// Runs `moat ARGS...`, asserts success, returns stdout.
pub(crate) fn moat_ok(args: &[&str]) -> String {
    harness().ok(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs an external program (curl, openssl) and returns its output.
pub(crate) fn tool(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// The programs the tests drive that cargo does not build: how to ask each
/// whether it runs, and how to install it (what `.ci/run` does).
const TOOLS: &[(&str, &[&str], &str)] = &[
    ("curl", &["--version"], "apt-get install curl"),
    ("openssl", &["version"], "apt-get install openssl"),
    ("ip", &["-V"], "apt-get install iproute2"),
    ("python3", &["--version"], "apt-get install python3"),
    ("nghttp", &["--version"], "apt-get install nghttp2-client"),
    ("sslscan", &["--version"], "apt-get install sslscan"),
    ("systemd-analyze", &["--version"], "apt-get install systemd"),
    ("strace", &["-V"], "apt-get install strace"),
    ("promtool", &["--version"], "apt-get install prometheus"),
    (
        "kubernetes-validate",
        &["--version"],
        "python3 -m pip install kubernetes-validate==1.37.0",
    ),
];

/// Whether `program` (one of [`TOOLS`]) runs here. If not: a failure
/// under `MOAT_TEST_REQUIRE_ALL=1`, else a printed `SKIPPED:` and false,
/// for the test to return.
pub(crate) fn require(program: &str) -> bool {
    let (_, probe, install) = TOOLS
        .iter()
        .find(|(name, _, _)| *name == program)
        .unwrap_or_else(|| panic!("add {program} to support::TOOLS and to .ci/run"));
    let runs = Command::new(program)
        .args(*probe)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    require_that(runs, &format!("{program} is not installed"), install)
}

/// Whether this process runs as root (namespaces, mounts); if not, as
/// [`require`].
pub(crate) fn require_root(what: &str) -> bool {
    let uid = tool("id", &["-u"]).stdout;
    require_that(
        uid == b"0\n",
        &format!("not root, so {what} is not possible"),
        "run the tests as root, as .ci/run does",
    )
}

/// `ok`, or what is missing and how to get it: a failure under
/// `MOAT_TEST_REQUIRE_ALL=1`, else a printed `SKIPPED:` and false.
pub(crate) fn require_that(ok: bool, missing: &str, how: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var_os("MOAT_TEST_REQUIRE_ALL").is_some_and(|v| v == "1") {
        panic!("MOAT_TEST_REQUIRE_ALL=1 and this test cannot run: {missing} ({how})");
    }
    // Straight to stderr, past the test harness's capture: a skip shows in
    // `cargo test` output even when the test passes.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {missing} ({how}; set MOAT_TEST_REQUIRE_ALL=1 to make this a failure; .ci/run does)"
    );
    false
}

/// A running `moat` process whose stderr (JSON logs) is collected. Killed
/// on drop. The harness's [`Process`], with waits that panic (showing the
/// log) instead of returning errors.
pub(crate) struct Running(Process);

impl std::ops::Deref for Running {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.0
    }
}

impl Running {
    /// Starts `moat ARGS...` in the background.
    pub(crate) fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// Starts `moat ARGS...` with extra environment variables.
    pub(crate) fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let moat = env.iter().fold(harness(), |m, (k, v)| m.env(k, v));
        Self(moat.spawn("moat", args, None).expect("spawn moat"))
    }

    /// Starts `moat ARGS...` allowed at most `nofile` open file descriptors
    /// (RLIMIT_NOFILE, soft and hard).
    pub(crate) fn start_with_fd_limit(args: &[&str], nofile: u64) -> Self {
        Self::start_with_fd_limits(args, nofile, nofile)
    }

    /// Starts `moat ARGS...` with a soft RLIMIT_NOFILE of `soft` and a hard
    /// one of `hard`, as `prlimit --nofile=SOFT:HARD` (or systemd's
    /// default, 1024:524288) would.
    pub(crate) fn start_with_fd_limits(args: &[&str], soft: u64, hard: u64) -> Self {
        use std::os::unix::process::CommandExt;
        let mut cmd = harness().command(args);
        // SAFETY: only setrlimit, which is async-signal-safe, runs between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: soft as libc::rlim_t,
                    rlim_max: hard as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Self::from_command(cmd)
    }

    /// The soft and hard open-file limits the process runs with, from
    /// `/proc/PID/limits`.
    pub(crate) fn fd_limits(&self) -> (u64, u64) {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.child.id()))
            .expect("read /proc/PID/limits");
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("a Max open files line");
        let mut values = line["Max open files".len()..]
            .split_whitespace()
            .map(|v| v.parse::<u64>().expect("a number"));
        (values.next().unwrap(), values.next().unwrap())
    }

    /// Starts a prepared command (the `moat` binary, in a network namespace
    /// or as another user, say), collecting its stderr as logs.
    pub(crate) fn from_command(mut cmd: Command) -> Self {
        if cmd.get_envs().all(|(k, _)| k != "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        let echo = std::env::var_os("MOAT_TEST_ECHO").is_some();
        Self(Process::start("moat", cmd, None, echo).expect("spawn moat"))
    }

    /// Every log line so far.
    pub(crate) fn logs(&self) -> Vec<String> {
        self.0.lines()
    }

    /// Every log line so far, parsed as JSON (non-JSON lines are skipped).
    pub(crate) fn json_logs(&self) -> Vec<Value> {
        self.0.json_since(0)
    }

    /// Waits until a JSON log line satisfies `pred`, or panics after `timeout`
    /// (or if the process exits first).
    pub(crate) fn wait_for_log(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.0
            .wait_for_log(timeout, pred)
            .unwrap_or_else(|e| panic!("waiting for a log line: {e:#}"))
    }

    /// The address a listener reported in its `listening` log line.
    /// `name` is the listener's name (`ca`, `admin`, or an inbound/outbound name).
    pub(crate) fn listening_addr(&mut self, name: &str) -> SocketAddr {
        self.0
            .listening(name)
            .unwrap_or_else(|e| panic!("waiting for listener {name}: {e:#}"))
    }

    /// Sends a signal (`TERM`, `HUP`, `KILL`, `STOP`, `CONT`) to the process.
    pub(crate) fn signal(&self, sig: &str) {
        let sig = match sig {
            "TERM" => moat_testkit::SIGTERM,
            "HUP" => moat_testkit::SIGHUP,
            "KILL" => moat_testkit::SIGKILL,
            "STOP" => moat_testkit::SIGSTOP,
            "CONT" => moat_testkit::SIGCONT,
            other => panic!("add signal {other} to support::Running::signal"),
        };
        self.0.signal(sig).expect("signal");
    }
}

/// A CA made with `moat ca init` and served with `moat ca serve` on a port-0 listener.
pub(crate) struct TestCa {
    pub dir: tempfile::TempDir,
    pub server: Running,
    pub addr: SocketAddr,
    pub trust_domain: String,
    ca: Ca,
}

impl TestCa {
    /// Initializes and starts a CA for `example.org`.
    pub(crate) fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// Initializes a CA, lets `prepare` add files to its directory (e.g. `ca.toml`), then serves it.
    pub(crate) fn start_with(prepare: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ca_init(&dir.path().join("ca"));
        prepare(ca.dir());
        let mut server = Running(ca.serve("ca", &[], None).expect("start moat ca serve"));
        let addr = server.listening_addr("ca");
        Self {
            dir,
            server,
            addr,
            trust_domain: "example.org".into(),
            ca,
        }
    }

    /// The CA's admin address (`/metrics`, `/live`, `/ready`).
    pub(crate) fn admin_addr(&mut self) -> SocketAddr {
        self.server.listening_addr("admin")
    }

    /// The CA directory.
    pub(crate) fn ca_dir(&self) -> PathBuf {
        self.ca.dir().to_owned()
    }

    /// `https://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Writes the current bundle to a file and returns its path.
    pub(crate) fn bundle_file(&self) -> PathBuf {
        let path = self.dir.path().join("bundle.pem");
        std::fs::write(&path, self.ca.bundle().expect("moat ca bundle")).unwrap();
        path
    }

    /// Mints a join token for `id`.
    pub(crate) fn token(&self, id: &str) -> String {
        self.ca.token(id).expect("moat ca token")
    }

    /// Issues a certificate and key to files in the temp dir; returns (cert, key) paths.
    pub(crate) fn issue_files(&self, id: &str, ttl: &str, name: &str) -> (PathBuf, PathBuf) {
        let cert = self.dir.path().join(format!("{name}.crt"));
        let key = self.dir.path().join(format!("{name}.key"));
        self.ca.issue(id, ttl, &cert, &key).expect("moat ca issue");
        (cert, key)
    }
}

/// `moat ca init` of a CA for `example.org` in `dir`.
pub(crate) fn ca_init(dir: &Path) -> Ca {
    Ca::init(&harness(), dir, "example.org").unwrap_or_else(|e| panic!("{e:#}"))
}

/// The values of every sample of `name` whose labels include `labels`, read
/// with a Prometheus text-format parser (NaN for a histogram or summary).
pub(crate) fn metric_samples(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .collect()
}

/// A path as `&str` (test paths are always UTF-8).
pub(crate) fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A loopback port free now: bound, read and closed. Another process could
/// take it before the caller uses it, which fails a test loudly (a bind
/// that fails, a refused connection that answers), never passes it wrongly;
/// for configuration written before the process that binds it starts, and
/// for a port where nobody listens.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Binds a plain HTTP/1.1 echo service on 127.0.0.1:0 (in a thread with its
/// own runtime) that answers every request with 200 and a JSON body listing
/// the method, path and request headers it received.
pub(crate) fn echo_service() -> SocketAddr {
    serve_each_connection(serve_echo)
}

/// Binds 127.0.0.1:0 and serves every accepted connection with `serve`, on
/// a thread with its own current-thread runtime, for the test's life.
pub(crate) fn serve_each_connection<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream));
            }
        });
    });
    addr
}

async fn serve_echo(stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut headers = serde_json::Map::new();
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    content_length = v.trim().parse().unwrap_or(0);
                }
                headers.insert(k, Value::String(v.trim().to_owned()));
            }
        }
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let reply = serde_json::json!({
            "method": method,
            "path": path,
            "headers": headers,
            "body_len": body.len(),
        })
        .to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
            reply.len(),
            reply
        );
        if reader
            .get_mut()
            .write_all(response.as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}
