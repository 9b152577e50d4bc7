//! The command line as an operator meets it: exit codes systemd can act on
//! (64 for anything a restart will not fix), each cause of an error printed
//! once, `--help` that ends with examples, shell completion, commands whose
//! standard output is their output alone, and the rotation of file-managed
//! certificates with `moat ca issue --force`. What `moat ca` commands
//! check before they touch the CA is in `ca_cli`.

use crate::support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Running, ca_init, moat_bin, path_str};

/// What a finished `moat` run left.
pub(crate) struct Exit {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `cmd` to its exit (killed, and the test failed, if it is still
/// running after a minute: every command here is expected to stop by itself).
pub(crate) fn run(mut cmd: Command) -> Exit {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn moat");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not exit within a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Exit {
        code: status.code(),
        stdout,
        stderr,
    }
}

/// `moat ARGS...`, with no `RUST_LOG`: what an operator sees.
pub(crate) fn moat(args: &[&str]) -> Exit {
    let mut cmd = Command::new(moat_bin());
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("MOAT_LOG_FORMAT");
    run(cmd)
}

/// How many times `needle` occurs in `haystack`.
fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// A proxy configuration with a file identity, the admin listener on
/// `admin`, and one outbound listener on a free loopback port.
fn files_config(dir: &Path, cert: &Path, key: &Path, bundle: &Path, admin: &str) -> PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            r#"[identity]
cert = "{}"
key = "{}"
bundle = "{}"

[admin]
listen = "{admin}"

[[outbound]]
name = "out"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:9"
peer = "spiffe://example.org/peer"
"#,
            cert.display(),
            key.display(),
            bundle.display()
        ),
    )
    .unwrap();
    path
}

/// A CA directory, a certificate and key issued by it, and its bundle.
struct Files {
    dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_init(&dir.path().join("ca"));
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    ca.issue("spiffe://example.org/vm/db", "1h", &cert, &key)
        .unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, ca.bundle().unwrap()).unwrap();
    Files {
        ca: ca.dir().to_owned(),
        dir,
        cert,
        key,
        bundle,
    }
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    for args in [
        &["no-such-command"][..],
        &["ca", "init", "--trust-domain", "example.org"],
        &["proxy"],
        &[
            "ca",
            "token",
            "--dir",
            "/nonexistent",
            "--id",
            "x",
            "--ttl",
            "forever",
        ],
        &["completion", "tcsh"],
    ] {
        let out = moat(args);
        assert_eq!(out.code, Some(64), "moat {args:?}: {}", out.stderr);
        assert!(!out.stderr.is_empty(), "moat {args:?} says nothing");
    }
    for args in [&["--help"][..], &["--version"], &["ca", "issue", "--help"]] {
        let out = moat(args);
        assert_eq!(out.code, Some(0), "moat {args:?}: {}", out.stderr);
    }
}

#[test]
fn a_missing_certificate_exits_64_and_says_why_once() {
    let f = files();
    let missing = f.dir.path().join("missing.crt");
    let config = files_config(f.dir.path(), &missing, &f.key, &f.bundle, "127.0.0.1:0");
    let out = moat(&["proxy", "--config", path_str(&config)]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert_eq!(count(&out.stderr, "missing.crt"), 1, "{}", out.stderr);
    assert_eq!(
        count(&out.stderr, "No such file or directory"),
        1,
        "{}",
        out.stderr
    );
}

#[test]
fn a_key_of_another_certificate_exits_64() {
    let f = files();
    let other_cert = f.dir.path().join("other.crt");
    let other_key = f.dir.path().join("other.key");
    support::harness()
        .ok(&[
            "ca",
            "issue",
            "--dir",
            path_str(&f.ca),
            "--id",
            "spiffe://example.org/vm/other",
            "--cert-out",
            path_str(&other_cert),
            "--key-out",
            path_str(&other_key),
        ])
        .unwrap();
    let config = files_config(f.dir.path(), &f.cert, &other_key, &f.bundle, "127.0.0.1:0");
    let out = moat(&["proxy", "--config", path_str(&config)]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("does not fit"), "{}", out.stderr);
    // Which two files, in words: not rustls's `KeyMismatch`.
    assert!(
        out.stderr.contains(&format!(
            "key {}, certificate {}: it is the key of another certificate",
            other_key.display(),
            f.cert.display()
        )),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("KeyMismatch"), "{}", out.stderr);
}

#[test]
fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let f = files();
    let config = f.dir.path().join("proxy.toml");
    // An inbound without a policy warns at start; the missing key then stops it.
    std::fs::write(
        &config,
        format!(
            "[identity]\ncert = \"{}\"\nkey = \"{}\"\nbundle = \"{}\"\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"127.0.0.1:8080\"\n",
            f.cert.display(),
            f.dir.path().join("missing.key").display(),
            f.bundle.display()
        ),
    )
    .unwrap();
    let out = moat(&[
        "proxy",
        "--config",
        path_str(&config),
        "--log-format",
        "text",
    ]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("no route policy"), "{}", out.stderr);
    assert!(
        !out.stderr.contains('\u{1b}'),
        "escape codes in a pipe: {:?}",
        out.stderr
    );
}

