//! A plain HTTP service (HTTP/1.1 or h2c) on a loopback port 0, in the
//! caller's Tokio runtime: the local service behind a sidecar.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::LOOPBACK_ANY_PORT;

/// A response with a whole body.
pub type Reply = hyper::Response<Full<Bytes>>;

/// Serves `handler` on 127.0.0.1, a port the kernel picks (returned), on
/// tasks of the current runtime, until the runtime stops.
pub async fn serve<F, Fut>(handler: F) -> std::io::Result<SocketAddr>
where
    F: Fn(hyper::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(LOOPBACK_ANY_PORT).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve_on(listener, handler));
    Ok(addr)
}

/// Serves `handler` on `listener` (bound in a network namespace, say)
/// until the runtime stops, each connection on its own task.
pub async fn serve_on<F, Fut>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(hyper::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let reply = handler(req);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
