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
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
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

