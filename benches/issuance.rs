//! Certificates issued per second: the signing path alone (CSR check and
//! ECDSA signature), and the full HTTPS request path (TLS handshake with a
//! client certificate, CSR upload, signing, SQLite record, response).
//!
//! Run: `cargo bench --bench issuance`. Criterion writes its results under
//! `target/criterion/` (HTML and JSON); throughput is shown as elements/s.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moat_ca::client::{CaClient, WorkloadKey};
use moat_ca::issuer::{RootCa, ValidatedCsr};
use moat_ca::server::{CaServer, ServerConfig};
use moat_ca::store::CaDir;
use moat_ca::{SpiffeId, TrustDomain};

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
        })
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
        b.iter(|| rt.block_on(client.renew(&svid, &key, &key)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, sign_path, https_path);
criterion_main!(benches);
