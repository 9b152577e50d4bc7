//! Certificates issued per second: the signing path alone (CSR check and
//! ECDSA signature), one renewal's full HTTPS path in process, and renewals
//! per second over HTTPS against real `moat ca serve` processes:
//!
//! - `renewals/sqlite`: one CA on SQLite (`synchronous=FULL`: an fsync per
//!   issuance);
//! - `renewals/postgres_1_replica`, `renewals/postgres_2_replicas`: replicas
//!   sharing one PostgreSQL (started here, `fsync=on`, TLS to the database),
//!   the load spread over them round-robin.
//!
//! Each renewal is what a sidecar does: a new TCP and TLS 1.3 connection
//! with its client certificate, a CSR, a signature, the issuance recorded,
//! the chain back. `MOAT_BENCH_CONCURRENCY` renewals are in flight at once
//! (default 64). Criterion reports them as elements/s (renewals/s).
//!
//! Where the time goes, per renewal: on the CA, the TLS 1.3 handshake (an
//! ECDHE exchange, one ECDSA P-256 signature, and two verifications: the
//! client certificate's signature, which `/v1/renew` takes from the
//! handshake rather than checking again, and its CertificateVerify), the
//! CSR's signature checked and the leaf signed (one more of each), then the
//! record. The record is where the engines differ. SQLite holds one
//! connection and fsyncs its WAL at every commit (`synchronous=FULL`);
//! commits are serialized, and the issuances that arrive while one waits
//! for its fsync are recorded together in the next (group commit), so one
//! fsync covers several. On PostgreSQL the issuances that arrive together
//! at a replica are sent, one prepared statement each, pipelined in one
//! transaction over one pooled connection and committed once (group commit
//! too), and the replicas' commits share WAL flushes, so replicas add
//! signing capacity without adding a serial step. The client side (the load
//! generator, in this process) pays
//! its own handshake and CSR; sidecars pay that spread over the fleet.
//!
//! Run: `cargo bench --bench issuance` (everything), or a row:
//! `cargo bench --bench issuance -- renewals/postgres_2`. The PostgreSQL rows
//! need PostgreSQL installed (Debian: `apt-get install postgresql`) and are
//! skipped with a message otherwise.

#[path = "../tests/it/support/mod.rs"]
mod support;

use support::pg as pg_support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moat_ca::client::{CaClient, Svid, WorkloadKey};
use moat_ca::issuer::{RootCa, ValidatedCsr};
use moat_ca::server::{CaServer, ServerConfig};
use moat_ca::store::CaDir;
use moat_ca::{SpiffeId, TrustBundle, TrustDomain};
use support::{Running, moat_ok, path_str};

fn sign_path(c: &mut Criterion) {
    moat_ca::install_crypto_provider();
    let td = TrustDomain::parse("example.org").unwrap();
    let root = RootCa::generate(&td, 1, Duration::from_secs(86400)).unwrap();
    let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let csr_pem = key.csr_pem().unwrap();
    let mut group = c.benchmark_group("issuance");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign_path", |b| {
        b.iter(|| {
            let csr = ValidatedCsr::parse(csr_pem.as_bytes()).unwrap();
            root.sign_svid(&td, &id, &csr, Duration::from_secs(3600))
                .unwrap()
        });
    });
    group.finish();
}

fn https_path(c: &mut Criterion) {
    moat_ca::install_crypto_provider();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let td = TrustDomain::parse("example.org").unwrap();
    let ca = rt
        .block_on(CaDir::init(
            &dir,
            &moat_ca::store::config::Engine::Sqlite,
            td,
            Duration::from_secs(86400),
        ))
        .unwrap();
    let id = SpiffeId::parse("spiffe://example.org/vm/bench").unwrap();
    let token = ca.mint_join_token(&id, Duration::from_secs(600)).unwrap();
    let bundle = rt.block_on(ca.bundle()).unwrap();
    let server = rt
        .block_on(CaServer::bind(
            ca,
            ServerConfig::default(),
            "127.0.0.1:0".parse().unwrap(),
            vec!["127.0.0.1".into()],
        ))
        .unwrap();
    let addr = server.local_addr().unwrap();
    rt.spawn(server.run(std::future::pending()));
    let client = CaClient::new(&format!("https://{addr}"), bundle).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let svid = rt.block_on(client.issue(&key, &token)).unwrap();

    let mut group = c.benchmark_group("issuance");
    group.throughput(Throughput::Elements(1));
    group.sample_size(30);
    group.bench_function("https_renew_path", |b| {
        b.iter(|| rt.block_on(client.renew(&svid, &key, &key)).unwrap());
    });
    group.finish();
}

