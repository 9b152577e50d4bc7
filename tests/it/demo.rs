//! `moat demo` (and `moat demo --transparent`, as root) runs to completion
//! and shows what a new user should see.

use crate::support;

/// Runs `moat demo ARGS` to its end; its standard output, once it exited 0.
fn run_demo(args: &[&str]) -> String {
    let out = std::process::Command::new(support::moat_bin())
        .arg("demo")
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run moat demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn demo_runs_to_completion_showing_allowed_and_denied_traffic_and_a_renewal() {
    let stdout = run_demo(&[]);
    let line = |needle: &str| {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stdout}"))
            .to_owned()
    };
    // Identities from the CA.
    assert!(line("frontend  spiffe://demo.local/ns/shop/sa/frontend").contains("serial"));
    // Allowed read, denied write, JWT missing, JWT present, traversal denied.
    let read = line("GET /invoices/42 ");
    assert!(
        read.contains("200") && read.contains("allow") && read.contains("read-invoices"),
        "{read}"
    );
    let write = line("POST /invoices/42");
    assert!(
        write.contains("403") && write.contains("write-invoices"),
        "{write}"
    );
    let export = line("GET /export  ");
    assert!(
        export.contains("401") && export.contains("export-invoices"),
        "{export}"
    );
    let with_jwt = line("with alice's JWT");
    assert!(
        with_jwt.contains("200") && with_jwt.contains("verified user alice"),
        "{with_jwt}"
    );
    let traversal = line("/invoices/../admin/keys");
    assert!(traversal.contains("403"), "{traversal}");
    // The sidecar refuses clients without a trusted certificate.
    assert!(line("no certificate").contains("refused"));
    assert!(line("another CA").contains("refused"));
    // A renewal happened and traffic still flows.
    assert!(line("renewed over mutual TLS").contains("->"));
    assert!(line("after renewal").contains("200"));
    // The addresses under "Where to look" stop with this run: it says so.
    assert!(stdout.contains("the demo stops now"), "{stdout}");
    // Its files go too: the commands name `DIR`, and how to keep one.
    let working = line("working directory: ");
    let tmp = working
        .trim_start_matches("working directory: ")
        .split(' ')
        .next()
        .unwrap();
    assert!(
        !std::path::Path::new(tmp).exists(),
        "{tmp} is removed when the demo ends"
    );
    let looking = where_to_look(&stdout);
    assert!(looking.contains("`moat demo --dir DIR`"), "{looking}");
    assert!(looking.contains("logs       DIR/logs/*.log"), "{looking}");
    assert!(
        looking.contains("moat policy explain DIR/billing-policy.toml "),
        "{looking}"
    );
    assert!(!looking.contains(&format!("{tmp}/")), "{looking}");
    assert!(stdout.contains("demo finished"));
}

/// The "Where to look" section of the demo's output.
fn where_to_look(stdout: &str) -> String {
    let from = stdout
        .find("Where to look")
        .expect("a Where to look section");
    let to = stdout[from..]
        .find("demo finished")
        .unwrap_or(stdout.len() - from);
    stdout[from..from + to].to_owned()
}

/// With `--dir` the files stay: "Where to look" names them where they are,
/// and they are there after the demo ends.
#[test]
fn demo_with_a_dir_points_at_the_files_it_leaves_there() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let stdout = run_demo(&["--dir", support::path_str(&demo_dir)]);
    let looking = where_to_look(&stdout);
    let d = demo_dir.display();
    assert!(
        looking.contains(&format!("logs       {d}/logs/*.log")),
        "{looking}"
    );
    let policy = demo_dir.join("billing-policy.toml");
    assert!(
        looking.contains(&format!("moat policy explain {} ", policy.display())),
        "{looking}"
    );
    assert!(!looking.contains("DIR"), "{looking}");
    assert!(policy.is_file());
    let logs: Vec<_> = std::fs::read_dir(demo_dir.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    assert!(!logs.is_empty(), "logs are kept");
    // The command it shows works on the file it names.
    let explain = support::moat(&[
        "policy",
        "explain",
        support::path_str(&policy),
        "--peer",
        "spiffe://demo.local/ns/shop/sa/frontend",
        "--method",
        "POST",
        "--path",
        "/invoices/42",
    ]);
    assert!(
        explain.status.code().is_some(),
        "{}",
        String::from_utf8_lossy(&explain.stderr)
    );
    assert!(
        String::from_utf8_lossy(&explain.stdout).contains("write-invoices"),
        "{}{}",
        String::from_utf8_lossy(&explain.stdout),
        String::from_utf8_lossy(&explain.stderr)
    );
}

/// `moat demo --transparent` as a user would run it: it needs root.
fn transparent_demo() -> std::process::Command {
    let mut cmd = std::process::Command::new(support::moat_bin());
    cmd.args(["demo", "--transparent"]).env("RUST_LOG", "info");
    cmd
}

