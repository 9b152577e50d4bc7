//! The shipped systemd units are hardened: `systemd-analyze security
//! --offline=true` rates each one "OK" or better (exposure at most 2.0), and
//! each carries the settings the deployment issue asks for by name.
//!
//! Needs `systemd-analyze` (`apt-get install systemd`) and, for the syscall
//! filter, `strace`: see `support::require` for what happens without them.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 2] = ["moat-proxy.service", "moat-ca.service"];

fn unit_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/systemd")
        .join(name)
}

fn systemd_analyze_available() -> bool {
    support::require("systemd-analyze")
}

/// The "Overall exposure level for X: 1.1 OK" number.
fn exposure(output: &str) -> Option<(f64, String)> {
    let line = output
        .lines()
        .find(|l| l.contains("Overall exposure level"))?;
    let rest = line.rsplit_once(": ")?.1;
    let mut words = rest.split_whitespace();
    let number = words.next()?.parse().ok()?;
    Some((number, words.next().unwrap_or_default().to_owned()))
}

#[test]
fn units_rate_ok_or_better_offline() {
    if !systemd_analyze_available() {
        return;
    }
    for unit in UNITS {
        let path = unit_path(unit);
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&path)
            .output()
            .expect("run systemd-analyze");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let (level, rating) =
            exposure(&text).unwrap_or_else(|| panic!("{unit}: no exposure level in:\n{text}"));
        eprintln!("{unit}: exposure {level} {rating}");
        assert!(
            level <= 2.0,
            "{unit}: exposure {level} {rating}, want 2.0 (OK) or less:\n{text}"
        );
        assert!(
            matches!(rating.as_str(), "OK" | "SAFE"),
            "{unit}: rated {rating}"
        );
    }
}

#[test]
fn units_carry_every_required_setting() {
    for unit in UNITS {
        let text = std::fs::read_to_string(unit_path(unit)).unwrap();
        let settings: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .collect();
        for want in [
            "User=moat",
            "Group=moat",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "CapabilityBoundingSet=",
            "AmbientCapabilities=",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
            "SystemCallFilter=@system-service",
            "MemoryDenyWriteExecute=yes",
            // systemd's default soft limit, 1024, caps a sidecar near a
            // thousand connections.
            "LimitNOFILE=524288",
        ] {
            assert!(settings.contains(&want), "{unit}: missing {want:?}");
        }
        // State and configuration directories are declared, not assumed.
        let declared = |key: &str| settings.iter().any(|l| l.starts_with(key));
        match unit {
            "moat-ca.service" => assert!(declared("StateDirectory=moat")),
            _ => assert!(declared("ConfigurationDirectory=moat")),
        }
    }
}

#[test]
fn units_verify_apart_from_the_missing_binary() {
    if !systemd_analyze_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in UNITS {
        // Point ExecStart at a binary that exists so `verify` checks the rest.
        let text = std::fs::read_to_string(unit_path(unit))
            .unwrap()
            .replace("/usr/local/bin/moat", env!("CARGO_BIN_EXE_moat"));
        let copy = dir.path().join(unit);
        std::fs::write(&copy, text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .expect("run systemd-analyze verify");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let problems: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(unit))
            // The test machine has no `moat` user; the units name one on purpose.
            .filter(|l| !l.contains("moat") || !l.to_ascii_lowercase().contains("user"))
            .collect();
        assert!(
            problems.is_empty(),
            "{unit}: systemd-analyze verify:\n{stderr}"
        );
    }
}

