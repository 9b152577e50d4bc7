//! Credentials a workload shows to get its first certificate.
//!
//! - **Join tokens** (VMs): ES256 JWTs minted by `moat ca token`, signed by
//!   the CA's token key, short-lived, naming the SPIFFE ID in `sub`. Single
//!   use is enforced by the [`store`](crate::store), which records each `jti`.
//! - **Kubernetes service-account tokens** (pods): projected JWTs verified
//!   against the cluster's JWKS, with the CA's audience; the subject
//!   `system:serviceaccount:<ns>:<sa>` maps to `spiffe://<td>/ns/<ns>/sa/<sa>`.
//!
//! Algorithms are pinned: join tokens are ES256 only; Kubernetes tokens are
//! RS256 or ES256 checked against the key type the JWKS gives for the `kid`.
//! `none` and every HMAC algorithm are refused.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::identity::{SpiffeId, TrustDomain};
use crate::issuer::hex;
use crate::jwks::IssuerKeys;

/// Where the Kubernetes JWKS comes from (the CA's `[kubernetes]` section).
pub use crate::jwks::JwksSource;

/// The `iss` of every join token.
pub const JOIN_ISSUER: &str = "moat-ca";
/// The longest a join token may live.
pub const MAX_JOIN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Clock-skew allowance for `exp`/`nbf`, in seconds.
const LEEWAY_SECS: u64 = 30;
/// How often the Kubernetes JWKS is refetched while healthy. The API server
/// rotates its signing keys rarely, and a new key is picked up at once by
/// the unknown-`kid` refetch; the schedule is what drops a removed key.
const KUBERNETES_REFRESH: Duration = Duration::from_secs(600);
/// The least time between two Kubernetes JWKS fetches triggered by unknown
/// `kid`s, or retries after a failure: a stream of tokens with made-up
/// `kid`s costs the API server one request per 10 seconds at most.
const KUBERNETES_MIN_REFETCH: Duration = Duration::from_secs(10);

/// Which kind of credential issued a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// A single-use join token.
    JoinToken,
    /// A Kubernetes service-account token.
    Kubernetes,
    /// Renewal over mutual TLS with a current certificate.
    Renewal,
    /// Issued directly by `moat ca issue` on the CA host.
    Local,
}

/// The claims of a join token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinClaims {
    /// Always [`JOIN_ISSUER`].
    pub iss: String,
    /// The SPIFFE ID to issue.
    pub sub: String,
    /// The trust domain's ID, `spiffe://<td>`.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    pub nbf: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Unique token ID, recorded on use.
    pub jti: String,
}

/// A verified credential: who the caller is, and how we know.
#[derive(Debug, Clone)]
pub struct VerifiedCredential {
    /// The identity the certificate will carry.
    pub id: SpiffeId,
    /// The credential kind.
    pub kind: CredentialKind,
    /// For join tokens: the `jti` to record, and when it stops mattering.
    pub single_use: Option<(String, u64)>,
}

/// The CA's join-token key (ES256). `Debug` hides the key.
pub struct JoinTokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
}

/// Verifies Kubernetes service-account tokens, with the cluster's keys kept
/// fresh by [`IssuerKeys`] (a background task refreshes them until the
/// verifier is dropped).
pub struct KubernetesVerifier {
    audience: String,
    issuer: Option<String>,
    keys: Arc<IssuerKeys>,
    refresher: tokio::task::AbortHandle,
}

/// Why a credential was refused (HTTP 401, or 403 for a foreign trust domain).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// No `Authorization: Bearer` header.
    #[error("no bearer credential")]
    Missing,
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("the credential is too long")]
    TooLong,
    /// Not a JWT we can read, or signed with an algorithm we do not accept.
    #[error("the credential is not a valid token: {0}")]
    Invalid(String),
    /// The token has expired.
    #[error("the token has expired")]
    Expired,
    /// The token was already used.
    #[error("the token was already used")]
    Replayed,
    /// The `kid` matches no key we know.
    #[error("no key is known for this token")]
    UnknownKey,
    /// The token names an identity outside the CA's trust domain.
    #[error("{0} is outside this CA's trust domain")]
    WrongTrustDomain(String),
    /// The JWKS could not be read or fetched.
    #[error("cannot load the Kubernetes JWKS: {0}")]
    Jwks(String),
    /// A join token asked for with a lifetime of zero or over 24 hours.
    #[error(
        "a join token's lifetime must be more than 0 and at most {}, not {}",
        crate::format_duration(MAX_JOIN_TTL),
        crate::format_duration(*.0)
    )]
    BadTtl(Duration),
}

