//! Drain-based shutdown, after linkerd2-proxy's `drain` crate.
//!
//! The [`Signal`] side is held by `run`; every listener and connection holds
//! a [`Watch`]. On SIGTERM the signal fires: listeners stop accepting,
//! connections finish what is in flight and close, and each dropped `Watch`
//! counts down. [`Signal::drain`] resolves when the last one is gone.
//!
//! Why not the `drain` crate itself (0.2, what ztunnel wraps): it is the
//! same mechanism in about as many lines, but its API would make the
//! call sites worse and change what an operator sees:
//!
//! - Its `Signal` cannot say how many watches are held, and the `draining`
//!   log line reports that count (`listeners_and_connections`); dropping
//!   the field is a change an operator would notice.
//! - Its `Watch::signaled` takes the watch by value (it returns the
//!   release token), while our waits borrow it: the select loop in
//!   `conn::serve_http_until` and the accept loop's stop would each become
//!   `drain.clone().signaled()`.
//! - Its `Watch` is two channel handles (an `mpsc::Sender` whose closing
//!   is the drain, and a `watch::Receiver` for the signal); ours is one
//!   `watch::Receiver`, whose closing is the drain. A watch is cloned for
//!   every accepted connection and lives in every connection's future, so
//!   the crate costs one more reference count per connection and a larger
//!   per-connection future, for nothing we use (`ReleaseShutdown`,
//!   `ignore_signaled`).
//!
//! Revisit if drain modes (graceful vs immediate, as ztunnel adds on top)
//! are ever needed.

use tokio::sync::watch;

/// Fires the drain and waits for it to finish.
#[derive(Debug)]
pub(crate) struct Signal {
    tx: watch::Sender<bool>,
}

/// Held while work is in progress; tells when to wind down.
#[derive(Debug, Clone)]
pub struct Watch {
    rx: watch::Receiver<bool>,
}

/// A new drain pair.
pub(crate) fn channel() -> (Signal, Watch) {
    let (tx, rx) = watch::channel(false);
    (Signal { tx }, Watch { rx })
}

impl Signal {
    /// Asks every holder of a [`Watch`] to wind down, and resolves once all
    /// have been dropped.
    pub(crate) async fn drain(self) {
        let _ = self.tx.send(true);
        self.tx.closed().await;
    }

    /// How many watches are held (listeners plus open connections).
    pub(crate) fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }
}

impl Watch {
    /// Resolves once the drain has started (immediately if it already has).
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// True once the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn drain_waits_for_every_watch() {
        let (signal, watch) = channel();
        let held = watch.clone();
        let task = tokio::spawn(async move {
            held.signaled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held);
        });
        drop(watch);
        let start = std::time::Instant::now();
        signal.drain().await;
        assert!(start.elapsed() >= Duration::from_millis(40));
        task.await.unwrap();
    }
}
