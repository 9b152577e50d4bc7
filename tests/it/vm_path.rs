//! The VM path as docs/deploy.md tells it, followed literally: the shell
//! blocks of "Install", "The CA on a VM" and "Bootstrapping a VM with a
//! join token", in order, run by bash with `set -eu`, so a step that fails
//! as written (a directory no step made, a configuration the proxy refuses,
//! a policy file nothing wrote) fails this test.
//!
//! The machine is played as closely as one process tree on loopback allows:
//!
//! - absolute paths (`/etc/moat`, `/var/lib/moat`, `/usr/local/bin`,
//!   `/etc/systemd/system`, `/run/credentials`) move under a scratch root,
//!   where the directories a Debian system has (`/etc`, `/var/lib`,
//!   `/usr/local/bin`, `/etc/systemd/system`) exist and `/etc/moat` does not;
//! - the CA and the VM are the same host, so the ports in the docs become
//!   free loopback ports (the CA's 8443, the proxy's 8443 and 9901), and the
//!   service at `127.0.0.1:8080` is an echo service; `ca_url`'s host,
//!   which only DNS on a real network resolves, becomes `127.0.0.1`;
//! - `sudo -u moat`, `install -o/-g`, `systemd-sysusers` and `systemctl
//!   daemon-reload` run without the user (the test runs as one user);
//! - `bash scripts/pgo-build.sh` is the `moat` this test was built with;
//! - `systemctl enable --now UNIT` runs the *installed* unit's `ExecStart=`
//!   (paths and ports moved as above), after doing what the unit's
//!   `LoadCredential=` does, and returns once the service listens;
//!   `journalctl -u UNIT -f` prints the unit's log once it has the line the
//!   docs say to watch for.
//!
//! Everything else (`install`, `cat > file <<'TOML'`, `curl`, every `moat`
//! command) is the real program.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::{free_port, moat_bin, path_str};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The text of `markdown` from the heading line `heading` to the next
/// heading of the same or a higher level, outside code blocks.
fn section<'a>(markdown: &'a str, heading: &str) -> &'a str {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let start = markdown
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("docs/deploy.md has no heading {heading:?}"))
        + 1;
    let mut fenced = false;
    let mut offset = start + heading.len() + 1;
    for line in markdown[offset..].lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !fenced && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            return &markdown[start..offset];
        }
        offset += line.len() + 1;
    }
    &markdown[start..]
}

/// Every ```sh block of `text`, indented ones (inside list items) included,
/// without their indentation.
fn sh_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut current {
            None if trimmed == "```sh" => current = Some((indent, String::new())),
            Some((_, block)) if trimmed == "```" => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some((indent, block)) => {
                block.push_str(line.get(*indent..).unwrap_or("").trim_end());
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// What `systemctl`, `journalctl`, `sudo`, `install`, `systemd-sysusers`
/// and `bash scripts/pgo-build.sh` do on this pretend machine (see the
/// module comment); `$ROOT` is the scratch root.
const SHIMS: &str = r#"
set -eu
sudo() { if [ "$1" = -u ]; then shift 2; fi; "$@"; }
install() {
  local args=()
  while [ $# -gt 0 ]; do
    case "$1" in -o|-g) shift 2 ;; *) args+=("$1"); shift ;; esac
  done
  command install "${args[@]}"
}
systemd-sysusers() { :; }
bash() {
  if [ "$1" = scripts/pgo-build.sh ]; then
    mkdir -p target/pgo && cp "$MOAT_BIN" target/pgo/moat
  else
    command bash "$@"
  fi
}
wait_for_log() { # FILE PATTERN: until the log has it, or the process died
  local i
  for i in $(seq 600); do
    if grep -q "$2" "$1" 2>/dev/null; then return 0; fi
    if ! kill -0 "$(cat "$1.pid")" 2>/dev/null; then cat "$1" >&2; echo "died" >&2; return 1; fi
    sleep 0.1
  done
  cat "$1" >&2; echo "timed out waiting for $2 in $1" >&2; return 1
}
systemctl() {
  case "$1" in
    daemon-reload) return 0 ;;
    enable) [ "$2" = --now ] || { echo "systemctl $*: only enable --now is known here" >&2; return 1; } ;;
    *) echo "systemctl $*: unknown to this test" >&2; return 1 ;;
  esac
  local unit="$3" file="$ROOT/etc/systemd/system/$3.service"
  [ -f "$file" ] || { echo "Unit $3.service not found." >&2; return 1; }
  local exec cred
  exec=$(sed -n 's/^ExecStart=//p' "$file" | sed -e "$UNIT_SED")
  for cred in $(sed -n 's/^LoadCredential=//p' "$file"); do
    mkdir -p "$ROOT/run/credentials/$unit.service"
    cp "$(echo "${cred#*:}" | sed -e "$UNIT_SED")" "$ROOT/run/credentials/$unit.service/${cred%%:*}"
  done
  mkdir -p "$ROOT/var/lib/moat" "$ROOT/var/lib/moat-proxy" "$ROOT/log"
  setsid $exec </dev/null >/dev/null 2>"$ROOT/log/$unit" &
  echo $! > "$ROOT/log/$unit.pid"
  wait_for_log "$ROOT/log/$unit" '"listening"'
}
journalctl() {
  [ "$1" = -u ] && [ "$3" = -f ] || { echo "journalctl $*: unknown to this test" >&2; return 1; }
  wait_for_log "$ROOT/log/$2" 'certificate issued'
  cat "$ROOT/log/$2"
}
"#;