impl TokenError {
    /// A short, stable reason code for responses, metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "credential_missing",
            TokenError::TooLong => "credential_too_long",
            TokenError::Invalid(_) => "credential_invalid",
            TokenError::Expired => "credential_expired",
            TokenError::Replayed => "token_replayed",
            TokenError::UnknownKey => "unknown_key",
            TokenError::WrongTrustDomain(_) => "wrong_trust_domain",
            TokenError::Jwks(_) => "jwks_unavailable",
            TokenError::BadTtl(_) => "bad_ttl",
        }
    }
}

impl CredentialKind {
    /// The kind's name in logs, metrics and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::JoinToken => "join_token",
            CredentialKind::Kubernetes => "kubernetes",
            CredentialKind::Renewal => "renewal",
            CredentialKind::Local => "local",
        }
    }
}

impl JoinTokenKey {
    /// Generates a new token key; returns it with its PKCS#8 PEM for storage.
    pub fn generate() -> Result<(Self, String), TokenError> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let pem = pair.serialize_pem();
        Ok((Self::from_pem(&pem)?, pem))
    }

    /// Loads the token key from PKCS#8 PEM.
    pub fn from_pem(pem: &str) -> Result<Self, TokenError> {
        let pair = rcgen::KeyPair::from_pem(pem).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let encoding = EncodingKey::from_ec_pem(pem.as_bytes())
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let decoding = DecodingKey::from_ec_pem(pair.public_key_pem().as_bytes())
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pair.public_key_raw());
        Ok(Self {
            encoding,
            decoding,
            kid: format!("moat-join-{}", &hex(digest.as_ref())[..16]),
        })
    }

    /// The key ID written into every join token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a DecodingKey (tests use it to forge HS256 tokens).
    pub fn decoding_key(&self) -> &DecodingKey {
        &self.decoding
    }

    /// Mints a join token for `id`, valid for `ttl`.
    pub fn mint(
        &self,
        td: &TrustDomain,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<String, TokenError> {
        if !id.is_in(td) {
            return Err(TokenError::WrongTrustDomain(id.to_string()));
        }
        if ttl.is_zero() || ttl > MAX_JOIN_TTL {
            return Err(TokenError::BadTtl(ttl));
        }
        let now = unix_now();
        let mut jti = [0u8; 16];
        rand::rng().fill_bytes(&mut jti);
        let claims = JoinClaims {
            iss: JOIN_ISSUER.into(),
            sub: id.to_string(),
            aud: td.id_string(),
            exp: now + ttl.as_secs(),
            nbf: now.saturating_sub(LEEWAY_SECS),
            iat: now,
            jti: hex(&jti),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }

    /// Verifies a join token's signature and claims (not its single use,
    /// which the store records).
    pub fn verify(&self, td: &TrustDomain, token: &str) -> Result<VerifiedCredential, TokenError> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.algorithms = vec![Algorithm::ES256];
        validation.set_issuer(&[JOIN_ISSUER]);
        validation.set_audience(&[td.id_string()]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<JoinClaims>(token, &self.decoding, &validation)
            .map_err(jwt_error)?;
        let claims = data.claims;
        let id =
            SpiffeId::parse(&claims.sub).map_err(|e| TokenError::Invalid(format!("sub: {e}")))?;
        if !id.is_in(td) {
            return Err(TokenError::WrongTrustDomain(id.to_string()));
        }
        if claims.jti.is_empty() || claims.jti.len() > 64 {
            return Err(TokenError::Invalid("jti".into()));
        }
        Ok(VerifiedCredential {
            id,
            kind: CredentialKind::JoinToken,
            single_use: Some((claims.jti, claims.exp + LEEWAY_SECS)),
        })
    }
}

impl fmt::Debug for JoinTokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinTokenKey")
            .field("kid", &self.kid)
            .field("key", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize)]
struct KubernetesClaims {
    sub: String,
}

impl KubernetesVerifier {
    /// A verifier for tokens with `audience` (and `issuer`, when set), whose
    /// keys come from `source`. Loads the keys now (an error if that fails)
    /// and starts refreshing them in the background.
    pub async fn new(
        audience: String,
        issuer: Option<String>,
        source: JwksSource,
    ) -> Result<Self, TokenError> {
        Self::with_schedule(
            audience,
            issuer,
            source,
            KUBERNETES_REFRESH,
            KUBERNETES_MIN_REFETCH,
        )
        .await
    }

