//! The open-file limit: raised to what the process may use at start.
//!
//! Every connection is a file descriptor (two for a proxied one: the peer's
//! and the upstream's), and the soft `RLIMIT_NOFILE` most launchers hand a
//! service is 1024 (systemd's default, kept for programs that still use
//! `select(2)`), which would cap a sidecar near 500 proxied connections
//! whatever `[limits] max_connections` says: past it `accept` fails with
//! EMFILE and handshakes fail half-way. moat uses no `select(2)`, so it
//! raises its soft limit to the hard one, as Go's runtime and nginx-style
//! servers do, and says so when even the hard limit is below what the
//! configuration can ask for.

/// Descriptors beyond the connections': the admin listener and its
/// clients, log and state files, the CA client's connections, the
/// runtime's own (epoll, eventfd, signal pipe).
const MARGIN: u64 = 256;

/// Raises the soft open-file limit to the hard one and logs what it did;
/// warns when the hard limit is below `needed`, naming `what` needs it.
/// Call after logging is set up, before any listener is bound.
pub(super) fn raise(needed: u64, what: &str) {
    let needed = needed.saturating_add(MARGIN);
    let Some((soft, hard)) = get() else {
        tracing::warn!("cannot read the open-file limit (RLIMIT_NOFILE)");
        return;
    };
    // Linux refuses an unlimited soft limit for descriptors: the kernel's
    // ceiling (fs.nr_open) is the most a process can have.
    let hard = if hard == libc::RLIM_INFINITY {
        nr_open().unwrap_or(soft)
    } else {
        hard
    };
    let mut limit = soft;
    if soft < hard {
        match set(hard) {
            Ok(()) => {
                tracing::info!(
                    from = soft,
                    to = hard,
                    "raised the open-file limit (soft RLIMIT_NOFILE) to its hard limit"
                );
                limit = hard;
            }
            Err(e) => tracing::warn!(
                soft,
                hard,
                error = %e,
                "cannot raise the open-file limit (soft RLIMIT_NOFILE) to its hard limit"
            ),
        }
    }
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            "the open-file limit is below what {what} can use: connections past it fail \
             (`accept` backs off with \"Too many open files\"); raise the hard limit \
             (systemd: LimitNOFILE=, as the shipped units set; a shell: `ulimit -Hn`; \
             a container runtime: its nofile ulimit) or lower [limits] max_connections"
        );
    }
}

/// The soft and hard `RLIMIT_NOFILE` (`rlim_t` is `u64` on Linux).
fn get() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some((limit.rlim_cur, limit.rlim_max))
}

/// The kernel's ceiling on a process's descriptors.
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Sets the soft limit, leaving the hard one as it is.
fn set(soft: u64) -> std::io::Result<()> {
    let Some((_, hard)) = get() else {
        return Err(std::io::Error::last_os_error());
    };
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
