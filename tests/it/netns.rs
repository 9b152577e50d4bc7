//! The two-sidecar path across network namespaces: client and sidecar A in
//! one namespace, sidecar B and its service in another, joined by a veth
//! pair, so the mutual TLS between the sidecars crosses a real interface.
//! Skipped (with the reason printed) when not root or `ip netns` fails.

use crate::support;
use crate::support::proxy as proxy_support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use proxy_support::*;
use support::{TestCa, moat_bin, path_str};

const A: &str = "spiffe://example.org/ns/prod/sa/web";
const B: &str = "spiffe://example.org/ns/prod/sa/billing";

struct Netns {
    a: String,
    b: String,
}

impl Netns {
    /// Two namespaces joined by a veth pair: 10.231.x.1 (a) and .2 (b).
    fn create(subnet: u8) -> Result<Self, String> {
        let pid = std::process::id();
        let n = Self {
            a: format!("moat-a-{pid}"),
            b: format!("moat-b-{pid}"),
        };
        let (va, vb) = (
            format!("mva{}", pid % 100_000),
            format!("mvb{}", pid % 100_000),
        );
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        ip(&["netns", "add", &n.a])?;
        ip(&["netns", "add", &n.b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &n.a])?;
        ip(&["link", "set", &vb, "netns", &n.b])?;
        for (ns, dev, host) in [(&n.a, &va, 1), (&n.b, &vb, 2)] {
            let addr = format!("10.231.{subnet}.{host}/24");
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }

    fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]).args(args);
        c
    }

    fn rx_bytes(&self) -> u64 {
        let dev = format!("mvb{}", std::process::id() % 100_000);
        let out = self
            .exec(
                &self.b,
                "cat",
                &[&format!("/sys/class/net/{dev}/statistics/rx_bytes")],
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A child whose stderr/stdout lines are searched for `pattern`; killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd`, returns it and the first line (stdout or stderr) that
/// `pick` maps to `Some`.
fn spawn_and_find<T: Send + 'static>(mut cmd: Command, pick: fn(&str) -> Option<T>) -> (Proc, T) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info");
    let mut child = cmd.spawn().expect("spawn");
    let (tx, rx) = mpsc::channel();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(v) = pick(&line) {
                    let _ = tx.send(v);
                }
            }
        });
    }
    let v = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the expected line");
    (Proc(child), v)
}

fn listening(line: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["message"] != "listening" || v["listener"] == "admin" {
        return None;
    }
    v["addr"].as_str()?.parse().ok()
}

fn python_port(line: &str) -> Option<u16> {
    // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
    let rest = line.split(" port ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn two_sidecars_in_separate_network_namespaces_over_a_veth_pair() {
    if !support::require_root("creating network namespaces")
        || !support::require("ip")
        || !support::require("python3")
    {
        return;
    }
    let subnet = (std::process::id() % 200) as u8 + 20;
    let ns = match Netns::create(subnet) {
        Ok(ns) => ns,
        Err(e) => {
            let what = format!("`ip netns` does not work here: {e}");
            support::require_that(false, &what, "a kernel with network namespaces");
            return;
        }
    };
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let dir = ca.dir.path();
    let www = dir.join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello across namespaces\n").unwrap();
    // The service: loopback inside namespace b only.
    let (_service, port) = spawn_and_find(
        ns.exec(
            &ns.b,
            "python3",
            &[
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
                path_str(&www),
            ],
        ),
        python_port,
    );
    let b_files = issue(&ca, B, "1h", "b");
    let b_cfg = write(
        dir,
        "b.toml",
        &format!(
            "{}\n[[inbound]]\nname = \"api\"\nlisten = \"10.231.{subnet}.2:0\"\nforward = \"127.0.0.1:{port}\"\nallow_peers = [\"{A}\"]\n",
            file_identity(&b_files, &ca.bundle_file())
        ),
    );
    let bin = moat_bin();
    let (_b, b_addr) = spawn_and_find(
        ns.exec(
            &ns.b,
            path_str(&bin),
            &["proxy", "--config", path_str(&b_cfg)],
        ),
        listening,
    );
    let a_files = issue(&ca, A, "1h", "a");
    let a_cfg = write(
        dir,
        "a.toml",
        &format!(
            "{}\n[[outbound]]\nname = \"billing\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{b_addr}\"\npeer = \"{B}\"\n",
            file_identity(&a_files, &ca.bundle_file())
        ),
    );
    let (_a, a_addr) = spawn_and_find(
        ns.exec(
            &ns.a,
            path_str(&bin),
            &["proxy", "--config", path_str(&a_cfg)],
        ),
        listening,
    );
    let rx_before = ns.rx_bytes();
    let url = format!("http://{a_addr}/hello.txt");
    let curl_in_a = |url: &str| {
        let out = ns
            .exec(
                &ns.a,
                "curl",
                &["-sS", "--max-time", "10", "-w", "\n%{http_code}", url],
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for _ in 0..20 {
        assert_eq!(curl_in_a(&url), "hello across namespaces\n\n200");
    }
    // One handshake (the sidecars keep their connection: B answers A in
    // HTTP/1.1 though python answers B in HTTP/1.0), then each request and
    // answer as TLS records.
    let crossed = ns.rx_bytes() - rx_before;
    assert!(
        crossed > 2000 + 20 * 100,
        "the TLS traffic crossed the veth: {crossed} bytes"
    );
    // From namespace a, B's listener refuses a client without a certificate,
    // and the plaintext service is not reachable at all.
    let direct = ns
        .exec(
            &ns.a,
            "curl",
            &[
                "-sk",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("https://{b_addr}/hello.txt"),
            ],
        )
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&direct.stdout),
        "000",
        "no HTTP answer without a certificate"
    );
    let service = ns
        .exec(
            &ns.a,
            "curl",
            &[
                "-s",
                "--max-time",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://10.231.{subnet}.2:{port}/hello.txt"),
            ],
        )
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&service.stdout),
        "000",
        "the service is loopback-only in b"
    );
}
