//! Transparent mode, phase 1, against the real kernel: `moat redirect`
//! installs, replaces, prints and removes its nftables table; redirected
//! connections report their original destination (IPv4 and IPv6), moat's
//! own UID is never redirected; and a server pod whose app listens on
//! `[::]:8080` is reachable from a peer only over mutual TLS through moat,
//! with nothing but TLS on the wire, while an outsider's plaintext never
//! reaches the app.
//!
//! Root and network namespaces are required (tests/netns_support); the
//! rules are inspected with `nft` (apt-get install nftables), which moat
//! itself does not use. Under `MOAT_TEST_REQUIRE_ALL=1` a test that cannot
//! run fails.

use crate::support;
use crate::support::netns as netns_support;
use crate::support::proxy as proxy_support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use netns_support::*;
use proxy_support::{CertFiles, file_identity, foreign_cert, issue, write};
use support::{Running, TestCa, moat_bin, path_str};

const CLIENT: &str = "spiffe://example.org/ns/shop/sa/web";
const SERVER: &str = "spiffe://example.org/ns/shop/sa/billing";

/// The pods, or `None` after saying why the test cannot run.
pub(crate) fn pods(tools: &[(&str, &[&str], &str)]) -> Option<Pods> {
    if let Some(why) = unavailable() {
        skip(&why);
        return None;
    }
    for (program, args, package) in tools {
        if let Some(why) = missing_tool(program, args, package) {
            skip(&why);
            return None;
        }
    }
    match Pods::create() {
        Ok(p) => Some(p),
        Err(e) => {
            skip(&format!("cannot make network namespaces: {e}"));
            None
        }
    }
}

/// `moat ARGS` inside `ns`, as root unless `user`.
pub(crate) fn moat_in(ns: &str, user: Option<u32>, args: &[&str]) -> Output {
    let mut cmd = netns_command_as(ns, moat_bin(), user);
    cmd.args(args).output().expect("run moat")
}