    /// [`KubernetesVerifier::new`] with its own refresh schedule (tests).
    async fn with_schedule(
        audience: String,
        issuer: Option<String>,
        source: JwksSource,
        refresh: Duration,
        min_refetch: Duration,
    ) -> Result<Self, TokenError> {
        let jwks = |e: crate::jwks::JwksError| TokenError::Jwks(e.to_string());
        let keys = IssuerKeys::new(source, refresh, min_refetch).map_err(jwks)?;
        keys.refresh_now().await.map_err(jwks)?;
        let refresher = tokio::spawn(keys.clone().run_refresh()).abort_handle();
        Ok(Self {
            audience,
            issuer,
            keys,
            refresher,
        })
    }

    /// Verifies a service-account token and maps it to a SPIFFE ID in `td`.
    /// A `kid` the cluster's keys do not hold triggers one rate-limited
    /// refetch (a key rotation), then a second try.
    pub async fn verify(
        &self,
        td: &TrustDomain,
        token: &str,
    ) -> Result<VerifiedCredential, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(jwt_error)?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Invalid("no kid".into()))?;
        match self.verify_with_current_keys(td, token, header.alg, &kid) {
            Err(TokenError::UnknownKey) => {
                self.keys.refetch_for_unknown_kid().await;
                self.verify_with_current_keys(td, token, header.alg, &kid)
            }
            other => other,
        }
    }

    fn verify_with_current_keys(
        &self,
        td: &TrustDomain,
        token: &str,
        alg: Algorithm,
        kid: &str,
    ) -> Result<VerifiedCredential, TokenError> {
        let keys = self.keys.current();
        let key = keys
            .find(Some(kid), alg.family())
            .ok_or(TokenError::UnknownKey)?;
        // Pin the algorithm to the key's own family (an RSA key only verifies
        // RS256 and an EC key only ES256, never HMAC), and to the key's own
        // `alg` when the JWK names one.
        if key.family != alg.family() || key.alg.is_some_and(|a| a != alg) {
            return Err(TokenError::Invalid(
                "algorithm does not match the key".into(),
            ));
        }
        let mut validation = Validation::new(alg);
        validation.set_audience(&[&self.audience]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<KubernetesClaims>(token, &key.key, &validation)
            .map_err(jwt_error)?;
        let id = kubernetes_subject_to_id(td, &data.claims.sub)?;
        Ok(VerifiedCredential {
            id,
            kind: CredentialKind::Kubernetes,
            single_use: None,
        })
    }
}

impl Drop for KubernetesVerifier {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl fmt::Debug for KubernetesVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesVerifier")
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("keys", &self.keys)
            .finish()
    }
}

/// Maps `system:serviceaccount:<ns>:<sa>` to `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn kubernetes_subject_to_id(td: &TrustDomain, sub: &str) -> Result<SpiffeId, TokenError> {
    let rest = sub
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| TokenError::Invalid("subject is not a service account".into()))?;
    let (ns, sa) = rest
        .split_once(':')
        .ok_or_else(|| TokenError::Invalid("subject is not a service account".into()))?;
    // Namespaces and service accounts are DNS-1123 names; anything else (a
    // '/' above all) could smuggle extra path segments into the SPIFFE ID.
    let dns_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
    };
    if !dns_name(ns) || !dns_name(sa) {
        return Err(TokenError::Invalid(format!(
            "subject {sub:?} is not a valid service account name"
        )));
    }
    td.workload(&format!("/ns/{ns}/sa/{sa}"))
        .map_err(|e| TokenError::Invalid(format!("subject {sub:?}: {e}")))
}

fn jwt_error(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        other => TokenError::Invalid(format!("{other:?}")),
    }
}

