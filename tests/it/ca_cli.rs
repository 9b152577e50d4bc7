//! `moat ca` as an operator meets it before anything is served: files in
//! the CA directory a restart cannot fix exit 64, one SQLite CA is served
//! (or migrated) by one process at a time, `ca.toml` is honoured by every
//! command, and refusals name the flag and what was typed.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;

use crate::cli::{Exit, moat};
use crate::support::{self, ca_init, path_str};

const ID: &str = "spiffe://example.org/vm/db";

/// A fresh CA directory in a temp dir (kept alive by the returned guard).
fn ca() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ca_init(&tmp.path().join("ca")).dir().to_owned();
    (tmp, dir)
}

/// `moat ca serve --dir DIR` on port 0 with the admin listener off, run to
/// its exit (every use here expects it to refuse to start).
fn serve_exit(dir: &Path, extra: &[&str]) -> Exit {
    let mut args = vec![
        "ca",
        "serve",
        "--dir",
        path_str(dir),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
    ];
    args.extend_from_slice(extra);
    moat(&args)
}

fn token(dir: &Path, extra: &[&str]) -> Exit {
    let mut args = vec!["ca", "token", "--dir", path_str(dir), "--id", ID];
    args.extend_from_slice(extra);
    moat(&args)
}

#[test]
fn ca_files_a_restart_cannot_fix_exit_64() {
    // A root key that is not PEM.
    let (_tmp, dir) = ca();
    std::fs::write(dir.join("roots/1.key"), "garbage").unwrap();
    let out = serve_exit(&dir, &[]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("roots/1.key"), "{}", out.stderr);

    // No token key.
    let (_tmp, dir) = ca();
    std::fs::remove_file(dir.join("token.key")).unwrap();
    let out = token(&dir, &[]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("token.key"), "{}", out.stderr);

    // A ca.db that is not a database.
    let (_tmp, dir) = ca();
    std::fs::write(dir.join("ca.db"), vec![b'x'; 8192]).unwrap();
    for f in ["ca.db-wal", "ca.db-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let out = token(&dir, &[]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("ca.db"), "{}", out.stderr);
    let out = serve_exit(&dir, &[]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
}

/// `moat ca serve` of `dir` on port 0, admin off, once it listens.
fn serve(dir: &Path) -> support::Running {
    let args = vec![
        "ca",
        "serve",
        "--dir",
        path_str(dir),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
    ];
    let mut server = support::Running::start(&args);
    server.listening_addr("ca");
    server
}

#[test]
fn a_sqlite_ca_is_served_or_migrated_by_one_process_at_a_time() {
    let (tmp, dir) = ca();
    let mut server = serve(&dir);
    let pid = server.child.id().to_string();

    // A second `serve` of the same directory refuses before it listens.
    let out = serve_exit(&dir, &[]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr.contains("a `moat ca serve`") && out.stderr.contains(&pid),
        "{}",
        out.stderr
    );

    // `migrate --from-sqlite` of a CA still serving refuses before it
    // connects anywhere (the URL leads nowhere: the refusal comes first).
    let pg_dir = tmp.path().join("pg");
    std::fs::create_dir_all(&pg_dir).unwrap();
    let port = support::free_port();
    std::fs::write(
        pg_dir.join("ca.toml"),
        format!("[store]\nurl = \"postgres://moat@127.0.0.1:{port}/moat?sslmode=disable\"\n"),
    )
    .unwrap();
    let migrate = || {
        moat(&[
            "ca",
            "migrate",
            "--dir",
            path_str(&pg_dir),
            "--from-sqlite",
            path_str(&dir),
        ])
    };
    let out = migrate();
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr.contains("stop it first") && out.stderr.contains(&pid),
        "{}",
        out.stderr
    );

    // Stopped, the lock is gone with it: the migration gets as far as the
    // (absent) database.
    server.signal("TERM");
    assert!(
        server
            .wait_exit(std::time::Duration::from_secs(30))
            .is_some()
    );
    let out = migrate();
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(!out.stderr.contains("stop it first"), "{}", out.stderr);
}

/// `moat ca issue --out DIR/NAME.pem` with `extra` flags.
fn issue(dir: &Path, out: &Path, extra: &[&str]) -> Exit {
    let mut args = vec![
        "ca",
        "issue",
        "--dir",
        path_str(dir),
        "--id",
        ID,
        "--out",
        path_str(out),
    ];
    args.extend_from_slice(extra);
    moat(&args)
}

/// Seconds between a PEM certificate's notBefore and notAfter.
fn lifetime_secs(pem_file: &Path) -> i64 {
    let pem = std::fs::read(pem_file).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let v = cert.validity();
    v.not_after.timestamp() - v.not_before.timestamp()
}

#[test]
fn ca_issue_honours_issuance_in_ca_toml() {
    let (tmp, dir) = ca();
    std::fs::write(
        dir.join("ca.toml"),
        "[issuance]\ndefault_ttl = \"10m\"\nmax_ttl = \"2h\"\n",
    )
    .unwrap();
    let out = tmp.path().join("db.pem");
    let done = issue(&dir, &out, &[]);
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    // The issuer backdates notBefore a little for clock skew: about 10m.
    let secs = lifetime_secs(&out);
    assert!((600..=600 + 300).contains(&secs), "lifetime {secs}s");

    let longer = issue(&dir, &out, &["--ttl", "3h", "--force"]);
    assert_eq!(longer.code, Some(64), "{}", longer.stderr);
    assert!(
        longer.stderr.contains("--ttl 3h")
            && longer.stderr.contains("max_ttl = \"2h\"")
            && longer.stderr.contains("ca.toml"),
        "{}",
        longer.stderr
    );
    let within = issue(&dir, &out, &["--ttl", "2h", "--force"]);
    assert_eq!(within.code, Some(0), "{}", within.stderr);
}

#[test]
fn ca_token_refuses_a_revoked_identity_as_ca_issue_does() {
    let (_tmp, dir) = ca();
    let revoked = moat(&["ca", "revoke", "--dir", path_str(&dir), "--id", ID]);
    assert_eq!(revoked.code, Some(0), "{}", revoked.stderr);
    // The revocation is the operator's own act: said on stdout, not as a
    // warning on stderr.
    assert!(!revoked.stderr.contains("WARN"), "{}", revoked.stderr);
    let out = token(&dir, &[]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "{ID} is revoked; `moat ca unrevoke --id {ID}` first"
        )),
        "{}",
        out.stderr
    );
    let unrevoked = moat(&["ca", "unrevoke", "--dir", path_str(&dir), "--id", ID]);
    assert_eq!(unrevoked.code, Some(0), "{}", unrevoked.stderr);
    assert!(!unrevoked.stderr.contains("WARN"), "{}", unrevoked.stderr);
    assert_eq!(token(&dir, &[]).code, Some(0));
}