pub(crate) fn moat_ok_in(ns: &str, args: &[&str]) -> String {
    let out = moat_in(ns, None, args);
    assert!(
        out.status.success(),
        "moat {args:?} in {ns}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub(crate) fn nft(ns: &str, args: &[&str]) -> String {
    let out = netns_command(ns, "nft").args(args).output().expect("nft");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The `table inet moat { ... }` part of a dry run.
fn table_part(dry_run: &str) -> &str {
    let at = dry_run
        .find("table inet moat {")
        .expect("a table in the dry run");
    &dry_run[at..]
}

#[test]
fn redirect_rules_apply_once_replace_print_and_clean_up() {
    let Some(pods) = pods(&[("nft", &["--version"], "nftables")]) else {
        return;
    };
    let ns = &pods.server.ns;
    let dir = tempfile::tempdir().unwrap();
    // Someone else's table, which moat must never touch.
    let other = write(
        dir.path(),
        "other.nft",
        "table inet other {\n\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t\ttcp dport 22 accept\n\t}\n}\n",
    );
    nft(ns, &["-f", path_str(&other)]);
    let before = nft(ns, &["list", "ruleset"]);
    let config = write(
        dir.path(),
        "proxy.toml",
        "[admin]\nlisten = \"0.0.0.0:9901\"\n\n[[inbound]]\nname = \"app\"\nlisten = \"0.0.0.0:15443\"\nforward = \"127.0.0.1:8080\"\n\n[redirect]\nskip_inbound_ports = [22]\nskip_outbound_cidrs = [\"10.96.0.0/12\", \"fd00:10:96::/112\"]\nskip_outbound_ports = [53]\n",
    );
    let cfg = path_str(&config);

    // --dry-run prints, changes nothing, and nft accepts what it prints.
    let dry = moat_ok_in(ns, &["redirect", "--config", cfg, "--dry-run"]);
    assert_eq!(
        nft(ns, &["list", "ruleset"]),
        before,
        "dry run changed nothing"
    );
    let dry_file = write(dir.path(), "dry.nft", &dry);
    nft(ns, &["-c", "-f", path_str(&dry_file)]);
    for rule in [
        "tcp dport 9901 return",
        "tcp dport 15443 return",
        "tcp dport 22 return",
        "meta l4proto tcp redirect to :15006",
        "meta skuid 65532 return",
        "ip daddr 10.96.0.0/12 return",
        "ip6 daddr fd00:10:96::/112 return",
        "meta l4proto tcp redirect to :15001",
    ] {
        assert!(dry.contains(rule), "{rule} in\n{dry}");
    }

    // Applied: the kernel holds exactly what the dry run printed.
    moat_ok_in(ns, &["redirect", "--config", cfg]);
    let applied = nft(ns, &["list", "ruleset"]);
    assert_eq!(
        nft(ns, &["list", "table", "inet", "moat"]),
        table_part(&dry)
    );
    assert!(applied.contains("table inet other"), "{applied}");

    // Twice: the same ruleset, one moat table.
    moat_ok_in(ns, &["redirect", "--config", cfg]);
    let again = nft(ns, &["list", "ruleset"]);
    assert_eq!(again, applied, "applying twice changes nothing");
    assert_eq!(again.matches("table inet moat").count(), 1);

    // Flags override the file, and the table is replaced, not added to.
    moat_ok_in(
        ns,
        &[
            "redirect",
            "--config",
            cfg,
            "--inbound-ports",
            "8080",
            "--skip-inbound-ports",
            "",
            "--no-outbound",
        ],
    );
    let replaced = nft(ns, &["list", "table", "inet", "moat"]);
    assert!(
        replaced.contains("tcp dport 8080 redirect to :15006"),
        "{replaced}"
    );
    assert!(
        !replaced.contains("chain output") && !replaced.contains("9901"),
        "{replaced}"
    );

    // Without CAP_NET_ADMIN: refused with the reason, nothing changed.
    let denied = moat_in(ns, Some(MOAT_UID), &["redirect", "--config", cfg]);
    assert_eq!(denied.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("needs CAP_NET_ADMIN"), "{stderr}");
    assert_eq!(nft(ns, &["list", "table", "inet", "moat"]), replaced);

    // Configuration mistakes are exit 64, naming the file and field.
    let bad = write(
        dir.path(),
        "bad.toml",
        "[redirect]\ninbound_ports = [8080]\nskip_inbound_port = [22]\n",
    );
    let out = moat_in(ns, None, &["redirect", "--config", path_str(&bad)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("bad.toml:3:1") && stderr.contains("skip_inbound_port"),
        "{stderr}"
    );
    let out = moat_in(
        ns,
        None,
        &[
            "redirect",
            "--config",
            cfg,
            "--inbound-ports",
            "9901",
            "--skip-inbound-ports",
            "",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("the admin port"), "{stderr}");

    let none = write(
        dir.path(),
        "none.toml",
        "[admin]\nlisten = \"127.0.0.1:9901\"\n",
    );
    let out = moat_in(ns, None, &["redirect", "--config", path_str(&none)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("none.toml: no [redirect] section"),
        "{stderr}"
    );
    assert_eq!(nft(ns, &["list", "table", "inet", "moat"]), replaced);

    // --cleanup leaves the other table alone, and can run again.
    let printed = moat_ok_in(ns, &["redirect", "--cleanup", "--dry-run"]);
    assert_eq!(printed, "table inet moat\ndelete table inet moat\n");
    let cleanup = || {
        let out = moat_in(ns, None, &["redirect", "--cleanup"]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = cleanup();
    assert!(said.contains("redirect rules removed"), "{said}");
    assert_eq!(
        nft(ns, &["list", "ruleset"]),
        before,
        "only moat's table went"
    );
    // Again: nothing to remove, and it says so (still success).
    let said = cleanup();
    assert!(
        said.contains("no table inet moat to remove") && !said.contains("rules removed"),
        "{said}"
    );
    assert_eq!(nft(ns, &["list", "ruleset"]), before);
}

#[test]
fn redirect_needs_only_cap_net_admin_not_root() {
    let Some(pods) = pods(&[
        ("nft", &["--version"], "nftables"),
        ("setpriv", &["--version"], "util-linux"),
    ]) else {
        return;
    };
    let ns = &pods.client.ns;
    let uid = MOAT_UID.to_string();
    let out = netns_command(ns, "setpriv")
        .args([
            "--reuid",
            &uid,
            "--regid",
            &uid,
            "--clear-groups",
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            "--bounding-set=-all,+net_admin",
        ])
        .arg(moat_bin())
        .args(["redirect", "--inbound-ports", "8080"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = nft(ns, &["list", "table", "inet", "moat"]);
    assert!(
        table.contains("tcp dport 8080 redirect to :15006"),
        "{table}"
    );
}

/// Connects from inside `ns` (as root, on a thread there) and says hello.
fn connect_from(ns: &str, to: SocketAddr) {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect {to}: {e}"));
        s.write_all(b"hello").unwrap();
        // Held briefly so the listener reads the bytes before the close.
        std::thread::sleep(Duration::from_millis(50));
    });
}

#[test]
fn redirected_connections_report_their_original_destination_v4_and_v6() {
    let Some(pods) = pods(&[("curl", &["--version"], "curl")]) else {
        return;
    };
    let (client, outsider) = (&pods.client, &pods.outsider);
    let apply = |extra: &[&str]| {
        let mut args = vec!["redirect", "--inbound-ports", "8080"];
        args.extend(extra);
        moat_ok_in(&client.ns, &args);
    };
    apply(&[]);
    // Stand-ins for moat's transparent listeners in the client pod, and a
    // server in the outsider's.
    let inbound = Recorder::start(&client.ns, &["[::]:15006".parse().unwrap()]);
    let outbound = Recorder::start(
        &client.ns,
        &[
            "127.0.0.1:15001".parse().unwrap(),
            "[::1]:15001".parse().unwrap(),
        ],
    );
    let remote = Recorder::start(&outsider.ns, &["[::]:9999".parse().unwrap()]);
    let at = |ip: std::net::IpAddr, port| SocketAddr::new(ip, port);

    // Inbound: to the app's port, into the inbound listener, original intact.
    for ip in [client.ip4.into(), client.ip6.into()] {
        connect_from(&outsider.ns, at(ip, 8080));
        let a = inbound.wait_for(&format!("to {ip}:8080"), |a| a.original == Ok(at(ip, 8080)));
        assert_eq!(a.first_bytes, b"hello");
        assert_eq!(a.peer.ip().to_canonical(), outsider_ip(outsider, ip));
    }
    // Outbound as root: into the outbound listener on loopback, original intact.
    for ip in [outsider.ip4.into(), outsider.ip6.into()] {
        connect_from(&client.ns, at(ip, 9999));
        let a = outbound.wait_for(&format!("to {ip}:9999"), |a| a.original == Ok(at(ip, 9999)));
        assert!(a.local.ip().is_loopback(), "{a:?}");
    }
    assert!(remote.accepted().is_empty(), "{:?}", remote.accepted());

    // Outbound as moat's UID: never redirected, straight to the remote.
    for ip in [format!("{}", outsider.ip4), format!("[{}]", outsider.ip6)] {
        let out = netns_command_as(&client.ns, "curl", Some(MOAT_UID))
            .args(["-s", "--max-time", "3", &format!("http://{ip}:9999/moat")])
            .output()
            .unwrap();
        let _ = out; // the remote answers nothing; what matters is where it went
        remote.wait_for(&format!("from moat's UID to {ip}"), |a| {
            a.first_bytes.starts_with(b"GET /moat") && a.local.to_string().contains(&ip)
        });
    }
    assert_eq!(
        outbound.accepted().len(),
        2,
        "moat's UID was not redirected"
    );

    // Skipped destinations go straight out, by CIDR and by port.
    apply(&[
        "--skip-outbound-cidrs",
        &format!("{}/32,{}", outsider.ip4, outsider.ip6),
    ]);
    for ip in [outsider.ip4.into(), outsider.ip6.into()] {
        connect_from(&client.ns, at(ip, 9999));
        remote.wait_for(&format!("skipped CIDR {ip}"), |a| {
            a.local.ip().to_canonical() == ip && a.first_bytes == b"hello"
        });
    }
    let before = remote.accepted().len();
    apply(&["--skip-outbound-ports", "9999"]);
    connect_from(&client.ns, at(outsider.ip4.into(), 9999));
    proxy_support::eventually(
        Duration::from_secs(10),
        "skipped port reaches the remote",
        || remote.accepted().len() > before,
    );
    assert_eq!(outbound.accepted().len(), 2);

    // Loopback stays loopback: the outbound listener sees no original
    // destination but its own.
    connect_from(&client.ns, "127.0.0.1:15001".parse().unwrap());
    outbound.wait_for("direct to loopback", |a| {
        a.original == Ok("127.0.0.1:15001".parse().unwrap())
    });
}

fn outsider_ip(outsider: &Pod, dst: std::net::IpAddr) -> std::net::IpAddr {
    if dst.is_ipv4() {
        outsider.ip4.into()
    } else {
        outsider.ip6.into()
    }
}

/// The server pod's app: HTTP/1.1 on `[::]:8080` (every address, both
/// families), answering with the headers it got and logging each request
/// (JSON on stderr, for [`Running`]).
pub(crate) const APP: &str = r#"
import http.server, json, socket, socketserver, sys
class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"client": self.client_address[0], "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print(json.dumps({"message": "request", "client": self.client_address[0], "path": self.path}),
              file=sys.stderr, flush=True)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "app", 8080
srv = Server(("::", 8080), App)
print(json.dumps({"message": "ready"}), file=sys.stderr, flush=True)
srv.serve_forever()
"#;

/// curl inside `ns` (as root): the status (0 when no HTTP answer) and body.
pub(crate) fn curl_in(ns: &str, args: &[&str]) -> (u16, String) {
    let out = netns_command(ns, "curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

pub(crate) fn sidecar_config(
    dir: &Path,
    name: &str,
    files: &CertFiles,
    bundle: &Path,
    rest: &str,
) -> String {
    for f in [&files.cert, &files.key] {
        give_to_moat(f);
    }
    let path = write(
        dir,
        name,
        &format!(
            "{}\n[admin]\nlisten = \"127.0.0.1:9901\"\n\n{rest}",
            file_identity(files, bundle)
        ),
    );
    path_str(&path).to_owned()
}

#[test]
fn transparent_inbound_serves_the_app_port_over_mtls_only() {
    let Some(pods) = pods(&[
        ("curl", &["--version"], "curl"),
        ("python3", &["--version"], "python3"),
    ]) else {
        return;
    };
    let (client, server, outsider) = (&pods.client, &pods.server, &pods.outsider);
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let dir = ca.dir.path();
    give_to_moat(dir);
    let bundle = ca.bundle_file();

    // The server pod: the app on every address, port 8080; its sidecar
    // (as UID 65532) with the app's port as the inbound target; redirect
    // rules from the same file.
    let mut app = {
        let mut cmd = netns_command(&server.ns, "python3");
        cmd.args(["-u", "-c", APP]);
        Running::from_command(cmd)
    };
    app.wait_for_log(Duration::from_secs(20), |v| v["message"] == "ready");
    let server_cfg = sidecar_config(
        dir,
        "server.toml",
        &issue(&ca, SERVER, "1h", "server"),
        &bundle,
        &format!(
            "[[inbound]]\nname = \"app\"\nlisten = \"0.0.0.0:15443\"\nforward = \"127.0.0.1:8080\"\nallow_peers = [\"{CLIENT}\"]\n\n[redirect]\n"
        ),
    );
    moat_ok_in(&server.ns, &["redirect", "--config", &server_cfg]);
    let mut server_moat = Running::from_command({
        let mut cmd = netns_command_as(&server.ns, moat_bin(), Some(MOAT_UID));
        cmd.args(["proxy", "--config", &server_cfg]);
        cmd
    });
    let bound = server_moat.listening_addr("transparent-inbound");
    assert_eq!(bound.port(), 15006);

    // The client pod: its app (curl, as root) uses explicit outbound
    // listeners for now (transparent outbound is phase 2); its sidecar runs
    // as UID 65532 under outbound redirect rules, so its connections to the
    // server are exempt by UID, or they would fail.
    let client_cfg = sidecar_config(
        dir,
        "client.toml",
        &issue(&ca, CLIENT, "1h", "client"),
        &bundle,
        &format!(
            "[[outbound]]\nname = \"v4\"\nlisten = \"127.0.0.1:18080\"\nupstream = \"{}:8080\"\npeer = \"{SERVER}\"\n\n\
             [[outbound]]\nname = \"v6\"\nlisten = \"127.0.0.1:18086\"\nupstream = \"[{}]:8080\"\npeer = \"{SERVER}\"\n\n\
             [[outbound]]\nname = \"explicit\"\nlisten = \"127.0.0.1:18443\"\nupstream = \"{}:15443\"\npeer = \"{SERVER}\"\n\n\
             [redirect]\ninbound_ports = []\n",
            server.ip4, server.ip6, server.ip4
        ),
    );
    moat_ok_in(&client.ns, &["redirect", "--config", &client_cfg]);
    let mut client_moat = Running::from_command({
        let mut cmd = netns_command_as(&client.ns, moat_bin(), Some(MOAT_UID));
        cmd.args(["proxy", "--config", &client_cfg]);
        cmd
    });
    client_moat.listening_addr("explicit");

    // A peer calls the app's own port, v4 and v6: over mutual TLS, the app
    // sees the verified peer ID. Only TLS crosses the server's veth.
    let capture = Capture::start(&pods.hub, &server.veth);
    for port in [18080, 18086] {
        let (status, body) = curl_in(&client.ns, &[&format!("http://127.0.0.1:{port}/hello")]);
        assert_eq!(status, 200, "{body}");
        let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["headers"]["x-moat-peer-id"], CLIENT, "{body}");
        assert_eq!(seen["path"], "/hello");
    }
    // Explicit mode still works beside it: moat's own port is not redirected.
    let (status, _) = curl_in(&client.ns, &["http://127.0.0.1:18443/explicit"]);
    assert_eq!(status, 200);

    // The outsider: plaintext to the app's port, v4 and v6, gets no HTTP
    // answer; a certificate from another CA is refused in the handshake; a
    // port no [[inbound]] serves is closed.
    let foreign = foreign_cert(dir, CLIENT, "foreign");
    for host in [server.ip4.to_string(), format!("[{}]", server.ip6)] {
        let (status, _) = curl_in(&outsider.ns, &[&format!("http://{host}:8080/plain")]);
        assert_eq!(status, 0, "plaintext to {host}:8080 got an HTTP answer");
        let (status, _) = curl_in(
            &outsider.ns,
            &[
                "-k",
                "--cert",
                path_str(&foreign.cert),
                "--key",
                path_str(&foreign.key),
                &format!("https://{host}:8080/foreign"),
            ],
        );
        assert_eq!(
            status, 0,
            "another CA's certificate to {host}:8080 got an answer"
        );
    }
    // On the wire: the peer's connections to the app's port carry TLS
    // records and nothing else, both ways; the outsider's plaintext did
    // cross the veth (so the capture would have seen plaintext), and
    // stopped at moat.
    let frames = capture.stop();
    let streams = tcp_streams(&frames);
    let from = |flow: &(SocketAddr, SocketAddr), ip: std::net::IpAddr| {
        (flow.0.ip() == ip || flow.1.ip() == ip) && (flow.0.port() == 8080 || flow.1.port() == 8080)
    };
    let peer: Vec<_> = streams
        .iter()
        .filter(|(f, _)| from(f, client.ip4.into()) || from(f, client.ip6.into()))
        .collect();
    assert!(
        peer.len() >= 4,
        "both directions of a v4 and a v6 connection: {:?}",
        streams.keys()
    );
    for ((src, dst), bytes) in &peer {
        let records = tls_records(bytes).unwrap_or_else(|e| panic!("{src} -> {dst}: {e}"));
        assert!(records > 0, "{src} -> {dst}: no TLS records");
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains("/hello") && !text.contains("HTTP/1.1"),
            "{src} -> {dst} carries plaintext HTTP"
        );
        if dst.port() == 8080 {
            assert_eq!(bytes[0], 0x16, "a handshake opens {src} -> {dst}");
        }
    }
    let plain: Vec<_> = streams
        .iter()
        .filter(|((_, dst), bytes)| {
            dst.port() == 8080 && String::from_utf8_lossy(bytes).contains("GET /plain")
        })
        .collect();
    assert_eq!(
        plain.len(),
        2,
        "the outsider's plaintext, v4 and v6, seen on the wire"
    );
    for (flow, bytes) in plain {
        assert!(tls_records(bytes).is_err(), "{flow:?} is not TLS");
    }
    let (status, _) = curl_in(&outsider.ns, &[&format!("http://{}:8081/", server.ip4)]);
    assert_eq!(status, 0);
    server_moat.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "handshake failed"
            && v["listener"] == "app"
            && v["peer_addr"]
                .as_str()
                .is_some_and(|a| a.contains(&outsider.ip4.to_string()))
    });
    server_moat.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "refused: no [[inbound]] forwards to this port"
            && v["original_dst"]
                .as_str()
                .is_some_and(|a| a.ends_with(":8081"))
    });

    // The app only ever saw moat, over loopback. (It logs a request after
    // answering it: wait for the lines.)
    proxy_support::wait_for_logs(&app, "request", 3);
    let requests: Vec<_> = app
        .json_logs()
        .into_iter()
        .filter(|v| v["message"] == "request")
        .collect();
    assert_eq!(requests.len(), 3, "{requests:?}");
    for r in &requests {
        let from = r["client"].as_str().unwrap();
        assert!(
            from == "::ffff:127.0.0.1" || from == "127.0.0.1",
            "the app saw {from}"
        );
        assert_ne!(r["path"], "/plain");
    }
    drop(client_moat);
    drop(server_moat);
    drop(app);
}

fn unit_text() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/systemd/moat-redirect.service"),
    )
    .unwrap()
}

