//! Which HTTP version the inbound speaks to the local service.
//!
//! It follows the service, never the caller: a caller's HTTP/2 (curl, a
//! browser, an h2c app behind a peer's outbound) says nothing about what a
//! Python or Node service behind this sidecar understands. `app_protocol`
//! says it: `http1` (the default), `http2` or `grpc` (h2c with prior
//! knowledge), or `auto`, which asks the service once with an HTTP/2
//! connection preface and keeps its answer until a request to the service
//! fails (the service may have been replaced by one that speaks otherwise).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::AppProtocol;

/// The HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// The frame type of SETTINGS, the first frame an HTTP/2 server sends.
const SETTINGS: u8 = 0x4;

const UNKNOWN: u8 = 0;
const HTTP1: u8 = 1;
const HTTP2: u8 = 2;

/// What the local service speaks, as configured or as found out.
#[derive(Debug)]
pub struct AppVersion {
    configured: AppProtocol,
    found: AtomicU8,
    probing: tokio::sync::Mutex<()>,
}

impl AppVersion {
    /// For a listener configured with `app_protocol = configured`.
    pub fn new(configured: AppProtocol) -> Self {
        Self {
            configured,
            found: AtomicU8::new(UNKNOWN),
            probing: tokio::sync::Mutex::new(()),
        }
    }

    /// `Some(true)` for h2c, `Some(false)` for HTTP/1.1, `None` when it
    /// still has to be found out ([`AppVersion::probe`]).
    pub fn known(&self) -> Option<bool> {
        match self.configured {
            AppProtocol::Http1 => Some(false),
            AppProtocol::Http2 | AppProtocol::Grpc => Some(true),
            AppProtocol::Auto => match self.found.load(Ordering::Relaxed) {
                HTTP1 => Some(false),
                HTTP2 => Some(true),
                _ => None,
            },
        }
    }

    /// Asks the service at `addr` whether it speaks h2c: sends the HTTP/2
    /// preface and reads the first frame. A SETTINGS frame means HTTP/2;
    /// an HTTP/1.1 error, a close or silence for `wait` means HTTP/1.1.
    /// Kept until [`AppVersion::forget`]; one probe at a time. A service
    /// that cannot be reached is not judged: the request then fails on its
    /// own, and the next one asks again.
    pub async fn probe(&self, listener: &str, addr: SocketAddr, wait: Duration) -> bool {
        let _one = self.probing.lock().await;
        if let Some(h2) = self.known() {
            return h2;
        }
        let Some(h2) = ask(addr, wait).await else {
            return false;
        };
        self.found
            .store(if h2 { HTTP2 } else { HTTP1 }, Ordering::Relaxed);
        tracing::info!(listener, forward = %addr, speaks = if h2 { "h2c" } else { "HTTP/1.1" }, "app protocol found by probe");
        h2
    }

    /// Forgets what a probe found (a request to the service failed).
    pub fn forget(&self) {
        if self.configured == AppProtocol::Auto {
            self.found.store(UNKNOWN, Ordering::Relaxed);
        }
    }
}

/// Asks the service at `addr` once, without remembering the answer (`moat
/// doctor`): `Some(true)` if it answers the HTTP/2 preface with SETTINGS
/// (h2c), `Some(false)` if it answers otherwise, `None` if it cannot be reached.
pub async fn probe_h2c(addr: SocketAddr, wait: Duration) -> Option<bool> {
    ask(addr, wait).await
}

/// `Some(true)` if the service answers the HTTP/2 preface with SETTINGS,
/// `Some(false)` if it answers otherwise, `None` if it cannot be reached.
async fn ask(addr: SocketAddr, wait: Duration) -> Option<bool> {
    let mut s = tokio::time::timeout(wait, crate::upstream::connect_tcp(addr))
        .await
        .ok()?
        .ok()?;
    if s.write_all(PREFACE).await.is_err() {
        return Some(false);
    }
    let mut head = [0u8; 9];
    let read = tokio::time::timeout(wait, s.read_exact(&mut head)).await;
    // A frame header: 3 bytes of length, the type, flags, stream 0.
    Some(matches!(read, Ok(Ok(_))) && head[3] == SETTINGS && head[5..9] == [0, 0, 0, 0])
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    async fn answering(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_probe_tells_h2c_from_http1_and_is_kept_until_forgotten() {
        let wait = Duration::from_secs(5);
        let h2 = answering(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00").await;
        let v = AppVersion::new(AppProtocol::Auto);
        assert_eq!(v.known(), None);
        assert!(v.probe("t", h2, wait).await);
        assert_eq!(v.known(), Some(true));
        v.forget();
        assert_eq!(v.known(), None);
        let h1 = answering(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
        let v = AppVersion::new(AppProtocol::Auto);
        assert!(!v.probe("t", h1, wait).await);
        assert_eq!(v.known(), Some(false));
    }

    #[tokio::test]
    async fn an_unreachable_service_is_not_judged() {
        let gone = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let v = AppVersion::new(AppProtocol::Auto);
        assert!(!v.probe("t", gone, Duration::from_secs(1)).await);
        assert_eq!(v.known(), None, "asked again next time");
        assert_eq!(AppVersion::new(AppProtocol::Grpc).known(), Some(true));
    }
}