/// Replicas of one CA under load, and a certificate to renew with.
struct Fleet {
    _replicas: Vec<Running>,
    renewers: Vec<Arc<Renewer>>,
    /// Renewals asked of this fleet so far (warm-up included), for
    /// [`CpuUse`].
    done: AtomicU64,
}

impl Fleet {
    /// `replicas` × `moat ca serve --dir dir` (each its own copy of the
    /// directory, as replicas have), and a first certificate.
    fn start(rt: &tokio::runtime::Runtime, dir: &Path, replicas: usize) -> Self {
        let mut procs = Vec::new();
        let mut clients = Vec::new();
        let mut addrs = Vec::new();
        let bundle =
            TrustBundle::from_pem(moat_ok(&["ca", "bundle", "--dir", path_str(dir)]).as_bytes())
                .unwrap();
        for _ in 0..replicas {
            let mut proc = Running::start(&[
                "ca",
                "serve",
                "--dir",
                path_str(dir),
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "off",
            ]);
            let addr = proc.listening_addr("ca");
            addrs.push(addr);
            clients.push(
                CaClient::new(&format!("https://{addr}"), bundle.clone())
                    .unwrap()
                    .with_timeout(Duration::from_secs(60)),
            );
            procs.push(proc);
        }
        let token = moat_ok(&[
            "ca",
            "token",
            "--dir",
            path_str(dir),
            "--id",
            "spiffe://example.org/vm/bench",
        ]);
        let key = WorkloadKey::generate().unwrap();
        let svid = rt.block_on(clients[0].issue(&key, token.trim())).unwrap();
        let renewers = addrs
            .into_iter()
            .map(|addr| Arc::new(Renewer::new(addr, &bundle, &svid, &key)))
            .collect();
        Self {
            _replicas: procs,
            renewers,
            done: AtomicU64::new(0),
        }
    }

    /// `n` renewals, `concurrency` at a time, round-robin over the replicas.
    async fn renew(&self, n: u64, concurrency: usize) -> Duration {
        self.done.fetch_add(n, Ordering::Relaxed);
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..concurrency {
            let renewer = self.renewers[worker % self.renewers.len()].clone();
            let next = next.clone();
            tasks.spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    renewer.renew().await;
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("load task");
        }
        start.elapsed()
    }
}

/// The load generator's side of a renewal, as cheap as a correct one can
/// be: what a sidecar does on the wire (a new TCP connection, a full TLS 1.3
/// handshake presenting its certificate and verifying the CA's, a CSR
/// posted to `/v1/renew`, the chain read back and parsed), without what a
/// sidecar does once per renewal but a generator need not repeat: building
/// the rustls configuration (parsing the bundle and the key) and signing
/// the CSR (the same key renews each time; the CA verifies the CSR's
/// signature every time all the same). `CaClient::renew` does those each
/// time, and resolves the address on a blocking thread: ~0.1 ms of the
/// generator's CPU per renewal on this machine, taken from the CA's cores.
struct Renewer {
    addr: std::net::SocketAddr,
    tls: tokio_rustls::TlsConnector,
    server_name: rustls_pki_types::ServerName<'static>,
    csr: bytes::Bytes,
}

impl Renewer {
    fn new(
        addr: std::net::SocketAddr,
        bundle: &TrustBundle,
        svid: &Svid,
        key: &WorkloadKey,
    ) -> Self {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(bundle.root_store().unwrap())
            .with_client_auth_cert(svid.chain.clone(), key.private_key_der())
            .unwrap();
        config.resumption = rustls::client::Resumption::disabled();
        Self {
            addr,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            csr: bytes::Bytes::from(key.csr_pem().unwrap()),
        }
    }

    /// One renewal; panics unless the CA answers 200 with a chain.
    async fn renew(&self) -> Svid {
        use http_body_util::BodyExt;
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .expect("TLS handshake");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        let req = hyper::Request::post("/v1/renew")
            .header(hyper::header::HOST, "127.0.0.1")
            .header(hyper::header::CONTENT_TYPE, "application/pkcs10")
            .body(http_body_util::Full::new(self.csr.clone()))
            .unwrap();
        // The connection is driven in this task, alongside the exchange.
        let exchange = async move {
            let resp = sender.send_request(req).await.expect("renewal response");
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        };
        let ((status, body), conn) = tokio::join!(exchange, conn);
        conn.expect("connection");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        Svid::from_pem(&body).expect("a certificate chain")
    }
}

