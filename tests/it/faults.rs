//! Faults the proxy and the CA must survive with nothing lost and nothing
//! hung: the CA restarted during renewal, a peer sidecar restarted under
//! load, a slow local service under a burst, policy files truncated or
//! deleted under traffic, SIGTERM with many requests in flight, and a full
//! disk under the CA's store.

use crate::support;
use crate::support::hostile as hostile_support;
use crate::support::proxy as proxy_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hostile_support::*;
use proxy_support::*;
use serde_json::Value;
use support::{Running, TestCa, ca_init, echo_service, moat_ok, path_str};

const A: &str = "spiffe://example.org/ns/prod/sa/web";
const B: &str = "spiffe://example.org/ns/prod/sa/billing";

fn identity_json(admin: SocketAddr) -> Value {
    let (status, body) = curl_http(admin, "/identity", &[]);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn open_fds(proc: &Running) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", proc.child.id()))
        .map(std::iter::Iterator::count)
        .unwrap_or(0)
}

#[test]
fn ca_restarted_during_renewal_is_picked_up_again() {
    moat_ca::install_crypto_provider();
    let mut ca = TestCa::start();
    let client = issue(&ca, A, "1h", "client");
    // 30 s: renewal at about half of it, so the CA (a debug build on a busy
    // machine) has some 15 s to come back before the certificate expires;
    // after expiry the sidecar could only go back to its spent join token.
    let (mut b, api, admin) = ca_inbound(&ca, B, "ttl = \"30s\"");
    let first = identity_json(admin)["serial"].clone();
    ca.server.child.kill().unwrap();
    ca.server.child.wait().unwrap();
    b.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "renewal failed; serving with the current certificate"
    });
    assert_eq!(
        curl(api, "/", Some(&client), &["--http1.1"]).0,
        200,
        "serving while the CA is down"
    );
    assert_eq!(
        curl_http(admin, "/ready", &[]).0,
        200,
        "still ready until expiry"
    );
    assert_eq!(
        identity_json(admin)["serial"],
        first,
        "the current certificate, not a new one"
    );
    // The CA comes back on the same address.
    let ca_dir = ca.ca_dir();
    let listen = ca.addr.to_string();
    let mut back = Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(&ca_dir),
        "--listen",
        &listen,
        "--admin",
        "127.0.0.1:0",
    ]);
    back.listening_addr("ca");
    let deadline = Instant::now() + Duration::from_secs(15);
    while identity_json(admin)["serial"] == first {
        assert!(
            Instant::now() < deadline,
            "no renewal after the CA came back:\n{}",
            b.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(curl(api, "/", Some(&client), &["--http1.1"]).0, 200);
}

/// B: inbound in front of `service` on `listen`; returns it and its address.
fn sidecar_b(
    ca: &TestCa,
    files: &CertFiles,
    service: SocketAddr,
    listen: &str,
) -> (Running, SocketAddr) {
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"{listen}\"\nforward = \"{service}\"\n",
        file_identity(files, &ca.bundle_file())
    );
    let (b, addrs) = start_proxy(&write(ca.dir.path(), "b.toml", &config), &["api"]);
    (b, addrs[0])
}

#[test]
fn peer_sidecar_restarted_under_load_costs_only_the_gap() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let service = echo_service();
    let b_files = issue(&ca, B, "1h", "b");
    let (b, b_addr) = sidecar_b(&ca, &b_files, service, "127.0.0.1:0");
    let a_files = issue(&ca, A, "1h", "a");
    let a_config = format!(
        "{}{ADMIN}\n[[outbound]]\nname = \"billing\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{b_addr}\"\npeer = \"{B}\"\n",
        file_identity(&a_files, &ca.bundle_file())
    );
    let (_a, a_addrs) = start_proxy(&write(ca.dir.path(), "a.toml", &a_config), &["billing"]);
    let a_addr = a_addrs[0];
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut conn = KeepAlive::connect(a_addr);
                while !stop.load(Ordering::Relaxed) {
                    match conn.get("/") {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        0 => {
                            conn = KeepAlive::connect(a_addr);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    eventually(Duration::from_secs(30), "load to flow", || {
        ok.load(Ordering::Relaxed) > 20
    });
    drop(b);
    let down = Instant::now();
    let (_b2, b2_addr) = sidecar_b(&ca, &b_files, service, &b_addr.to_string());
    let gap = down.elapsed();
    assert_eq!(b2_addr, b_addr);
    let failed_at_restart = failed.load(Ordering::Relaxed);
    let ok_at_restart = ok.load(Ordering::Relaxed);
    // At least a second of traffic to B's successor, failures counted.
    std::thread::sleep(Duration::from_millis(1000));
    eventually(Duration::from_secs(30), "traffic to resume", || {
        ok.load(Ordering::Relaxed) - ok_at_restart > 20
    });
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let failed_after = failed.load(Ordering::Relaxed) - failed_at_restart;
    let ok_after = ok.load(Ordering::Relaxed) - ok_at_restart;
    eprintln!(
        "restart gap {gap:?}: {failed_at_restart} failed during it; after: {ok_after} ok, {failed_after} failed"
    );
    assert!(ok_after > 20, "traffic resumed: {ok_after}");
    // At most one failure per client connection once B is back: the
    // pooled connection to the old B.
    assert!(
        failed_after <= 2,
        "{failed_after} failures after the restart"
    );
}

#[test]
fn slow_service_under_a_burst_gets_fast_504s_and_no_pile_up() {
    let (slow, _arrived) = slow_service(Duration::from_secs(30));
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let server = issue(&ca, B, "1h", "server");
    let client = issue(&ca, A, "1h", "client");
    let config = format!(
        "{}{ADMIN}[limits]\nrequest_timeout = \"500ms\"\n\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{slow}\"\n",
        file_identity(&server, &ca.bundle_file())
    );
    let (proxy, addrs) = start_proxy(&write(ca.dir.path(), "p.toml", &config), &["api"]);
    let api = addrs[0];
    assert_eq!(curl(api, "/", Some(&client), &["--http1.1"]).0, 504);
    std::thread::sleep(Duration::from_millis(300));
    let baseline = open_fds(&proxy);
    let client = Arc::new(client);
    let start = Instant::now();
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            std::thread::spawn(move || curl(api, "/", Some(&client), &["--http1.1"]).0)
        })
        .collect();
    let statuses: Vec<u16> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(statuses.iter().all(|&s| s == 504), "{statuses:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    eventually(
        Duration::from_secs(5),
        "file descriptors back to the baseline",
        || open_fds(&proxy) <= baseline + 2,
    );
}

