//! Open peer connections, and closing them when the credential that
//! authenticated them lapses.
//!
//! Every mutually authenticated connection (inbound, and outbound to a
//! peer sidecar) is registered after its handshake with what it was
//! authenticated by: the peer's SPIFFE ID, certificate serial, end of
//! validity and chain. A [`Lease`] resolves [`Lease::closed`] when
//! that no longer holds:
//!
//! - `revoked`: the deny-list now names the serial or the identity;
//! - `peer_cert_expired`: the peer's certificate expired (a timer per
//!   connection, so at the second);
//! - `root_retired`: the trust bundle changed and the chain no longer
//!   verifies against it (`moat ca rotate --retire`);
//! - `policy`: a TCP listener's `allow_peers` no longer lists the peer.
//!
//! The connection's task then closes it the way its protocol allows:
//! HTTP/2 with GOAWAY, HTTP/1.1 after the request in flight, TCP at once.
//! The sweep runs when the deny-list, the credentials or a listener's
//! `allow_peers` change; our own renewal changes the credentials but not
//! the bundle, so it never closes anything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use moat_ca::{SpiffeId, TrustBundle};
use rustls::crypto::CryptoProvider;
use rustls::server::ParsedCertificate;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::{Notify, watch};
use x509_parser::prelude::FromDer;

use crate::config::PeerPattern;
use crate::tls::CredentialStore;

/// Why an open connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The deny-list names its certificate or identity.
    Revoked,
    /// The peer's certificate expired.
    PeerCertExpired,
    /// Its chain's root left the trust bundle.
    RootRetired,
    /// The listener's `allow_peers` no longer lists the peer.
    Policy,
}

/// A listener's `allow_peers`, replaceable while connections are open
/// (TCP listeners, on reload). `None` inside: every peer of the trust domain.
pub(crate) type AllowPeers = Arc<ArcSwap<Option<Vec<PeerPattern>>>>;

/// The open peer connections.
pub struct ConnRegistry {
    store: Arc<CredentialStore>,
    conns: Mutex<HashMap<u64, Arc<Tracked>>>,
    next: AtomicU64,
    /// Notified when a listener's `allow_peers` changed.
    policy_changed: Notify,
}

/// One registered connection; removed from the registry when dropped.
pub struct Lease {
    registry: Arc<ConnRegistry>,
    key: u64,
    tracked: Arc<Tracked>,
}

struct Tracked {
    listener: Arc<str>,
    peer: SpiffeId,
    serial: Vec<u8>,
    not_after: SystemTime,
    chain: Vec<CertificateDer<'static>>,
    allow: Option<AllowPeers>,
    close: watch::Sender<Option<CloseReason>>,
}

impl CloseReason {
    /// The label in `moat_connections_closed_total` and the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Revoked => "revoked",
            CloseReason::PeerCertExpired => "peer_cert_expired",
            CloseReason::RootRetired => "root_retired",
            CloseReason::Policy => "policy",
        }
    }
}

impl ConnRegistry {
    /// An empty registry checking against `store`'s credentials and deny-list.
    pub fn new(store: Arc<CredentialStore>) -> Arc<Self> {
        Arc::new(Self {
            store,
            conns: Mutex::default(),
            next: AtomicU64::new(0),
            policy_changed: Notify::new(),
        })
    }

