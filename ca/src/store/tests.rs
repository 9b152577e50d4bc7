use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use super::config::Engine;
use super::*;
use crate::client::WorkloadKey;
use crate::identity::{SpiffeId, TrustDomain};
use crate::issuer::ValidatedCsr;
use crate::token::{CredentialKind, TokenError};

async fn new_ca() -> (tempfile::TempDir, CaDir) {
    crate::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaDir::init(
        &tmp.path().join("ca"),
        &Engine::Sqlite,
        TrustDomain::parse("example.org").unwrap(),
        Duration::from_secs(86400),
    )
    .await
    .unwrap();
    (tmp, ca)
}

#[tokio::test]
async fn init_refuses_to_overwrite() {
    let (tmp, _ca) = new_ca().await;
    let err = CaDir::init(
        &tmp.path().join("ca"),
        &Engine::Sqlite,
        TrustDomain::parse("example.org").unwrap(),
        Duration::from_secs(86400),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyInitialized(_)));
}

#[tokio::test]
async fn init_makes_private_files() {
    let (tmp, _ca) = new_ca().await;
    let mode = |p: &str| {
        fs::metadata(tmp.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("ca"), 0o700);
    assert_eq!(mode("ca/token.key"), 0o600);
    assert_eq!(mode("ca/roots/1.key"), 0o600);
    assert_eq!(mode("ca/ca.db"), 0o600);
}

#[tokio::test]
async fn rotation_walks_through_its_states_and_bumps_the_version() {
    let (_tmp, ca) = new_ca().await;
    let v0 = ca.versions().await.unwrap().roots;
    assert_eq!(ca.bundle().await.unwrap().roots().len(), 1);
    assert!(ca.rotate_activate().await.is_err());
    assert!(ca.rotate_retire(false).await.is_err());
    ca.rotate_prepare(Duration::from_secs(86400)).await.unwrap();
    assert!(ca.rotate_prepare(Duration::from_secs(86400)).await.is_err());
    assert_eq!(ca.versions().await.unwrap().roots, v0 + 1);
    assert_eq!(ca.bundle().await.unwrap().roots().len(), 2);
    let old = ca.active_root().await.unwrap();
    ca.rotate_activate().await.unwrap();
    let new = ca.active_root().await.unwrap();
    assert_ne!(old.cert_der(), new.cert_der());
    assert_eq!(ca.bundle().await.unwrap().roots().len(), 2);
    // The serving certificate stays with the oldest root in the bundle,
    // which every client trusts, until --retire.
    let serving = |s: super::SigningState| s.serving_signer.cert_der().clone();
    assert_eq!(serving(ca.signing_state().await.unwrap()), *old.cert_der());
    // Nothing was issued under the old root: nothing to wait for.
    ca.rotate_retire(false).await.unwrap();
    assert_eq!(serving(ca.signing_state().await.unwrap()), *new.cert_der());
    let bundle = ca.bundle().await.unwrap();
    assert_eq!(bundle.roots(), &[new.cert_der().clone()]);
    assert_eq!(ca.versions().await.unwrap().roots, v0 + 3);
}

#[tokio::test]
async fn a_stale_version_is_a_conflict_and_changes_nothing() {
    let (_tmp, ca) = new_ca().await;
    let v = ca.versions().await.unwrap().roots;
    ca.rotate_prepare(Duration::from_secs(86400)).await.unwrap();
    let err = ca
        .store()
        .change_roots(v, &RootChange::Retire)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err}");
    assert_eq!(ca.versions().await.unwrap().roots, v + 1);
}

