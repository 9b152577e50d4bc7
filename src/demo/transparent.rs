//! `moat demo --transparent`: the same two services, each in its own network
//! namespace (a "pod") with its app on port 8080 (billing's on every
//! address, frontend's on loopback, where the demo calls it), its sidecar
//! running as UID 65532 with `[redirect]` and `[[destination]]`, and the
//! rules of `moat redirect` installed. frontend calls billing by billing's
//! plain address (`BILLING_URL=http://10.200.0.2:8080`), with no proxy
//! settings; the rules hand that connection to frontend's sidecar, which
//! opens mutual TLS to the same address, where billing's rules hand it to
//! billing's sidecar. A third namespace, the outsider, dials billing's app
//! port directly and is refused.
//!
//! Needs root (namespaces, nftables) and `ip` (iproute2); `moat redirect`
//! itself talks netlink, no `nft` needed. The namespaces, and with them
//! their rules, are deleted on exit, on Ctrl-C or SIGTERM, and after a kill
//! at the next start (`moat-demo-<pid>-*` of a dead pid).

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use moat_testkit::netns::{self, Host, Network};
use moat_testkit::{Ca, Process};
use tokio::signal::unix::{SignalKind, signal};

use super::{
    BILLING_ID, BILLING_POLICY, FRONTEND_ID, JSON_LOG, TRUST_DOMAIN, billing_service, demo_idp,
    foreign_identity, frontend_service, heading, moat, outcome, p, print_outcome, rogue_handshake,
    send,
};

/// moat's UID and GID in the image: the sidecars run as this, and the
/// rules exempt it, so their own connections are not redirected.
const PROXY_UID: u32 = 65532;
/// The port both apps listen on, on every address.
const APP_PORT: u16 = 8080;
/// Where a sidecar's admin listener is, inside its pod.
const ADMIN: &str = "127.0.0.1:9901";

/// Runs the demo, then deletes its namespaces (also when interrupted).
pub(super) async fn run(dir: &Path, dir_given: bool, keep_running: bool) -> Result<()> {
    // Registered before anything is made, so a Ctrl-C at any point below
    // ends here and the namespaces are deleted.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    if let Some(why) = netns::unavailable() {
        bail!("moat demo --transparent: {why}");
    }
    netns::sweep_stale("moat-demo-");
    let net = Network::create(
        &format!("moat-demo-{}", std::process::id()),
        &["frontend", "billing", "outsider"],
    )
    .context("make the demo's network namespaces")?;
    let result = tokio::select! {
        r = demo(dir, dir_given, &net, keep_running) => r,
        _ = interrupt.recv() => { println!("\ninterrupted"); Ok(()) }
        _ = terminate.recv() => { println!("\nterminated"); Ok(()) }
    };
    // The sidecars were killed when `demo` was dropped; the namespaces go
    // now, and their nftables tables with them.
    let names: Vec<&str> = net
        .hosts
        .iter()
        .map(|h| h.ns.as_str())
        .chain([net.hub.as_str()])
        .collect();
    let names = names.join(", ");
    drop(net);
    println!("removed the network namespaces {names} and their redirect rules");
    result
}

