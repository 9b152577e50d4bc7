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