#[test]
fn san_must_be_a_dns_name_or_an_ip_address() {
    let (_tmp, dir) = ca();
    for (san, want) in [
        ("foo bar", "not a DNS name or an IP address"),
        ("https://ca.example.org:8443", "give --san ca.example.org"),
        ("ca.example.org:8443", "give --san ca.example.org"),
    ] {
        let out = serve_exit(&dir, &["--san", san]);
        assert_eq!(out.code, Some(64), "--san {san}: {}", out.stderr);
        assert!(
            out.stderr.contains("--san") && out.stderr.contains(san) && out.stderr.contains(want),
            "--san {san}: {}",
            out.stderr
        );
    }
}

#[test]
fn a_ca_dir_with_keys_but_no_store_asks_for_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    // What `moat ca init --config elsewhere` leaves for PostgreSQL: keys, no ca.db.
    ca_init(&dir);
    std::fs::remove_file(dir.join("ca.db")).unwrap();
    let out = serve_exit(&dir, &[]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr.contains("has the CA's keys but no state store")
            && out.stderr.contains("--config"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("moat ca init --dir"), "{}", out.stderr);
}

#[test]
fn serve_warns_of_readable_keys_and_a_public_admin_and_says_what_it_serves() {
    use std::os::unix::fs::PermissionsExt;
    let (_tmp, dir) = ca();
    for key in ["token.key", "roots/1.key"] {
        std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let mut server = support::Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(&dir),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "0.0.0.0:0",
        "--san",
        "ca.example.internal",
    ]);
    server.listening_addr("admin");
    let logs = server.json_logs();
    for key in ["token.key", "roots/1.key"] {
        let path = dir.join(key);
        assert!(
            logs.iter().any(|l| l["level"] == "WARN"
                && l["file"] == path_str(&path)
                && l["mode"] == "0644"
                && l["message"].as_str().unwrap_or("").contains("chmod 600")),
            "{key}: {logs:#?}"
        );
    }
    assert!(
        logs.iter().any(|l| l["level"] == "WARN"
            && l["message"]
                .as_str()
                .unwrap_or("")
                .contains("--admin listens beyond loopback")),
        "{logs:#?}"
    );
    let start = logs
        .iter()
        .find(|l| l["message"] == "starting the CA")
        .unwrap_or_else(|| panic!("{logs:#?}"));
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"), "{start}");
    assert_eq!(start["root"], 1, "{start}");
    assert!(start["root_expires"].as_str().is_some(), "{start}");
    assert!(
        start["sans"]
            .as_str()
            .unwrap_or("")
            .contains("ca.example.internal"),
        "{start}"
    );

    // Keys of mode 0600 and a loopback admin: nothing to warn about.
    drop(server);
    for key in ["token.key", "roots/1.key"] {
        std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut quiet = support::Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(&dir),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    quiet.listening_addr("admin");
    let warnings: Vec<_> = quiet
        .json_logs()
        .into_iter()
        .filter(|l| l["level"] == "WARN")
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}

