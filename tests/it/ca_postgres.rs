//! The CA on PostgreSQL, end to end: several real `moat ca serve` replicas
//! on one real database (started by the tests, see `pg_support`), real
//! sidecars, real TLS. What holds for one SQLite CA holds across replicas:
//! a join token is spent everywhere at once, every issuance is recorded
//! once, a rotation done once reaches every replica and its sidecars; and
//! losing a replica or the database costs a retry, never an outage.

use crate::support;
use crate::support::pg as pg_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moat_ca::TrustBundle;
use moat_ca::client::{CaClient, ClientError, Svid, WorkloadKey};
use pg_support::{Database, PgCluster};
use serde_json::Value;
use support::{Running, echo_service, moat, moat_ok, path_str, tool};

const TD: &str = "example.org";

fn rt() -> tokio::runtime::Runtime {
    moat_ca::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `moat ca init` of a CA whose state is in `db`: `parent/name` holds its
/// keys and a `ca.toml` naming the database.
fn pg_ca(db: &Database, parent: &Path, name: &str, store_toml: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.toml"), store_toml).unwrap();
    let out = moat_ok(&["ca", "init", "--dir", path_str(&dir), "--trust-domain", TD]);
    assert!(out.contains("postgres"), "{out}");
    let _ = db;
    dir
}

/// Another replica's CA directory: the same keys and ca.toml, as a
/// Kubernetes Secret and ConfigMap would carry them.
fn replica_dir(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to.join("roots")).unwrap();
    for f in ["token.key", "ca.toml"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    copy_root_keys(from, to);
    to.to_owned()
}

/// One CA on a fresh database of the shared cluster, with two replica
/// directories in one temp dir: `a_dir` (`moat ca init`) and `b_dir` (its
/// copy, [`replica_dir`]). Dropping `tmp` deletes the directories.
struct TwoReplicaDirs {
    db: Database<'static>,
    tmp: tempfile::TempDir,
    a_dir: PathBuf,
    b_dir: PathBuf,
}

/// [`TwoReplicaDirs`] on a database named after `name`; `None` when
/// PostgreSQL is not here ([`pg_support::require`]: skipped, or a failure
/// under MOAT_TEST_REQUIRE_ALL=1).
fn two_replica_dirs(name: &str) -> Option<TwoReplicaDirs> {
    let pg = pg_support::require()?;
    let db = pg.database(name);
    let tmp = tempfile::tempdir().unwrap();
    let a_dir = pg_ca(&db, tmp.path(), "a", &db.store_toml());
    let b_dir = replica_dir(&a_dir, &tmp.path().join("b"));
    Some(TwoReplicaDirs {
        db,
        tmp,
        a_dir,
        b_dir,
    })
}

fn copy_root_keys(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from.join("roots")).unwrap().flatten() {
        let target = to.join("roots").join(entry.file_name());
        if !target.exists() {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// One `moat ca serve` replica.
struct Replica {
    proc: Running,
    addr: SocketAddr,
    admin: SocketAddr,
}

fn serve(dir: &Path) -> Replica {
    let mut proc = Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(dir),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    let addr = proc.listening_addr("ca");
    let admin = proc.listening_addr("admin");
    Replica { proc, addr, admin }
}

impl Replica {
    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn client(&self, bundle: &TrustBundle) -> CaClient {
        CaClient::new(&self.url(), bundle.clone())
            .unwrap()
            .with_timeout(Duration::from_secs(15))
    }

    /// `/ready`: status and body.
    fn ready(&self) -> (u16, String) {
        http_get(self.admin, "/ready")
    }
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let out = tool(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            &format!("http://{addr}{path}"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn bundle_of(dir: &Path) -> TrustBundle {
    TrustBundle::from_pem(moat_ok(&["ca", "bundle", "--dir", path_str(dir)]).as_bytes()).unwrap()
}

fn token(dir: &Path, id: &str) -> String {
    moat_ok(&["ca", "token", "--dir", path_str(dir), "--id", id])
        .trim()
        .to_owned()
}

fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

fn replayed(r: &Result<Svid, ClientError>) -> bool {
    matches!(r, Err(ClientError::Refused { status, reason, .. }) if *status == 401 && reason == "token_replayed")
}

#[test]
fn two_replicas_on_one_database_spend_a_token_once_and_record_every_issuance_once() {
    let Some(s) = two_replica_dirs("two_replicas") else {
        return;
    };
    let (db, a_dir, b_dir) = (s.db, s.a_dir, s.b_dir);
    let a = serve(&a_dir);
    let b = serve(&b_dir);
    let rt = rt();
    let bundle = bundle_of(&a_dir);
    assert_eq!(bundle, bundle_of(&b_dir), "one store, one bundle");
    let mut certificates = Vec::new();

    // Redeemed at A, refused at B.
    let t1 = token(&a_dir, "spiffe://example.org/vm/one");
    let key = WorkloadKey::generate().unwrap();
    let svid = rt.block_on(a.client(&bundle).issue(&key, &t1)).unwrap();
    certificates.push(svid.serial.clone());
    let again = rt.block_on(
        b.client(&bundle)
            .issue(&WorkloadKey::generate().unwrap(), &t1),
    );
    assert!(replayed(&again), "{again:?}");

    // Eight concurrent redemptions of one token, spread over both: one wins.
    let t2 = token(&b_dir, "spiffe://example.org/vm/race");
    let clients = [a.client(&bundle), b.client(&bundle)];
    let results = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..8 {
            let client = clients[i % 2].clone();
            let t2 = t2.clone();
            set.spawn(async move {
                let key = WorkloadKey::generate().unwrap();
                client.issue(&key, &t2).await
            });
        }
        set.join_all().await
    });
    let wins: Vec<&Svid> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(wins.len(), 1, "{results:?}");
    assert!(
        results.iter().filter(|r| r.is_err()).all(replayed),
        "{results:?}"
    );
    certificates.push(wins[0].serial.clone());

    // Renewal at either replica, with a certificate the other issued.
    let renewed_at_b = rt
        .block_on(b.client(&bundle).renew(&svid, &key, &key))
        .unwrap();
    assert_eq!(renewed_at_b.id, svid.id);
    let renewed_at_a = rt
        .block_on(a.client(&bundle).renew(&renewed_at_b, &key, &key))
        .unwrap();
    certificates.push(renewed_at_b.serial.clone());
    certificates.push(renewed_at_a.serial.clone());

    // The issuance log holds every certificate, each once, and nothing else.
    let mut logged: Vec<String> = db
        .psql("SELECT serial FROM issued ORDER BY serial")
        .lines()
        .map(str::to_owned)
        .collect();
    certificates.sort();
    logged.sort();
    assert_eq!(logged, certificates);
    assert_eq!(db.psql("SELECT count(*) FROM used_tokens").trim(), "2");
    // Both replicas counted what they refused.
    let replays: f64 = [&a, &b]
        .iter()
        .map(|r| {
            let (_, text) = http_get(r.admin, "/metrics");
            support::metric_samples(&text, "moat_ca_token_replays_total", &[])
                .first()
                .copied()
                .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(replays, 8.0, "one replay at B, seven in the race");
    drop((a, b));
}

/// A sidecar getting its identity from `ca_urls`, with an inbound
/// listener in front of an echo service.
struct Sidecar {
    proc: Running,
    inbound: SocketAddr,
    admin: SocketAddr,
}

fn sidecar(
    dir: &Path,
    name: &str,
    ca_dir: &Path,
    ca_urls: &[String],
    bundle: &Path,
    extra: &str,
) -> Sidecar {
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(
        &token_file,
        token(ca_dir, &format!("spiffe://example.org/vm/{name}")),
    )
    .unwrap();
    let urls: Vec<String> = ca_urls.iter().map(|u| format!("{u:?}")).collect();
    let config = format!(
        "[identity]\nca_url = [{}]\nbundle = {:?}\ntoken_file = {:?}\n{extra}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\nforward_http = \"http1\"\n",
        urls.join(", "),
        path_str(bundle),
        path_str(&token_file),
        echo_service()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let mut proc = Running::start(&["proxy", "--config", path_str(&path)]);
    let inbound = proc.listening_addr("api");
    let admin = proc.listening_addr("admin");
    proc.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "certificate issued"
    });
    Sidecar {
        proc,
        inbound,
        admin,
    }
}

impl Sidecar {
    fn identity(&self) -> Value {
        let (status, body) = http_get(self.admin, "/identity");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn serial(&self) -> String {
        self.identity()["serial"].as_str().unwrap().to_owned()
    }

    fn count_logs(&self, message: &str) -> usize {
        self.proc
            .json_logs()
            .iter()
            .filter(|v| v["message"] == message)
            .count()
    }
}

/// A client certificate for curl, issued on the CA host.
fn client_cert(ca_dir: &Path, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    moat_ok(&[
        "ca",
        "issue",
        "--dir",
        path_str(ca_dir),
        "--id",
        &format!("spiffe://example.org/vm/{name}"),
        "--cert-out",
        path_str(&cert),
        "--key-out",
        path_str(&key),
    ]);
    (cert, key)
}

/// Status of one request through a sidecar's inbound listener (curl,
/// client certificate, server not checked: the point is the sidecar serves).
fn through(sidecar: SocketAddr, client: &(PathBuf, PathBuf)) -> u16 {
    let out = tool(
        "curl",
        &[
            "-sS",
            "-k",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cert",
            path_str(&client.0),
            "--key",
            path_str(&client.1),
            &format!("https://{sidecar}/"),
        ],
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Requests through `sidecar` in a loop until dropped; counts failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(sidecar: SocketAddr, client: (PathBuf, PathBuf)) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match through(sidecar, &client) {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        };
        Self {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    /// Stops; returns (ok, failed).
    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// True when `cert`'s chain verifies against `root` alone (openssl).
fn signed_by(cert_pem: &str, root: &Path, dir: &Path) -> bool {
    let file = dir.join("check.pem");
    std::fs::write(&file, cert_pem).unwrap();
    tool(
        "openssl",
        &["verify", "-CAfile", path_str(root), path_str(&file)],
    )
    .status
    .success()
}

/// True when the TLS server at `addr` presents a chain that verifies
/// against `root` alone (openssl s_client, with a client certificate).
fn serves_chain_to(addr: SocketAddr, root: &Path, client: Option<&(PathBuf, PathBuf)>) -> bool {
    let connect = addr.to_string();
    let mut args = vec![
        "s_client",
        "-connect",
        &connect,
        "-CAfile",
        path_str(root),
        "-verify_return_error",
        "-brief",
    ];
    if let Some((cert, key)) = client {
        args.extend(["-cert", path_str(cert), "-key", path_str(key)]);
    }
    let out = std::process::Command::new("openssl")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    out.status.success()
}

/// The replica logged that it reloaded its signing state with root #2 active.
fn signs_with_root_2(r: &Replica) -> bool {
    r.proc.json_logs().iter().any(|v| {
        v["message"] == "signing state reloaded"
            && v["roots"]
                .as_str()
                .is_some_and(|r| r.contains("(2, Active)"))
    })
}

#[test]
fn rotation_done_once_reaches_both_replicas_and_the_sidecars_of_each() {
    let Some(s) = two_replica_dirs("rotation") else {
        return;
    };
    let (tmp, a_dir, b_dir) = (s.tmp, s.a_dir, s.b_dir);
    let a = serve(&a_dir);
    let b = serve(&b_dir);
    let rt = rt();
    let bundle_file = tmp.path().join("bundle.pem");
    std::fs::write(&bundle_file, bundle_of(&a_dir).to_pem()).unwrap();
    let identity =
        "ttl = \"8s\"\nbundle_refresh = \"1s\"\nretry_base = \"200ms\"\nretry_max = \"1s\"";
    let on_a = sidecar(
        tmp.path(),
        "on-a",
        &a_dir,
        &[a.url()],
        &bundle_file,
        identity,
    );
    let on_b = sidecar(
        tmp.path(),
        "on-b",
        &a_dir,
        &[b.url()],
        &bundle_file,
        identity,
    );
    let roots_at = |r: &Replica| {
        rt.block_on(r.client(&bundle_of(&a_dir)).fetch_bundle())
            .map(|b| b.roots().len())
            .unwrap_or(0)
    };

    // Prepare, once, against the database: both replicas serve the new
    // bundle within 5 s (they poll the rotation version every second), and
    // the sidecars of both pick it up.
    moat_ok(&["ca", "rotate", "--dir", path_str(&a_dir), "--prepare"]);
    let seen = eventually(
        Duration::from_secs(5),
        "both replicas serve 2 roots",
        || roots_at(&a) == 2 && roots_at(&b) == 2,
    );
    eprintln!("prepare seen by both replicas after {seen:?}");
    for s in [&on_a, &on_b] {
        eventually(Duration::from_secs(10), "the sidecar holds 2 roots", || {
            s.identity()["bundle_roots"] == 2
        });
    }

    // The new key reaches replica B the way a Secret update would; then
    // activate, once. Both replicas sign with root #2 within 5 s (their
    // serving certificates stay on root #1, which every client trusts,
    // until --retire).
    copy_root_keys(&a_dir, &b_dir);
    let root1 = a_dir.join("roots/1.crt");
    let root2 = a_dir.join("roots/2.crt");
    moat_ok(&["ca", "rotate", "--dir", path_str(&a_dir), "--activate"]);
    let seen = eventually(
        Duration::from_secs(5),
        "both replicas reload with root #2 active",
        || signs_with_root_2(&a) && signs_with_root_2(&b),
    );
    assert!(
        serves_chain_to(a.addr, &root1, None) && serves_chain_to(b.addr, &root1, None),
        "the serving certificates stay on the retiring root"
    );
    eprintln!("activate seen by both replicas after {seen:?}");
    let two_roots = bundle_of(&a_dir);
    for r in [&a, &b] {
        let svid = rt
            .block_on(r.client(&two_roots).issue(
                &WorkloadKey::generate().unwrap(),
                &token(&a_dir, "spiffe://example.org/vm/x"),
            ))
            .unwrap();
        assert!(
            signed_by(&svid.to_pem(), &root2, tmp.path()),
            "issued by root #2"
        );
    }
    // Each sidecar renews from its replica with root #2 and serves it.
    let client = client_cert(&a_dir, tmp.path(), "caller");
    for s in [&on_a, &on_b] {
        eventually(
            Duration::from_secs(20),
            "the sidecar serves a certificate from root #2",
            || serves_chain_to(s.inbound, &root2, Some(&client)),
        );
    }

    // Retire, once: the old root leaves every bundle; the sidecars still
    // reach their replicas (whose serving certificates chain to root #2)
    // and renew.
    // --force: the sidecars' first certificates, from root #1, are still valid.
    moat_ok(&[
        "ca",
        "rotate",
        "--dir",
        path_str(&a_dir),
        "--retire",
        "--force",
    ]);
    eventually(Duration::from_secs(5), "both replicas serve 1 root", || {
        roots_at(&a) == 1 && roots_at(&b) == 1
    });
    for s in [&on_a, &on_b] {
        eventually(Duration::from_secs(10), "the sidecar holds 1 root", || {
            s.identity()["bundle_roots"] == 1
        });
        let before = s.serial();
        eventually(Duration::from_secs(20), "a renewal after retire", || {
            s.serial() != before
        });
        assert_eq!(through(s.inbound, &client), 200);
    }
}

/// True while the process with this port's client side has an
/// established TCP connection to `port` (from /proc/net/tcp).
fn connection_open_to(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 3
            && f[3] == "01"
            && f[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

#[test]
fn a_replica_killed_mid_renewal_costs_the_sidecar_one_retry_and_no_request() {
    let Some(s) = two_replica_dirs("kill_replica") else {
        return;
    };
    let (tmp, a_dir, b_dir) = (s.tmp, s.a_dir, s.b_dir);
    let mut a = serve(&a_dir);
    let b = serve(&b_dir);
    let bundle_file = tmp.path().join("bundle.pem");
    std::fs::write(&bundle_file, bundle_of(&a_dir).to_pem()).unwrap();
    let s = sidecar(
        tmp.path(),
        "vm",
        &a_dir,
        &[a.url(), b.url()],
        &bundle_file,
        "ttl = \"6s\"\nretry_base = \"2s\"\nretry_max = \"10s\"",
    );
    let traffic = Traffic::start(s.inbound, client_cert(&a_dir, tmp.path(), "caller"));
    let first = s.serial();

    // Freeze A: the sidecar's next renewal (to A, its first choice) opens a
    // connection the kernel accepts and nobody answers. Kill A then: the
    // renewal in flight fails, and the sidecar asks B at once.
    a.proc.signal("STOP");
    eventually(
        Duration::from_secs(20),
        "the sidecar's renewal reaches the frozen replica",
        || connection_open_to(a.addr.port()),
    );
    a.proc.signal("KILL");
    let killed = Instant::now();
    let _ = a.proc.child.wait();
    eventually(Duration::from_secs(5), "a renewal from replica B", || {
        s.serial() != first
    });
    eprintln!("renewed {:?} after the kill", killed.elapsed());
    let second = s.serial();
    // And the next renewal works too (A is gone; B answers).
    eventually(Duration::from_secs(15), "another renewal", || {
        s.serial() != second
    });
    let (ok, failed) = traffic.finish();
    assert_eq!(failed, 0, "no request failed ({ok} ok)");
    assert!(ok > 10, "traffic flowed: {ok}");
    assert_eq!(
        s.count_logs("renewal failed; serving with the current certificate"),
        0,
        "one retry inside the renewal, not a failed renewal:\n{}",
        s.proc.logs().join("\n")
    );
    assert!(s.count_logs("CA replica failed; trying the next") >= 1);
    drop(b);
}

#[test]
fn database_down_means_503_and_unready_and_database_back_means_issuance_without_a_restart() {
    if !pg_support::available() {
        return;
    }
    // A cluster of its own: this test stops it.
    let pg = PgCluster::start();
    let db = pg.database("outage");
    let tmp = tempfile::tempdir().unwrap();
    let dir = pg_ca(&db, tmp.path(), "ca", &db.store_toml());
    let ca = serve(&dir);
    let rt = rt();
    let bundle = bundle_of(&dir);
    let bundle_file = tmp.path().join("bundle.pem");
    std::fs::write(&bundle_file, bundle.to_pem()).unwrap();
    // Long enough to outlive the outage: a certificate that expires before
    // the CA can renew it needs a new token.
    let s = sidecar(
        tmp.path(),
        "vm",
        &dir,
        &[ca.url()],
        &bundle_file,
        "ttl = \"40s\"\nretry_base = \"500ms\"\nretry_max = \"1s\"",
    );
    let traffic = Traffic::start(s.inbound, client_cert(&dir, tmp.path(), "caller"));
    // Minted before the outage (minting reads the trust domain from the store).
    let waiting = token(&dir, "spiffe://example.org/vm/waiting");
    assert_eq!(ca.ready().0, 200);

    pg.stop();
    let refused = rt.block_on(
        ca.client(&bundle)
            .issue(&WorkloadKey::generate().unwrap(), &waiting),
    );
    match &refused {
        Err(ClientError::Refused {
            status,
            reason,
            error,
        }) => {
            assert_eq!(*status, 503);
            assert_eq!(reason, "store_unavailable");
            assert!(error.contains("database"), "{error}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    // More refused requests, with polls between them: the outage is
    // logged at ERROR once, not once per request (or per poll after one).
    for _ in 0..3 {
        let again = rt.block_on(
            ca.client(&bundle)
                .issue(&WorkloadKey::generate().unwrap(), &waiting),
        );
        assert!(
            matches!(&again, Err(ClientError::Refused { status, .. }) if *status == 503),
            "{again:?}"
        );
        // The store's poll has run since (its reason is on /ready).
        eventually(Duration::from_secs(5), "a poll of the store", || {
            ca.ready()
                .1
                .contains("the CA's state database is unreachable")
        });
    }
    let errors: Vec<Value> = ca
        .proc
        .json_logs()
        .into_iter()
        .filter(|v| v["level"] == "ERROR")
        .collect();
    assert_eq!(
        errors
            .iter()
            .filter(|v| v["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("the CA's state store is unreachable"))
            .count(),
        1,
        "{errors:#?}"
    );
    assert!(
        !errors.iter().any(|v| v["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("issuance refused")),
        "{errors:#?}"
    );
    eventually(Duration::from_secs(5), "/ready false", || {
        let (status, body) = ca.ready();
        status == 503 && body.contains("database")
    });
    let (_, metrics) = http_get(ca.admin, "/metrics");
    assert_eq!(
        support::metric_samples(&metrics, "moat_ca_store_up", &[]),
        [0.0]
    );
    let serial = s.serial();
    let failed_renewals = s.count_logs("renewal failed; serving with the current certificate");
    eventually(Duration::from_secs(30), "the sidecar retries", || {
        s.count_logs("renewal failed; serving with the current certificate") > failed_renewals
    });
    assert_eq!(s.serial(), serial, "serving on its current certificate");

    pg.start_again();
    eventually(Duration::from_secs(10), "/ready true again", || {
        ca.ready().0 == 200
    });
    // The token refused during the outage was not burned.
    let svid = rt
        .block_on(
            ca.client(&bundle)
                .issue(&WorkloadKey::generate().unwrap(), &waiting),
        )
        .unwrap();
    assert_eq!(svid.id.as_str(), "spiffe://example.org/vm/waiting");
    eventually(Duration::from_secs(15), "the sidecar renews again", || {
        s.serial() != serial
    });
    let (ok, failed) = traffic.finish();
    assert_eq!(failed, 0, "no request failed during the outage ({ok} ok)");
    let mut ca = ca;
    assert!(
        ca.proc.child.try_wait().unwrap().is_none(),
        "the CA was not restarted"
    );
    assert_eq!(
        ca.proc
            .json_logs()
            .iter()
            .filter(|v| v["message"] == "the CA's state store is reachable again")
            .count(),
        1
    );
}

#[test]
fn migrate_copies_a_sqlite_ca_with_its_history_and_spent_tokens_stay_spent() {
    let Some(pg) = pg_support::require() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    support::ca_init(&dir);
    let rt = rt();
    // A SQLite CA with history: two tokens spent, a renewal, a rotation
    // half done (root #1 retiring, #2 active), and an issuance after it.
    let (spent, before) = {
        let sqlite = serve(&dir);
        let bundle = bundle_of(&dir);
        let client = sqlite.client(&bundle);
        let spent = token(&dir, "spiffe://example.org/vm/old");
        let key = WorkloadKey::generate().unwrap();
        let svid = rt.block_on(client.issue(&key, &spent)).unwrap();
        rt.block_on(client.renew(&svid, &key, &key)).unwrap();
        moat_ok(&["ca", "rotate", "--dir", path_str(&dir), "--prepare"]);
        moat_ok(&["ca", "rotate", "--dir", path_str(&dir), "--activate"]);
        let t = token(&dir, "spiffe://example.org/vm/other");
        let two = bundle_of(&dir);
        eventually(
            Duration::from_secs(5),
            "the SQLite CA signs with root #2",
            || signs_with_root_2(&sqlite),
        );
        rt.block_on(
            sqlite
                .client(&two)
                .issue(&WorkloadKey::generate().unwrap(), &t),
        )
        .unwrap();
        (spent, two)
    };

    let db = pg.database("migrate");
    let pg_toml = tmp.path().join("pg.toml");
    std::fs::write(&pg_toml, db.store_toml()).unwrap();
    let out = moat_ok(&[
        "ca",
        "migrate",
        "--dir",
        path_str(&dir),
        "--config",
        path_str(&pg_toml),
        "--from-sqlite",
        path_str(&dir.join("ca.db")),
    ]);
    assert!(
        out.contains("2 roots, 3 issuances, 2 spent join tokens"),
        "{out}"
    );
    assert_eq!(
        db.psql("SELECT id || ':' || state FROM roots ORDER BY id"),
        "1:retiring\n2:active\n"
    );
    assert_eq!(db.psql("SELECT count(*) FROM issued").trim(), "3");

    // A second copy into the same database is refused.
    let again = moat(&[
        "ca",
        "migrate",
        "--dir",
        path_str(&dir),
        "--config",
        path_str(&pg_toml),
        "--from-sqlite",
        path_str(&dir),
    ]);
    assert_eq!(again.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a CA"));
    // `migrate` alone reports the schema.
    let out = moat_ok(&[
        "ca",
        "migrate",
        "--dir",
        path_str(&dir),
        "--config",
        path_str(&pg_toml),
    ]);
    assert!(out.contains("schema version 2"), "{out}");

    // The migrated CA: the same bundle, the same signing root, and the
    // token spent before the migration is still spent.
    let mut migrated = Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(&dir),
        "--config",
        path_str(&pg_toml),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
    ]);
    let addr = migrated.listening_addr("ca");
    migrated.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "state store opened" && v["engine"] == "postgres"
    });
    let client = CaClient::new(&format!("https://{addr}"), before.clone()).unwrap();
    assert_eq!(rt.block_on(client.fetch_bundle()).unwrap(), before);
    let r = rt.block_on(client.issue(&WorkloadKey::generate().unwrap(), &spent));
    assert!(replayed(&r), "{r:?}");
    let fresh = rt
        .block_on(client.issue(
            &WorkloadKey::generate().unwrap(),
            &token(&dir, "spiffe://example.org/vm/new"),
        ))
        .unwrap();
    // `moat ca token --dir` without --config still talks to SQLite here:
    // the token key is the same, so its token works on the migrated CA.
    assert!(signed_by(
        &fresh.to_pem(),
        &dir.join("roots/2.crt"),
        tmp.path()
    ));
    assert_eq!(db.psql("SELECT count(*) FROM issued").trim(), "4");
}

#[test]
fn store_misconfiguration_is_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    std::fs::create_dir_all(&dir).unwrap();
    // Configuration mistakes: exit 64, naming the file and the field, before any port.
    for (store, want) in [
        (
            "[store]\nurl = \"postgres://moat@db.example:5432/moat?sslmode=require\"\n",
            "sslmode=require is not supported",
        ),
        (
            "[store]\nurl = \"postgres://moat@db.example:5432/moat?sslmode=disable\"\n",
            "loopback",
        ),
        (
            "[store]\nurl = \"postgres://moat:secret@127.0.0.1/moat?sslmode=disable\"\n",
            "password_file",
        ),
        (
            "[store]\nurl = \"postgres://moat@db.example/moat\"\n",
            "store.ca_file",
        ),
        (
            "[store]\npool_size = 0\nurl = \"postgres://moat@127.0.0.1/moat?sslmode=disable\"\n",
            "pool_size",
        ),
    ] {
        std::fs::write(dir.join("ca.toml"), store).unwrap();
        let out = moat(&[
            "ca",
            "serve",
            "--dir",
            path_str(&dir),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{store}: {stderr}");
        assert!(stderr.contains("ca.toml"), "{stderr}");
        assert!(stderr.contains(want), "{store}: {stderr}");
        assert!(!stderr.contains("secret"), "{stderr}");
    }

    let Some(pg) = pg_support::require() else {
        return;
    };
    let db = pg.database("misconfigured");
    // A database server the CA cannot verify: refused, with the reason.
    let other_ca = tmp.path().join("other-ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other_ca, params.self_signed(&key).unwrap().pem()).unwrap();
    let store = db.store_toml().replace(
        &pg.ca_file.display().to_string(),
        &other_ca.display().to_string(),
    );
    std::fs::write(dir.join("ca.toml"), &store).unwrap();
    let out = moat(&["ca", "init", "--dir", path_str(&dir), "--trust-domain", TD]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("UnknownIssuer") || stderr.contains("certificate"),
        "{stderr}"
    );
    assert!(
        !dir.join("token.key").exists(),
        "no key made for a database we cannot reach"
    );
    // A wrong password: refused by the server, and said so; exit 64, as
    // no restart fixes it (systemd's Restart=on-failure would loop).
    let wrong = tmp.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let store = db.store_toml().replace(
        &pg.password_file.display().to_string(),
        &wrong.display().to_string(),
    );
    std::fs::write(dir.join("ca.toml"), &store).unwrap();
    let out = moat(&["ca", "init", "--dir", path_str(&dir), "--trust-domain", TD]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    let out = moat(&[
        "ca",
        "serve",
        "--dir",
        path_str(&dir),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    // Nobody listening: a prompt error, not a hang, and exit 1: the
    // database may be back on the next try.
    let port = support::free_port();
    std::fs::write(
        dir.join("ca.toml"),
        format!("[store]\nurl = \"postgres://moat@127.0.0.1:{port}/moat?sslmode=disable\"\n"),
    )
    .unwrap();
    let started = Instant::now();
    let out = moat(&["ca", "init", "--dir", path_str(&dir), "--trust-domain", TD]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("127.0.0.1"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn replicas_may_run_as_a_role_that_only_reads_and_writes_a_migrated_schema() {
    let Some(pg) = pg_support::require() else {
        return;
    };
    let db = pg.database("least_privilege");
    let tmp = tempfile::tempdir().unwrap();
    // The owner makes the CA (and runs the migrations).
    let dir = pg_ca(&db, tmp.path(), "ca", &db.store_toml());
    // The replicas' role: no CREATE anywhere, only the tables' rows.
    let role = format!("rw_{}", db.name);
    db.psql(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'rw-password'; \
         REVOKE CREATE ON SCHEMA public FROM PUBLIC; \
         GRANT USAGE ON SCHEMA public TO {role}; \
         GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}; \
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};"
    ));
    let password = tmp.path().join("rw-password");
    std::fs::write(&password, "rw-password\n").unwrap();
    let store = db
        .store_toml()
        .replace(
            &format!("postgres://{}@", pg_support::USER),
            &format!("postgres://{role}@"),
        )
        .replace(
            &pg.password_file.display().to_string(),
            &password.display().to_string(),
        );
    std::fs::write(dir.join("ca.toml"), store).unwrap();
    let ca = serve(&dir);
    let rt = rt();
    let svid = rt
        .block_on(ca.client(&bundle_of(&dir)).issue(
            &WorkloadKey::generate().unwrap(),
            &token(&dir, "spiffe://example.org/vm/rw"),
        ))
        .unwrap();
    assert_eq!(svid.id.as_str(), "spiffe://example.org/vm/rw");
    // Rotation steps are row changes too.
    moat_ok(&["ca", "rotate", "--dir", path_str(&dir), "--prepare"]);
    // But it could not have made the schema itself.
    let fresh = pg.database("least_privilege_empty");
    fresh.psql(&format!(
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT USAGE ON SCHEMA public TO {role};"
    ));
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(
        empty.join("ca.toml"),
        fresh
            .store_toml()
            .replace(
                &format!("postgres://{}@", pg_support::USER),
                &format!("postgres://{role}@"),
            )
            .replace(
                &pg.password_file.display().to_string(),
                &password.display().to_string(),
            ),
    )
    .unwrap();
    let out = moat(&["ca", "migrate", "--dir", path_str(&empty)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
}

#[test]
fn the_kubernetes_ca_runs_replicas_with_a_disruption_budget_and_the_database_from_a_secret() {
    let yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kubernetes/ca.yaml"),
    )
    .unwrap();
    let replicas: u32 = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("replicas: "))
        .and_then(|n| n.parse().ok())
        .expect("replicas");
    assert!(replicas >= 2, "{replicas} replicas");
    assert!(yaml.contains("kind: PodDisruptionBudget"));
    assert!(yaml.contains("minAvailable: 1"));
    assert!(yaml.contains("maxUnavailable: 0"));
    // The URL and password are files from a Secret, not text in the ConfigMap.
    assert!(yaml.contains("url_file = \"/etc/moat/db/url\""));
    assert!(yaml.contains("password_file = \"/etc/moat/db/password\""));
    assert!(yaml.contains("secretName: moat-ca-db"));
    assert!(!yaml.contains("postgres://moat@db") || yaml.contains("--from-literal=url="));
    // No volume a second replica would fight over.
    assert!(!yaml.contains("PersistentVolumeClaim"));
    assert!(yaml.contains("path: /ready"));
}

#[test]
fn a_revocation_made_once_is_enforced_by_every_replica() {
    let Some(s) = two_replica_dirs("revocation") else {
        return;
    };
    let (a_dir, b_dir) = (s.a_dir, s.b_dir);
    let b = serve(&b_dir);
    let rt = rt();
    let bundle = bundle_of(&a_dir);
    let key = WorkloadKey::generate().unwrap();
    let svid = rt
        .block_on(
            b.client(&bundle)
                .issue(&key, &token(&a_dir, "spiffe://example.org/vm/one")),
        )
        .unwrap();
    let out = moat_ok(&[
        "ca",
        "revoke",
        "--dir",
        path_str(&a_dir),
        "--serial",
        &svid.serial,
        "--reason",
        "test",
    ]);
    assert!(out.contains("revoked"), "{out}");
    // B refuses the renewal at once (it asks the store), and lists it
    // within its one-second poll.
    let renew = rt.block_on(b.client(&bundle).renew(&svid, &key, &key));
    assert!(
        matches!(&renew, Err(ClientError::Refused { reason, .. }) if reason == "revoked"),
        "{renew:?}"
    );
    eventually(Duration::from_secs(10), "replica B to list it", || {
        rt.block_on(b.client(&bundle).fetch_revocations(&svid, &key, None))
            .unwrap()
            .is_some_and(|l| {
                l.entries
                    .iter()
                    .any(|e| e.serial.as_deref() == Some(&svid.serial))
            })
    });
    let list = moat_ok(&["ca", "revoke", "--list", "--dir", path_str(&b_dir)]);
    assert!(list.contains(&svid.serial), "{list}");
}

/// The issuances that reach a replica together are recorded in one
/// transaction (group commit) exactly as each would be alone: of 64 at
/// once, the 8 that share a join token spend it once, the one for a revoked
/// identity writes nothing, and of two that carry the same serial the second
/// is refused by the primary key, which rolls the whole transaction back, so
/// the batch is recorded again one by one and that error stays its own.
/// (One worker thread: the 64 are queued before the writer runs, so they
/// are one batch.)
#[test]
fn issuances_committed_together_are_each_recorded_exactly_as_alone() {
    use moat_ca::store::{CaDir, IssuanceRecord, Recorded, StoreError};
    use moat_ca::token::TokenError;
    let Some(pg) = pg_support::require() else {
        return;
    };
    let db = pg.database("group_commit");
    let tmp = tempfile::tempdir().unwrap();
    let dir = pg_ca(&db, tmp.path(), "a", &db.store_toml());
    let revoked = "spiffe://example.org/vm/revoked";
    let out = moat_ok(&["ca", "revoke", "--dir", path_str(&dir), "--id", revoked]);
    assert!(out.contains("revoked"), "{out}");
    moat_ca::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = moat_ca::server::ServerConfig::load(&dir.join("ca.toml")).unwrap();
    let ca = rt
        .block_on(CaDir::open(&dir, &config.store.engine().unwrap()))
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let record = |i: usize| {
        let token = (i % 8 == 3).then(|| ("shared-token".to_owned(), now + 600));
        IssuanceRecord {
            // 62 and 63 carry one serial.
            serial: format!("gc-{:02x}", i.min(62)),
            spiffe_id: if i == 40 {
                revoked.to_owned()
            } else {
                format!("spiffe://example.org/vm/w{i}")
            },
            not_after: now + 3600,
            kind: if token.is_some() {
                "join_token"
            } else {
                "renewal"
            },
            issued_at: now,
            single_use: token,
            presented_serial: None,
        }
    };
    let outcomes = rt.block_on(async {
        let store = ca.store().clone();
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                let r = record(i);
                tokio::spawn(async move { store.record_issuance(&r).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        outcomes
    });
    let (mut spent, mut replayed, mut issued) = (0, 0, Vec::new());
    for (i, outcome) in outcomes.iter().enumerate() {
        match (i, outcome) {
            (40, Ok(Recorded::Revoked(r))) => assert_eq!(r.spiffe_id.as_deref(), Some(revoked)),
            (40, other) => panic!("the revoked identity: {other:?}"),
            (63, Err(StoreError::Postgres { message, .. })) => {
                assert!(message.contains("duplicate key"), "{message}");
            }
            (63, other) => panic!("the second of one serial: {other:?}"),
            (i, Err(StoreError::Token(TokenError::Replayed))) if i % 8 == 3 => replayed += 1,
            (i, Ok(Recorded::Issued)) => {
                spent += usize::from(i % 8 == 3);
                issued.push(format!("gc-{:02x}", i.min(62)));
            }
            (i, other) => panic!("issuance {i}: {other:?}"),
        }
    }
    assert_eq!(
        (spent, replayed),
        (1, 7),
        "one use of the shared token wins"
    );
    issued.sort();
    assert_eq!(issued.len(), 64 - 7 - 2);
    let recorded: Vec<String> = db
        .psql("SELECT serial FROM issued WHERE serial LIKE 'gc-%' ORDER BY serial")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        recorded, issued,
        "every issuance recorded once, nothing else"
    );
    assert_eq!(
        db.psql("SELECT count(*) FROM used_tokens WHERE jti = 'shared-token'")
            .trim(),
        "1"
    );
}
