//! The greeter service: a plain tonic gRPC server speaking h2c (HTTP/2
//! without TLS) on loopback, behind a moat sidecar that terminates mutual
//! TLS, checks route policy, and tells it who called in `x-moat-peer-id`.
//! Nothing in here knows about certificates.
//!
//! ```sh
//! cargo run --example grpc-server -- --listen 127.0.0.1:50051
//! ```
//!
//! See `examples/grpc/README.md` for the sidecars and the CA around it.

use std::net::SocketAddr;

use clap::Parser;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The messages and service code generated from `helloworld.proto`.
// Generated code, kept as tonic emits it: `pub` items and undocumented fields.
#[allow(unreachable_pub, missing_docs)]
pub mod hello_world {
    include!("helloworld.rs");
}

use hello_world::greeter_server::{Greeter, GreeterServer};
use hello_world::{HelloReply, HelloRequest};

/// Serve the greeter over h2c.
#[derive(Parser, Debug)]
struct Args {
    /// Where to listen: loopback, so only the sidecar reaches it.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
}

/// The greeter: says hello, and to whom the sidecar says it is talking.
#[derive(Debug, Default)]
pub(crate) struct MyGreeter;

#[tonic::async_trait]
impl Greeter for MyGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        // The inbound sidecar sets this from the verified client
        // certificate and drops any value the caller sent.
        let caller = request
            .metadata()
            .get("x-moat-peer-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("an unknown caller")
            .to_owned();
        let name = request.into_inner().name;
        Ok(Response::new(HelloReply {
            message: format!("Hello {name} (calling as {caller})"),
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!("greeter listening on {}", listener.local_addr()?);
    serve(listener).await?;
    Ok(())
}

/// Serves the greeter on `listener` until the process ends.
pub(crate) async fn serve(listener: TcpListener) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(GreeterServer::new(MyGreeter))
        .serve_with_incoming(TcpIncoming::from(listener))
        .await
}