async fn demo(dir: &Path, dir_given: bool, net: &Network, keep_running: bool) -> Result<()> {
    let [frontend, billing, outsider] = [&net.hosts[0], &net.hosts[1], &net.hosts[2]];
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    println!(
        "moat demo --transparent: two pods in network namespaces, redirect rules, no proxy settings in the apps."
    );
    println!(
        "working directory: {} (logs in {})",
        dir.display(),
        logs.display()
    );
    // The sidecars run as moat's UID: they must reach the directory.
    let mode = std::fs::metadata(dir)?.permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))?;

    heading("1. Pods: one network namespace each, on one bridge");
    for (name, host) in [
        ("frontend", frontend),
        ("billing", billing),
        ("outsider", outsider),
    ] {
        println!("   {name:<9} {}  namespace {}", host.ip4, host.ns);
    }

    heading("2. Identities, issued offline by the demo CA (`moat ca issue`)");
    let ca_dir = dir.join("ca");
    let ca = if ca_dir.join("ca.db").exists() {
        Ca::open(&moat()?, &ca_dir)
    } else {
        Ca::init(&moat()?, &ca_dir, TRUST_DOMAIN)?
    };
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, ca.bundle()?)?;
    for (name, id) in [("frontend", FRONTEND_ID), ("billing", BILLING_ID)] {
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        ca.issue(id, "1h", &cert, &key)?;
        chown(&key, PROXY_UID)?;
        println!("   {name:<9} {id}");
    }

    heading("3. Apps on port 8080, sidecars as UID 65532, `moat redirect` in each pod");
    let (_, jwks) = demo_idp()?;
    std::fs::write(dir.join("idp-jwks.json"), jwks.to_string())?;
    std::fs::write(dir.join("billing-policy.toml"), BILLING_POLICY)?;
    serve_app(&billing.ns, Ipv4Addr::UNSPECIFIED, billing_service)?;
    let billing_url: Arc<str> = format!("http://{}:{APP_PORT}", billing.ip4).into();
    {
        let url = billing_url.clone();
        // On loopback: the demo calls it from inside its pod, and frontend's
        // rules redirect nothing inbound (it has no [[inbound]]).
        serve_app(&frontend.ns, Ipv4Addr::LOCALHOST, move |req| {
            frontend_service(req, url.clone(), None)
        })?;
    }
    let billing_config = sidecar_config(
        dir,
        "billing",
        &format!(
            r#"# Redirected connections to port {APP_PORT} are served by this listener:
# mutual TLS, then billing's route policy, then the app on loopback.
[[inbound]]
name     = "billing"
listen   = "127.0.0.1:15443"
forward  = "127.0.0.1:{APP_PORT}"
protocol = "http"
policy   = "{policy}"

[redirect]
inbound_ports = [{APP_PORT}]   # mode = "strict" (the default): mutual TLS only
"#,
            policy = dir.join("billing-policy.toml").display(),
        ),
    )?;
    let frontend_config = sidecar_config(
        dir,
        "frontend",
        &format!(
            r#"# frontend serves nobody outside its pod; everything it opens is redirected.
[redirect]
inbound_ports = []
unmatched     = "deny"

# frontend's app calls {billing_url}/: mutual TLS to that address, and it
# must be billing.
[[destination]]
name     = "billing"
ip       = "{billing_ip}"
port     = {APP_PORT}
peer     = "{BILLING_ID}"
protocol = "http1"
"#,
            billing_ip = billing.ip4,
        ),
    )?;
    for (name, host, config) in [
        ("billing", billing, &billing_config),
        ("frontend", frontend, &frontend_config),
    ] {
        redirect(host, config, &logs.join(format!("{name}-redirect.log")))?;
    }
    let mut billing_proxy = sidecar(billing, "billing", &billing_config, &logs)?;
    billing_proxy.listening_async("transparent-inbound").await?;
    let mut frontend_proxy = sidecar(frontend, "frontend", &frontend_config, &logs)?;
    frontend_proxy
        .listening_async("transparent-outbound")
        .await?;
    println!(
        "   billing   app http://0.0.0.0:{APP_PORT}; rules send arriving TCP to port {APP_PORT} to its sidecar (mutual TLS, route policy)"
    );
    println!(
        "   frontend  app http://127.0.0.1:{APP_PORT} with BILLING_URL={billing_url}; rules send what it opens to its sidecar"
    );
    println!(
        "   configs   {}/{{billing,frontend}}-proxy.toml",
        dir.display()
    );

    heading(&format!(
        "4. Requests: frontend's app calls {billing_url}/... (plain http, no proxy settings)"
    ));
    let local_frontend = SocketAddr::from((Ipv4Addr::LOCALHOST, APP_PORT));
    for (method, path) in [
        ("GET", "/invoices/42"),
        ("POST", "/invoices/42"),
        ("GET", "/export"),
    ] {
        let mark = billing_proxy.count();
        let (status, body) = in_pod(&frontend.ns, move || {
            send(local_frontend, method, path, None)
        })
        .await?;
        let outcome = outcome(status, body, &billing_proxy, mark).await?;
        print_outcome(method, path, "", &outcome);
    }

    heading(&format!(
        "5. The outsider dials billing's app port {} directly",
        SocketAddr::from((billing.ip4, APP_PORT))
    ));
    let target = SocketAddr::from((billing.ip4, APP_PORT));
    let plaintext = in_pod(&outsider.ns, move || plaintext_attempt(target)).await;
    println!("     {:<48} {plaintext}", "plaintext HTTP");
    let no_cert = in_pod(&outsider.ns, move || rogue_handshake(target, None)).await;
    println!("     {:<48} {no_cert}", "TLS with no certificate");
    let foreign = foreign_identity()?;
    let foreign = in_pod(&outsider.ns, move || rogue_handshake(target, Some(foreign))).await;
    println!(
        "     {:<48} {foreign}",
        "TLS with frontend's ID from another CA"
    );
    let metrics = in_pod(&billing.ns, || admin_get("/metrics")).await?;
    println!("   billing's sidecar counted each refusal:");
    for line in metrics.lines().filter(|l| {
        l.starts_with("moat_tls_handshake_failures_total") && l.contains("listener=\"billing\"")
    }) {
        println!("     {line}");
    }

    heading("Where to look");
    if !keep_running {
        println!(
            "   (the namespaces go when the demo ends; run `moat demo --transparent --keep-running` to try these)"
        );
    }
    println!(
        "   rules      ip netns exec {} nft list table inet moat",
        billing.ns
    );
    println!(
        "   admin      ip netns exec {} curl -s http://{ADMIN}/transparent",
        frontend.ns
    );
    let files = super::FilesShown::new(dir, dir_given, keep_running, " --transparent");
    if let Some(note) = &files.note {
        println!("   {note}");
    }
    println!("   logs       {}/logs/*.log", files.dir);

    if keep_running {
        println!();
        println!(
            "Everything keeps running; try: ip netns exec {} curl -s http://127.0.0.1:{APP_PORT}/invoices/7",
            frontend.ns
        );
        println!(
            "                          and: ip netns exec {} curl -s http://{target}/invoices/7   (Ctrl-C to stop)",
            outsider.ns
        );
        std::future::pending::<()>().await;
    }
    for proc in [&mut frontend_proxy, &mut billing_proxy] {
        let _ = proc.stop(Duration::from_secs(5)).await;
    }
    println!();
    println!(
        "demo finished: frontend reached billing by its plain address over mutual TLS; plaintext from outside never reached the app."
    );
    Ok(())
}

