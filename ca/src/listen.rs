//! Accepting TCP connections: the one accept loop every moat listener runs
//! (the CA's API and admin listeners, the proxy's inbound, outbound and
//! admin listeners).
//!
//! Each [`Acceptor`] holds at most its `max` connections at once: it takes a
//! slot before it calls `accept()`, so past the limit new connections wait in
//! the kernel's backlog instead of being accepted and dropped. When
//! `accept()` itself fails for want of a resource (out of file descriptors,
//! `EMFILE`/`ENFILE`, or of memory) the listener stays readable and a loop
//! that simply retried would spin a core; this one backs off, from
//! [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`], logs once when that starts
//! and once when accepting works again, and never stops the listener.
//!
//! It lives in moat-ca because both crates need it and moat-proxy already
//! depends on moat-ca (the CA knows nothing of the proxy).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The first pause after `accept()` fails for want of a resource.
pub const BACKOFF_MIN: Duration = Duration::from_millis(20);
/// The longest pause between attempts while `accept()` keeps failing.
pub const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Most connections an admin listener (the CA's or the proxy's: probes,
/// metrics scrapes, an operator's curl) serves at once.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// A bound listener with its connection limit, ready to [`run`](Acceptor::run).
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    name: Arc<str>,
    slots: Arc<Semaphore>,
    max: usize,
}

/// The connections an [`Acceptor`] is serving, for waiting on them after it
/// has stopped accepting.
#[derive(Debug, Clone)]
pub struct Open {
    slots: Arc<Semaphore>,
    max: usize,
}

impl Acceptor {
    /// Serves `listener` (called `name` in logs) with at most `max`
    /// connections at once (`max` 0 is taken as 1).
    pub fn new(listener: TcpListener, name: impl Into<Arc<str>>, max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self {
            listener,
            name: name.into(),
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// The connections this acceptor serves, to wait on after [`run`](Self::run).
    pub fn open(&self) -> Open {
        Open {
            slots: self.slots.clone(),
            max: self.max,
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `stop` resolves, each served by `handle`'s
    /// future on a task of its own, which holds one slot until it ends.
    /// Returns once `stop` has resolved; the connections still open go on.
    pub async fn run<F, Fut>(self, stop: impl Future<Output = ()>, mut handle: F)
    where
        F: FnMut(TcpStream, SocketAddr) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        tokio::pin!(stop);
        let mut failing = Failing::default();
        loop {
            let permit = tokio::select! {
                p = self.slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = &mut stop => break,
            };
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                () = &mut stop => break,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) if is_connection_error(&e) => {
                    // That one connection went away before we took it; the
                    // next one may be fine.
                    tracing::debug!(listener = %self.name, error = %e, "accept: connection gone");
                    continue;
                }
                Err(e) => {
                    let pause = failing.next(&self.name, &e);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => continue,
                        () = &mut stop => break,
                    }
                }
            };
            failing.recovered(&self.name);
            let _ = stream.set_nodelay(true);
            let fut = handle(stream, peer);
            tokio::spawn(async move {
                fut.await;
                drop(permit);
            });
        }
        tracing::info!(listener = %self.name, "stopped accepting");
    }
}

impl Open {
    /// How many connections are open now.
    pub fn count(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Resolves once every connection has ended.
    pub async fn closed(&self) {
        let _all = self.slots.acquire_many(self.max as u32).await;
    }
}

/// The back-off state while `accept()` keeps failing.
#[derive(Debug, Default)]
struct Failing {
    errors: u64,
    pause: Duration,
}

impl Failing {
    /// Counts one failure and says how long to pause before the next try.
    fn next(&mut self, name: &str, e: &io::Error) -> Duration {
        if self.errors == 0 {
            tracing::warn!(listener = %name, error = %e, "accept failed; backing off until it works again");
            self.pause = BACKOFF_MIN;
        } else {
            self.pause = (self.pause * 2).min(BACKOFF_MAX);
        }
        self.errors += 1;
        self.pause
    }

    /// Accepting works again: says so once, and starts over.
    fn recovered(&mut self, name: &str) {
        if self.errors > 0 {
            tracing::info!(listener = %name, failed_attempts = self.errors, "accepting again");
            *self = Self::default();
        }
    }
}

/// Errors about the one connection being accepted (it was reset or aborted
/// while it waited), not about the listener or the process.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_up_to_the_cap_and_starts_over() {
        let mut f = Failing::default();
        let e = io::Error::from_raw_os_error(24); // EMFILE
        let pauses: Vec<Duration> = (0..8).map(|_| f.next("t", &e)).collect();
        assert_eq!(pauses[0], BACKOFF_MIN);
        assert_eq!(pauses[1], BACKOFF_MIN * 2);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*pauses.last().unwrap(), BACKOFF_MAX);
        f.recovered("t");
        assert_eq!(f.next("t", &e), BACKOFF_MIN);
    }

    #[test]
    fn only_per_connection_errors_are_retried_at_once() {
        assert!(is_connection_error(
            &io::ErrorKind::ConnectionAborted.into()
        ));
        assert!(!is_connection_error(&io::Error::from_raw_os_error(24)));
        assert!(!is_connection_error(&io::Error::from_raw_os_error(23)));
    }

    /// Past the limit, connections wait in the backlog and are taken as
    /// soon as a slot frees; stopping returns at once.
    #[tokio::test]
    async fn at_most_max_connections_are_served_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = Acceptor::new(listener, "test", 2);
        let open = acceptor.open();
        let (release, released) = tokio::sync::watch::channel(false);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = served.clone();
        let task = tokio::spawn(acceptor.run(
            async {
                let _ = stop_rx.await;
            },
            move |_tcp, _peer| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut released = released.clone();
                async move {
                    let _ = released.wait_for(|r| *r).await;
                }
            },
        ));
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while open.count() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 2);
        release.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while served.load(std::sync::atomic::Ordering::SeqCst) < 4 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the waiting connections are served once slots free");
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), open.closed())
            .await
            .unwrap();
    }
}