#[test]
fn sigterm_under_load_completes_every_in_flight_request() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let server = issue(&ca, B, "1h", "server");
    let client = Arc::new(issue(&ca, A, "1h", "client"));
    let (slow, arrived) = slow_service(Duration::from_millis(1200));
    let config = format!(
        "{}{ADMIN}[limits]\nshutdown_grace = \"10s\"\n\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{slow}\"\nforward_http = \"http1\"\n",
        file_identity(&server, &ca.bundle_file())
    );
    let (mut proxy, addrs) = start_proxy(&write(ca.dir.path(), "p.toml", &config), &["api"]);
    let api = addrs[0];
    let n = 12;
    let in_flight: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let proto = if i % 2 == 0 { "--http1.1" } else { "--http2" };
            std::thread::spawn(move || curl(api, "/slow", Some(&client), &[proto]))
        })
        .collect();
    for _ in 0..n {
        arrived
            .recv_timeout(Duration::from_secs(10))
            .expect("all requests arrived");
    }
    proxy.signal("TERM");
    let results: Vec<(u16, String)> = in_flight.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        results.iter().all(|(s, b)| *s == 200 && b == "slow"),
        "{results:?}"
    );
    let exit = proxy.wait_exit(Duration::from_secs(5)).expect("exited");
    assert!(exit.success(), "{exit}");
}

const POLICY: &str = "[[route]]\nname = \"all\"\npath = \"/*\"\nallow = \"any-peer\"\n";

#[test]
fn policy_file_truncated_deleted_or_replaced_under_traffic() {
    let mut s = sidecar_with("", |ca| {
        let p = write(ca.dir.path(), "policy.toml", POLICY);
        format!("policy = {:?}\n", path_str(&p))
    });
    let policy = s.ca.dir.path().join("policy.toml");
    let get = |s: &Sidecar| curl(s.inbound, "/x", Some(&s.client), &["--http1.1"]).0;
    assert_eq!(get(&s), 200);
    // Refused reloads, whichever result label counts them (one scrape).
    let refused = |s: &Sidecar| {
        let text = s.scrape();
        ["error", "failed", "invalid"]
            .iter()
            .map(|r| metric(&text, "moat_policy_reloads_total", &[("result", r)]))
            .sum::<f64>()
    };
    // An editor's write-rename to a new valid policy that denies /x.
    let deny_x = format!("[[route]]\nname = \"x\"\npath = \"/x\"\ndeny = true\n{POLICY}");
    let tmp = s.ca.dir.path().join(".policy.toml.swp");
    std::fs::write(&tmp, &deny_x).unwrap();
    std::fs::rename(&tmp, &policy).unwrap();
    eventually(
        Duration::from_secs(10),
        "the renamed policy applies",
        || get(&s) == 403,
    );
    // Truncated to half: invalid, refused, the last good policy stays.
    let failed_before = refused(&s);
    std::fs::write(&policy, &deny_x[..deny_x.len() / 2 + 3]).unwrap();
    eventually(Duration::from_secs(10), "the broken edit refused", || {
        refused(&s) > failed_before
    });
    assert_eq!(get(&s), 403, "last good policy kept");
    // Deleted: the last good policy stays.
    let failed_before = refused(&s);
    std::fs::remove_file(&policy).unwrap();
    eventually(Duration::from_secs(10), "the deleted file refused", || {
        refused(&s) > failed_before
    });
    assert_eq!(get(&s), 403, "last good policy kept after delete");
    // Recreated: applies again.
    std::fs::write(&policy, POLICY).unwrap();
    eventually(
        Duration::from_secs(10),
        "the recreated policy applies",
        || get(&s) == 200,
    );
    s.alive_path = "/x";
    s.assert_still_serving();
}

