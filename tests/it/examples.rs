//! The examples in `examples/` work as their READMEs say.
//!
//! - `svid_server.rs` gets a certificate from a real `moat ca serve`, serves
//!   mutual TLS that `openssl s_client` verifies against the bundle and
//!   curl (with an SVID of its own) gets answers from, refuses callers
//!   without a certificate or outside `--allow-peer`, and renews: a later
//!   connection gets a new certificate, and not at once.
//! - `grpc/`: the greeter and its client (their code, in this process)
//!   behind two real sidecars started from the example's configuration
//!   files, a real gRPC call through them, a caller the policy does not name
//!   refused with `PERMISSION_DENIED`, and the policy tests.
//! - `vm/`: the proxy and CA configuration loads, the policies pass their
//!   tests, and the application units pass `systemd-analyze verify` beside
//!   `config/systemd/moat-proxy.service`.
//! - `kubernetes/`: `moat inject` takes `shop.yaml` without a warning and
//!   makes each pod transparent (the `moat-redirect` init container ahead of
//!   the sidecar), the output passes the Kubernetes schemas
//!   (`kubernetes-validate --strict`) and does not change when injected
//!   again, and so with `--explicit`; each embedded proxy configuration
//!   loads with its `[redirect]` and a `[[destination]]` per peer URL the
//!   app is given, `moat redirect --dry-run` prints its rules, and each
//!   policy passes its tests.
//!
//! The examples' files name fixed ports and paths for a person to run them;
//! the tests load them as they are and change only the addresses (to ports
//! the kernel picks) and the paths of the CA's bundle and tokens.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use serde_json::Value;

use support::proxy::{start_proxy, write};
use support::{Running, TestCa, moat, moat_bin, path_str, tool};

#[allow(dead_code)] // its `main`: the test calls `run`
#[path = "../../examples/svid_server.rs"]
mod svid_server;

#[allow(dead_code)] // its `main`: the test calls `serve`
#[path = "../../examples/grpc/server.rs"]
mod grpc_server;

#[allow(dead_code)] // its `main`: the test calls `say_hello`
#[path = "../../examples/grpc/client.rs"]
mod grpc_client;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Runs `future` on its own runtime in a thread, for as long as the test
/// process lives (the examples' servers run until their process ends).
fn run_in_background<F>(future: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future);
    });
}