/// Writes `NAME-proxy.toml`: the identity from files, admin on
/// [`ADMIN`] (inside the pod), then `rest`.
fn sidecar_config(dir: &Path, name: &str, rest: &str) -> Result<std::path::PathBuf> {
    let config = dir.join(format!("{name}-proxy.toml"));
    std::fs::write(
        &config,
        format!(
            r#"# {name}'s sidecar, in {name}'s pod.
[identity]
cert   = "{cert}"
key    = "{key}"
bundle = "{bundle}"

[admin]
listen = "{ADMIN}"

{rest}"#,
            cert = dir.join(format!("{name}.crt")).display(),
            key = dir.join(format!("{name}.key")).display(),
            bundle = dir.join("bundle.pem").display(),
        ),
    )?;
    Ok(config)
}

/// `moat redirect --config CONFIG` in `host`'s namespace, as root: what
/// an init container does.
fn redirect(host: &Host, config: &Path, log: &Path) -> Result<()> {
    let mut cmd = moat()?.command(&[JSON_LOG, &["redirect", "--config", p(config)]].concat());
    netns::enter(&mut cmd, &host.ns, None);
    let out = cmd.output().context("run moat redirect")?;
    std::fs::write(log, &out.stderr)?;
    if !out.status.success() {
        bail!(
            "moat redirect in {} failed ({}): {}",
            host.ns,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `moat proxy --config CONFIG` in `host`'s namespace as moat's UID, its
/// log in `logs/NAME-sidecar.log`.
fn sidecar(host: &Host, name: &str, config: &Path, logs: &Path) -> Result<Process> {
    let mut cmd = moat()?.command(&[JSON_LOG, &["proxy", "--config", p(config)]].concat());
    netns::enter(&mut cmd, &host.ns, Some(PROXY_UID));
    let log = logs.join(format!("{name}-sidecar.log"));
    Process::start(&format!("{name}-sidecar"), cmd, Some(&log), false)
}

/// Serves `handler` on `ip:8080` inside `ns`, on a thread of its own (with
/// its own runtime, so the connections the app opens belong to `ns` too),
/// for the rest of the demo.
fn serve_app<F, Fut>(ns: &str, ip: Ipv4Addr, handler: F) -> Result<()>
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = moat_testkit::http::Reply> + Send + 'static,
{
    let (bound, ready) = std::sync::mpsc::channel();
    netns::spawn_in_netns(ns, move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => return drop(bound.send(Err(e))),
        };
        runtime.block_on(async move {
            match tokio::net::TcpListener::bind((ip, APP_PORT)).await {
                Ok(listener) => {
                    let _ = bound.send(Ok(()));
                    moat_testkit::http::serve_on(listener, handler).await;
                }
                Err(e) => drop(bound.send(Err(e))),
            }
        });
    })?;
    ready
        .recv()
        .context("the app thread ended")?
        .with_context(|| format!("app on {ip}:{APP_PORT} in {ns}"))
}

/// Runs the future `f` makes on a thread inside `ns`: every socket it
/// opens belongs to that namespace.
async fn in_pod<T, F, Fut>(ns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let ns = ns.to_owned();
    tokio::task::spawn_blocking(move || {
        netns::in_netns(&ns, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(f())
        })
    })
    .await
    .expect("the thread in the namespace")
}

/// GET `path` from the sidecar's admin listener (run inside its pod).
async fn admin_get(path: &'static str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(ADMIN).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await?;
    Ok(text)
}

/// A plaintext HTTP request straight to `addr`; how it was refused.
async fn plaintext_attempt(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /invoices/42 HTTP/1.1\r\nhost: billing\r\n\r\n")
            .await?;
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await?;
        Ok::<_, std::io::Error>(got)
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(got)) if got.starts_with(b"HTTP/") => {
            "ANSWERED by the app (this would be a bug)".into()
        }
        Ok(Ok(got)) if got.first() == Some(&0x15) => {
            "refused: a TLS alert, then closed; the app never saw it".into()
        }
        Ok(Ok(_)) => "refused: connection closed; the app never saw it".into(),
        Ok(Err(e)) => format!("refused: {e}"),
        Err(_) => "no answer within 10 s".into(),
    }
}

fn chown(path: &Path, id: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(id), Some(id))
        .with_context(|| format!("chown {}", path.display()))
}
