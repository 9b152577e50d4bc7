//! A VM sidecar across restarts: with `[identity] state_dir` it keeps its
//! certificate and key on disk and renews from them after a restart, with
//! no new join token; without one, a spent token is reported once, with
//! what to do, and a new token file is used as soon as it is written.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moat_ca::TrustBundle;
use moat_ca::client::{CaClient, WorkloadKey};
use serde_json::Value;
use support::{Running, TestCa, echo_service, metric_samples, path_str, tool};

const ID: &str = "spiffe://example.org/vm/billing-1";

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let out = tool(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            &format!("http://{addr}{path}"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn identity(admin: SocketAddr) -> Value {
    let (status, body) = http_get(admin, "/identity");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Writes a sidecar configuration for `ca` and returns its path.
fn config(ca: &TestCa, token_file: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "[identity]\nca_url = \"{}\"\nbundle = {:?}\ntoken_file = {:?}\n{extra}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\n\
         forward = \"{}\"\nforward_http = \"http1\"\n",
        ca.url(),
        path_str(&ca.bundle_file()),
        path_str(token_file),
        echo_service()
    );
    let path = ca.dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start(config: &Path) -> (Running, SocketAddr, SocketAddr) {
    let mut proxy = Running::start(&["proxy", "--config", path_str(config)]);
    let api = proxy.listening_addr("api");
    let admin = proxy.listening_addr("admin");
    (proxy, api, admin)
}

fn count(proxy: &Running, message: &str) -> usize {
    proxy
        .json_logs()
        .iter()
        .filter(|v| v["message"] == message)
        .count()
}

fn replays(ca: &mut TestCa) -> f64 {
    let admin = ca.admin_addr();
    let (_, text) = http_get(admin, "/metrics");
    metric_samples(&text, "moat_ca_token_replays_total", &[])
        .first()
        .copied()
        .unwrap_or(0.0)
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn vm_sidecar_with_a_state_dir_restarts_and_renews_without_a_new_token() {
    moat_ca::install_crypto_provider();
    let mut ca = TestCa::start();
    let token_file = ca.dir.path().join("token");
    std::fs::write(&token_file, ca.token(ID)).unwrap();
    let state = ca.dir.path().join("state");
    let config = config(
        &ca,
        &token_file,
        &format!("ttl = \"20s\"\nstate_dir = {:?}\n", path_str(&state)),
    );
    let (mut proxy, _, admin) = start(&config);
    proxy.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "certificate issued"
    });
    let first = identity(admin);
    assert_eq!(first["id"], ID);
    // The key rests privately, in one file with its certificate.
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("identity.pem")), 0o600);
    let stored = std::fs::read_to_string(state.join("identity.pem")).unwrap();
    assert!(stored.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(stored.contains("-----BEGIN CERTIFICATE-----"));

    // SIGTERM, then start again: the token in the file is spent.
    proxy.signal("TERM");
    let exit = proxy.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(exit.success(), "{exit}");
    let (mut again, api, admin) = start(&config);
    again.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "certificate restored from the state directory"
    });
    let restored = identity(admin);
    assert_eq!(restored["id"], ID, "same SPIFFE ID");
    assert_eq!(
        restored["serial"], first["serial"],
        "the stored certificate"
    );
    assert_eq!(http_get(admin, "/ready").0, 200, "ready at once");
    // It renews over mutual TLS with the stored certificate and key.
    again.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "certificate renewed"
    });
    let renewed = identity(admin);
    assert_eq!(renewed["id"], ID);
    assert_ne!(renewed["serial"], first["serial"]);
    assert_eq!(count(&again, "certificate issued"), 0, "no token used");
    assert_eq!(replays(&mut ca), 0.0, "the spent token was never sent");
    // And it serves with the renewed certificate.
    let client = ca.issue_files("spiffe://example.org/vm/caller", "10m", "caller");
    let out = tool(
        "curl",
        &[
            "-sS",
            "-k",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cert",
            path_str(&client.0),
            "--key",
            path_str(&client.1),
            &format!("https://{api}/"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    // The stored file follows the renewal.
    let stored_now = std::fs::read_to_string(state.join("identity.pem")).unwrap();
    assert_ne!(stored_now, stored);
}

#[test]
fn a_spent_token_without_state_is_reported_once_and_a_new_token_file_is_picked_up() {
    moat_ca::install_crypto_provider();
    let mut ca = TestCa::start();
    // Someone else redeemed it first.
    let spent = ca.token(ID);
    let bundle = TrustBundle::from_pem(&std::fs::read(ca.bundle_file()).unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(
        CaClient::new(&ca.url(), bundle)
            .unwrap()
            .issue(&WorkloadKey::generate().unwrap(), &spent),
    )
    .unwrap();

    let token_file = ca.dir.path().join("token");
    std::fs::write(&token_file, &spent).unwrap();
    let config = config(
        &ca,
        &token_file,
        "retry_base = \"100ms\"\nretry_max = \"200ms\"\n",
    );
    let (mut proxy, _, admin) = start(&config);
    let error = proxy.wait_for_log(Duration::from_secs(20), |v| {
        v["level"] == "ERROR" && v["reason"] == "token_replayed"
    });
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("was already used"), "{message}");
    assert!(
        message.contains(&format!("moat ca token --dir <CA directory> --id {ID}")),
        "{message}"
    );
    assert!(message.contains(path_str(&token_file)), "{message}");

    // Many retry periods later: still one error, one replay at the CA.
    // (A bounded wait: what is checked is that nothing more happens.)
    std::thread::sleep(Duration::from_secs(3));
    let errors = proxy
        .json_logs()
        .iter()
        .filter(|v| v["level"] == "ERROR")
        .count();
    assert_eq!(errors, 1, "{}", proxy.logs().join("\n"));
    assert_eq!(replays(&mut ca), 1.0, "the spent token is not sent again");
    assert_eq!(http_get(admin, "/ready").0, 503, "no identity yet");

    // A new token, written the way an operator would: picked up at once.
    let written = Instant::now();
    std::fs::write(&token_file, ca.token(ID)).unwrap();
    proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "certificate issued"
    });
    eprintln!(
        "new token used {:?} after it was written",
        written.elapsed()
    );
    assert_eq!(identity(admin)["id"], ID);
    assert_eq!(http_get(admin, "/ready").0, 200);
    assert_eq!(replays(&mut ca), 1.0);
}

