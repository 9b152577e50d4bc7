//! The greeter's client: a plain tonic gRPC client calling its own sidecar's
//! outbound listener over h2c on loopback. The sidecar opens mutual TLS to
//! the server's sidecar and refuses any peer that is not the greeter's
//! SPIFFE ID. Nothing in here knows about certificates.
//!
//! ```sh
//! cargo run --example grpc-client -- --sidecar http://127.0.0.1:15001 --name world
//! ```
//!
//! See `examples/grpc/README.md` for the sidecars and the CA around it.

use clap::Parser;

/// The messages and service code generated from `helloworld.proto`.
// Generated code, kept as tonic emits it: `pub` items and undocumented fields.
#[allow(unreachable_pub, missing_docs)]
pub mod hello_world {
    include!("helloworld.rs");
}

use hello_world::HelloRequest;
use hello_world::greeter_client::GreeterClient;

/// Call the greeter once, through the sidecar.
#[derive(Parser, Debug)]
struct Args {
    /// The client sidecar's outbound listener.
    #[arg(long, default_value = "http://127.0.0.1:15001")]
    sidecar: String,
    /// Who to greet.
    #[arg(long, default_value = "world")]
    name: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let message = say_hello(&args.sidecar, &args.name).await?;
    println!("{message}");
    Ok(())
}

/// One `SayHello` call through the sidecar at `sidecar`; the greeting, or
/// the error (a `tonic::Status` when the call got an answer that is not a
/// greeting, such as the server sidecar's 403 for a caller its policy does
/// not allow).
pub(crate) async fn say_hello(
    sidecar: &str,
    name: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut client = GreeterClient::connect(sidecar.to_owned()).await?;
    let reply = client
        .say_hello(HelloRequest {
            name: name.to_owned(),
        })
        .await?;
    Ok(reply.into_inner().message)
}