#[test]
fn refusals_echo_what_was_typed() {
    let (tmp, dir) = ca();
    let out = token(&dir, &["--ttl", "1y"]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("at most 24h, not 1y"), "{}", out.stderr);

    let out = moat(&[
        "ca",
        "init",
        "--dir",
        path_str(&tmp.path().join("other")),
        "--trust-domain",
        "example.org",
        "--root-ttl",
        "365",
    ]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("365d"), "{}", out.stderr);
    assert!(!out.stderr.contains("365sec"), "{}", out.stderr);

    // An output path that is a directory: the same message with or
    // without --force (which cannot help).
    let target = tmp.path().join("certs");
    std::fs::create_dir(&target).unwrap();
    for force in [&[][..], &["--force"]] {
        let out = issue(&dir, &target, force);
        assert_eq!(out.code, Some(64), "{force:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("it is a directory") && !out.stderr.contains("pass --force"),
            "{force:?}: {}",
            out.stderr
        );
    }
}

#[test]
fn revoke_list_columns_line_up() {
    let (tmp, dir) = ca();
    let cert = tmp.path().join("db.crt");
    let key = tmp.path().join("db.key");
    crate::support::moat_ok(&[
        "ca",
        "issue",
        "--dir",
        path_str(&dir),
        "--id",
        ID,
        "--cert-out",
        path_str(&cert),
        "--key-out",
        path_str(&key),
    ]);
    let pem = std::fs::read(&cert).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
    let serial = parsed.raw_serial_as_string().replace(':', "");
    for args in [
        &["--serial", serial.as_str()][..],
        &["--id", "spiffe://example.org/vm/web"],
    ] {
        let mut cmd = vec!["ca", "revoke", "--dir", path_str(&dir)];
        cmd.extend_from_slice(args);
        let out = moat(&cmd);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    }
    let out = moat(&["ca", "revoke", "--dir", path_str(&dir), "--list"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    // Every column starts where its header does.
    let header = lines[0];
    for col in ["REVOKED", "UNTIL", "REASON"] {
        let at = header.find(col).unwrap();
        for row in &lines[1..] {
            let before = &row[..at];
            assert!(
                before.ends_with("  ") && !row[at..].starts_with(' '),
                "{col} at {at}:\n{}",
                out.stdout
            );
        }
    }
}