/// Stops the services the script started.
struct Services(PathBuf);

impl Drop for Services {
    fn drop(&mut self) {
        for unit in ["moat-ca", "moat-proxy"] {
            if let Ok(pid) = std::fs::read_to_string(self.0.join(format!("log/{unit}.pid"))) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
}

#[test]
fn the_vm_path_of_deploy_md_works_as_written() {
    if !support::require("curl") {
        return;
    }
    let text = std::fs::read_to_string(repo().join("docs/deploy.md")).unwrap();
    let vms = section(&text, "## VMs");
    let mut script = String::new();
    for heading in [
        "### Install",
        "### The CA on a VM",
        "### Bootstrapping a VM with a join token",
    ] {
        let blocks = sh_blocks(section(vms, heading));
        assert!(!blocks.is_empty(), "{heading} lost its commands");
        for block in blocks {
            script.push_str(&block);
        }
    }

    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    for dir in [
        "etc/systemd/system",
        "etc/sysusers.d",
        "var/lib",
        "usr/local/bin",
        "work",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let work = root.join("work");
    for dir in ["config", "scripts"] {
        std::os::unix::fs::symlink(repo().join(dir), work.join(dir)).unwrap();
    }
    let _services = Services(root.to_owned());
    let app = support::echo_service();
    let (ca_port, inbound_port, admin_port) = (free_port(), free_port(), free_port());
    let r = path_str(root);

    // The docs' paths and ports, moved onto this machine.
    let moved = |s: &str, listen_8443: u16| {
        s.replace("/etc/moat", &format!("{r}/etc/moat"))
            .replace("/var/lib/moat", &format!("{r}/var/lib/moat"))
            .replace("/run/credentials", &format!("{r}/run/credentials"))
            .replace("/etc/systemd/system", &format!("{r}/etc/systemd/system"))
            .replace("/etc/sysusers.d", &format!("{r}/etc/sysusers.d"))
            .replace("/usr/local/bin", &format!("{r}/usr/local/bin"))
            .replace(
                "moat-ca.example.internal:8443",
                &format!("127.0.0.1:{ca_port}"),
            )
            .replace("127.0.0.1:8443", &format!("127.0.0.1:{ca_port}"))
            .replace("0.0.0.0:8443", &format!("127.0.0.1:{listen_8443}"))
            .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin_port}"))
            .replace("127.0.0.1:8080", &app.to_string())
    };
    let script = moved(&script, inbound_port);
    // In the units (read by the systemctl stand-in): the same moves, as a
    // sed script, and the CA's admin listener on a free port.
    let unit_sed = [
        ("/etc/moat", format!("{r}/etc/moat")),
        ("/var/lib/moat", format!("{r}/var/lib/moat")),
        ("/usr/local/bin", format!("{r}/usr/local/bin")),
        ("0.0.0.0:8443", format!("127.0.0.1:{ca_port}")),
        (" ca serve ", " ca serve --admin 127.0.0.1:0 ".to_owned()),
    ]
    .iter()
    .map(|(from, to)| format!("s|{from}|{to}|g;"))
    .collect::<String>();

    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("{SHIMS}\n{script}"))
        .current_dir(&work)
        .env("ROOT", r)
        .env("MOAT_BIN", moat_bin())
        .env("UNIT_SED", unit_sed)
        .env(
            "PATH",
            format!("{r}/usr/local/bin:{}", std::env::var("PATH").unwrap()),
        )
        .env_remove("RUST_LOG")
        .env_remove("MOAT_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the documented VM steps failed\n--- script ---\n{script}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    // The last step's answer: the proxy holds its certificate.
    assert!(
        stdout.trim_end().ends_with("ready"),
        "/ready did not answer ready:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("all well"),
        "moat doctor found something:\n{stdout}"
    );

    // What the CA unit's --san adds: the name in the docs' ca_url.
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/moat-ca.service")).unwrap();
    assert!(unit.contains("--san moat-ca.example.internal"), "{unit}");
    let resolve = format!("moat-ca.example.internal:{ca_port}:127.0.0.1");
    let url = format!("https://moat-ca.example.internal:{ca_port}/v1/bundle");
    let bundle = root.join("etc/moat/bundle.pem");
    let curl = support::tool(
        "curl",
        &[
            "-sf",
            "--cacert",
            path_str(&bundle),
            "--resolve",
            &resolve,
            &url,
        ],
    );
    assert!(
        curl.status.success(),
        "{}",
        String::from_utf8_lossy(&curl.stderr)
    );

    // And the sidecar serves: its inbound is up with the identity the token named.
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let identity = support::tool("curl", &["-sf", &format!("http://{admin}/identity")]);
    let identity = String::from_utf8_lossy(&identity.stdout);
    assert!(
        identity.contains("spiffe://example.org/vm/billing-1"),
        "{identity}"
    );
}
