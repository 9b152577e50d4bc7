//! An opened CA: the directory that holds its keys, and the store that
//! holds its state (see the module above for the layout).

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::FromDer;

use super::config::Engine;
use super::{
    BeforeActivation, DEFAULT_REASON, IssuanceRecord, NewRevocation, PgStore, Recorded,
    RevocationRecord, RevocationTarget, Revoked, RootChange, RootRecord, RootState, SqliteStore,
    StateVersions, Store, StoreError, Unrevoked, unix,
};
use crate::atomic_file::AtomicFile;
use crate::client::{Svid, WorkloadKey};
use crate::identity::{SpiffeId, TrustBundle, TrustDomain};
use crate::issuer::{Issued, RootCa, ValidatedCsr};
use crate::token::{CredentialKind, JoinTokenKey};

const DB_FILE: &str = "ca.db";
const TOKEN_KEY_FILE: &str = "token.key";
const ROOTS_DIR: &str = "roots";

/// How long after `--activate` a certificate may still come from the old
/// root: a replica signs with the root it read at its last poll of the
/// store (every second), and records the issuance after signing. Counted
/// as the old root's by `--retire` (a certificate of the new root counted
/// too only makes it wait longer).
pub const ROTATION_GRACE: Duration = Duration::from_secs(10);

/// An opened CA: its directory (keys) and its state store.
pub struct CaDir {
    dir: PathBuf,
    td: TrustDomain,
    store: Arc<dyn Store>,
    token_key: JoinTokenKey,
}

/// What signs now, read from the store in one pass.
pub struct SigningState {
    /// The version counters when the roots were read.
    pub versions: StateVersions,
    /// Every root.
    pub roots: Vec<RootRecord>,
    /// The active root, with its key.
    pub signer: RootCa,
    /// The root that signs the CA's own serving certificate: the oldest one
    /// in the bundle (see [`CaDir::signing_state`]).
    pub serving_signer: RootCa,
    /// Every root not retired.
    pub bundle: TrustBundle,
}