/// A token file caught between the shell's `> token` and the write (`moat
/// ca token` redirected while the proxy waits): empty, then half a token, then the
/// whole one. Neither of the first two is sent to the CA (where it would be
/// refused and counted); each is said once, at info level; the whole token
/// is used as soon as it is written.
#[test]
fn a_token_file_read_before_it_is_written_is_not_sent() {
    let mut ca = TestCa::start();
    let token_file = ca.dir.path().join("token");
    let config = config(
        &ca,
        &token_file,
        "retry_base = \"100ms\"\nretry_max = \"200ms\"\n",
    );
    let (mut proxy, _, admin) = start(&config);
    proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "cannot read the token"
    });
    assert_eq!(
        http_get(admin, "/ready"),
        (503, "not ready: no certificate yet\n".to_owned())
    );
    let token = ca.token(ID);
    std::fs::write(&token_file, "").unwrap();
    proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["level"] == "INFO"
            && v["message"] == "the token file is empty; waiting for a token to be written to it"
    });
    std::fs::write(&token_file, &token[..token.len() / 2]).unwrap();
    proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["level"] == "INFO"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the token file does not hold a whole token"))
    });
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "certificate issued"
    });
    assert_eq!(http_get(admin, "/ready").0, 200);
    let logs = proxy.json_logs();
    assert!(
        !logs.iter().any(|v| v["level"] == "ERROR"),
        "{}",
        proxy.logs().join("\n")
    );
    let ca_admin = ca.admin_addr();
    let (_, text) = http_get(ca_admin, "/metrics");
    let refused: f64 = metric_samples(&text, "moat_ca_issuances_total", &[])
        .iter()
        .sum::<f64>()
        - metric_samples(&text, "moat_ca_issuances_total", &[("result", "ok")])
            .iter()
            .sum::<f64>();
    assert_eq!(refused, 0.0, "the CA refused nothing:\n{text}");
}

/// A state directory the sidecar cannot write in is found before the join
/// token is spent: exit 64 naming the directory, and the same token still
/// enrolls a sidecar whose state directory is writable.
#[test]
fn an_unwritable_state_dir_exits_64_before_the_token_is_spent() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let token_file = ca.dir.path().join("token");
    std::fs::write(&token_file, ca.token(ID)).unwrap();
    // Root writes in any directory whatever its mode; nobody creates a file
    // directly under /proc/self.
    let unwritable = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/proc/self")
    } else {
        use std::os::unix::fs::PermissionsExt;
        let d = ca.dir.path().join("read-only");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o500)).unwrap();
        d
    };
    let refused = config(
        &ca,
        &token_file,
        &format!("state_dir = {:?}\n", path_str(&unwritable)),
    );
    let mut proxy = Running::start(&["proxy", "--config", path_str(&refused)]);
    let exit = proxy
        .wait_exit(Duration::from_secs(15))
        .expect("exits instead of enrolling");
    assert_eq!(exit.code(), Some(64), "{}", proxy.logs().join("\n"));
    let said = proxy.logs().join("\n");
    assert!(
        said.contains(&format!(
            "{}: cannot write in the state directory",
            unwritable.display()
        )),
        "{said}"
    );

    let state = ca.dir.path().join("state");
    let config = config(
        &ca,
        &token_file,
        &format!("state_dir = {:?}\n", path_str(&state)),
    );
    let (mut proxy, _, admin) = start(&config);
    proxy.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "certificate issued"
    });
    assert_eq!(identity(admin)["id"], ID, "the token was not spent");
}
