//! A real PostgreSQL for tests and benches, started by the tests
//! themselves: `initdb` in a temporary directory, a free port, the Unix
//! socket in that directory, TLS with a certificate made at test time, and
//! the server run as a non-root OS user (PostgreSQL refuses root): the
//! `postgres` user the Debian package makes, else `nobody`.
//!
//! One cluster is shared by every test of a binary ([`shared`]), each test
//! with its own database; a test that stops the server starts its own
//! ([`PgCluster::start`]). Binaries are found in `MOAT_PG_BIN`, then
//! `/usr/lib/postgresql/<newest>/bin` (Debian's `postgresql` package), then
//! `PATH`. Without them a test fails when `MOAT_TEST_REQUIRE_ALL=1`, else
//! prints `SKIPPED: <why>` and returns ([`require`]).
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// The superuser the clusters are made with (the CA connects as it too).
pub(crate) const USER: &str = "moat";
/// Its password (host connections use scram-sha-256).
pub(crate) const PASSWORD: &str = "moat-test-password";

/// A running (or stopped) PostgreSQL cluster in a temporary directory.
pub(crate) struct PgCluster {
    /// The temporary directory: data, socket, TLS files, log.
    pub root: PathBuf,
    data: PathBuf,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// The directory holding the Unix socket.
    pub socket_dir: PathBuf,
    /// The roots that verify the server's certificate (for `ca_file`).
    pub ca_file: PathBuf,
    /// A file holding [`PASSWORD`] (for `password_file`).
    pub password_file: PathBuf,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
    temporary: bool,
}

/// One test's database in a cluster.
pub(crate) struct Database<'a> {
    /// The cluster.
    pub cluster: &'a PgCluster,
    /// The database name.
    pub name: String,
}

/// The PostgreSQL binaries' directory, if any.
pub(crate) fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MOAT_PG_BIN") {
        let dir = PathBuf::from(dir);
        return dir.join("initdb").exists().then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").exists() && d.join("postgres").exists())
    })
}

/// The shared cluster, or `None` (after printing why) when PostgreSQL is
/// not installed and `MOAT_TEST_REQUIRE_ALL` is not set.
pub(crate) fn require() -> Option<&'static PgCluster> {
    if bin_dir().is_none() {
        skip_or_fail();
        return None;
    }
    static SHARED: OnceLock<PgCluster> = OnceLock::new();
    Some(SHARED.get_or_init(|| PgCluster::start_with(false, false)))
}

/// True when PostgreSQL can be run here; prints or panics like [`require`].
pub(crate) fn available() -> bool {
    if bin_dir().is_none() {
        skip_or_fail();
        return false;
    }
    true
}

fn skip_or_fail() {
    crate::support::require_that(
        false,
        "PostgreSQL is not installed",
        "apt-get install -y postgresql, or set MOAT_PG_BIN",
    );
}

impl PgCluster {
    /// A cluster of its own (stopped and removed on drop), for a test that
    /// stops and restarts the server.
    pub(crate) fn start() -> Self {
        Self::start_with(false, true)
    }