#[test]
fn lifetimes_over_the_limit_are_refused_in_the_unit_of_the_limit() {
    let f = files();
    let token = moat(&[
        "ca",
        "token",
        "--dir",
        path_str(&f.ca),
        "--id",
        "spiffe://example.org/vm/db",
        "--ttl",
        "30d",
    ]);
    assert_eq!(token.code, Some(64), "{}", token.stderr);
    assert!(
        token.stderr.contains(
            "--ttl: a join token's lifetime must be more than 0 and at most 24h, not 30d"
        ),
        "{}",
        token.stderr
    );
    // Minting is not verifying: no "the credential is not a valid token".
    assert!(!token.stderr.contains("credential"), "{}", token.stderr);
    let issue = moat(&[
        "ca",
        "issue",
        "--dir",
        path_str(&f.ca),
        "--id",
        "spiffe://example.org/vm/db",
        "--ttl",
        "48h",
        "--out",
        path_str(&f.dir.path().join("db.pem")),
    ]);
    assert_eq!(issue.code, Some(64), "{}", issue.stderr);
    assert!(
        issue.stderr.contains(
            "certificate lifetime 48h is not allowed: it must be more than 0 and at most 24h"
        ),
        "{}",
        issue.stderr
    );
}

#[test]
fn ca_issue_without_an_output_names_both_ways_to_give_one() {
    let f = files();
    let out = moat(&[
        "ca",
        "issue",
        "--dir",
        path_str(&f.ca),
        "--id",
        "spiffe://example.org/vm/db",
    ]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr.contains("--cert-out") && out.stderr.contains("--out"),
        "both --cert-out/--key-out and --out are offered: {}",
        out.stderr
    );
}

#[test]
fn a_host_name_where_an_address_belongs_says_what_is_expected() {
    let f = files();
    let config = f.dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\ncert = \"{}\"\nkey = \"{}\"\nbundle = \"{}\"\n\n\
             [[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"localhost:8080\"\n",
            f.cert.display(),
            f.key.display(),
            f.bundle.display()
        ),
    )
    .unwrap();
    let out = moat(&["proxy", "--config", path_str(&config)]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr.contains(":9:11:")
            && out
                .stderr
                .contains("\"localhost:8080\" is not an IP address and port")
            && out.stderr.contains("host names are not resolved here"),
        "{}",
        out.stderr
    );
}

#[test]
fn an_expired_certificate_exits_64() {
    let f = files();
    let issuer = moat_testkit::pki::ca_dir_issuer(&f.ca).unwrap();
    let expired = moat_testkit::pki::leaf(&issuer, "", |p| {
        p.subject_alt_names =
            vec![moat_testkit::pki::uri_san("spiffe://example.org/vm/db").unwrap()];
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2020, 1, 2);
    })
    .unwrap();
    let cert = f.dir.path().join("expired.crt");
    let key = f.dir.path().join("expired.key");
    std::fs::write(&cert, &expired.cert).unwrap();
    std::fs::write(&key, &expired.key).unwrap();
    let config = files_config(f.dir.path(), &cert, &key, &f.bundle, "127.0.0.1:0");
    let out = moat(&["proxy", "--config", path_str(&config)]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("expired"), "{}", out.stderr);
}

