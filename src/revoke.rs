//! `moat ca revoke` and `moat ca unrevoke`: take a certificate or an
//! identity back, list what is revoked, undo a revocation. One short
//! conversation with the CA's store (the same `--dir`/`[store]` as every
//! `moat ca` command); every CA replica serves the change within a second,
//! and every sidecar applies it at its next poll (a few seconds).

use std::time::SystemTime;

use clap::{ArgGroup, Args};
use moat_ca::store::{CaDir, NO_END, RevocationTarget, StoreError, format_unix};

/// What `moat ca revoke` takes.
#[derive(Args)]
#[group(skip)]
#[command(group = ArgGroup::new("revoke_what").required(true).multiple(false))]
pub struct RevokeArgs {
    /// Revoke one certificate by its serial number (hex, as the CA's
    /// `issued` log line and `/identity` show it).
    #[arg(long, group = "revoke_what")]
    serial: Option<String>,
    /// Revoke every certificate of this SPIFFE ID, now and until
    /// `moat ca unrevoke --id`; it can neither renew nor redeem a token.
    #[arg(long, group = "revoke_what")]
    id: Option<String>,
    /// List the revocations in force.
    #[arg(long, group = "revoke_what")]
    list: bool,
    /// Why (kept with the revocation: shown by --list, in the CA's 403, and
    /// in the log line of each sidecar that refuses a handshake for it).
    #[arg(long, default_value = "unspecified")]
    reason: String,
    /// When the revocation ends: a duration from now (`2h`) or an RFC 3339
    /// time. Default: when the certificate expires (--serial), or never
    /// until un-revoked (--id).
    #[arg(long, value_parser = parse_until)]
    until: Option<SystemTime>,
}

/// What `moat ca unrevoke` takes.
#[derive(Args)]
#[group(skip)]
#[command(group = ArgGroup::new("unrevoke_what").required(true).multiple(false))]
pub struct UnrevokeArgs {
    /// The certificate serial to restore.
    #[arg(long, group = "unrevoke_what")]
    serial: Option<String>,
    /// The SPIFFE ID to restore.
    #[arg(long, group = "unrevoke_what")]
    id: Option<String>,
}

/// `moat ca revoke`.
pub async fn revoke(ca: &CaDir, args: RevokeArgs) -> Result<(), StoreError> {
    if args.list {
        return list(ca).await;
    }
    let target = target(args.serial, args.id);
    let record = ca.revoke(target.clone(), &args.reason, args.until).await?;
    let until = if record.until == NO_END {
        "until un-revoked".to_owned()
    } else {
        format!("until {}", format_unix(record.until))
    };
    println!(
        "revoked {} ({until}); CA replicas serve it within a second, sidecars apply it within seconds",
        target.describe()
    );
    Ok(())
}

/// `moat ca unrevoke`.
pub async fn unrevoke(ca: &CaDir, args: UnrevokeArgs) -> Result<(), StoreError> {
    let target = target(args.serial, args.id);
    ca.unrevoke(target.clone()).await?;
    println!("{} is no longer revoked", target.describe());
    Ok(())
}

async fn list(ca: &CaDir) -> Result<(), StoreError> {
    let revocations = ca.revocations().await?;
    if revocations.is_empty() {
        println!("nothing is revoked");
        return Ok(());
    }
    println!(
        "{:<10} {:<45} {:<21} {:<21} REASON",
        "KIND", "WHAT", "REVOKED", "UNTIL"
    );
    for r in revocations {
        let (kind, what) = match (&r.serial, &r.spiffe_id) {
            (Some(serial), Some(id)) => ("serial", format!("{serial} ({id})")),
            (Some(serial), None) => ("serial", serial.clone()),
            (None, id) => ("identity", id.clone().unwrap_or_default()),
        };
        let until = if r.until == NO_END {
            "un-revoked".to_owned()
        } else {
            format_unix(r.until)
        };
        println!(
            "{kind:<10} {what:<45} {:<21} {until:<21} {}",
            format_unix(r.revoked_at),
            r.reason
        );
    }
    Ok(())
}

fn target(serial: Option<String>, id: Option<String>) -> RevocationTarget {
    match (serial, id) {
        (Some(serial), _) => RevocationTarget::Serial(serial),
        (None, Some(id)) => RevocationTarget::Id(id),
        // clap's argument group requires one of them.
        (None, None) => unreachable!("clap requires --serial or --id"),
    }
}

fn parse_until(s: &str) -> Result<SystemTime, String> {
    moat_ca::revocation::parse_until(s, SystemTime::now())
}