/// A loopback listener on a port the kernel picks, for a runtime to adopt.
fn loopback_listener() -> (std::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

// ---- svid-server ----

/// curl with a client certificate against the svid-server: (exit success, body).
fn curl_svid_server(addr: SocketAddr, cert: Option<(&Path, &Path)>) -> (bool, String) {
    let url = format!("https://{addr}/hello");
    // -k: an SVID carries no DNS name for curl to check; openssl checks
    // the chain against the bundle in the test below.
    let mut args = vec!["-sS", "-k", "--max-time", "10", "--fail-with-body"];
    if let Some((crt, key)) = cert {
        args.extend(["--cert", path_str(crt), "--key", path_str(key)]);
    }
    args.push(&url);
    let out = tool("curl", &args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The serial in the svid-server's answer.
fn served_serial(body: &str) -> String {
    body.rsplit_once("certificate serial ")
        .and_then(|(_, rest)| rest.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("no serial in {body:?}"))
        .to_owned()
}

#[test]
fn svid_server_example_serves_mutual_tls_with_a_ca_certificate_and_renews_it() {
    if !support::require("curl") || !support::require("openssl") {
        return;
    }
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let dir = ca.dir.path();
    let token = write(
        dir,
        "server.token",
        &ca.token("spiffe://example.org/svid-server"),
    );
    let bundle = ca.bundle_file();
    let (client_crt, client_key) = ca.issue_files("spiffe://example.org/client", "1h", "client");
    let (other_crt, other_key) = ca.issue_files("spiffe://example.org/other", "1h", "other");

    let (listener, addr) = loopback_listener();
    let (url, listen) = (ca.url(), addr.to_string());
    let args = svid_server::Args::parse_from([
        "svid-server",
        "--ca-url",
        url.as_str(),
        "--bundle",
        path_str(&bundle),
        "--token-file",
        path_str(&token),
        "--listen",
        listen.as_str(),
        // Short, so that the test sees a renewal: due 4-6 s after issuance.
        "--ttl",
        "10s",
        "--allow-peer",
        "spiffe://example.org/client",
    ]);
    run_in_background(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        if let Err(e) = svid_server::run(args, listener).await {
            panic!("svid-server stopped: {e:#}");
        }
    });

    // The listener is bound already; the first connection waits in its
    // backlog until the certificate is issued.
    let (ok, first) = curl_svid_server(addr, Some((&client_crt, &client_key)));
    let first_at = Instant::now();
    assert!(ok, "{first}");
    assert!(
        first.starts_with("hello spiffe://example.org/client: GET /hello answered by spiffe://example.org/svid-server"),
        "{first}"
    );

    // The chain verifies against the CA's bundle; the certificate served is
    // the one that answered.
    let out = tool(
        "openssl",
        &[
            "s_client",
            "-connect",
            &addr.to_string(),
            "-CAfile",
            path_str(&bundle),
            "-cert",
            path_str(&client_crt),
            "-key",
            path_str(&client_key),
            "-verify_return_error",
            "-showcerts",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "openssl s_client: {text}");
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    let served = moat_ca::client::Svid::from_pem(&out.stdout).expect("the served chain");
    assert_eq!(served.id.as_str(), "spiffe://example.org/svid-server");
    let first_serial = served_serial(&first);
    assert_eq!(served.serial, first_serial);

    // No client certificate: no handshake. Another workload: 403.
    let (ok, body) = curl_svid_server(addr, None);
    assert!(!ok, "served without a client certificate: {body}");
    let (ok, body) = curl_svid_server(addr, Some((&other_crt, &other_key)));
    assert!(!ok && body.contains("may not call"), "{body}");

    // Renewal: a new serial on a new connection.
    loop {
        let (ok, body) = curl_svid_server(addr, Some((&client_crt, &client_key)));
        assert!(ok, "{body}");
        if served_serial(&body) != first_serial {
            break;
        }
        assert!(
            first_at.elapsed() < Duration::from_secs(30),
            "no renewal within 30 s of a 10 s certificate"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Not before 40 % of the lifetime ahead at issuance had passed, so at
    // most 6 s before the old certificate's expiry. (Counting half the
    // lifetime from not_before, which the CA backdates by a minute, would
    // have renewed at once, ten seconds before it.)
    let seen = SystemTime::now();
    let earliest = served.not_after - Duration::from_secs(6);
    assert!(
        seen >= earliest,
        "renewed {:?} before the earliest renewal time",
        earliest.duration_since(seen).unwrap_or_default()
    );
}

// ---- grpc ----

/// Reads an example's proxy configuration as TOML, to change its addresses.
fn example_config(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path).unwrap();
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Points `[identity]` at the test CA with a fresh token for `id`, and
/// `[admin]` at a free port.
fn use_test_ca(config: &mut toml::Table, ca: &TestCa, id: &str, name: &str) {
    let token = write(ca.dir.path(), &format!("{name}.token"), &ca.token(id));
    let identity = config.get_mut("identity").unwrap().as_table_mut().unwrap();
    identity.insert("ca_url".into(), ca.url().into());
    identity.insert("bundle".into(), path_str(&ca.bundle_file()).into());
    identity.insert("token_file".into(), path_str(&token).into());
    identity.insert("retry_base".into(), "100ms".into());
    config
        .get_mut("admin")
        .and_then(toml::Value::as_table_mut)
        .unwrap()
        .insert("listen".into(), "127.0.0.1:0".into());
}

/// The one `[[inbound]]` or `[[outbound]]` of an example's configuration.
fn listener<'a>(config: &'a mut toml::Table, kind: &str) -> &'a mut toml::Table {
    let list = config.get_mut(kind).unwrap().as_array_mut().unwrap();
    assert_eq!(list.len(), 1, "one [[{kind}]] in the example");
    list[0].as_table_mut().unwrap()
}

/// A sidecar from the client's example configuration with identity `id`,
/// its outbound pointed at `upstream`; returns it once it holds a
/// certificate, with its outbound address.
fn client_sidecar(
    ca: &TestCa,
    id: &str,
    name: &str,
    upstream: SocketAddr,
) -> (Running, SocketAddr) {
    let grpc = examples_dir().join("grpc");
    let mut config = example_config(&grpc.join("client-proxy.toml"));
    use_test_ca(&mut config, ca, id, name);
    let outbound = listener(&mut config, "outbound");
    assert_eq!(
        outbound["peer"].as_str(),
        Some("spiffe://example.org/greeter")
    );
    outbound.insert("listen".into(), "127.0.0.1:0".into());
    outbound.insert("upstream".into(), upstream.to_string().into());
    let file = write(
        ca.dir.path(),
        &format!("{name}.toml"),
        &toml::to_string(&config).unwrap(),
    );
    let (mut proxy, addrs) = start_proxy(&file, &["greeter"]);
    proxy.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "certificate issued"
    });
    (proxy, addrs[0])
}

fn say_hello(sidecar: SocketAddr, name: &str) -> Result<String, tonic::Status> {
    let url = format!("http://{sidecar}");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(grpc_client::say_hello(&url, name))
        .map_err(|e| match e.downcast::<tonic::Status>() {
            Ok(status) => *status,
            Err(e) => panic!("the call failed before gRPC: {e}"),
        })
}

#[test]
fn grpc_example_calls_through_two_sidecars_and_the_policy_names_the_caller() {
    let ca = TestCa::start();
    let grpc = examples_dir().join("grpc");

    let (greeter, greeter_addr) = loopback_listener();
    run_in_background(async move {
        let listener = tokio::net::TcpListener::from_std(greeter).unwrap();
        grpc_server::serve(listener).await.expect("greeter");
    });

    // The server's sidecar: the example file, its policy by absolute path.
    let mut config = example_config(&grpc.join("server-proxy.toml"));
    use_test_ca(&mut config, &ca, "spiffe://example.org/greeter", "greeter");
    let inbound = listener(&mut config, "inbound");
    assert_eq!(inbound["app_protocol"].as_str(), Some("grpc"));
    inbound.insert("listen".into(), "127.0.0.1:0".into());
    inbound.insert("forward".into(), greeter_addr.to_string().into());
    inbound.insert("policy".into(), path_str(&grpc.join("policy.toml")).into());
    let file = write(
        ca.dir.path(),
        "greeter.toml",
        &toml::to_string(&config).unwrap(),
    );
    let (mut server_sidecar, addrs) = start_proxy(&file, &["greeter"]);
    server_sidecar.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "certificate issued"
    });
    let server_sidecar_addr = addrs[0];

    let (_client_sidecar, outbound) = client_sidecar(
        &ca,
        "spiffe://example.org/greeter-client",
        "greeter-client",
        server_sidecar_addr,
    );
    let reply = say_hello(outbound, "world").expect("the allowed call");
    assert_eq!(
        reply,
        "Hello world (calling as spiffe://example.org/greeter-client)"
    );

    // A workload the policy does not name: refused at the server's sidecar
    // with 403, before the greeter.
    let (_other_sidecar, other) = client_sidecar(
        &ca,
        "spiffe://example.org/reports",
        "reports",
        server_sidecar_addr,
    );
    let status = say_hello(other, "world").expect_err("a caller the policy does not name");
    // The denying sidecar answers a gRPC caller as gRPC: trailers-only,
    // grpc-status 7 (the access log still says 403).
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let denied = server_sidecar.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "access" && v["peer"] == "spiffe://example.org/reports"
    });
    assert_eq!(
        (
            &denied["path"],
            &denied["route"],
            &denied["decision"],
            &denied["status"]
        ),
        (
            &Value::from("/helloworld.Greeter/SayHello"),
            &Value::from("say-hello"),
            &Value::from("deny"),
            &Value::from(403)
        ),
        "{denied}"
    );
}