#[test]
fn a_bundle_of_another_ca_names_the_roots_it_tried() {
    let f = files();
    let (_, foreign) = moat_testkit::pki::foreign_ca("Some Other Root").unwrap();
    let bundle = f.dir.path().join("foreign.pem");
    std::fs::write(&bundle, foreign).unwrap();
    let config = files_config(f.dir.path(), &f.cert, &f.key, &bundle, "127.0.0.1:0");
    let out = moat(&["proxy", "--config", path_str(&config)]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("does not lead to any root of the bundle"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("Some Other Root"), "{}", out.stderr);
}

#[test]
fn a_port_in_use_exits_1_and_says_so_once() {
    let f = files();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap().to_string();
    let config = files_config(f.dir.path(), &f.cert, &f.key, &f.bundle, &admin);
    let out = moat(&["proxy", "--config", path_str(&config)]);
    // A runtime condition, which may pass: systemd's Restart=on-failure retries.
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(
        count(&out.stderr, "Address already in use"),
        1,
        "{}",
        out.stderr
    );
    assert_eq!(count(&out.stderr, &admin), 1, "{}", out.stderr);
    // The CA names which of its two listeners, and how to do without the
    // admin one.
    let out = moat(&[
        "ca",
        "serve",
        "--dir",
        path_str(&f.ca),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        &admin,
    ]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "moat: listener admin (--admin; --admin off disables it): cannot listen on {admin}: Address already in use"
        )),
        "{}",
        out.stderr
    );
    drop(taken);
}

/// Files in `dir` handed to the unprivileged user the test runs moat as.
fn give_to_nobody(dir: &Path) {
    for entry in walk(dir) {
        std::os::unix::fs::chown(&entry, Some(65534), Some(65534)).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn as_nobody(args: &[&str]) -> Exit {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(moat_bin())
        .args(args)
        .env_remove("RUST_LOG");
    run(cmd)
}

#[test]
fn a_privileged_port_as_non_root_exits_64_with_the_capability_to_add() {
    if !support::require_root("running moat as another user (setpriv)") {
        return;
    }
    let f = files();
    let config = files_config(f.dir.path(), &f.cert, &f.key, &f.bundle, "127.0.0.1:80");
    give_to_nobody(f.dir.path());
    let out = as_nobody(&["proxy", "--config", path_str(&config)]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr.contains("CAP_NET_BIND_SERVICE"),
        "{}",
        out.stderr
    );
    assert_eq!(count(&out.stderr, "Permission denied"), 1, "{}", out.stderr);

    let out = as_nobody(&[
        "ca",
        "serve",
        "--dir",
        path_str(&f.ca),
        "--listen",
        "127.0.0.1:443",
        "--admin",
        "off",
    ]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr.contains("CAP_NET_BIND_SERVICE"),
        "{}",
        out.stderr
    );
}

#[test]
fn every_shipped_unit_that_restarts_stops_on_exit_64() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/systemd");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "service") {
            continue;
        }
        let unit = std::fs::read_to_string(&path).unwrap();
        let restarts = unit
            .lines()
            .any(|l| l.starts_with("Restart=") && l != "Restart=no");
        if restarts {
            assert!(
                unit.lines().any(|l| l == "RestartPreventExitStatus=64"),
                "{}: restarts but not RestartPreventExitStatus=64",
                path.display()
            );
        }
    }
}

/// Every command path (`["ca", "issue"]`, ...), read from the `Commands:`
/// sections of `--help`.
fn command_paths() -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut queue = vec![Vec::<String>::new()];
    while let Some(path) = queue.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = moat(&args);
        assert_eq!(out.code, Some(0), "moat {args:?}: {}", out.stderr);
        let mut in_commands = false;
        for line in out.stdout.lines() {
            if line == "Commands:" {
                in_commands = true;
                continue;
            }
            if in_commands {
                let Some(name) = line
                    .strip_prefix("  ")
                    .and_then(|l| l.split_whitespace().next())
                else {
                    in_commands = false;
                    continue;
                };
                if name != "help" {
                    let mut sub = path.clone();
                    sub.push(name.to_owned());
                    queue.push(sub);
                }
            }
        }
        paths.push(path);
    }
    paths
}