#[test]
fn transparent_demo_calls_by_plain_address_over_mtls_and_refuses_the_outsider() {
    if !support::require_root("moat demo --transparent (network namespaces)") {
        return;
    }
    let out = transparent_demo().output().expect("run moat demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let line = |needle: &str| {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stdout}"))
            .to_owned()
    };
    // The app called billing by its address, with no proxy settings.
    assert!(line("4. Requests").contains("http://10.200.0.2:8080/"));
    // The call went through, and billing saw frontend's verified ID.
    let read = line("GET /invoices/42");
    assert!(
        read.contains("200")
            && read.contains("read-invoices")
            && read.contains("billing saw caller spiffe://demo.local/ns/shop/sa/frontend"),
        "{read}"
    );
    // billing's route policy still decides.
    let write = line("POST /invoices/42");
    assert!(
        write.contains("403") && write.contains("write-invoices"),
        "{write}"
    );
    // The outsider's plaintext, and TLS without the mesh's certificate, are
    // refused, and billing's sidecar counted the plaintext.
    for what in ["plaintext HTTP", "no certificate", "another CA"] {
        let l = line(what);
        assert!(l.contains("refused"), "{l}");
    }
    assert!(
        line("moat_tls_handshake_failures_total{listener=\"billing\",reason=\"protocol\"}")
            .ends_with(" 1")
    );
    // Nothing is left behind.
    let pid = out_pid(&stdout);
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(
        !left.contains(&format!("moat-demo-{pid}-")),
        "namespaces left behind:\n{left}"
    );
    assert!(stdout.contains("demo finished"));
}

/// The demo's process ID, read from the namespace names it printed.
fn out_pid(stdout: &str) -> String {
    let at = stdout
        .find("namespace moat-demo-")
        .expect("a namespace name")
        + "namespace moat-demo-".len();
    let pid: String = stdout[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    assert!(!pid.is_empty(), "no process ID in the namespace names");
    pid
}

#[test]
fn transparent_demo_without_root_says_so_and_exits_64() {
    use std::os::unix::process::CommandExt;
    let mut cmd = transparent_demo();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(65532).gid(65532);
    }
    let out = cmd.output().expect("run moat demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("needs root: network namespaces and nftables"),
        "{stderr}"
    );
}

#[test]
fn transparent_demo_interrupted_removes_its_namespaces() {
    if !support::require_root("moat demo --transparent (network namespaces)") {
        return;
    }
    let (mut child, mut stdout, seen) = kept_running(transparent_demo());
    let child = &mut child.0;
    let pid = child.id();
    assert_eq!(out_pid(&seen), pid.to_string());
    let exists = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        String::from_utf8_lossy(&out.stdout).contains(&format!("moat-demo-{pid}-"))
    };
    assert!(exists(), "no namespaces while it runs");
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}:\n{seen}{rest}");
    assert!(rest.contains("removed the network namespaces"), "{rest}");
    assert!(!exists(), "namespaces left behind after Ctrl-C");
}

/// `demo --keep-running`, started and read until it says everything keeps
/// running: the running demo, the rest of its output, and what it printed.
fn kept_running(
    mut demo: std::process::Command,
) -> (
    Interrupted,
    std::io::BufReader<std::process::ChildStdout>,
    String,
) {
    use std::io::BufRead;
    let mut child = Interrupted(
        demo.arg("--keep-running")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run moat demo"),
    );
    let mut stdout = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while !seen.contains("Ctrl-C to stop") {
        line.clear();
        let n = stdout.read_line(&mut line).expect("read the demo's output");
        assert!(n > 0, "the demo ended before it kept running:\n{seen}");
        seen.push_str(&line);
    }
    (child, stdout, seen)
}

/// A demo that gets Ctrl-C (and is waited for) when the test ends, failed
/// or not, so that it removes its namespaces.
struct Interrupted(std::process::Child);

impl Drop for Interrupted {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
            let _ = self.0.wait();
        }
    }
}

/// `kill PID` (SIGTERM) reaches the demo alone, not the CA and sidecars it
/// started (a terminal's Ctrl-C reaches them all): they stop with it rather
/// than run on, orphaned, on their ports.
#[test]
fn demo_terminated_stops_the_processes_it_started() {
    use std::io::Read;
    let mut demo = std::process::Command::new(support::moat_bin());
    demo.arg("demo");
    let (mut child, mut stdout, _) = kept_running(demo);
    let child = &mut child.0;
    let pid = child.id();
    let started = children_of(pid);
    assert_eq!(started.len(), 3, "the CA and two sidecars: {started:?}");
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let status = child.wait().expect("the demo ends");
    assert!(status.success(), "{status:?}");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("terminated"), "{rest}");
    for p in started {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "process {p} outlived the demo"
        );
    }
}

/// The pids whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // `pid (comm) state ppid ...`; comm may hold spaces.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}
