//! Bearer token verification for routes that require a JWT.
//!
//! Order of checks: size cap, header, algorithm in the issuer's pinned list,
//! key by `kid` (of the algorithm's family, and of the JWK's own `alg` if it
//! names one), signature, then `iss`, `exp`, `nbf` (with the issuer's leeway,
//! against the caller's clock) and `aud`. HMAC algorithms and `none` are
//! refused when the policy is parsed, and symmetric JWKs are never loaded, so
//! a public key can never be used as an HMAC secret.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use serde_json::{Map, Value};

use super::{Issuer, JwtRule, Reason};

/// The largest bearer token accepted, in bytes; larger ones are refused
/// before any parsing.
pub(crate) const MAX_TOKEN_LEN: usize = 8 * 1024;

/// A token whose signature, issuer, audience and lifetime were verified.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub(crate) claims: Map<String, Value>,
}

/// Why a token was refused: the reason code and a short, secret-free detail
/// for `moat policy explain` and debug logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) reason: Reason,
    pub(crate) detail: &'static str,
}

fn refused(reason: Reason, detail: &'static str) -> Refused {
    Refused { reason, detail }
}

/// Extracts the token from an `Authorization: Bearer <token>` header value.
pub(crate) fn bearer(header: Option<&str>) -> Result<&str, Refused> {
    let Some(value) = header else {
        return Err(refused(Reason::JwtMissing, "no Authorization header"));
    };
    if value == super::AMBIGUOUS_AUTHORIZATION {
        return Err(refused(
            Reason::JwtInvalid,
            "several Authorization headers, or one that is not UTF-8",
        ));
    }
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(refused(
            Reason::JwtMissing,
            "the Authorization header is not a Bearer token",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(refused(Reason::JwtMissing, "the Bearer token is empty"));
    }
    Ok(token)
}

/// Verifies `token` for `rule`, whose issuer is `issuer`, at time `now`.
pub(crate) fn verify(
    issuer: &Issuer,
    rule: &JwtRule,
    token: &str,
    now: SystemTime,
) -> Result<Verified, Refused> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(refused(
            Reason::JwtInvalid,
            "the token is larger than 8 KiB",
        ));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| {
        refused(
            Reason::JwtInvalid,
            "the token is not a well-formed signed JWT",
        )
    })?;
    // RFC 7515 §4.1.11: extensions marked critical must be understood; moat
    // understands none. Keys embedded in the header (jwk, jku, x5u, x5c) are
    // never used: keys come from the issuer's JWKS only.
    if header.crit.is_some() {
        return Err(refused(
            Reason::JwtInvalid,
            "the token has critical header extensions",
        ));
    }
    let Some((alg, validation)) = issuer.validations.iter().find(|(a, _)| *a == header.alg) else {
        return Err(refused(
            Reason::JwtInvalid,
            "the token's algorithm is not pinned for this issuer",
        ));
    };
    let keys = issuer.keys.current();
    let Some(key) = keys.find(header.kid.as_deref(), alg.family()) else {
        return Err(if header.kid.is_some() {
            refused(
                Reason::JwtUnknownKid,
                "no key of the issuer has the token's kid",
            )
        } else {
            refused(
                Reason::JwtInvalid,
                "the token has no kid and the issuer has several keys",
            )
        });
    };
    if key.family != alg.family() || key.alg.is_some_and(|a| a != *alg) {
        return Err(refused(
            Reason::JwtInvalid,
            "the token's algorithm does not match its key",
        ));
    }
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation).map_err(
        |e| match e.kind() {
            ErrorKind::InvalidSignature => {
                refused(Reason::JwtInvalid, "the signature does not verify")
            }
            ErrorKind::InvalidAlgorithm => refused(
                Reason::JwtInvalid,
                "the token's algorithm does not match its key",
            ),
            _ => refused(
                Reason::JwtInvalid,
                "the token is not a well-formed signed JWT",
            ),
        },
    )?;
    check_claims(issuer, rule, &data.claims, now)?;
    Ok(Verified {
        claims: data.claims,
    })
}

/// Checks `iss`, `exp`, `nbf` and `aud` of already signature-checked claims.
pub(crate) fn check_claims(
    issuer: &Issuer,
    rule: &JwtRule,
    claims: &Map<String, Value>,
    now: SystemTime,
) -> Result<(), Refused> {
    if claims.get("iss").and_then(Value::as_str) != Some(issuer.issuer.as_str()) {
        return Err(refused(
            Reason::JwtWrongIssuer,
            "the token's iss is not the issuer's",
        ));
    }
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let leeway = issuer.leeway.as_secs_f64();
    let Some(exp) = claims.get("exp").and_then(Value::as_f64) else {
        return Err(refused(Reason::JwtInvalid, "the token has no numeric exp"));
    };
    if now > exp + leeway {
        return Err(refused(Reason::JwtExpired, "the token has expired"));
    }
    match claims.get("nbf") {
        None => {}
        Some(nbf) => match nbf.as_f64() {
            Some(nbf) if now + leeway < nbf => {
                return Err(refused(
                    Reason::JwtNotYetValid,
                    "the token is not valid yet (nbf)",
                ));
            }
            Some(_) => {}
            None => {
                return Err(refused(
                    Reason::JwtInvalid,
                    "the token's nbf is not a number",
                ));
            }
        },
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => rule.audiences.iter().any(|want| want == a),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|a| rule.audiences.iter().any(|want| want == a)),
        _ => false,
    };
    if !aud_ok {
        return Err(refused(
            Reason::JwtWrongAudience,
            "the token's aud does not name this service",
        ));
    }
    Ok(())
}