#[test]
fn every_help_ends_with_examples_and_describes_every_option() {
    let paths = command_paths();
    assert!(paths.len() > 15, "found only {paths:?}");
    for path in paths {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        // -h: the one-line form of each entry (--help may put it below).
        args.push("-h");
        let help = moat(&args).stdout;
        assert!(
            help.contains("\nExamples:\n"),
            "moat {args:?} has no examples:\n{help}"
        );
        let examples = help.split("\nExamples:\n").last().unwrap();
        assert!(
            examples
                .lines()
                .any(|l| l.trim_start().starts_with("moat ")),
            "moat {args:?}: examples without a moat command:\n{help}"
        );
        // Under Options: and Arguments:, every entry has a description, on
        // its line or (clap's layout for long entries) indented below it.
        let lines: Vec<&str> = help.lines().collect();
        let mut section = "";
        for (i, line) in lines.iter().enumerate() {
            if !line.starts_with(' ') {
                section = line;
                continue;
            }
            if section != "Options:" && section != "Arguments:" {
                continue;
            }
            let entry = line.trim_start();
            let indent = line.len() - entry.len();
            let starts_entry = indent <= 6 && entry.starts_with(['-', '<', '[']);
            if !starts_entry {
                continue;
            }
            let same_line = entry.split("  ").skip(1).any(|s| !s.trim().is_empty());
            let below = lines.get(i + 1).is_some_and(|next| {
                let t = next.trim_start();
                !t.is_empty() && next.len() - t.len() > indent && !t.starts_with('-')
            });
            assert!(
                same_line || below,
                "moat {args:?}: {line:?} has no description:\n{help}"
            );
        }
    }
}

#[test]
fn log_format_is_offered_only_by_commands_that_log() {
    for (args, offered) in [
        (&["proxy", "--help"][..], true),
        (&["ca", "serve", "--help"], true),
        (&["redirect", "--help"], true),
        (&["demo", "--help"], true),
        (&["ca", "token", "--help"], false),
        (&["ca", "issue", "--help"], false),
        (&["policy", "check", "--help"], false),
        (&["inject", "--help"], false),
        (&["doctor", "--help"], false),
        (&["--help"], false),
    ] {
        let help = moat(args).stdout;
        assert_eq!(
            help.contains("--log-format"),
            offered,
            "moat {args:?}:\n{help}"
        );
    }
}