/// The `sub` claim of a JWT, read WITHOUT verifying anything: only for
/// telling an operator which identity a refused token was for.
pub fn unverified_subject(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.trim().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["sub"].as_str().map(str::to_owned)
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/vm/billing").unwrap()
    }

    #[test]
    fn minted_token_verifies_once_decoded() {
        let (key, _) = JoinTokenKey::generate().unwrap();
        let token = key.mint(&td(), &id(), Duration::from_secs(900)).unwrap();
        let cred = key.verify(&td(), &token).unwrap();
        assert_eq!(cred.id, id());
        assert!(cred.single_use.is_some());
    }

    #[test]
    fn token_from_another_key_is_refused() {
        let (a, _) = JoinTokenKey::generate().unwrap();
        let (b, _) = JoinTokenKey::generate().unwrap();
        let token = a.mint(&td(), &id(), Duration::from_secs(900)).unwrap();
        assert!(matches!(
            b.verify(&td(), &token),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn alg_none_and_hs256_forgeries_are_refused() {
        let (key, pem) = JoinTokenKey::generate().unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = serde_json::json!({
            "iss": JOIN_ISSUER, "sub": id().as_str(), "aud": td().id_string(),
            "exp": unix_now() + 600, "nbf": unix_now() - 10, "iat": unix_now(), "jti": "abc"
        });
        let payload = b64.encode(claims.to_string());
        let none = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            payload
        );
        assert!(key.verify(&td(), &none).is_err());

        // HS256 keyed with the public key's PEM (the classic confusion attack).
        let public_pem = rcgen::KeyPair::from_pem(&pem).unwrap().public_key_pem();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid().to_owned());
        let forged = jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(public_pem.as_bytes()),
        )
        .unwrap();
        assert!(key.verify(&td(), &forged).is_err());
    }

    #[test]
    fn expired_token_is_refused() {
        let (key, _) = JoinTokenKey::generate().unwrap();
        let claims = JoinClaims {
            iss: JOIN_ISSUER.into(),
            sub: id().to_string(),
            aud: td().id_string(),
            exp: unix_now() - 3600,
            nbf: unix_now() - 7200,
            iat: unix_now() - 7200,
            jti: "x".into(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid().to_owned());
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap();
        assert!(matches!(
            key.verify(&td(), &token),
            Err(TokenError::Expired)
        ));
    }

    #[test]
    fn token_for_another_trust_domain_is_not_minted() {
        let (key, _) = JoinTokenKey::generate().unwrap();
        let other = SpiffeId::parse("spiffe://evil.org/x").unwrap();
        assert!(matches!(
            key.mint(&td(), &other, Duration::from_secs(60)),
            Err(TokenError::WrongTrustDomain(_))
        ));
    }

    #[test]
    fn kubernetes_subjects_map_to_ids() {
        let got = kubernetes_subject_to_id(&td(), "system:serviceaccount:prod:web").unwrap();
        assert_eq!(got.as_str(), "spiffe://example.org/ns/prod/sa/web");
        assert!(kubernetes_subject_to_id(&td(), "system:node:x").is_err());
        assert!(kubernetes_subject_to_id(&td(), "system:serviceaccount:a/b:c").is_err());
    }

    /// An ES256 cluster signing key named `kid`, and its public JWK.
    fn cluster_key(kid: &str) -> (EncodingKey, serde_json::Value) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw(); // 0x04 || X || Y
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
            "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65])
        });
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        (key, jwk)
    }

    fn service_account_token(key: &EncodingKey, kid: &str) -> String {
        let claims = serde_json::json!({
            "aud": "moat-ca", "sub": "system:serviceaccount:prod:web",
            "exp": unix_now() + 600, "iat": unix_now()
        });
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kubernetes_unknown_kid_refetch_is_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let (old, old_jwk) = cluster_key("old");
        let (new, new_jwk) = cluster_key("new");
        std::fs::write(&path, serde_json::json!({"keys": [&old_jwk]}).to_string()).unwrap();
        let min_refetch = Duration::from_millis(1500);
        let verifier = Arc::new(
            KubernetesVerifier::with_schedule(
                "moat-ca".into(),
                None,
                JwksSource::File(path.clone()),
                Duration::from_secs(3600),
                min_refetch,
            )
            .await
            .unwrap(),
        );
        let reads = || verifier.keys.stats().fetches_ok;
        verifier
            .verify(&td(), &service_account_token(&old, "old"))
            .await
            .unwrap();
        assert_eq!(reads(), 1);

        // The cluster rotates its key. Within min_refetch of the last read,
        // a token with the new kid does not make the CA read again.
        let both = serde_json::json!({"keys": [&old_jwk, &new_jwk]});
        std::fs::write(&path, both.to_string()).unwrap();
        let new_token = service_account_token(&new, "new");
        assert!(matches!(
            verifier.verify(&td(), &new_token).await,
            Err(TokenError::UnknownKey)
        ));
        assert_eq!(reads(), 1, "rate-limited");

        // After min_refetch, one read picks the new key up.
        tokio::time::sleep(min_refetch + Duration::from_millis(100)).await;
        verifier.verify(&td(), &new_token).await.unwrap();
        assert_eq!(reads(), 2);

        // A burst of made-up kids: at most one read per min_refetch.
        tokio::time::sleep(min_refetch + Duration::from_millis(100)).await;
        let mut burst = tokio::task::JoinSet::new();
        for i in 0..20 {
            let (verifier, token) = (
                verifier.clone(),
                service_account_token(&new, &format!("bogus-{i}")),
            );
            burst.spawn(async move { verifier.verify(&td(), &token).await });
        }
        while let Some(result) = burst.join_next().await {
            assert!(matches!(result.unwrap(), Err(TokenError::UnknownKey)));
        }
        assert_eq!(reads(), 3, "twenty unknown kids, one read");
        // The old key was kept throughout.
        verifier
            .verify(&td(), &service_account_token(&old, "old"))
            .await
            .unwrap();
    }
}