    /// A cluster with `fsync` as asked: tests run without (durability is
    /// not what they check), benches with (the commit cost is what they
    /// measure).
    pub(crate) fn start_with(fsync: bool, temporary: bool) -> Self {
        let bin = bin_dir().expect("PostgreSQL binaries");
        remove_stale_clusters();
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "moat-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let owner = server_user();
        let data = root.join("data");
        let socket_dir = root.join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        let password_file = root.join("password");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
        let (ca_pem, cert_pem, key_pem) = tls_material();
        let ca_file = root.join("db-ca.crt");
        std::fs::write(&ca_file, &ca_pem).unwrap();
        chown_tree(&root, owner);

        let out = run_as(
            Command::new(bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", USER, "-E", "UTF8", "--locale=C", "-N"])
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", password_file.display())),
            owner,
        )
        .output()
        .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(data.join("server.crt"), cert_pem).unwrap();
        std::fs::write(data.join("server.key"), key_pem).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        chown_tree(&data, owner);

        let mut last_err = String::new();
        for _ in 0..5 {
            let port = super::free_port();
            let conf = format!(
                "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
                 ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
                 max_connections = 400\nshared_buffers = 32MB\nfsync = {}\n\
                 log_min_messages = warning\nlog_connections = off\n",
                socket_dir.display(),
                if fsync { "on" } else { "off" },
            );
            let base = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
            let base = base.split("\n# moat tests\n").next().unwrap().to_owned();
            std::fs::write(
                data.join("postgresql.conf"),
                format!("{base}\n# moat tests\n{conf}"),
            )
            .unwrap();
            let cluster = Self {
                root: root.clone(),
                data: data.clone(),
                port,
                socket_dir: socket_dir.clone(),
                ca_file: ca_file.clone(),
                password_file: password_file.clone(),
                bin: bin.clone(),
                owner,
                child: Mutex::new(None),
                temporary,
            };
            match cluster.try_start() {
                Ok(()) => return cluster,
                Err(e) => {
                    last_err = e;
                    // Not dropped: that would remove the directory.
                    std::mem::forget(cluster);
                }
            }
        }
        panic!("PostgreSQL did not start: {last_err}");
    }

    /// Starts the server (again, after [`stop`](Self::stop)) and waits until it accepts connections.
    pub(crate) fn start_again(&self) {
        self.try_start().expect("PostgreSQL restarts");
    }

    fn try_start(&self) -> Result<(), String> {
        let log = std::fs::File::create(self.root.join("postgres.log")).unwrap();
        chown_tree(&self.root.join("postgres.log"), self.owner);
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = spawn_tied_to_process(run_as(&mut cmd, self.owner));
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.socket_dir)
                .args(["-p", &self.port.to_string(), "-U", USER, "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("postgres exited ({status}): {}", self.log()));
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!("postgres not ready in 60s: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: clients are disconnected) and waits.
    pub(crate) fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            // SIGINT is PostgreSQL's fast shutdown.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
    }

    /// The server's log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("postgres.log")).unwrap_or_default()
    }

    /// Creates a fresh database for one test.
    pub(crate) fn database(&self, hint: &str) -> Database<'_> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let clean: String = hint
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(40)
            .collect();
        let name = format!("t_{clean}_{}", N.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        Database {
            cluster: self,
            name,
        }
    }

    /// Runs SQL with `psql` over the Unix socket; returns its unaligned output.
    pub(crate) fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", db])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.temporary {
            self.stop();
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

impl Database<'_> {
    /// `[store]` over TLS (`verify-full`, the test CA's roots, the password file).
    pub(crate) fn store_toml(&self) -> String {
        format!(
            "[store]\nurl = \"postgres://{USER}@localhost:{}/{}?sslmode=verify-full\"\npassword_file = {:?}\nca_file = {:?}\npool_size = 4\ntimeout = \"3s\"\n",
            self.cluster.port,
            self.name,
            self.cluster.password_file.display().to_string(),
            self.cluster.ca_file.display().to_string(),
        )
    }

    /// `[store]` over the Unix socket, no TLS (loopback only).
    pub(crate) fn store_toml_socket(&self) -> String {
        let sock = self
            .cluster
            .socket_dir
            .display()
            .to_string()
            .replace('/', "%2F");
        format!(
            "[store]\nurl = \"postgres://{USER}@{sock}:{}/{}?sslmode=disable\"\npool_size = 4\ntimeout = \"3s\"\n",
            self.cluster.port, self.name,
        )
    }

    /// Runs SQL in this database.
    pub(crate) fn psql(&self, sql: &str) -> String {
        self.cluster.psql(&self.name, sql)
    }
}

/// A CA certificate and a server certificate for `localhost` and
/// 127.0.0.1 signed by it: (CA PEM, server cert PEM, server key PEM).
fn tls_material() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "moat test database CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// The OS user the server runs as: none needed unless we are root.
fn server_user() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let find = |name: &str| {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 3 && f[0] == name {
                Some((f[2].parse().ok()?, f[3].parse().ok()?))
            } else {
                None
            }
        })
    };
    Some(
        find("postgres")
            .or_else(|| find("nobody"))
            .unwrap_or((65534, 65534)),
    )
}

fn run_as(cmd: &mut Command, owner: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = owner {
        cmd.gid(gid).uid(uid);
    }
    cmd
}

fn chown_tree(path: &Path, owner: Option<(u32, u32)>) {
    let Some((uid, gid)) = owner else { return };
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap().flatten() {
            chown_tree(&entry.path(), owner);
        }
    }
}

/// Spawns `cmd` from a thread that lives as long as the process, with
/// `PR_SET_PDEATHSIG`: the server gets SIGQUIT (immediate shutdown) when
/// the test binary exits, however it exits. (The death signal follows the
/// spawning *thread*, hence the one long-lived spawner.)
fn spawn_tied_to_process(cmd: &mut Command) -> Child {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
            // The channel lives in a static: this loop never ends.
        });
        Mutex::new(tx)
    });
    let mut owned = std::mem::replace(cmd, Command::new("true"));
    unsafe {
        owned.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner.lock().unwrap().send((owned, tx)).unwrap();
    rx.recv().unwrap().expect("spawn postgres")
}

/// Removes clusters left by test binaries that are gone (their servers
/// died with them; see [`spawn_tied_to_process`]).
fn remove_stale_clusters() {
    for entry in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("moat-pg-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