impl CaDir {
    /// Opens the store `engine` names for the CA in `dir`, creating and
    /// migrating it as needed, without reading any key.
    pub async fn open_store(dir: &Path, engine: &Engine) -> Result<Arc<dyn Store>, StoreError> {
        Ok(match engine {
            Engine::Sqlite => {
                let db = dir.join(DB_FILE);
                let roots = dir.join(ROOTS_DIR);
                let store = tokio::task::spawn_blocking(move || SqliteStore::open(&db, &roots))
                    .await
                    .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))??;
                Arc::new(store)
            }
            Engine::Postgres(settings) => Arc::new(PgStore::connect(settings).await?),
        })
    }

    /// Creates a new CA: a token key and a first root in `dir`, and the
    /// CA's record in the store. Refuses a directory or a database that
    /// already holds a CA.
    pub async fn init(
        dir: &Path,
        engine: &Engine,
        td: TrustDomain,
        root_ttl: Duration,
    ) -> Result<Self, StoreError> {
        let existing = match engine {
            Engine::Sqlite => dir.join(DB_FILE).exists() || dir.join(TOKEN_KEY_FILE).exists(),
            Engine::Postgres(_) => dir.join(TOKEN_KEY_FILE).exists(),
        };
        if existing {
            return Err(StoreError::AlreadyInitialized(dir.display().to_string()));
        }
        // The database first: a wrong URL or password fails before any key is made.
        let pg = match engine {
            Engine::Sqlite => None,
            Engine::Postgres(_) => {
                let store = Self::open_store(dir, engine).await?;
                if store.trust_domain().await?.is_some() {
                    return Err(StoreError::AlreadyInitialized(format!(
                        "the database {}",
                        store.location()
                    )));
                }
                Some(store)
            }
        };
        // The first write: a directory that cannot be made is the
        // operator's to fix (exit 64), and nothing is written yet.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(ROOTS_DIR))
            .map_err(|source| {
                StoreError::Config(format!(
                    "{}: cannot create the CA directory: {source}",
                    dir.display()
                ))
            })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|source| io_err(dir, source))?;

        let (token_key, token_pem) = JoinTokenKey::generate()?;
        write_secret(&dir.join(TOKEN_KEY_FILE), token_pem.as_bytes())?;
        let store = match pg {
            Some(store) => store,
            None => {
                let store = Self::open_store(dir, engine).await?;
                let db_path = dir.join(DB_FILE);
                fs::set_permissions(&db_path, fs::Permissions::from_mode(0o600))
                    .map_err(|source| io_err(&db_path, source))?;
                store
            }
        };
        let ca = Self {
            dir: dir.to_owned(),
            td,
            store,
            token_key,
        };
        let first = ca.write_new_root(1, RootState::Active, root_ttl)?;
        if let Err(e) = ca.store.initialize(ca.td.as_str(), &first).await {
            ca.remove_root_files(1);
            return Err(e);
        }
        Ok(ca)
    }

    /// Opens an existing CA: its store, and the token key from `dir`.
    pub async fn open(dir: &Path, engine: &Engine) -> Result<Self, StoreError> {
        if matches!(engine, Engine::Sqlite) && !dir.join(DB_FILE).exists() {
            // The keys without ca.db: most likely a PostgreSQL CA whose
            // ca.toml was given to `init` with --config and not this time.
            // "create one with init" would only meet "already holds a CA".
            if dir.join(TOKEN_KEY_FILE).exists() {
                return Err(StoreError::NotInitialized(format!(
                    "{0} has the CA's keys but no state store: pass --config FILE (the ca.toml given to \
                     `moat ca init`) or put ca.toml in {0}",
                    dir.display()
                )));
            }
            return Err(StoreError::NotInitialized(format!(
                "{0} holds no CA; create one with `moat ca init --dir {0}`",
                dir.display()
            )));
        }
        let store = Self::open_store(dir, engine).await?;
        let td = store.trust_domain().await?.ok_or_else(|| {
            StoreError::NotInitialized(format!(
                "the database {} holds no CA; create one with `moat ca init --dir {}` (with this [store]), \
                 or copy a SQLite CA into it with `moat ca migrate --from-sqlite DIR/ca.db`",
                store.location(),
                dir.display()
            ))
        })?;
        let td = TrustDomain::parse(&td)
            .map_err(|e| StoreError::Corrupt(format!("trust domain: {e}")))?;
        let token_path = dir.join(TOKEN_KEY_FILE);
        let token_pem =
            fs::read_to_string(&token_path).map_err(|source| io_err(&token_path, source))?;
        let token_key = JoinTokenKey::from_pem(&token_pem)?;
        Ok(Self {
            dir: dir.to_owned(),
            td,
            store,
            token_key,
        })
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The CA's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The join-token key.
    pub fn token_key(&self) -> &JoinTokenKey {
        &self.token_key
    }

    /// Every root the store knows, oldest first.
    pub async fn roots(&self) -> Result<Vec<RootRecord>, StoreError> {
        self.store.roots().await
    }

    /// The version counters replicas poll.
    pub async fn versions(&self) -> Result<StateVersions, StoreError> {
        self.store.versions().await
    }

    /// The trust bundle: every root that is not retired.
    pub async fn bundle(&self) -> Result<TrustBundle, StoreError> {
        bundle_of(&self.roots().await?)
    }

    /// The root that signs now, with its key from this directory.
    pub async fn active_root(&self) -> Result<RootCa, StoreError> {
        let roots = self.roots().await?;
        self.signer_of(&roots)
    }

    /// The roots, the signer and the bundle, with the versions read first
    /// (so a change in between is seen again at the next poll).
    ///
    /// The serving certificate comes from the oldest root in the bundle
    /// (the retiring one while a rotation is under way), not the active
    /// one: every client trusts that root, including a sidecar that has
    /// not fetched the bundle since `--prepare`. Served from the new root,
    /// such a sidecar could never fetch the bundle that would teach it the
    /// new root. When the retiring root's key is missing here or the root
    /// has expired, the active root serves instead (with a warning).
    pub async fn signing_state(&self) -> Result<SigningState, StoreError> {
        let versions = self.versions().await?;
        let roots = self.roots().await?;
        let signer = self.signer_of(&roots)?;
        let bundle = bundle_of(&roots)?;
        let oldest = roots
            .iter()
            .filter(|r| r.state.in_bundle())
            .min_by_key(|r| r.id)
            .filter(|r| r.state != RootState::Active);
        let serving_signer = match oldest {
            None => self.signer_of(&roots)?,
            Some(root) => match self.load_root(root) {
                Ok(ca) if ca.not_after() > SystemTime::now() => ca,
                Ok(_) => {
                    tracing::warn!(
                        root = root.id,
                        "the retiring root has expired; the CA's serving certificate comes from the active root, which sidecars that have not refreshed their bundle do not trust"
                    );
                    self.signer_of(&roots)?
                }
                Err(e) => {
                    tracing::warn!(root = root.id, error = %e, "cannot sign the CA's serving certificate with the retiring root; the active root serves, which sidecars that have not refreshed their bundle do not trust");
                    self.signer_of(&roots)?
                }
            },
        };
        Ok(SigningState {
            versions,
            roots,
            signer,
            serving_signer,
            bundle,
        })
    }

    fn signer_of(&self, roots: &[RootRecord]) -> Result<RootCa, StoreError> {
        let active = roots
            .iter()
            .find(|r| r.state == RootState::Active)
            .ok_or_else(|| StoreError::Corrupt("no active root".into()))?;
        self.load_root(active)
    }

    /// A root's certificate (from the store) with its key (from this
    /// directory), checked to belong together.
    pub fn load_root(&self, root: &RootRecord) -> Result<RootCa, StoreError> {
        let key_path = self.root_path(root.id, "key");
        let key = match fs::read_to_string(&key_path) {
            Ok(key) => key,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::KeyMissing {
                    root: root.id,
                    path: key_path,
                });
            }
            Err(source) => return Err(io_err(&key_path, source)),
        };
        let pair = rcgen::KeyPair::from_pem(&key)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", key_path.display())))?;
        let der = CertificateDer::from_pem_slice(root.cert_pem.as_bytes())
            .map_err(|e| StoreError::Corrupt(format!("root #{} certificate: {e}", root.id)))?;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der)
            .map_err(|e| StoreError::Corrupt(format!("root #{} certificate: {e}", root.id)))?;
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&pair).as_slice()
        {
            return Err(StoreError::Corrupt(format!(
                "{} is not the key of root #{} in the store (a key from another CA?)",
                key_path.display(),
                root.id
            )));
        }
        Ok(RootCa::from_pem(&root.cert_pem, &key)?)
    }

    /// Mints a join token for `id`.
    pub fn mint_join_token(&self, id: &SpiffeId, ttl: Duration) -> Result<String, StoreError> {
        let token = self.token_key.mint(&self.td, id, ttl)?;
        tracing::info!(spiffe_id = %id, ttl_secs = ttl.as_secs(), "join token minted");
        Ok(token)
    }

    /// Records an issuance, and for single-use credentials the token ID, in
    /// one transaction, unless a revocation in force covers `id` or the
    /// certificate the request presented (`presented_serial`): then nothing
    /// is recorded and the answer is [`Recorded::Revoked`]. A token ID seen
    /// before (by any replica) fails with
    /// [`crate::token::TokenError::Replayed`] and nothing is recorded.
    pub async fn record_issuance(
        &self,
        issued: &Issued,
        id: &SpiffeId,
        kind: CredentialKind,
        single_use: Option<&(String, u64)>,
        presented_serial: Option<&str>,
    ) -> Result<Recorded, StoreError> {
        let record = IssuanceRecord {
            serial: issued.serial.clone(),
            spiffe_id: id.as_str().to_owned(),
            not_after: unix(issued.not_after),
            kind: kind.as_str(),
            issued_at: unix(SystemTime::now()),
            single_use: single_use.map(|(jti, exp)| (jti.clone(), *exp as i64)),
            presented_serial: presented_serial.map(str::to_owned),
        };
        self.store.record_issuance(&record).await
    }

    /// True if this join-token ID was already used.
    pub async fn token_used(&self, jti: &str) -> Result<bool, StoreError> {
        self.store.token_used(jti).await
    }

    /// Number of certificates issued, for tests and the admin view.
    pub async fn issued_count(&self) -> Result<i64, StoreError> {
        self.store.issued_count().await
    }

    /// Issues a certificate and key for `id` directly (on the CA host) and
    /// writes them to files, the key with mode 0600, each replacing what was
    /// there atomically. With `cert_out == key_out` one file (0600) holds
    /// the chain, then the key.
    ///
    /// The files are created (as temporary files beside their paths) before
    /// anything is issued: a path that cannot be written is refused with
    /// [`StoreError::Output`] and no issuance is recorded for a certificate
    /// nobody would have.
    pub async fn issue_to_files(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        cert_out: &Path,
        key_out: &Path,
    ) -> Result<(Svid, WorkloadKey), StoreError> {
        let corrupt = |e: &dyn fmt::Display| StoreError::Corrupt(e.to_string());
        let key = WorkloadKey::generate().map_err(|e| corrupt(&e))?;
        let key_pem = key.dangerous_private_key_pem();
        // Both files exist (and the key is written) before the issuance:
        // what is left to fail after it is a full disk or a failing rename.
        let outputs = if cert_out == key_out {
            Outputs::One(pending(cert_out, 0o600)?)
        } else {
            let mut key_file = pending(key_out, 0o600)?;
            let cert_file = pending(cert_out, 0o644)?;
            key_file
                .write(key_pem.as_bytes())
                .map_err(|e| io_err(key_out, e))?;
            Outputs::Two {
                key_file,
                cert_file,
            }
        };
        if self.revocation_for(None, id).await?.is_some() {
            return Err(StoreError::Revocation(format!(
                "{id} is revoked; `moat ca unrevoke --id {id}` first"
            )));
        }
        let csr = ValidatedCsr::parse(key.csr_pem().map_err(|e| corrupt(&e))?.as_bytes())
            .map_err(|e| corrupt(&e))?;
        let issued = self
            .active_root()
            .await?
            .sign_svid(&self.td, id, &csr, ttl)?;
        if issued.cut_to_root {
            tracing::warn!(
                spiffe_id = %id,
                requested = %crate::format_duration(ttl),
                not_after = %format_time(issued.not_after),
                "certificate lifetime cut to the signing root's expiry; rotate the CA"
            );
        }
        if let Recorded::Revoked(_) = self
            .record_issuance(&issued, id, CredentialKind::Local, None, None)
            .await?
        {
            return Err(StoreError::Revocation(format!("{id} is revoked")));
        }
        let svid = Svid::from_chain(vec![issued.cert_der.clone()]).map_err(|e| corrupt(&e))?;
        match outputs {
            Outputs::One(mut both) => {
                both.write(svid.to_pem().as_bytes())
                    .and_then(|()| both.write(key_pem.as_bytes()))
                    .and_then(|()| both.commit())
                    .map_err(|e| io_err(cert_out, e))?;
            }
            // Each file is replaced whole by a rename. A reader between the
            // two renames sees a new key beside the old certificate; the
            // proxy's file watch waits for the pair to fit again.
            Outputs::Two {
                key_file,
                mut cert_file,
            } => {
                key_file.commit().map_err(|e| io_err(key_out, e))?;
                cert_file
                    .write(svid.to_pem().as_bytes())
                    .and_then(|()| cert_file.commit())
                    .map_err(|e| io_err(cert_out, e))?;
            }
        }
        tracing::info!(serial = %svid.serial, spiffe_id = %id, credential = "local", "issued");
        Ok((svid, key))
    }

    /// Rotation step 1: add a new root to the bundle; the current root keeps signing.
    pub async fn rotate_prepare(&self, root_ttl: Duration) -> Result<String, StoreError> {
        let versions = self.versions().await?;
        let roots = self.roots().await?;
        if roots.iter().any(|r| r.state == RootState::Prepared) {
            return Err(StoreError::Rotation {
                step: "prepare",
                why: "a prepared root already waits; run --activate".into(),
            });
        }
        if roots.iter().any(|r| r.state == RootState::Retiring) {
            return Err(StoreError::Rotation {
                step: "prepare",
                why: "the previous rotation is not finished; run --retire first".into(),
            });
        }
        let id = roots.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        let record = self.write_new_root(id, RootState::Prepared, root_ttl)?;
        if let Err(e) = self
            .store
            .change_roots(versions.roots, &RootChange::Add(record))
            .await
        {
            self.remove_root_files(id);
            return Err(e);
        }
        let shared = if self.store.engine() == "postgres" {
            format!(
                " Every replica must have {} before --activate (add it to the CA's Secret).",
                self.root_path(id, "key").display()
            )
        } else {
            String::new()
        };
        Ok(format!(
            "root #{id} prepared: it is in the bundle now and will sign after --activate. \
             Wait at least the sidecars' bundle_refresh (5 minutes by default) before --activate, \
             and check that every sidecar has 2 roots: \"bundle_roots\": 2 on its admin /identity, \
             or its log line \"trust bundle updated\" with roots=2.{shared}"
        ))
    }

    /// Rotation step 2: the prepared root signs from now on; the old one stays trusted.
    pub async fn rotate_activate(&self) -> Result<String, StoreError> {
        let versions = self.versions().await?;
        let roots = self.roots().await?;
        let prepared = roots
            .iter()
            .find(|r| r.state == RootState::Prepared)
            .ok_or_else(|| StoreError::Rotation {
                step: "activate",
                why: "no prepared root; run --prepare first".into(),
            })?;
        let id = prepared.id;
        let at = unix(SystemTime::now());
        self.store
            .change_roots(versions.roots, &RootChange::Activate { id, at })
            .await?;
        Ok(format!(
            "root #{id} now signs. The old root stays in the bundle; run --retire once every \
             certificate it issued has expired (one certificate lifetime; --retire checks)."
        ))
    }

    /// Revokes a certificate or an identity (see [`Store::revoke`]). An
    /// identity must be in this CA's trust domain.
    ///
    /// Idempotent: a target already revoked is left as it is (no version
    /// bump, so no sidecar refetches, and no second `revoked` log line)
    /// unless the operator asks for a change, an explicit `reason` that
    /// differs or an `until`; then the entry is replaced in one transaction
    /// so the target is never un-revoked in between (which
    /// `unrevoke` + `revoke` would risk if a sidecar polled between them).
    /// Two concurrent first revocations of one target both write; the
    /// second replaces the first, which is harmless.
    pub async fn revoke(
        &self,
        target: RevocationTarget,
        reason: Option<&str>,
        until: Option<SystemTime>,
    ) -> Result<Revoked, StoreError> {
        let target = self.check_target(target)?;
        let now = SystemTime::now();
        if let Some(until) = until
            && until <= now
        {
            return Err(StoreError::Revocation(
                "--until is in the past: nothing would be revoked".into(),
            ));
        }
        let before = self.revocation_of(&target).await?;
        if let Some(before) = &before {
            let new_reason = reason.is_some_and(|r| r != before.reason);
            if !new_reason && until.is_none() {
                return Ok(Revoked::Already {
                    target,
                    record: before.clone(),
                });
            }
        }
        let reason = reason
            .or(before.as_ref().map(|b| b.reason.as_str()))
            .unwrap_or(DEFAULT_REASON)
            .to_owned();
        let record = self
            .store
            .revoke(&NewRevocation {
                target: target.clone(),
                reason: reason.clone(),
                until: until.map(unix),
                now: unix(now),
            })
            .await?;
        let until = format_time(from_unix(record.until));
        Ok(match before {
            None => {
                // INFO: the operator asked for it, and the command prints
                // the result; stderr carries only warnings by default.
                tracing::info!(target = %target.describe(), reason, %until, "revoked");
                Revoked::New { target, record }
            }
            Some(before) => {
                tracing::info!(
                    target = %target.describe(),
                    reason,
                    %until,
                    previous_reason = before.reason,
                    previous_until = %format_time(from_unix(before.until)),
                    "revocation updated"
                );
                Revoked::Updated {
                    target,
                    before,
                    record,
                }
            }
        })
    }

    /// Undoes the revocation of `target`. Idempotent: a target that is not
    /// revoked is no error, and nothing changes (`false`).
    pub async fn unrevoke(&self, target: RevocationTarget) -> Result<Unrevoked, StoreError> {
        let target = self.check_target(target)?;
        let removed = self.store.unrevoke(&target).await? > 0;
        if removed {
            tracing::info!(target = %target.describe(), "revocation removed");
        }
        Ok(Unrevoked { target, removed })
    }

    /// The revocation in force that names exactly `target` (an identity's
    /// revocation does not name its certificates' serials).
    async fn revocation_of(
        &self,
        target: &RevocationTarget,
    ) -> Result<Option<RevocationRecord>, StoreError> {
        let all = self.revocations().await?;
        Ok(all.into_iter().find(|r| match target {
            RevocationTarget::Serial(s) => r.serial.as_deref() == Some(s.as_str()),
            RevocationTarget::Id(id) => {
                r.serial.is_none() && r.spiffe_id.as_deref() == Some(id.as_str())
            }
        }))
    }

    /// Every revocation in force now.
    pub async fn revocations(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        self.store.revocations(unix(SystemTime::now())).await
    }

    /// The revocation covering this certificate (serial) or identity now.
    pub async fn revocation_for(
        &self,
        serial: Option<&str>,
        id: &SpiffeId,
    ) -> Result<Option<RevocationRecord>, StoreError> {
        self.store
            .revocation_for(serial, id.as_str(), unix(SystemTime::now()))
            .await
    }

    /// A serial in the CA's form (lowercase hex, no separators or leading
    /// `0x`); an identity parsed and in this trust domain.
    fn check_target(&self, target: RevocationTarget) -> Result<RevocationTarget, StoreError> {
        match target {
            RevocationTarget::Serial(s) => {
                let hex: String = s
                    .trim()
                    .trim_start_matches("0x")
                    .chars()
                    .filter(|c| *c != ':')
                    .collect::<String>()
                    // A serial is an integer: leading zeros (as some tools
                    // print a byte with its high bit set) are not part of
                    // the CA's spelling.
                    .trim_start_matches('0')
                    .to_ascii_lowercase();
                if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(StoreError::Revocation(format!(
                        "--serial {s:?} is not a hexadecimal serial number"
                    )));
                }
                Ok(RevocationTarget::Serial(hex))
            }
            RevocationTarget::Id(id) => {
                let parsed = SpiffeId::parse(&id)
                    .map_err(|e| StoreError::Revocation(format!("--id {id:?}: {e}")))?;
                if !parsed.is_in(&self.td) {
                    return Err(StoreError::Revocation(format!(
                        "--id {id}: not in this CA's trust domain {}",
                        self.td
                    )));
                }
                Ok(RevocationTarget::Id(parsed.as_str().to_owned()))
            }
        }
    }

    /// Rotation step 3: drop the old root from the bundle.
    ///
    /// Refused while certificates issued before `--activate` (so by the
    /// retiring root) are still valid, unless `force`: their holders would
    /// be refused by every peer, and a sidecar still holding one could not
    /// fetch the deny-list. The store records every issuance but not the
    /// root that signed it, so the time of `--activate` (recorded with it)
    /// tells them apart.
    pub async fn rotate_retire(&self, force: bool) -> Result<String, StoreError> {
        let versions = self.versions().await?;
        let roots = self.roots().await?;
        if !roots.iter().any(|r| r.state == RootState::Retiring) {
            return Err(StoreError::Rotation {
                step: "retire",
                why: "no retiring root; run --prepare and --activate first".into(),
            });
        }
        if !force {
            let now = SystemTime::now();
            let before = self
                .store
                .issued_before_activation(unix(now), ROTATION_GRACE.as_secs() as i64)
                .await?;
            match before {
                BeforeActivation {
                    activated_at: None, ..
                } => {
                    return Err(StoreError::Rotation {
                        step: "retire",
                        why: "the time of --activate is not recorded (it ran with an older moat), \
                              so the certificates of the retiring root cannot be told apart; \
                              run --retire --force once one certificate lifetime has passed since --activate"
                            .into(),
                    });
                }
                BeforeActivation {
                    activated_at: Some(at),
                    valid,
                    last_not_after: Some(last),
                } if valid > 0 => {
                    return Err(StoreError::Rotation {
                        step: "retire",
                        why: format!(
                            "{valid} certificate(s) issued under the retiring root (before --activate at {}) \
                             are still valid; the last expires at {}. Retire after then, \
                             or pass --force to cut them off now",
                            format_unix(at),
                            format_unix(last)
                        ),
                    });
                }
                _ => {}
            }
        }
        self.store
            .change_roots(versions.roots, &RootChange::Retire)
            .await?;
        Ok("the old root is retired: it is no longer in the bundle".into())
    }

    /// Generates root `id` and writes its key and certificate to the
    /// directory. Refuses to overwrite: a key file already there belongs to
    /// a `--prepare` that failed half-way or runs now.
    fn write_new_root(
        &self,
        id: i64,
        state: RootState,
        ttl: Duration,
    ) -> Result<RootRecord, StoreError> {
        let root = RootCa::generate(&self.td, id, ttl)?;
        let key_path = self.root_path(id, "key");
        match write_secret(&key_path, root.dangerous_key_pem().as_bytes()) {
            Err(StoreError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                return Err(StoreError::Rotation {
                    step: "prepare",
                    why: format!(
                        "{} exists but root #{id} is not in the store: an earlier --prepare failed half-way \
                         (or one runs now); remove {} and {} and try again",
                        key_path.display(),
                        key_path.display(),
                        self.root_path(id, "crt").display()
                    ),
                });
            }
            other => other?,
        }
        let cert_path = self.root_path(id, "crt");
        fs::write(&cert_path, root.cert_pem()).map_err(|source| io_err(&cert_path, source))?;
        Ok(RootRecord {
            id,
            state,
            not_after: unix(root.not_after()),
            cert_pem: root.cert_pem(),
        })
    }

    fn remove_root_files(&self, id: i64) {
        let _ = fs::remove_file(self.root_path(id, "key"));
        let _ = fs::remove_file(self.root_path(id, "crt"));
    }

    fn root_path(&self, id: i64, ext: &str) -> PathBuf {
        self.dir.join(ROOTS_DIR).join(format!("{id}.{ext}"))
    }
}