#[tokio::test]
async fn a_missing_or_foreign_root_key_is_named() {
    let (tmp, ca) = new_ca().await;
    ca.rotate_prepare(Duration::from_secs(86400)).await.unwrap();
    ca.rotate_activate().await.unwrap();
    let key = tmp.path().join("ca/roots/2.key");
    let saved = fs::read(&key).unwrap();
    fs::remove_file(&key).unwrap();
    let err = ca.active_root().await.unwrap_err();
    assert!(
        matches!(err, StoreError::KeyMissing { root: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("roots/2.key"), "{err}");
    // Root 1's key where root 2's belongs: refused, not used to sign.
    fs::copy(tmp.path().join("ca/roots/1.key"), &key).unwrap();
    let err = ca.active_root().await.unwrap_err();
    assert!(err.to_string().contains("not the key of root #2"), "{err}");
    fs::write(&key, saved).unwrap();
    ca.active_root().await.unwrap();
}

#[tokio::test]
async fn a_token_id_is_recorded_once() {
    let (_tmp, ca) = new_ca().await;
    let id = SpiffeId::parse("spiffe://example.org/vm/a").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let csr = ValidatedCsr::parse(key.csr_pem().unwrap().as_bytes()).unwrap();
    let root = ca.active_root().await.unwrap();
    let first = root
        .sign_svid(ca.trust_domain(), &id, &csr, Duration::from_secs(60))
        .unwrap();
    let second = root
        .sign_svid(ca.trust_domain(), &id, &csr, Duration::from_secs(60))
        .unwrap();
    let jti = ("abc".to_owned(), crate::token::unix_now() + 60);
    let recorded = ca
        .record_issuance(&first, &id, CredentialKind::JoinToken, Some(&jti), None)
        .await
        .unwrap();
    assert_eq!(recorded, Recorded::Issued);
    let err = ca
        .record_issuance(&second, &id, CredentialKind::JoinToken, Some(&jti), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Token(TokenError::Replayed)));
    assert_eq!(ca.issued_count().await.unwrap(), 1);
    assert!(ca.token_used("abc").await.unwrap());
}

/// The revocation check and the record are one transaction: a revoked
/// identity, or a renewal presenting a revoked certificate, records
/// nothing and spends no token; un-revoked, the same token still works.
#[tokio::test]
async fn a_revoked_issuance_records_nothing_and_spends_no_token() {
    let (_tmp, ca) = new_ca().await;
    let id = SpiffeId::parse("spiffe://example.org/vm/a").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let csr = ValidatedCsr::parse(key.csr_pem().unwrap().as_bytes()).unwrap();
    let root = ca.active_root().await.unwrap();
    let sign = || {
        root.sign_svid(ca.trust_domain(), &id, &csr, Duration::from_secs(60))
            .unwrap()
    };
    let first = sign();
    let recorded = ca
        .record_issuance(&first, &id, CredentialKind::Local, None, None)
        .await
        .unwrap();
    assert_eq!(recorded, Recorded::Issued);

    // A renewal presenting the revoked certificate.
    ca.revoke(RevocationTarget::Serial(first.serial.clone()), None, None)
        .await
        .unwrap();
    let renewal = ca
        .record_issuance(
            &sign(),
            &id,
            CredentialKind::Renewal,
            None,
            Some(&first.serial),
        )
        .await
        .unwrap();
    assert!(
        matches!(&renewal, Recorded::Revoked(r) if r.serial.as_deref() == Some(first.serial.as_str())),
        "{renewal:?}"
    );
    // Another certificate of the same identity renews.
    let other = ca
        .record_issuance(&sign(), &id, CredentialKind::Renewal, None, Some("00"))
        .await
        .unwrap();
    assert_eq!(other, Recorded::Issued);

    // The whole identity: a join token for it is refused and not spent.
    let whole = RevocationTarget::Id(id.as_str().to_owned());
    ca.revoke(whole.clone(), None, None).await.unwrap();
    let jti = ("jti-1".to_owned(), crate::token::unix_now() + 60);
    let token = ca
        .record_issuance(&sign(), &id, CredentialKind::JoinToken, Some(&jti), None)
        .await
        .unwrap();
    assert!(
        matches!(&token, Recorded::Revoked(r) if r.serial.is_none()),
        "{token:?}"
    );
    assert!(!ca.token_used("jti-1").await.unwrap());
    assert_eq!(ca.issued_count().await.unwrap(), 2);

    ca.unrevoke(whole).await.unwrap();
    let token = ca
        .record_issuance(&sign(), &id, CredentialKind::JoinToken, Some(&jti), None)
        .await
        .unwrap();
    assert_eq!(token, Recorded::Issued);
    assert!(ca.token_used("jti-1").await.unwrap());
    assert_eq!(ca.issued_count().await.unwrap(), 3);
}

/// A CA directory as moat made it before migrations were versioned: the
/// four original tables, root certificates only in files.
#[tokio::test]
async fn a_ca_from_before_versioned_migrations_is_upgraded_in_place() {
    crate::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    fs::create_dir_all(dir.join("roots")).unwrap();
    let td = TrustDomain::parse("example.org").unwrap();
    let root = crate::issuer::RootCa::generate(&td, 1, Duration::from_secs(86400)).unwrap();
    fs::write(dir.join("roots/1.crt"), root.cert_pem()).unwrap();
    fs::write(dir.join("roots/1.key"), root.dangerous_key_pem()).unwrap();
    let (_, token_pem) = crate::token::JoinTokenKey::generate().unwrap();
    fs::write(dir.join("token.key"), token_pem).unwrap();
    {
        let conn = rusqlite::Connection::open(dir.join("ca.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE roots (id INTEGER PRIMARY KEY, state TEXT NOT NULL, not_after INTEGER NOT NULL);
             CREATE TABLE issued (serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_after INTEGER NOT NULL,
                 kind TEXT NOT NULL, issued_at INTEGER NOT NULL);
             CREATE TABLE used_tokens (jti TEXT PRIMARY KEY, expires_at INTEGER NOT NULL, used_at INTEGER NOT NULL);
             INSERT INTO meta VALUES ('trust_domain', 'example.org');
             INSERT INTO roots VALUES (1, 'active', 4000000000);
             INSERT INTO used_tokens VALUES ('old-jti', 4000000000, 1);
             INSERT INTO issued VALUES ('01', 'spiffe://example.org/a', 4000000000, 'join_token', 1);",
        )
        .unwrap();
    }
    let ca = CaDir::open(&dir, &Engine::Sqlite).await.unwrap();
    assert_eq!(
        ca.store().schema_version().await.unwrap(),
        migrations::LATEST
    );
    assert!(ca.token_used("old-jti").await.unwrap());
    assert_eq!(ca.issued_count().await.unwrap(), 1);
    assert_eq!(
        ca.bundle().await.unwrap().roots(),
        &[root.cert_der().clone()]
    );
    ca.active_root().await.unwrap();
    // Opening again applies nothing twice.
    drop(ca);
    let again = CaDir::open(&dir, &Engine::Sqlite).await.unwrap();
    assert_eq!(again.versions().await.unwrap().roots, 1);
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused() {
    let (tmp, ca) = new_ca().await;
    drop(ca);
    let conn = rusqlite::Connection::open(tmp.path().join("ca/ca.db")).unwrap();
    conn.execute(
        "INSERT INTO moat_schema (version, name, applied_at) VALUES (99, 'future', 0)",
        [],
    )
    .unwrap();
    drop(conn);
    let err = CaDir::open(&tmp.path().join("ca"), &Engine::Sqlite)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn revocations_bump_the_version_and_end_with_what_they_name() {
    let (tmp, ca) = new_ca().await;
    let id = SpiffeId::parse("spiffe://example.org/frontend").unwrap();
    let (svid, _) = ca
        .issue_to_files(
            &id,
            Duration::from_secs(600),
            &tmp.path().join("c.pem"),
            &tmp.path().join("k.pem"),
        )
        .await
        .unwrap();
    let v0 = ca.versions().await.unwrap().revocations;

    // A serial: until the certificate expires; its identity is not revoked.
    let upper = svid.serial.to_uppercase();
    let serial = RevocationTarget::Serial(upper);
    let Revoked::New { target, record: r } = ca
        .revoke(serial.clone(), Some("lost laptop"), None)
        .await
        .unwrap()
    else {
        panic!("a first revocation is new")
    };
    assert_eq!(target, RevocationTarget::Serial(svid.serial.clone()));
    assert_eq!(
        r.serial.as_deref(),
        Some(svid.serial.as_str()),
        "normalized"
    );
    assert_eq!(r.until, unix(svid.not_after));
    assert_eq!(ca.versions().await.unwrap().revocations, v0 + 1);
    // The same serial spelled with a leading zero byte is the same target.
    let again = ca
        .revoke(
            RevocationTarget::Serial(format!("00:{}", svid.serial)),
            None,
            None,
        )
        .await
        .unwrap();
    assert!(
        matches!(&again, Revoked::Already { target, .. }
            if *target == RevocationTarget::Serial(svid.serial.clone())),
        "{again:?}"
    );
    assert_eq!(ca.versions().await.unwrap().revocations, v0 + 1);
    assert!(
        ca.revocation_for(Some(&svid.serial), &id)
            .await
            .unwrap()
            .is_some()
    );
    assert!(ca.revocation_for(Some("00"), &id).await.unwrap().is_none());

    // An identity: until un-revoked, but it stops mattering to sidecars
    // once its last certificate has expired.
    let whole = RevocationTarget::Id(id.as_str().to_owned());
    let Revoked::New { record: r, .. } = ca
        .revoke(whole.clone(), Some("compromised"), None)
        .await
        .unwrap()
    else {
        panic!("a first revocation is new")
    };
    assert_eq!(r.until, NO_END);
    assert_eq!(r.expires, unix(svid.not_after));
    assert!(ca.revocation_for(None, &id).await.unwrap().is_some());
    // Revoking again without asking for a change changes nothing: same
    // entry, same version (sidecars do not refetch).
    let v = ca.versions().await.unwrap().revocations;
    let again = ca.revoke(whole.clone(), None, None).await.unwrap();
    assert!(
        matches!(&again, Revoked::Already { record, .. } if *record == r),
        "{again:?}"
    );
    let same = ca
        .revoke(whole.clone(), Some("compromised"), None)
        .await
        .unwrap();
    assert!(matches!(same, Revoked::Already { .. }), "{same:?}");
    assert_eq!(ca.versions().await.unwrap().revocations, v);
    // A new reason replaces the entry; the list holds one row per target.
    let updated = ca
        .revoke(whole.clone(), Some("still compromised"), None)
        .await
        .unwrap();
    assert!(
        matches!(&updated, Revoked::Updated { before, record, .. }
            if before.reason == "compromised" && record.reason == "still compromised"),
        "{updated:?}"
    );
    assert_eq!(ca.revocations().await.unwrap().len(), 2);

    // Not even the operator's offline `moat ca issue` gives it a certificate.
    let refused = ca
        .issue_to_files(
            &id,
            Duration::from_secs(600),
            &tmp.path().join("c2.pem"),
            &tmp.path().join("k2.pem"),
        )
        .await;
    assert!(refused.unwrap_err().is_operator_error());
    assert!(ca.unrevoke(whole.clone()).await.unwrap().removed);
    assert!(ca.revocation_for(None, &id).await.unwrap().is_none());
    assert!(!ca.unrevoke(whole).await.unwrap().removed, "idempotent");
    let v = ca.versions().await.unwrap().revocations;
    assert_eq!(v, v0 + 4, "repeats change nothing");

    // Unknown serials, foreign identities and past times are refused.
    for bad in [
        ca.revoke(RevocationTarget::Serial("abcdef".into()), None, None)
            .await,
        ca.revoke(RevocationTarget::Serial("xyz".into()), None, None)
            .await,
        ca.revoke(
            RevocationTarget::Id("spiffe://other.org/a".into()),
            None,
            None,
        )
        .await,
        ca.revoke(
            serial,
            None,
            Some(std::time::SystemTime::now() - Duration::from_secs(5)),
        )
        .await,
    ] {
        assert!(bad.as_ref().unwrap_err().is_operator_error(), "{bad:?}");
    }
    assert_eq!(ca.versions().await.unwrap().revocations, v);
}
