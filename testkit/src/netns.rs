//! Network namespaces as "pods", for the transparent-mode tests and
//! `moat demo --transparent` (both as root): a hub namespace holding a
//! bridge, and one namespace per host whose `eth0` is a veth to that bridge,
//! on 10.200.0.0/24 and fd00:200::/64; commands and threads run inside them
//! (as root or as another UID); every namespace deleted on drop, panics
//! included, and those of dead processes swept at the next start.
//!
//! The addresses are the same in every [`Network`]: each has its own
//! namespaces, so nothing collides, and no packet leaves them.

use std::ffi::OsStr;
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

/// One host: a namespace whose `eth0` is on the hub's bridge.
#[derive(Clone, Debug)]
pub struct Host {
    /// The namespace's name (under /run/netns).
    pub ns: String,
    /// `eth0`'s IPv4 address.
    pub ip4: Ipv4Addr,
    /// `eth0`'s IPv6 address.
    pub ip6: Ipv6Addr,
    /// The hub end of the host's veth pair (in [`Network::hub`]).
    pub veth: String,
}

/// Hosts on one bridge; every namespace deleted on drop.
pub struct Network {
    /// The namespace holding the bridge and the hub ends of the veths.
    pub hub: String,
    /// The hosts, in the order their roles were given; host `i` has
    /// 10.200.0.`i+1` and fd00:200::`i+1`.
    pub hosts: Vec<Host>,
}

impl Network {
    /// Makes `PREFIX-hub` and one `PREFIX-ROLE` per role (a role names the
    /// veth too: at most 13 characters); on error, removes what it made.
    /// The prefix should start with a stem and this process's ID
    /// (`moat-t1234-0`) so that [`sweep_stale`] can clean up after a kill.
    pub fn create(prefix: &str, roles: &[&str]) -> Result<Self> {
        let net = Network {
            hub: format!("{prefix}-hub"),
            hosts: roles
                .iter()
                .zip(1u8..)
                .map(|(role, n)| Host {
                    ns: format!("{prefix}-{role}"),
                    ip4: Ipv4Addr::new(10, 200, 0, n),
                    ip6: Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, n.into()),
                    veth: format!("v-{role}"),
                })
                .collect(),
        };
        // From here on, dropping `net` deletes whatever was made.
        ip(&["netns", "add", &net.hub])?;
        ip(&["-n", &net.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &net.hub, "link", "set", "br0", "up"])?;
        ip(&["-n", &net.hub, "link", "set", "lo", "up"])?;
        for h in &net.hosts {
            ip(&["netns", "add", &h.ns])?;
            ip(&[
                "link", "add", "eth0", "netns", &h.ns, "type", "veth", "peer", "name", &h.veth,
                "netns", &net.hub,
            ])?;
            ip(&[
                "-n", &net.hub, "link", "set", &h.veth, "master", "br0", "up",
            ])?;
            let v4 = format!("{}/24", h.ip4);
            let v6 = format!("{}/64", h.ip6);
            ip(&["-n", &h.ns, "addr", "add", &v4, "dev", "eth0"])?;
            ip(&["-n", &h.ns, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
            ip(&["-n", &h.ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &h.ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its links and its nftables tables;
        // processes still inside (none should be: their handles drop first)
        // keep it alive unnamed until they exit.
        for ns in self.hosts.iter().map(|h| &h.ns).chain([&self.hub]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Whether this process runs as root (effective UID 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Why namespaces cannot be made here (not root, no `ip`), if they cannot.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("not root: network namespaces need root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("the `ip` tool is missing (apt-get install iproute2)".into()),
    }
}

/// Removes the namespaces named `STEM<pid>-...` whose process no longer
/// runs (killed before its [`Network`] was dropped).
pub fn sweep_stale(stem: &str) {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(stem)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// Runs `ip ARGS`, with its stderr in the error.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn open_netns(ns: &str) -> Result<File> {
    File::open(format!("/run/netns/{ns}")).with_context(|| format!("open netns {ns}"))
}

/// `program` run inside `ns`, as root.
pub fn netns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    netns_command_as(ns, program, None)
}

/// `program` run inside `ns`; with `user`, as that UID and GID with no
/// supplementary groups (so with no capabilities).
pub fn netns_command_as(ns: &str, program: impl AsRef<OsStr>, user: Option<u32>) -> Command {
    let mut cmd = Command::new(program);
    enter(&mut cmd, ns, user);
    cmd
}

/// Makes `cmd` start inside `ns` (and as `user`, if given). The namespace
/// is entered before the IDs change: entering needs `CAP_SYS_ADMIN`. A
/// namespace that cannot be opened fails the spawn.
pub fn enter(cmd: &mut Command, ns: &str, user: Option<u32>) {
    let netns = open_netns(ns).map(Arc::new);
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            let netns = netns
                .as_ref()
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::NotFound))?;
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(id) = user
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(id) != 0
                    || libc::setuid(id) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `f` on a thread that has entered `ns`: sockets it makes belong to
/// `ns` for their whole life, whichever thread uses them afterwards.
/// Panics if the namespace cannot be entered.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = open_netns(ns).unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::spawn(move || {
        enter_thread(&netns);
        f()
    })
    .join()
    .expect("thread in the namespace")
}

/// Starts a thread that enters `ns` and then runs `f` (a service's accept
/// loop, say) for as long as it likes.
pub fn spawn_in_netns(ns: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    let netns = open_netns(ns)?;
    std::thread::Builder::new()
        .name(format!("in {ns}"))
        .spawn(move || {
            enter_thread(&netns);
            f();
        })?;
    Ok(())
}

fn enter_thread(netns: &File) {
    // SAFETY: setns on this thread only (network namespaces are per thread).
    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}
