//! `moat ca revoke` and `moat ca unrevoke`: take a certificate or an
//! identity back, list what is revoked, undo a revocation. One short
//! conversation with the CA's store (the same `--dir`/`[store]` as every
//! `moat ca` command); every CA replica serves the change within a second,
//! and every sidecar applies it at its next poll (a few seconds).

use std::time::SystemTime;

use clap::{ArgGroup, Args};
use moat_ca::revocation::{RevocationEntry, RevocationList};
use moat_ca::store::{
    CaDir, NO_END, RevocationRecord, RevocationTarget, Revoked, StoreError, format_unix,
};

/// What `moat ca revoke` takes.
#[derive(Args)]
#[group(skip)]
#[command(group = ArgGroup::new("revoke_what").required(true).multiple(false))]
pub(crate) struct RevokeArgs {
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
    /// With --list: print the deny-list as the CA serves it to sidecars
    /// (JSON), for the `[identity] deny_list` file of sidecars that have
    /// their certificates from files rather than from the CA.
    #[arg(long, requires = "list")]
    json: bool,
    /// Why (kept with the revocation: shown by --list, in the CA's 403, and
    /// in the log line of each sidecar that refuses a handshake for it).
    /// Default: "unspecified". Given for something already revoked with
    /// another reason, it replaces the reason (the target stays revoked
    /// throughout).
    #[arg(long)]
    reason: Option<String>,
    /// When the revocation ends: a duration from now (`2h`) or an RFC 3339
    /// time. Default: when the certificate expires (--serial), or never
    /// until un-revoked (--id). Given for something already revoked, it
    /// replaces the end.
    #[arg(long, value_parser = parse_until)]
    until: Option<SystemTime>,
}

/// What `moat ca unrevoke` takes.
#[derive(Args)]
#[group(skip)]
#[command(group = ArgGroup::new("unrevoke_what").required(true).multiple(false))]
pub(crate) struct UnrevokeArgs {
    /// The certificate serial to restore.
    #[arg(long, group = "unrevoke_what")]
    serial: Option<String>,
    /// The SPIFFE ID to restore.
    #[arg(long, group = "unrevoke_what")]
    id: Option<String>,
}

/// `moat ca revoke`. Revoking what is already revoked changes nothing
/// (and exits 0) unless `--reason` or `--until` asks for a change.
pub(crate) async fn revoke(ca: &CaDir, args: RevokeArgs) -> Result<(), StoreError> {
    if args.list {
        return if args.json {
            list_json(ca).await
        } else {
            list(ca).await
        };
    }
    let target = target(args.serial, args.id);
    // Every message names the target as the CA spells it (as `--list`
    // shows it), not as typed: a serial copied from openssl is uppercase.
    match ca
        .revoke(target, args.reason.as_deref(), args.until)
        .await?
    {
        Revoked::New { target, record } => println!(
            "revoked {} ({}); CA replicas serve it within a second, sidecars apply it within seconds",
            target.describe(),
            until(&record)
        ),
        Revoked::Already { target, record } => println!(
            "{} is already revoked (at {}, reason {:?}, {}); nothing changed",
            target.describe(),
            format_unix(record.revoked_at),
            record.reason,
            until(&record)
        ),
        Revoked::Updated {
            target,
            before,
            record,
        } => println!(
            "{} stays revoked; updated from (reason {:?}, {}) to (reason {:?}, {})",
            target.describe(),
            before.reason,
            until(&before),
            record.reason,
            until(&record)
        ),
    }
    Ok(())
}

/// `moat ca unrevoke`. Un-revoking what is not revoked changes nothing
/// and exits 0.
pub(crate) async fn unrevoke(ca: &CaDir, args: UnrevokeArgs) -> Result<(), StoreError> {
    let done = ca.unrevoke(target(args.serial, args.id)).await?;
    if done.removed {
        println!("{} is no longer revoked", done.target.describe());
    } else {
        println!(
            "{} is not revoked; nothing changed (see `moat ca revoke --list`)",
            done.target.describe()
        );
    }
    Ok(())
}

/// "until …" for a confirmation message.
fn until(record: &RevocationRecord) -> String {
    if record.until == NO_END {
        "until un-revoked".to_owned()
    } else {
        format!("until {}", format_unix(record.until))
    }
}

async fn list(ca: &CaDir) -> Result<(), StoreError> {
    let revocations = ca.revocations().await?;
    if revocations.is_empty() {
        println!("nothing is revoked");
        return Ok(());
    }
    // Columns as wide as their widest cell: a serial with its identity
    // runs past any fixed width and pushed the rest of its row out of line.
    let mut rows = vec![[
        "KIND".to_owned(),
        "WHAT".to_owned(),
        "REVOKED".to_owned(),
        "UNTIL".to_owned(),
        "REASON".to_owned(),
    ]];
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
        rows.push([
            kind.to_owned(),
            what,
            format_unix(r.revoked_at),
            until,
            r.reason,
        ]);
    }
    let width = |col: usize| {
        rows.iter()
            .map(|r| r[col].chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2), width(3)];
    for [kind, what, revoked, until, reason] in &rows {
        println!(
            "{kind:<w0$}  {what:<w1$}  {revoked:<w2$}  {until:<w3$}  {reason}",
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        );
    }
    Ok(())
}

/// The deny-list in the JSON of `GET /v1/revocations`: what a sidecar's
/// `[identity] deny_list` file holds.
async fn list_json(ca: &CaDir) -> Result<(), StoreError> {
    // The version first: a revocation landing in between makes the list
    // newer than its version, never older.
    let version = ca.versions().await?.revocations;
    let list = RevocationList {
        version,
        entries: ca
            .revocations()
            .await?
            .into_iter()
            .map(|r| RevocationEntry {
                serial: r.serial,
                spiffe_id: r.spiffe_id,
                reason: r.reason,
                expires: r.expires,
            })
            .collect(),
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&list).expect("a deny-list serializes")
    );
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
