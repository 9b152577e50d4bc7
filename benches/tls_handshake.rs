//! TLS 1.3 mutual-TLS handshakes per second, in memory (no sockets), ECDSA
//! P-256 certificates from rcgen, aws-lc-rs:
//!
//! - `full/moat`: the proxy's own configurations (`TlsFactory`: SPIFFE peer
//!   verifiers on both sides, no resumption) — what every inbound connection
//!   costs today;
//! - `full/stock`: rustls' stock WebPKI verifiers, resumption off — the
//!   floor for a full handshake with these keys;
//! - `resumed/stock`: the same with TLS 1.3 tickets (PSK + ECDHE), the
//!   client holding a ticket — what resumption would cost instead;
//! - `full/moat_denylist_10k`: `full/moat` with 10,000 revocations on both
//!   sides (5,000 serials, 5,000 identities, none of them the peer's):
//!   the deny-list check every handshake pays (issue 20: within 2 %).
//!
//! Each iteration is one complete handshake, client and server both, on one
//! thread: divide by two for a rough per-side figure.
//!
//! Run: `cargo bench --bench tls_handshake`.

use std::ops::DerefMut;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moat_ca::client::Svid;
use moat_ca::{SpiffeId, TrustBundle};
use moat_proxy::tls::{ALPN_HTTP, CredentialStore, Credentials, TlsFactory};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use rustls::client::Resumption;
use rustls::server::{NoServerSessionStorage, ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, RootCertStore, ServerConfig, ServerConnection,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// What the client side offers: HTTP/2 or HTTP/1.1, as curl does (the
/// server picks `h2`). Not [`ALPN_HTTP`], the listeners' list.
const CLIENT_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

struct Pki {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn pki() -> Pki {
    let key = KeyPair::generate().unwrap(); // ECDSA P-256
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = params.self_signed(&key).unwrap().der().clone();
    Pki {
        issuer: Issuer::new(params, key),
        root,
    }
}

/// A workload certificate: one SPIFFE URI SAN, plus a DNS name so that the
/// stock verifiers (which check names) accept it too.
fn leaf(pki: &Pki, id: &str) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["bench.test".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::URI(id.try_into().unwrap()));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &pki.issuer).unwrap();
    Leaf {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

fn moat_store(pki: &Pki, id: &str) -> Arc<CredentialStore> {
    moat_store_with(pki, id, Arc::default())
}

fn moat_store_with(
    pki: &Pki,
    id: &str,
    revocations: Arc<moat_proxy::revocation::RevocationState>,
) -> Arc<CredentialStore> {
    let l = leaf(pki, id);
    let svid = Svid::from_chain(l.chain).unwrap();
    let bundle = TrustBundle::new(vec![pki.root.clone()]).unwrap();
    let store = Arc::new(CredentialStore::with_revocations(revocations));
    store.publish(Credentials::new(svid, l.key, bundle).unwrap());
    store
}

/// A deny-list of `n` entries, half serials and half identities, none of
/// which names the bench's own certificates.
fn deny_list(n: usize) -> Arc<moat_proxy::revocation::RevocationState> {
    use moat_ca::revocation::{RevocationEntry, RevocationList};
    let expires = moat_proxy::revocation::unix_now() + 86_400;
    let entries = (0..n)
        .map(|i| RevocationEntry {
            serial: (i % 2 == 0).then(|| format!("{:032x}", 0x5eed_0000_u64 + i as u64)),
            spiffe_id: Some(format!("spiffe://example.org/ns/revoked/sa/w{i}")),
            reason: "bench".into(),
            expires,
        })
        .collect();
    let state = Arc::new(moat_proxy::revocation::RevocationState::default());
    state.publish(&RevocationList {
        version: 1,
        entries,
    });
    assert_eq!(state.current().len(), n);
    state
}

fn stock_configs(pki: &Pki, resume: bool) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(pki.root.clone()).unwrap();
    let roots = Arc::new(roots);
    let s = leaf(pki, "spiffe://example.org/server");
    let c = leaf(pki, "spiffe://example.org/client");
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap();
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(s.chain, s.key)
        .unwrap();
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(c.chain, c.key)
        .unwrap();
    if resume {
        server.session_storage = ServerSessionMemoryCache::new(1024);
        server.send_tls13_tickets = 2;
        client.resumption = Resumption::in_memory_sessions(64);
    } else {
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        client.resumption = Resumption::disabled();
    }
    server.alpn_protocols = ALPN_HTTP.iter().map(|p| p.to_vec()).collect();
    client.alpn_protocols = CLIENT_ALPN.iter().map(|p| p.to_vec()).collect();
    (Arc::new(server), Arc::new(client))
}

/// Moves bytes one way; returns how many.
fn transfer<A, B, DA, DB>(from: &mut A, to: &mut B) -> usize
where
    A: DerefMut<Target = ConnectionCommon<DA>>,
    B: DerefMut<Target = ConnectionCommon<DB>>,
{
    let mut buf = Vec::with_capacity(4096);
    let mut n = 0;
    while from.wants_write() {
        n += from.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets().unwrap();
    }
    n
}

/// One complete handshake (and, with tickets, their delivery to the client).
/// Returns whether the client resumed.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> bool {
    let name = ServerName::try_from("bench.test").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    loop {
        let a = transfer(&mut c, &mut s);
        let b = transfer(&mut s, &mut c);
        if a == 0 && b == 0 {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    assert!(
        s.peer_certificates().is_some(),
        "client certificate was presented"
    );
    c.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

fn handshakes(c: &mut Criterion) {
    moat_ca::install_crypto_provider();
    let pki = pki();
    let mut group = c.benchmark_group("tls13_mtls_handshake_p256");
    group.throughput(Throughput::Elements(1));

    let server_store = moat_store(&pki, "spiffe://example.org/server");
    let client_store = moat_store(&pki, "spiffe://example.org/client");
    let moat_server = TlsFactory::new(server_store, false)
        .server(None, ALPN_HTTP)
        .unwrap();
    let moat_client = TlsFactory::new(client_store, false)
        .client(
            SpiffeId::parse("spiffe://example.org/server").unwrap(),
            CLIENT_ALPN,
        )
        .unwrap();
    assert!(!handshake(&moat_server, &moat_client));
    group.bench_function("full/moat", |b| {
        b.iter(|| handshake(&moat_server, &moat_client));
    });

    let denied = deny_list(10_000);
    let moat_server = TlsFactory::new(
        moat_store_with(&pki, "spiffe://example.org/server", denied.clone()),
        false,
    )
    .server(None, ALPN_HTTP)
    .unwrap();
    let moat_client = TlsFactory::new(
        moat_store_with(&pki, "spiffe://example.org/client", denied),
        false,
    )
    .client(
        SpiffeId::parse("spiffe://example.org/server").unwrap(),
        CLIENT_ALPN,
    )
    .unwrap();
    assert!(!handshake(&moat_server, &moat_client));
    group.bench_function("full/moat_denylist_10k", |b| {
        b.iter(|| handshake(&moat_server, &moat_client));
    });

    let (server, client) = stock_configs(&pki, false);
    assert!(!handshake(&server, &client));
    group.bench_function("full/stock", |b| b.iter(|| handshake(&server, &client)));

    let (server, client) = stock_configs(&pki, true);
    handshake(&server, &client); // first contact: full, leaves tickets with the client
    assert!(handshake(&server, &client), "second handshake resumes");
    group.bench_function("resumed/stock", |b| {
        b.iter(|| assert!(handshake(&server, &client)));
    });
    group.finish();
}

criterion_group!(benches, handshakes);
criterion_main!(benches);