#[test]
fn full_disk_under_the_ca_store_refuses_issuance_cleanly_and_recovers() {
    if !support::require_root("mounting a small tmpfs") {
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            path_str(mnt.path()),
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !support::require_that(
        mounted,
        "cannot mount a tmpfs here",
        "a kernel and container that allow `mount -t tmpfs`",
    ) {
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(mnt.path().to_owned());
    moat_ca::install_crypto_provider();
    let ca_dir = mnt.path().join("ca");
    ca_init(&ca_dir);
    let mut server = Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(&ca_dir),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    let addr = server.listening_addr("ca");
    let url = format!("https://{addr}");
    let bundle = moat_ca::TrustBundle::from_pem(
        moat_ok(&["ca", "bundle", "--dir", path_str(&ca_dir)]).as_bytes(),
    )
    .unwrap();
    let client = moat_ca::client::CaClient::new(&url, bundle).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let token = |id: &str| {
        moat_ok(&["ca", "token", "--dir", path_str(&ca_dir), "--id", id])
            .trim()
            .to_owned()
    };
    let issue =
        |t: &str| rt.block_on(client.issue(&moat_ca::client::WorkloadKey::generate().unwrap(), t));
    let used = token("spiffe://example.org/vm/before");
    issue(&used).expect("issues while there is room");
    // Fill the disk.
    let filler = mnt.path().join("filler");
    let _ = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", path_str(&filler)),
            "bs=64k",
        ])
        .stderr(std::process::Stdio::null())
        .status();
    let mut refused = 0;
    let mut tokens = Vec::new();
    for i in 0..20 {
        let t = token(&format!("spiffe://example.org/vm/full{i}"));
        if let Err(e) = issue(&t) {
            if refused == 0 {
                eprintln!("with the disk full: {e}");
            }
            refused += 1;
        }
        tokens.push(t);
    }
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the CA is still running"
    );
    eprintln!("{refused} of 20 refused with the disk full");
    assert!(
        refused > 0,
        "a full disk refuses issuance (a certificate that cannot be recorded is not issued)"
    );
    std::fs::remove_file(&filler).unwrap();
    issue(&token("spiffe://example.org/vm/after")).expect("issues again once there is room");
    issue(&tokens[0]).expect("a token refused for lack of disk was not burned");
    assert!(
        issue(&used).is_err(),
        "the token spent before the disk filled is still spent"
    );
    // And the store survives a restart.
    drop(server);
    let mut again = Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(&ca_dir),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    let addr = again.listening_addr("ca");
    let bundle = moat_ca::TrustBundle::from_pem(
        moat_ok(&["ca", "bundle", "--dir", path_str(&ca_dir)]).as_bytes(),
    )
    .unwrap();
    let client = moat_ca::client::CaClient::new(&format!("https://{addr}"), bundle).unwrap();
    let r = rt.block_on(client.issue(&moat_ca::client::WorkloadKey::generate().unwrap(), &used));
    assert!(r.is_err(), "still spent after a restart");
}

#[test]
fn certificate_files_truncated_deleted_or_replaced_under_traffic() {
    let mut s = sidecar("", "");
    let dir = s.ca.dir.path().to_owned();
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    let before = identity_json(s.admin)["serial"].clone();
    let unusable = |s: &Sidecar| {
        count_logs(
            &s.proxy,
            "identity files changed but are unusable; keeping the current credentials",
        )
    };
    // Truncated (an editor's first step, or a full disk).
    let seen = unusable(&s);
    std::fs::write(&cert, "").unwrap();
    eventually(Duration::from_secs(10), "the empty file refused", || {
        unusable(&s) > seen
    });
    assert_eq!(identity_json(s.admin)["serial"], before);
    s.assert_still_serving();
    // Deleted, both files.
    let seen = unusable(&s);
    std::fs::remove_file(&cert).unwrap();
    std::fs::remove_file(&key).unwrap();
    eventually(Duration::from_secs(10), "the deleted files refused", || {
        unusable(&s) > seen
    });
    assert_eq!(
        identity_json(s.admin)["serial"],
        before,
        "old kept after delete"
    );
    s.assert_still_serving();
    // Recreated by write-rename, key first: applied once the pair matches.
    let fresh = issue(&s.ca, SERVER_ID, "2h", "fresh");
    for (from, to) in [(&fresh.key, &key), (&fresh.cert, &cert)] {
        let tmp = dir.join(".incoming");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
    eventually(Duration::from_secs(10), "the new pair served", || {
        identity_json(s.admin)["serial"] != before
    });
    s.assert_still_serving();
}
