//! Hot reload of a policy file edited on disk, in-process: valid edits are
//! applied, invalid ones refused with the last good policy kept, and
//! editor-style write-rename and ConfigMap-style symlink swaps are seen.
//! A reader thread decides requests all along and must never see a failure
//! caused by an edit.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use moat_ca::SpiffeId;
use moat_proxy::policy::watch::ReloadOutcome;
use moat_proxy::policy::{JwksCache, Method, PolicyWatcher, RequestFacts, Verdict};

fn policy(extra_route: &str) -> String {
    format!(
        r#"
[[route]]
name  = "always"
path  = "/always"
allow = "any-peer"

[[route]]
name  = "{extra_route}"
path  = "/{extra_route}/*"
allow = "any-peer"
"#
    )
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for: {what}");
}

fn routes(w: &PolicyWatcher) -> Vec<String> {
    w.current().route_names().map(str::to_owned).collect()
}

/// Writes `text` to a temporary file in the same directory and renames it
/// over `path`, as editors and `kubectl cp` do.
fn write_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn policy_edits_on_disk_apply_when_valid_and_are_refused_when_not() {
    moat_ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy("v1")).unwrap();
    let mut watcher = PolicyWatcher::load("api", &path, JwksCache::new()).unwrap();
    watcher.watch().unwrap();
    let stats = watcher.stats();

    // A reader deciding requests the whole time, as the proxy would.
    let handle = watcher.handle();
    let stop = Arc::new(AtomicBool::new(false));
    let (decided, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let reader = {
        let (stop, decided, failed) = (stop.clone(), decided.clone(), failed.clone());
        std::thread::spawn(move || {
            let peer = SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
            while !stop.load(Ordering::Relaxed) {
                let policy = handle.load();
                let facts = RequestFacts {
                    method: &Method::GET,
                    host: None,
                    path: "/always",
                    peer: &peer,
                    authorization: None,
                };
                if policy.authorize(&facts, SystemTime::now()).verdict != Verdict::Allow {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                decided.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    assert_eq!(routes(&watcher), ["always", "v1"]);
    let first_hash = watcher.current().hash().to_owned();

    // A valid in-place edit.
    std::fs::write(&path, policy("v2")).unwrap();
    eventually("v2 applied", || routes(&watcher) == ["always", "v2"]);
    assert_ne!(watcher.current().hash(), first_hash);
    assert_eq!(stats.ok.load(Ordering::Relaxed), 1);

    // An invalid edit: refused, counted, the last good policy stays.
    let good_hash = watcher.current().hash().to_owned();
    std::fs::write(&path, policy("v3").replace("allow", "allwo")).unwrap();
    eventually("invalid edit counted", || {
        stats.failed.load(Ordering::Relaxed) >= 1
    });
    assert_eq!(routes(&watcher), ["always", "v2"]);
    assert_eq!(watcher.current().hash(), good_hash);
    match watcher.reload() {
        ReloadOutcome::Refused(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("policy.toml:5:1: unknown field `allwo`"),
                "{msg}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        1,
        "the same invalid content counts once"
    );
    assert!(
        stats
            .last_error()
            .unwrap()
            .contains("unknown field `allwo`")
    );

    // Editor-style write to a temp file and rename over the original.
    write_rename(&path, &policy("v4"));
    eventually("v4 applied after rename", || {
        routes(&watcher) == ["always", "v4"]
    });

    // The file disappears for a moment: refused, last good kept.
    let failed_before = stats.failed.load(Ordering::Relaxed);
    std::fs::remove_file(&path).unwrap();
    eventually("missing file counted", || {
        stats.failed.load(Ordering::Relaxed) > failed_before
    });
    assert_eq!(routes(&watcher), ["always", "v4"]);
    std::fs::write(&path, policy("v5")).unwrap();
    eventually("v5 applied after re-create", || {
        routes(&watcher) == ["always", "v5"]
    });

    // Unchanged content is a no-op.
    assert!(matches!(watcher.reload(), ReloadOutcome::Unchanged));

    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert!(decided.load(Ordering::Relaxed) > 100);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed because of an edit"
    );
}

#[test]
fn configmap_symlink_swap_is_applied() {
    use std::os::unix::fs::symlink;
    moat_ca::install_crypto_provider();
    // The kubelet's layout: policy.toml -> ..data/policy.toml, ..data -> ..v1.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::write(d.join("..v1/policy.toml"), policy("v1")).unwrap();
    symlink("..v1", d.join("..data")).unwrap();
    symlink("..data/policy.toml", d.join("policy.toml")).unwrap();
    let mut watcher = PolicyWatcher::load("api", &d.join("policy.toml"), JwksCache::new()).unwrap();
    watcher.watch().unwrap();
    assert_eq!(routes(&watcher), ["always", "v1"]);

    // Atomic swap: a new version directory, a new symlink renamed over ..data.
    std::fs::create_dir(d.join("..v2")).unwrap();
    std::fs::write(d.join("..v2/policy.toml"), policy("v2")).unwrap();
    symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..v1")).unwrap();
    eventually("v2 applied after the symlink swap", || {
        routes(&watcher) == ["always", "v2"]
    });
    assert_eq!(watcher.stats().failed.load(Ordering::Relaxed), 0);
}

#[test]
fn a_restored_policy_clears_the_reload_error_by_watch_and_by_reload() {
    moat_ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    let good = policy("v1");
    let bad = "[[route]]\nname = \"broken\"\npath = \"/x\"\nunknown = 1\n";
    std::fs::write(&path, &good).unwrap();

    // SIGHUP's path: an explicit re-read, no file watch.
    let watcher = PolicyWatcher::load("api", &path, JwksCache::new()).unwrap();
    let stats = watcher.stats();
    let loaded_at = stats.last_success_unix();
    assert!(loaded_at > 0 && !stats.failing());
    std::fs::write(&path, bad).unwrap();
    assert!(matches!(watcher.reload(), ReloadOutcome::Refused(_)));
    assert!(stats.failing());
    let error = stats.last_error().expect("the refusal is kept");
    assert!(error.contains("unknown field"), "{error}");
    // The good file back: the same content as the running policy.
    std::fs::write(&path, &good).unwrap();
    assert!(matches!(watcher.reload(), ReloadOutcome::Unchanged));
    assert!(!stats.failing(), "restoring the file clears the refusal");
    assert_eq!(stats.last_error(), None);
    assert!(stats.last_success_unix() >= loaded_at);
    assert_eq!(stats.failed.load(Ordering::Relaxed), 1);
    drop(watcher);

    // The file watch's path.
    let mut watcher = PolicyWatcher::load("api", &path, JwksCache::new()).unwrap();
    watcher.watch().unwrap();
    let stats = watcher.stats();
    write_rename(&path, bad);
    eventually("the bad edit to be refused", || stats.failing());
    write_rename(&path, &good);
    eventually("the restored file to clear the refusal", || {
        !stats.failing() && stats.last_error().is_none()
    });
    assert_eq!(routes(&watcher), ["always", "v1"]);
}