#[test]
fn completion_scripts_for_bash_zsh_and_fish() {
    let bash = moat(&["completion", "bash"]);
    assert_eq!(bash.code, Some(0), "{}", bash.stderr);
    assert!(bash.stdout.contains("complete -F"), "{}", bash.stdout);
    assert!(bash.stdout.contains("--trust-domain"), "completes flags");
    // bash itself reads it without a syntax error.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("moat.bash");
    std::fs::write(&script, &bash.stdout).unwrap();
    let out = support::tool("bash", &["-n", path_str(&script)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let zsh = moat(&["completion", "zsh"]);
    assert_eq!(zsh.code, Some(0));
    assert!(zsh.stdout.starts_with("#compdef moat"), "{}", zsh.stdout);
    let fish = moat(&["completion", "fish"]);
    assert_eq!(fish.code, Some(0));
    assert!(fish.stdout.contains("complete -c moat"), "{}", fish.stdout);
}

#[test]
fn ca_token_prints_the_token_alone_and_ca_init_the_next_steps() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let init = moat(&[
        "ca",
        "init",
        "--dir",
        path_str(&ca),
        "--trust-domain",
        "example.org",
    ]);
    assert_eq!(init.code, Some(0), "{}", init.stderr);
    assert!(init.stdout.contains("Next steps:"), "{}", init.stdout);
    assert!(
        init.stdout
            .contains(&format!("moat ca serve --dir {}", ca.display())),
        "{}",
        init.stdout
    );
    let token = moat(&[
        "ca",
        "token",
        "--dir",
        path_str(&ca),
        "--id",
        "spiffe://example.org/vm/a",
    ]);
    assert_eq!(token.code, Some(0), "{}", token.stderr);
    assert_eq!(token.stdout.lines().count(), 1, "{}", token.stdout);
    assert_eq!(
        token.stdout.trim().split('.').count(),
        3,
        "a JWT: {}",
        token.stdout
    );
    assert!(token.stderr.is_empty(), "nothing logged: {}", token.stderr);
    // The older place of --log-format, before the command, still works.
    let old = moat(&[
        "--log-format",
        "json",
        "ca",
        "bundle",
        "--dir",
        path_str(&ca),
    ]);
    assert_eq!(old.code, Some(0), "{}", old.stderr);
    assert!(old.stdout.starts_with("-----BEGIN CERTIFICATE-----"));
}

#[test]
fn ca_issue_refuses_to_overwrite_without_force() {
    let f = files();
    let args = |force: bool| {
        let mut a = vec![
            "ca".to_owned(),
            "issue".into(),
            "--dir".into(),
            path_str(&f.ca).into(),
            "--id".into(),
            "spiffe://example.org/vm/db".into(),
            "--cert-out".into(),
            path_str(&f.cert).into(),
            "--key-out".into(),
            path_str(&f.key).into(),
        ];
        if force {
            a.push("--force".into());
        }
        a
    };
    let before = std::fs::read(&f.cert).unwrap();
    let refused = moat(&args(false).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(refused.code, Some(64), "{}", refused.stderr);
    assert!(refused.stderr.contains("--force"), "{}", refused.stderr);
    assert_eq!(std::fs::read(&f.cert).unwrap(), before, "left as it was");
    let forced = moat(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(forced.code, Some(0), "{}", forced.stderr);
    assert_ne!(std::fs::read(&f.cert).unwrap(), before, "replaced");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&f.key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let leftovers = temporary_files(f.dir.path());
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Issuances the CA at `ca` has recorded.
fn issued_count(ca: &Path) -> i64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let engine = moat_ca::store::config::Engine::Sqlite;
        let ca = moat_ca::store::CaDir::open(ca, &engine).await.unwrap();
        ca.issued_count().await.unwrap()
    })
}

/// Names in `dir` that a half-done `moat ca issue` would leave.
fn temporary_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn ca_issue_to_a_path_it_cannot_write_exits_64_and_records_nothing() {
    let f = files();
    let before = issued_count(&f.ca);
    let dir = f.dir.path();
    let missing = dir.join("no-such-dir").join("y.pem");
    let cert = dir.join("y.crt");
    let key = dir.join("y.key");
    let issue = |extra: &[&str]| {
        let mut args = vec![
            "ca",
            "issue",
            "--dir",
            path_str(&f.ca),
            "--id",
            "spiffe://example.org/vm/y",
        ];
        args.extend_from_slice(extra);
        moat(&args)
    };
    let mut cases = vec![
        // The certificate's directory does not exist (the audit's case).
        (
            vec![
                "--cert-out",
                path_str(&missing),
                "--key-out",
                path_str(&key),
            ],
            missing.clone(),
            "No such file or directory",
        ),
        // The key's.
        (
            vec![
                "--cert-out",
                path_str(&cert),
                "--key-out",
                path_str(&missing),
            ],
            missing.clone(),
            "No such file or directory",
        ),
        // One file in a missing directory.
        (
            vec!["--out", path_str(&missing)],
            missing.clone(),
            "No such file or directory",
        ),
        // A directory where the file belongs, even with --force.
        (
            vec!["--out", path_str(dir), "--force"],
            dir.to_owned(),
            "it is a directory",
        ),
    ];
    // Root writes to any directory whatever its mode: that case only as
    // another user.
    let read_only = dir.join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    let in_read_only = read_only.join("y.pem");
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o500)).unwrap();
        cases.push((
            vec!["--out", path_str(&in_read_only)],
            in_read_only.clone(),
            "Permission denied",
        ));
    }
    for (args, path, why) in &cases {
        let out = issue(args);
        assert_eq!(out.code, Some(64), "{args:?}: {}", out.stderr);
        let want = format!("moat: {}: cannot create the file: {why}", path.display());
        assert!(out.stderr.starts_with(&want), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.trim_end().ends_with("nothing was issued"),
            "{args:?}: {}",
            out.stderr
        );
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
        assert!(!key.exists() && !cert.exists(), "{args:?}: half a pair");
        assert!(temporary_files(dir).is_empty(), "{args:?}");
        assert!(temporary_files(&read_only).is_empty(), "{args:?}");
    }
    assert_eq!(issued_count(&f.ca), before, "nothing recorded");

    // With writable paths the same command issues, and records it once.
    let out = issue(&["--cert-out", path_str(&cert), "--key-out", path_str(&key)]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(issued_count(&f.ca), before + 1);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert!(
        std::fs::read_to_string(&cert)
            .unwrap()
            .contains("CERTIFICATE")
    );
    assert!(temporary_files(dir).is_empty());
}

/// Starts a proxy on `config` and waits for its first certificate.
fn proxy(config: &Path) -> (Running, std::net::SocketAddr) {
    let mut p = Running::start(&[
        "--log-format",
        "json",
        "proxy",
        "--config",
        path_str(config),
    ]);
    let admin = p.listening_addr("admin");
    p.wait_for_log(Duration::from_secs(30), |l| {
        l["message"] == "certificate loaded"
    });
    (p, admin)
}

fn serial_of(cert: &Path) -> String {
    let pem = std::fs::read(cert).unwrap();
    moat_ca::client::Svid::from_pem(&pem).unwrap().serial
}