/// The system calls in `systemd-analyze syscall-filter GROUP`, groups expanded.
fn syscall_group(group: &str, seen: &mut Vec<String>) -> Vec<String> {
    let out = Command::new("systemd-analyze")
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

/// `moat ARGS` under `strace -f`, its JSON log lines sent down a channel.
struct Traced {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    logged: Vec<serde_json::Value>,
}

impl Traced {
    fn start(trace: &Path, args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = Command::new("strace")
            .args(["-f", "-qq", "-o"])
            .arg(trace)
            .arg(env!("CARGO_BIN_EXE_moat"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn strace");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            logged: Vec::new(),
        }
    }

    /// The address of the listener `name`, from its `listening` log line.
    fn listening(&mut self, name: &str) -> String {
        let line = self.wait_for(&format!("`listening` line for {name}"), |v| {
            v["message"] == "listening" && v["listener"] == name
        });
        line["addr"].as_str().unwrap().to_owned()
    }

    /// The first JSON log line that satisfies `pred`, waiting up to a minute.
    fn wait_for(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(v) = self.logged.iter().find(|v| pred(v)) {
                return v.clone();
            }
            assert!(std::time::Instant::now() < deadline, "no {what}");
            if let Ok(line) = self.lines.recv_timeout(std::time::Duration::from_secs(1))
                && let Ok(v) = serde_json::from_str(&line)
            {
                self.logged.push(v);
            }
        }
    }

    /// The traced `moat` process (strace's child).
    fn tracee(&self) -> Option<String> {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next().map(str::to_owned)
    }

    /// SIGTERM to moat (strace itself would only detach), then wait for both.
    fn stop(mut self) {
        let tracee = self.tracee();
        if let Some(pid) = &tracee {
            let _ = Command::new("kill").args(["-TERM", pid]).status();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if let Some(pid) = &tracee {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        // A failed assertion must not leave moat running: kill the tracee, then strace.
        if let Ok(None) = self.child.try_wait() {
            if let Some(pid) = self.tracee() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every system call name in an `strace -f` log.
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

#[test]
fn the_syscall_filter_allows_what_the_ca_and_proxy_do() {
    if !systemd_analyze_available() {
        return;
    }
    if !support::require("strace") {
        return;
    }
    let strace_works = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !support::require_that(
        strace_works,
        "strace cannot trace here",
        "ptrace allowed (CAP_SYS_PTRACE, no seccomp profile that forbids it)",
    ) {
        return;
    }
    let moat = env!("CARGO_BIN_EXE_moat");
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p);
    let run = |args: &[&str]| {
        let out = Command::new(moat).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "moat {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let ca_dir = d("ca");
    let ca_dir = ca_dir.to_str().unwrap();
    run(&[
        "ca",
        "init",
        "--dir",
        ca_dir,
        "--trust-domain",
        "example.org",
    ]);
    std::fs::write(d("bundle.pem"), run(&["ca", "bundle", "--dir", ca_dir])).unwrap();
    std::fs::write(
        d("token"),
        run(&[
            "ca",
            "token",
            "--dir",
            ca_dir,
            "--id",
            "spiffe://example.org/vm/t",
        ]),
    )
    .unwrap();

    // The CA as its unit runs it (serve), the proxy with an inbound listener,
    // a watched policy, an outbound to a peer with the wrong identity, and
    // a SIGTERM drain at the end.
    let mut ca = Traced::start(
        &d("ca.trace"),
        &[
            "ca",
            "serve",
            "--dir",
            ca_dir,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let ca_addr = ca.listening("ca");
    let policy = "[[route]]\nname = \"all\"\npath = \"/*\"\nallow = \"any-peer\"\n";
    std::fs::write(d("policy.toml"), policy).unwrap();
    std::fs::write(
        d("proxy.toml"),
        format!(
            "[identity]\nca_url = \"https://localhost:{port}\"\nbundle = \"bundle.pem\"\ntoken_file = \"token\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"127.0.0.1:9\"\npolicy = \"policy.toml\"\n\
             [[outbound]]\nname = \"peer\"\nlisten = \"127.0.0.1:0\"\nupstream = \"localhost:{port}\"\npeer = \"spiffe://example.org/vm/other\"\n",
            port = ca_addr.rsplit(':').next().unwrap()
        ),
    )
    .unwrap();
    let mut proxy = Traced::start(
        &d("proxy.trace"),
        &["proxy", "--config", d("proxy.toml").to_str().unwrap()],
    );
    let admin = proxy.listening("admin");
    let outbound = proxy.listening("peer");
    let ready = |addr: &str| {
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{addr}/ready"),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ready(&admin) != "200" {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never became ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::fs::write(
        d("policy.toml"),
        policy.replace("\"all\"", "\"everything\""),
    )
    .unwrap();
    let _ = Command::new("curl")
        .args(["-s", "-o", "/dev/null", &format!("http://{outbound}/x")])
        .output();
    // The reload's system calls are in the trace once it has logged.
    proxy.wait_for("`policy reloaded` line", |v| {
        v["message"] == "policy reloaded"
    });
    proxy.stop();
    ca.stop();

    let mut seen = Vec::new();
    let allowed = syscall_group("@system-service", &mut seen);
    let mut seen = Vec::new();
    let mut denied = syscall_group("@privileged", &mut seen);
    denied.extend(syscall_group("@resources", &mut seen));
    for (what, trace) in [
        ("moat ca serve", d("ca.trace")),
        ("moat proxy", d("proxy.trace")),
    ] {
        let calls = traced_calls(&trace);
        assert!(
            calls.len() > 20,
            "{what}: too few system calls traced: {calls:?}"
        );
        let refused: Vec<&String> = calls
            .iter()
            .filter(|c| !allowed.contains(c) || denied.contains(c))
            .collect();
        // SQLite calls fchown only when running as root (as the test may);
        // as the unit's `moat` user it does not.
        let refused: Vec<&&String> = refused.iter().filter(|c| c.as_str() != "fchown").collect();
        assert!(
            refused.is_empty(),
            "{what} made system calls the units' SystemCallFilter refuses: {refused:?}"
        );
    }
}