fn renewals(c: &mut Criterion) {
    moat_ca::install_crypto_provider();
    let concurrency: usize = std::env::var("MOAT_BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("renewals");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));

    let sqlite = tmp.path().join("sqlite");
    support::ca_init(&sqlite);
    if c_wants(&group_name("sqlite")) {
        let fleet = Fleet::start(&rt, &sqlite, 1);
        let before = CpuUse::now();
        group.bench_function("sqlite", |b| {
            b.iter_custom(|n| rt.block_on(fleet.renew(n, concurrency)));
        });
        before.report("sqlite", fleet.done.load(Ordering::Relaxed));
    }

    let wants_pg =
        c_wants(&group_name("postgres_1_replica")) || c_wants(&group_name("postgres_2_replicas"));
    if wants_pg && pg_support::bin_dir().is_none() {
        eprintln!(
            "SKIPPED: renewals/postgres_*: PostgreSQL is not installed (apt-get install postgresql)"
        );
    } else if wants_pg {
        // fsync on: the commit is part of what is measured.
        let pg = pg_support::PgCluster::start_with(true, true);
        let db = pg.database("bench");
        let dir = tmp.path().join("postgres");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ca.toml"),
            db.store_toml()
                .replace("pool_size = 4", "pool_size = 16")
                .replace("timeout = \"3s\"", "timeout = \"30s\""),
        )
        .unwrap();
        support::ca_init(&dir);
        for (name, replicas) in [("postgres_1_replica", 1), ("postgres_2_replicas", 2)] {
            if !c_wants(&group_name(name)) {
                continue;
            }
            let fleet = Fleet::start(&rt, &dir, replicas);
            let before = CpuUse::now();
            group.bench_function(name, |b| {
                b.iter_custom(|n| rt.block_on(fleet.renew(n, concurrency)));
            });
            before.report(name, fleet.done.load(Ordering::Relaxed));
        }
    }
    group.finish();
}

/// CPU seconds used so far (user + system) by this process (the load
/// generator), by its `moat` children (the CA replicas) and by its
/// `postgres` descendants (server and backends), from /proc: where the
/// time of a row goes, per renewal, whatever else the machine is running.
struct CpuUse {
    generator: f64,
    ca: f64,
    postgres: f64,
}

impl CpuUse {
    fn now() -> Self {
        let me = std::process::id();
        let mut procs = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(stat) = proc_stat(pid) {
                procs.push((pid, stat));
            }
        }
        let parent = |pid: u32| procs.iter().find(|(p, _)| *p == pid).map(|(_, s)| s.1);
        let descends = |mut pid: u32| {
            while pid > 1 {
                if pid == me {
                    return true;
                }
                pid = parent(pid).unwrap_or(0);
            }
            false
        };
        let mut cpu = Self {
            generator: 0.0,
            ca: 0.0,
            postgres: 0.0,
        };
        for (pid, (comm, _, secs)) in &procs {
            if *pid == me {
                cpu.generator += secs;
            } else if descends(*pid) && comm == "moat" {
                cpu.ca += secs;
            } else if descends(*pid) && comm.starts_with("postgres") {
                cpu.postgres += secs;
            }
        }
        cpu
    }

    /// Prints the CPU used since `self` per renewal, in microseconds.
    fn report(&self, row: &str, renewals: u64) {
        let now = Self::now();
        let per = |a: f64, b: f64| (a - b) * 1e6 / renewals.max(1) as f64;
        let (ca, generator, pg) = (
            per(now.ca, self.ca),
            per(now.generator, self.generator),
            per(now.postgres, self.postgres),
        );
        eprintln!(
            "cpu per renewal ({row}, {renewals} renewals): CA {ca:.0} us, load generator {generator:.0} us, \
             postgres {pg:.0} us, total {:.0} us",
            ca + generator + pg
        );
    }
}

/// `(comm, ppid, user + system seconds)` of a process.
fn proc_stat(pid: u32) -> Option<(String, u32, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state, ppid, ... utime is field 14 overall, 12 here.
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((comm, ppid, ticks / hz))
}

fn group_name(row: &str) -> String {
    format!("renewals/{row}")
}

/// True unless a filter on the command line excludes this row (starting
/// servers for a row criterion will not run is slow). Criterion's own
/// filter still decides what runs; this only mirrors its substring case.
fn c_wants(id: &str) -> bool {
    const TAKES_VALUE: &[&str] = &[
        "--sample-size",
        "--measurement-time",
        "--warm-up-time",
        "--save-baseline",
        "--baseline",
        "--load-baseline",
        "--profile-time",
        "--output-format",
        "--color",
        "--plotting-backend",
        "--noise-threshold",
        "--significance-level",
        "--confidence-level",
        "--nresamples",
    ];
    let mut filters = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if TAKES_VALUE.contains(&arg.as_str()) {
            args.next();
        } else if !arg.starts_with('-') {
            filters.push(arg);
        }
    }
    filters.is_empty() || filters.iter().any(|f| id.contains(f.as_str()))
}

criterion_group!(benches, sign_path, https_path, renewals);
criterion_main!(benches);