/// The VM unit: a oneshot before the proxy, removed on stop, with
/// CAP_NET_ADMIN alone and netlink as its only socket family, rated "OK"
/// by `systemd-analyze security`; and the system calls `moat redirect`
/// makes (traced applying and removing rules) pass its filter.
#[test]
fn systemd_unit_runs_redirect_before_the_proxy_with_only_cap_net_admin() {
    let text = unit_text();
    let settings: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for want in [
        "Type=oneshot",
        "RemainAfterExit=yes",
        "Before=moat-proxy.service network-pre.target",
        "ExecStart=/usr/local/bin/moat --log-format json redirect --config /etc/moat/proxy.toml",
        "ExecStop=/usr/local/bin/moat --log-format json redirect --cleanup",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_NETLINK AF_UNIX",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
    ] {
        assert!(settings.contains(&want), "missing {want:?}");
    }
    for never in ["PrivateUsers=yes", "PrivateNetwork=yes"] {
        assert!(
            !settings.contains(&never),
            "{never} would keep the rules from the host"
        );
    }
    if let Some(why) = missing_tool("systemd-analyze", &["--version"], "systemd") {
        return skip(&why);
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("moat-redirect.service");
    std::fs::write(
        &unit,
        text.replace("/usr/local/bin/moat", env!("CARGO_BIN_EXE_moat")),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.lines().any(|l| l.contains("moat-redirect.service")),
        "systemd-analyze verify:\n{stderr}"
    );
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let level: f64 = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .and_then(|l| l.rsplit_once(": "))
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level:\n{report}"));
    assert!(level <= 2.0, "exposure {level}:\n{report}");

    // What `moat redirect` does, under strace, against the unit's filter.
    let Some(pods) = pods(&[("strace", &["-V"], "strace")]) else {
        return;
    };
    // A group by name: /etc/group is read too.
    let config = write(
        dir.path(),
        "proxy.toml",
        "[redirect]\ninbound_ports = [8080]\nproxy_gid = \"nogroup\"\n",
    );
    let mut calls = Vec::new();
    for (n, args) in [
        vec!["redirect", "--config", path_str(&config)],
        vec!["redirect", "--cleanup"],
    ]
    .into_iter()
    .enumerate()
    {
        let trace = dir.path().join(format!("{n}.trace"));
        let out = netns_command(&pods.server.ns, "strace")
            .args(["-f", "-qq", "-o", path_str(&trace)])
            .arg(moat_bin())
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        calls.extend(traced_calls(&trace));
    }
    let mut seen = Vec::new();
    let allowed = syscall_group("@system-service", &mut seen);
    let mut seen = Vec::new();
    let mut denied = syscall_group("@privileged", &mut seen);
    denied.extend(syscall_group("@resources", &mut seen));
    assert!(calls.iter().any(|c| c == "sendto"), "{calls:?}");
    let refused: Vec<&String> = calls
        .iter()
        .filter(|c| !allowed.contains(c) || denied.contains(c))
        .collect();
    assert!(
        refused.is_empty(),
        "the unit's SystemCallFilter refuses {refused:?}"
    );
}

/// The system calls in `systemd-analyze syscall-filter GROUP`, groups
/// expanded. (As in tests/systemd.rs.)
fn syscall_group(group: &str, seen: &mut Vec<String>) -> Vec<String> {
    let out = std::process::Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", group])
        .output()
        .expect("run systemd-analyze syscall-filter");
    let mut calls = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let item = line.trim();
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        if item.starts_with('@') {
            if !seen.iter().any(|s| s == item) {
                seen.push(item.to_owned());
                calls.extend(syscall_group(item, seen));
            }
        } else {
            calls.push(item.to_owned());
        }
    }
    calls
}

/// Every system call name in an `strace -f` log. (As in tests/systemd.rs.)
fn traced_calls(trace: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(trace).unwrap();
    let mut calls: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let rest = l.split_once(' ')?.1.trim_start();
            let name = rest.split_once('(')?.0;
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                .then(|| name.to_owned())
        })
        .filter(|n| !n.is_empty())
        .collect();
    calls.sort();
    calls.dedup();
    calls
}
