//! Listeners: binding, what serves a connection ([`Serve`]), and the
//! bounded accept loop (the one loop of [`moat_ca::listen`], with its
//! back-off when `accept()` fails).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::drain;

/// Binds a listener and returns it with the address it got (port 0 picks one).
pub(crate) async fn bind(
    name: &str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), crate::Error> {
    let err = |source| crate::Error::Bind {
        name: name.to_owned(),
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// What serves the connections a [`Listener`] accepts.
pub trait Serve: Send + Sync + 'static {
    /// Serves one accepted connection to its end.
    fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        addr: SocketAddr,
        drain: drain::Watch,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// A bound listener and what serves its connections.
pub struct Listener<S> {
    listener: TcpListener,
    name: Arc<str>,
    max_connections: usize,
    shared: Arc<S>,
}

impl<S: Serve> Listener<S> {
    /// Pairs a listener bound at `addr` with what serves it (at most
    /// `max_connections` at once), and says so in the log.
    pub fn new(
        listener: TcpListener,
        addr: SocketAddr,
        name: Arc<str>,
        max_connections: usize,
        shared: S,
    ) -> Self {
        tracing::info!(listener = %name, addr = %addr, "listening");
        Self {
            listener,
            name,
            max_connections,
            shared: Arc::new(shared),
        }
    }

    /// What serves this listener's connections (the transparent listener
    /// hands redirected connections to it).
    pub fn shared(&self) -> Arc<S> {
        self.shared.clone()
    }

    /// Serves until the drain starts; open connections finish on their own.
    pub async fn serve(self, drain: drain::Watch) {
        let shared = self.shared;
        accept_loop(
            self.listener,
            self.name,
            self.max_connections,
            drain,
            move |tcp, addr, drain| shared.clone().connection(tcp, addr, drain),
        )
        .await;
    }
}

/// Accepts connections until the drain starts, never holding more than
/// `max` at once; each is handled on its own task with a drain watch.
/// Failing `accept()` calls (out of file descriptors) back off instead of
/// spinning: see [`moat_ca::listen`].
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: Arc<str>,
    max: usize,
    drain: drain::Watch,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, drain::Watch) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let stop = drain.clone();
    moat_ca::listen::Acceptor::new(listener, name, max)
        .run(async move { stop.signaled().await }, move |tcp, peer| {
            handle(tcp, peer, drain.clone())
        })
        .await;
}