    /// Registers a connection authenticated by `chain` (leaf first) on
    /// `listener`; `allow` is the listener's replaceable `allow_peers`
    /// (TCP). `None` if the leaf cannot be read (the verifier read it, so
    /// this does not happen).
    pub fn register(
        self: &Arc<Self>,
        listener: &Arc<str>,
        chain: Option<&[CertificateDer<'static>]>,
        allow: Option<AllowPeers>,
    ) -> Option<Lease> {
        let chain = chain?;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(chain.first()?).ok()?;
        let peer = SpiffeId::from_x509(&cert).ok()?;
        let not_after = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
        let tracked = Arc::new(Tracked {
            listener: listener.clone(),
            peer,
            serial: cert.raw_serial().to_vec(),
            not_after,
            chain: chain.to_vec(),
            allow,
            close: watch::Sender::new(None),
        });
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(key, tracked.clone());
        // The deny-list may have changed between the handshake and now,
        // after the sweep for it ran.
        if let Some(reason) = self.check(&tracked, None) {
            tracked.close.send_replace(Some(reason));
        }
        Some(Lease {
            registry: self.clone(),
            key,
            tracked,
        })
    }

    /// Open connections registered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Says that a listener's `allow_peers` changed: open connections are
    /// checked against it at once.
    pub fn policy_changed(&self) {
        self.policy_changed.notify_one();
    }

    /// Checks every open connection again whenever the deny-list, the
    /// trust bundle or a listener's `allow_peers` changes. Runs forever.
    pub async fn run(self: Arc<Self>) {
        let mut deny = self.store.revocations().subscribe();
        let mut creds = self.store.subscribe();
        let mut bundle = self.store.current().map(|c| c.bundle.clone());
        loop {
            tokio::select! {
                _ = deny.changed() => {}
                _ = creds.changed() => {}
                () = self.policy_changed.notified() => {}
            }
            let now = self.store.current().map(|c| c.bundle.clone());
            // Our own renewal publishes the same bundle: nothing to verify again.
            let retired = match (&bundle, &now) {
                (Some(old), Some(new)) if old != new => Some(new.clone()),
                _ => None,
            };
            bundle = now;
            self.sweep(retired.as_ref());
        }
    }

    /// Signals every connection that must close now.
    fn sweep(&self, new_bundle: Option<&TrustBundle>) {
        let conns: Vec<Arc<Tracked>> = self.lock().values().cloned().collect();
        for tracked in conns {
            if tracked.close.borrow().is_some() {
                continue;
            }
            if let Some(reason) = self.check(&tracked, new_bundle) {
                tracked.close.send_replace(Some(reason));
            }
        }
    }

    /// Why `tracked` must close, if it must; the chain is verified again
    /// only when the bundle changed.
    fn check(&self, tracked: &Tracked, new_bundle: Option<&TrustBundle>) -> Option<CloseReason> {
        let unix = crate::revocation::unix_now();
        if self
            .store
            .revocations()
            .current()
            .revoked(&tracked.serial, tracked.peer.as_str(), unix)
            .is_some()
        {
            return Some(CloseReason::Revoked);
        }
        if new_bundle.is_some()
            && let Some(creds) = self.store.current()
            && let Err(e) = verify_chain(&tracked.chain, &creds.roots)
        {
            return Some(match e {
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                    | rustls::CertificateError::ExpiredContext { .. },
                ) => CloseReason::PeerCertExpired,
                _ => CloseReason::RootRetired,
            });
        }
        if let Some(allow) = &tracked.allow
            && let Some(patterns) = allow.load().as_ref()
            && !patterns.iter().any(|p| p.matches(&tracked.peer))
        {
            return Some(CloseReason::Policy);
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Tracked>>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Lease {
    /// Resolves when the connection must close (logged and counted once,
    /// here); pending for as long as its credential holds.
    pub async fn closed(&self) -> CloseReason {
        let until_expiry = self
            .tracked
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let mut signal = self.tracked.close.subscribe();
        let signaled = async {
            let got = signal.wait_for(Option::is_some).await.ok().and_then(|r| *r);
            match got {
                Some(reason) => reason,
                // The sender lives in `tracked`, which we hold.
                None => std::future::pending().await,
            }
        };
        let reason = tokio::select! {
            () = tokio::time::sleep(until_expiry) => CloseReason::PeerCertExpired,
            reason = signaled => reason,
        };
        let t = &self.tracked;
        let serial = moat_ca::issuer::hex(&t.serial);
        macro_rules! closing {
            ($level:ident) => {
                tracing::$level!(
                    listener = %t.listener,
                    peer = t.peer.as_str(),
                    serial = %serial,
                    reason = reason.as_str(),
                    "closing connection: the credential it was authenticated with no longer holds"
                )
            };
        }
        // A certificate reaching its end is routine (the peer reconnects
        // with its renewed one): info. Revocation, a retired root or a
        // policy change is something an operator did or should see: warn.
        if reason == CloseReason::PeerCertExpired {
            closing!(info);
        } else {
            closing!(warn);
        }
        self.registry
            .store
            .revocations()
            .count_closed(reason.as_str());
        reason
    }

    /// The peer's SPIFFE ID.
    pub fn peer(&self) -> &SpiffeId {
        &self.tracked.peer
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.key);
    }
}

/// Resolves when `lease` says to close; never without one. Boxed: a
/// connection's task holds it for its whole life, and the timer and watch
/// inside would otherwise add their size to every connection future
/// (`inbound`'s size tests).
pub(crate) fn closed(
    lease: Option<&Lease>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = CloseReason> + Send + '_>> {
    Box::pin(async move {
        match lease {
            Some(lease) => lease.closed().await,
            None => std::future::pending().await,
        }
    })
}

fn verify_chain(
    chain: &[CertificateDer<'static>],
    roots: &rustls::RootCertStore,
) -> Result<(), rustls::Error> {
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let leaf = ParsedCertificate::try_from(&chain[0])?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &leaf,
        roots,
        &chain[1..],
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
}