impl fmt::Debug for CaDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaDir")
            .field("dir", &self.dir)
            .field("trust_domain", &self.td)
            .field("store", &self.store)
            .finish()
    }
}

/// The bundle of these roots: every one not retired.
pub fn bundle_of(roots: &[RootRecord]) -> Result<TrustBundle, StoreError> {
    let mut ders = Vec::new();
    for root in roots.iter().filter(|r| r.state.in_bundle()) {
        let bundle = TrustBundle::from_pem(root.cert_pem.as_bytes())
            .map_err(|e| StoreError::Corrupt(format!("root #{}: {e}", root.id)))?;
        ders.extend(bundle.roots().iter().cloned());
    }
    TrustBundle::new(ders).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| io_err(path, source))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| io_err(path, source))
}

/// Where `issue_to_files` writes: one file (chain, then key) or two.
enum Outputs {
    One(AtomicFile),
    Two {
        key_file: AtomicFile,
        cert_file: AtomicFile,
    },
}

/// Creates `path`'s [`AtomicFile`]; a failure is the operator's
/// ([`StoreError::Output`]): no directory, no permission, a directory.
fn pending(path: &Path, mode: u32) -> Result<AtomicFile, StoreError> {
    AtomicFile::create(path, mode).map_err(|source| StoreError::Output {
        path: path.to_owned(),
        source,
    })
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Seconds since the epoch as a time.
fn from_unix(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

/// Formats seconds since the epoch as RFC 3339 UTC, for messages.
pub fn format_unix(secs: i64) -> String {
    format_time(from_unix(secs))
}

/// Formats a time as RFC 3339 UTC, for messages.
pub fn format_time(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}