// ---- policies and configuration files ----

/// `moat policy check POLICY` and `moat policy test POLICY CASES` pass.
fn assert_policy_passes(policy: &Path, cases: &Path) {
    for args in [
        vec!["policy", "check", path_str(policy)],
        vec!["policy", "test", path_str(policy), path_str(cases)],
    ] {
        let out = moat(&args);
        assert!(
            out.status.success(),
            "moat {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_example_policy_passes_its_tests() {
    let dir = examples_dir();
    assert_policy_passes(
        &dir.join("grpc/policy.toml"),
        &dir.join("grpc/policy-tests.toml"),
    );
    for vm in ["orders", "billing"] {
        assert_policy_passes(
            &dir.join(format!("vm/{vm}/policy.toml")),
            &dir.join(format!("vm/{vm}/policy-tests.toml")),
        );
    }
}

#[test]
fn grpc_example_configurations_load() {
    let grpc = examples_dir().join("grpc");
    for file in ["server-proxy.toml", "client-proxy.toml"] {
        let config = moat_proxy::config::Config::load(&grpc.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        for l in &config.inbound {
            assert_eq!(
                l.app_protocol(),
                moat_proxy::config::AppProtocol::Grpc,
                "{file}"
            );
        }
    }
}

#[test]
fn vm_example_configurations_load() {
    let vm = examples_dir().join("vm");
    for service in ["orders", "billing"] {
        let path = vm.join(service).join("proxy.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        // `parse`, not `load`: the policy path is where it goes on the VM.
        let config = moat_proxy::config::Config::parse(&path, &text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for l in &config.inbound {
            assert_eq!(
                l.policy.as_deref(),
                Some(Path::new("/etc/moat/policy.toml")),
                "{service}: the policy the README installs"
            );
            assert!(l.forward.ip().is_loopback(), "{service}: forward");
        }
        // The unit hands the token over with LoadCredential=.
        let proxy_unit = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/systemd/moat-proxy.service"),
        )
        .unwrap();
        assert!(proxy_unit.contains("LoadCredential=token:/etc/moat/token"));
        assert!(
            text.contains("token_file = \"/run/credentials/moat-proxy.service/token\""),
            "{service}"
        );
    }
    moat_ca::server::ServerConfig::load(&vm.join("ca/ca.toml"))
        .unwrap_or_else(|e| panic!("ca.toml: {e}"));
}

#[test]
fn vm_example_units_verify_beside_the_sidecar_unit() {
    if !support::require("systemd-analyze") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    // Binaries that exist, so `verify` checks the rest; the sidecar's unit
    // beside the application's, so its dependency resolves.
    let copy = |from: &Path, name: &str| {
        let text = std::fs::read_to_string(from)
            .unwrap()
            .replace("/usr/local/bin/moat", env!("CARGO_BIN_EXE_moat"))
            .replace("/usr/local/bin/orders", "/bin/true")
            .replace("/usr/local/bin/billing", "/bin/true");
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let sidecar = copy(
        &repo.join("config/systemd/moat-proxy.service"),
        "moat-proxy.service",
    );
    for service in ["orders", "billing"] {
        let unit = format!("{service}.service");
        let app_text =
            std::fs::read_to_string(examples_dir().join("vm").join(service).join(&unit)).unwrap();
        assert!(
            app_text.contains("After=moat-proxy.service"),
            "{unit}: starts after the sidecar"
        );
        let app = copy(&examples_dir().join("vm").join(service).join(&unit), &unit);
        let out = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&app)
            .arg(&sidecar)
            .output()
            .expect("run systemd-analyze verify");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let problems: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(&unit) || l.contains("moat-proxy.service"))
            // The test machine has no `moat` user; the sidecar's unit names one on purpose.
            .filter(|l| !l.contains("moat") || !l.to_ascii_lowercase().contains("user"))
            .collect();
        assert!(
            problems.is_empty(),
            "{unit}: systemd-analyze verify:\n{stderr}"
        );
    }
}

// ---- kubernetes ----

const IMAGE: &str = "registry.example/moat:0.1.0";

/// `moat inject --image IMAGE [FLAGS...] FILE`: (stdout, stderr), asserting success.
fn inject(file: &Path, flags: &[&str]) -> (String, String) {
    let out = std::process::Command::new(moat_bin())
        .args(["inject", "--image", IMAGE])
        .args(flags)
        .arg(file)
        .output()
        .expect("run moat inject");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "moat inject {flags:?} {}: {stderr}",
        file.display()
    );
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

/// Every document of a YAML stream.
fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap_or_else(|e| panic!("YAML: {e}"))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// `moat inject FLAGS` on `shop.yaml`, checked as `kubectl apply` would
/// take it: every Deployment got the sidecar and the init containers
/// `want_init` names, in that order, every ConfigMap a pod mounts is in the
/// file (but for the bundle the README makes from the CA's), injecting the
/// output again changes nothing, and the output passes the Kubernetes
/// schemas. Returns what `moat inject` said on standard error.
fn inject_shop(flags: &[&str], want_init: &[&str]) -> String {
    let k8s = examples_dir().join("kubernetes");
    let (injected, report) = inject(&k8s.join("shop.yaml"), flags);

    let docs = documents(&injected);
    let configmaps: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .filter_map(|d| d["metadata"]["name"].as_str())
        .collect();
    let mut deployments = 0;
    for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
        deployments += 1;
        let name = d["metadata"]["name"].as_str().unwrap();
        let pod = &d["spec"]["template"]["spec"];
        let init = pod["initContainers"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no init containers injected"));
        let names: Vec<&str> = init.iter().filter_map(|c| c["name"].as_str()).collect();
        assert_eq!(names, want_init, "{name} {flags:?}: init containers");
        for c in init {
            assert_eq!(c["image"], IMAGE, "{name}: {}", c["name"]);
        }
        if let Some(redirect) = init.iter().find(|c| c["name"] == "moat-redirect") {
            let args: Vec<&str> = redirect["args"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: moat-redirect has no args"))
                .iter()
                .filter_map(|a| a.as_str())
                .collect();
            assert_eq!(
                args,
                ["redirect", "--config", "/etc/moat/config/proxy.toml"],
                "{name}: moat-redirect"
            );
            let caps = &redirect["securityContext"]["capabilities"];
            assert_eq!(caps["add"], serde_json::json!(["NET_ADMIN"]), "{name}");
            assert_eq!(caps["drop"], serde_json::json!(["ALL"]), "{name}");
        }
        for volume in pod["volumes"].as_array().unwrap() {
            if let Some(cm) = volume["configMap"]["name"].as_str() {
                assert!(
                    cm == "moat-bundle" || configmaps.contains(&cm),
                    "{name} mounts ConfigMap {cm}, which shop.yaml lacks"
                );
            }
        }
    }
    assert_eq!(deployments, 3, "frontend, orders, billing");

    let dir = tempfile::tempdir().unwrap();
    let out_file = write(dir.path(), "shop.injected.yaml", &injected);
    let (again, _) = inject(&out_file, flags);
    assert_eq!(
        again, injected,
        "{flags:?}: a second injection changed the output"
    );

    if support::require("kubernetes-validate") {
        let namespace = k8s.join("namespace.yaml");
        let out = tool(
            "kubernetes-validate",
            &[
                "--strict",
                "--quiet",
                "-k",
                "1.37.0",
                path_str(&namespace),
                path_str(&out_file),
            ],
        );
        assert!(
            out.status.success(),
            "kubernetes-validate {flags:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    report
}

#[test]
fn kubernetes_example_injects_transparent_without_a_warning_and_validates() {
    let report = inject_shop(&[], &["moat-redirect", "moat-proxy"]);
    assert!(!report.contains("warning:"), "{report}");
}

#[test]
fn kubernetes_example_still_injects_in_explicit_mode_and_validates() {
    let report = inject_shop(&["--explicit"], &["moat-proxy"]);
    // The only complaint: the [redirect] sections that nothing installs
    // in explicit mode (the README says what else to change).
    let warnings: Vec<&str> = report.lines().filter(|l| l.contains("warning:")).collect();
    assert_eq!(warnings.len(), 3, "one per workload:\n{report}");
    for w in warnings {
        assert!(w.contains("[redirect] is set, but --explicit"), "{w}");
    }
}

#[test]
fn kubernetes_example_configmaps_load_and_the_policies_pass_their_tests() {
    let k8s = examples_dir().join("kubernetes");
    let yaml = std::fs::read_to_string(k8s.join("shop.yaml")).unwrap();
    let docs = documents(&yaml);
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for doc in &docs {
        if doc["kind"] != "ConfigMap" {
            continue;
        }
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        if let Some(text) = doc["data"]["proxy.toml"].as_str() {
            let path = write(dir.path(), &format!("{name}.toml"), text);
            let config = moat_proxy::config::Config::parse(&path, text)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let service = name.trim_end_matches("-moat-proxy");
            assert_transparent_pod(service, &config, &docs);
            // The rules the pod's moat-redirect init container installs.
            let out = moat(&["redirect", "--config", path_str(&path), "--dry-run"]);
            let rules = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{name}: moat redirect --dry-run: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let inbound = rules.contains(":15006");
            assert_eq!(
                inbound,
                service != "frontend",
                "{name}: inbound rule:\n{rules}"
            );
            assert!(rules.contains(":15001"), "{name}: outbound rule:\n{rules}");
        }
        if let Some(text) = doc["data"]["policy.toml"].as_str() {
            let path = write(dir.path(), &format!("{name}.toml"), text);
            let service = name.trim_end_matches("-moat-policy");
            let cases = k8s.join(format!("{service}-policy-tests.toml"));
            if cases.exists() {
                assert_policy_passes(&path, &cases);
            } else {
                let out = moat(&["policy", "check", path_str(&path)]);
                assert!(
                    out.status.success(),
                    "{name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        seen.push(name);
    }
    for service in ["frontend", "orders", "billing"] {
        for kind in ["proxy", "policy"] {
            let want = format!("{service}-moat-{kind}");
            assert!(seen.contains(&want), "shop.yaml has no ConfigMap {want}");
        }
    }
}

/// `service`'s proxy configuration is the transparent pod the README
/// describes: admin on the pod IP at 9901 (what `moat inject` probes), the
/// app's port 8080 redirected to an `[[inbound]]` that forwards to it (but
/// for the edge, frontend), no explicit `[[outbound]]`, and a
/// `[[destination]]` for every peer URL the app is given, naming the
/// peer's Service, its port, and its identity.
fn assert_transparent_pod(service: &str, config: &moat_proxy::config::Config, docs: &[Value]) {
    use moat_proxy::config::PeerPattern;
    use moat_proxy::redirect::{InboundPorts, Owner};

    let admin = config.admin.listen;
    assert!(
        admin.ip().is_unspecified() && admin.port() == 9901,
        "{service}: admin"
    );
    let redirect = config
        .redirect
        .as_ref()
        .unwrap_or_else(|| panic!("{service}: no [redirect]"));
    assert!(redirect.outbound, "{service}: outbound redirected");
    assert_eq!(
        redirect.proxy_uid,
        Owner::Id(65532),
        "{service}: the sidecar's UID"
    );
    assert!(
        config.outbound.is_empty(),
        "{service}: an explicit [[outbound]]"
    );
    if service == "frontend" {
        // The edge: its ingress speaks plaintext to the app.
        assert_eq!(
            redirect.inbound_ports,
            InboundPorts::Listed(vec![]),
            "{service}"
        );
        assert!(config.inbound.is_empty(), "{service}: [[inbound]]");
    } else {
        assert_eq!(
            redirect.inbound_ports,
            InboundPorts::Listed(vec![8080]),
            "{service}"
        );
        assert_eq!(config.inbound.len(), 1, "{service}: [[inbound]]");
        let l = &config.inbound[0];
        assert_eq!(
            l.forward.to_string(),
            "127.0.0.1:8080",
            "{service}: forward"
        );
        assert_eq!(l.listen.port(), 15443, "{service}: the moat-mtls port");
        assert!(l.policy.is_some(), "{service}: policy");
    }

    // The peers the app calls, by the URLs in its environment.
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == service)
        .unwrap_or_else(|| panic!("no Deployment {service}"));
    let app = &deployment["spec"]["template"]["spec"]["containers"][0];
    let urls: Vec<&str> = app["env"]
        .as_array()
        .map(|env| env.iter().filter_map(|e| e["value"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        urls.len(),
        config.destination.len(),
        "{service}: one [[destination]] per peer URL"
    );
    for url in urls {
        let authority = url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("{service}: {url}"));
        let (host, port) = authority.split_once(':').unwrap();
        let port: u16 = port.trim_end_matches('/').parse().unwrap();
        let peer = host
            .strip_suffix(".shop.svc")
            .unwrap_or_else(|| panic!("{service}: {url}"));
        let d = config
            .destination
            .iter()
            .find(|d| d.host.as_deref() == Some(&format!("{host}.cluster.local")))
            .unwrap_or_else(|| panic!("{service}: no [[destination]] for {url}"));
        assert_eq!(d.port, Some(port), "{service}: {url}");
        match &d.peer {
            PeerPattern::Exact(id) => assert_eq!(
                id.as_str(),
                format!("spiffe://example.org/ns/shop/sa/{peer}"),
                "{service}: {url}"
            ),
            other => panic!("{service}: {url}: peer {other:?}, not one identity"),
        }
        // The peer's Service takes the call on that port, at the app's port
        // (where the peer's rules pick it up).
        let svc = docs
            .iter()
            .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == peer)
            .unwrap_or_else(|| panic!("no Service {peer}"));
        let ports = &svc["spec"]["ports"][0];
        assert_eq!(ports["port"], port, "Service {peer}");
        assert_eq!(ports["targetPort"], "http", "Service {peer}");
    }
}
