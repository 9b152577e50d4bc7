//! `moat demo` runs to completion and shows what a new user should see.

use crate::support;

#[test]
fn demo_runs_to_completion_showing_allowed_and_denied_traffic_and_a_renewal() {
    let out = std::process::Command::new(support::moat_bin())
        .arg("demo")
        .env("RUST_LOG", "info")
        .output()
        .expect("run moat demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let line = |needle: &str| {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stdout}"))
            .to_owned()
    };
    // Identities from the CA.
    assert!(line("frontend  spiffe://demo.local/ns/shop/sa/frontend").contains("serial"));
    // Allowed read, denied write, JWT missing, JWT present, traversal denied.
    let read = line("GET /invoices/42 ");
    assert!(
        read.contains("200") && read.contains("allow") && read.contains("read-invoices"),
        "{read}"
    );
    let write = line("POST /invoices/42");
    assert!(
        write.contains("403") && write.contains("write-invoices"),
        "{write}"
    );
    let export = line("GET /export  ");
    assert!(
        export.contains("401") && export.contains("export-invoices"),
        "{export}"
    );
    let with_jwt = line("with alice's JWT");
    assert!(
        with_jwt.contains("200") && with_jwt.contains("verified user alice"),
        "{with_jwt}"
    );
    let traversal = line("/invoices/../admin/keys");
    assert!(traversal.contains("403"), "{traversal}");
    // The sidecar refuses clients without a trusted certificate.
    assert!(line("no certificate").contains("refused"));
    assert!(line("another CA").contains("refused"));
    // A renewal happened and traffic still flows.
    assert!(line("renewed over mutual TLS").contains("->"));
    assert!(line("after renewal").contains("200"));
    assert!(stdout.contains("demo finished"));
}
