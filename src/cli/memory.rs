//! Giving freed heap memory back to the OS once load falls (issue 22:
//! "memory that comes back").
//!
//! glibc's malloc returns memory to the OS only from the top of a heap; after
//! a burst of connections the free chunks sit between live ones and the
//! process keeps its peak RSS (a sidecar after 256 keep-alive connections:
//! ~19 MiB of heap, 1.1 MiB before, none of it returned 60 s later).
//! `malloc_trim(0)` also releases the free pages inside a heap
//! (`MADV_DONTNEED`), in every arena. A tick calls it unless the number of
//! live tasks (one per connection, more per HTTP/2 stream) rose since the
//! previous tick: a rising load keeps what it is about to reuse, and a
//! burst that came and went between two ticks is still trimmed.
//!
//! The allocator comparison that chose glibc plus this over mimalloc and
//! jemalloc is in benches/results/analysis.md ("The global allocator").

use std::time::Duration;

/// How often the task looks whether load fell. Memory comes back within
/// one to two ticks of the last connection closing.
const TICK: Duration = Duration::from_secs(10);

/// Spawns the task on the current runtime. Runs until the runtime stops.
pub(super) fn spawn_release_task() {
    tokio::spawn(async {
        let metrics = tokio::runtime::Handle::current().metrics();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = usize::MAX;
        loop {
            tick.tick().await;
            let alive = metrics.num_alive_tasks();
            if alive <= last {
                release();
            }
            last = alive;
        }
    });
}

/// Returns the free pages of every malloc arena to the OS.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release() {
    let start = std::time::Instant::now();
    // SAFETY: malloc_trim only walks the allocator's own free lists, under
    // its arena locks; the pad of 0 keeps nothing spare at a heap's top.
    unsafe { libc::malloc_trim(0) };
    tracing::debug!(
        took_us = start.elapsed().as_micros() as u64,
        "returned free heap pages to the OS"
    );
}

/// Other C libraries: nothing to call (musl's malloc returns freed pages itself).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() {}