/// Warnings the proxy logged about its identity files.
fn identity_warnings(p: &Running) -> Vec<Value> {
    p.json_logs()
        .into_iter()
        .filter(|l| l["level"] == "WARN")
        .filter(|l| {
            let text = l.to_string();
            text.contains("KeyMismatch")
                || text.contains("unusable")
                || text.contains("does not fit")
        })
        .collect()
}

#[test]
fn rotating_two_files_with_ca_issue_force_reloads_without_a_key_mismatch() {
    let f = files();
    let config = files_config(f.dir.path(), &f.cert, &f.key, &f.bundle, "127.0.0.1:0");
    let (mut p, _) = proxy(&config);
    for round in 0..3 {
        support::harness()
            .ok(&[
                "ca",
                "issue",
                "--dir",
                path_str(&f.ca),
                "--id",
                "spiffe://example.org/vm/db",
                "--cert-out",
                path_str(&f.cert),
                "--key-out",
                path_str(&f.key),
                "--force",
            ])
            .unwrap();
        let serial = serial_of(&f.cert);
        p.wait_for_log(Duration::from_secs(30), |l| {
            l["message"] == "certificate reloaded" && l["serial"] == serial.as_str()
        });
        assert!(
            identity_warnings(&p).is_empty(),
            "round {round}: {:?}",
            identity_warnings(&p)
        );
    }
}

#[test]
fn one_pem_with_certificate_and_key_serves_and_rotates() {
    let f = files();
    let pem = f.dir.path().join("tls.pem");
    let issue = |force: bool| {
        let mut args = vec![
            "ca",
            "issue",
            "--dir",
            path_str(&f.ca),
            "--id",
            "spiffe://example.org/vm/db",
            "--out",
            path_str(&pem),
        ];
        if force {
            args.push("--force");
        }
        support::harness().ok(&args).unwrap()
    };
    issue(false);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&pem).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the file holds the key");
    let config = files_config(f.dir.path(), &pem, &pem, &f.bundle, "127.0.0.1:0");
    let (mut p, _) = proxy(&config);
    issue(true);
    let serial = serial_of(&pem);
    p.wait_for_log(Duration::from_secs(30), |l| {
        l["message"] == "certificate reloaded" && l["serial"] == serial.as_str()
    });
    assert!(
        identity_warnings(&p).is_empty(),
        "{:?}",
        identity_warnings(&p)
    );
}

#[test]
fn san_adds_to_localhost_and_loopback() {
    if !support::require("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_init(&dir.path().join("ca"));
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, ca.bundle().unwrap()).unwrap();
    let mut server = Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(ca.dir()),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--san",
        "ca.example.internal",
    ]);
    let addr = server.listening_addr("ca");
    for host in ["127.0.0.1", "localhost", "ca.example.internal"] {
        let resolve = format!("{host}:{}:127.0.0.1", addr.port());
        let url = format!("https://{host}:{}/v1/bundle", addr.port());
        let out = support::tool(
            "curl",
            &[
                "-sf",
                "--cacert",
                path_str(&bundle),
                "--resolve",
                &resolve,
                &url,
            ],
        );
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn half_a_rotation_waits_for_the_other_file_instead_of_warning() {
    let f = files();
    let config = files_config(f.dir.path(), &f.cert, &f.key, &f.bundle, "127.0.0.1:0");
    let (mut p, _) = proxy(&config);
    // A new pair made elsewhere, then moved in one file at a time.
    let staged = tempfile::tempdir_in(f.dir.path()).unwrap();
    let (cert, key) = (staged.path().join("new.crt"), staged.path().join("new.key"));
    support::harness()
        .ok(&[
            "ca",
            "issue",
            "--dir",
            path_str(&f.ca),
            "--id",
            "spiffe://example.org/vm/db",
            "--cert-out",
            path_str(&cert),
            "--key-out",
            path_str(&key),
        ])
        .unwrap();
    let serial = serial_of(&cert);
    std::fs::rename(&key, &f.key).unwrap();
    p.wait_for_log(Duration::from_secs(30), |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("do not fit yet; waiting for the other file"))
    });
    std::fs::rename(&cert, &f.cert).unwrap();
    p.wait_for_log(Duration::from_secs(30), |l| {
        l["message"] == "certificate reloaded" && l["serial"] == serial.as_str()
    });
    assert!(
        identity_warnings(&p).is_empty(),
        "{:?}",
        identity_warnings(&p)
    );
}
