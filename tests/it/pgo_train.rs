//! `pgo-train`, the training load of the profile-guided build
//! (scripts/pgo-build.sh), runs every workload against the current `moat`
//! and gets the answers it expects — so the shipped build's profile comes
//! from the paths a sidecar really takes, not from a run that failed half
//! way through.

use crate::support;

#[test]
fn pgo_training_load_runs_every_workload_and_stops_the_sidecars_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgo-train"))
        .args(["--moat", support::moat_bin().to_str().expect("utf-8 path")])
        .args(["--dir", dir.path().to_str().expect("utf-8 path")])
        .args(["--scale", "1"])
        .output()
        .expect("run pgo-train");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pgo-train failed:\n{stdout}\n{stderr}"
    );
    for workload in [
        "h1 mTLS, no policy",
        "new TLS connection per request",
        "h2 mTLS, no policy",
        "h1 mTLS, routes",
        "paced, one connection",
        "h2 mTLS, routes",
        "h1 via outbound",
        "h2c via outbound",
        "paced via outbound",
        "1 MiB uploads via both",
        "tcp via both",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(workload))
            .unwrap_or_else(|| panic!("no {workload:?} row in:\n{stdout}"));
        assert!(
            line.contains("200×") && line.contains("unexpected 0 errors 0"),
            "{line}"
        );
    }
    // The routed workloads met the policy: JWTs missing or short of the
    // scope, denials and malformed paths too.
    let routed = stdout
        .lines()
        .find(|l| l.starts_with("h2 mTLS, routes"))
        .expect("routes row");
    assert!(
        routed.contains("401×") && routed.contains("403×") && routed.contains("400×"),
        "{routed}"
    );
}
