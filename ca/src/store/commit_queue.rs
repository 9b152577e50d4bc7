//! The queue behind both engines' group commit (`sqlite/group.rs`,
//! `postgres/group.rs`): an issuance joins it and waits for its outcome;
//! the first to find no writer at work starts one, which takes batches
//! until the queue is empty. How a batch is written is the engine's.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{IssuanceRecord, Recorded, StoreError};

/// Issuances waiting for a writer, and whether one is at work.
#[derive(Default)]
pub(super) struct Queue {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pending: Vec<Pending>,
    writing: bool,
}

/// One issuance to record and where to send the outcome.
pub(super) struct Pending {
    pub(super) record: IssuanceRecord,
    reply: oneshot::Sender<Result<Recorded, StoreError>>,
}

/// Where a queued issuance's outcome arrives ([`Outcome::wait`]).
pub(super) struct Outcome(oneshot::Receiver<Result<Recorded, StoreError>>);

impl Outcome {
    /// The outcome, once the writer answered.
    pub(super) async fn wait(self) -> Result<Recorded, StoreError> {
        self.0
            .await
            .map_err(|_| StoreError::Corrupt("the store's writer stopped".into()))?
    }
}

impl Queue {
    /// Queues `record`. `true` with it when no writer is at work: the
    /// caller then starts one, holding a [`Turn`].
    pub(super) fn join(&self, record: IssuanceRecord) -> (Outcome, bool) {
        let (reply, outcome) = oneshot::channel();
        let mut state = self.state.lock().expect("CA store queue");
        state.pending.push(Pending { record, reply });
        let start = !std::mem::replace(&mut state.writing, true);
        (Outcome(outcome), start)
    }
}

/// A writer's hold on the queue. Dropped before the queue ran dry (a panic,
/// or a runtime shutting down before the writer ran), it answers what is
/// queued with an error (the reply channels close) and lets the next
/// issuance start another writer.
pub(super) struct Turn {
    queue: Arc<Queue>,
    done: bool,
}

impl Turn {
    pub(super) fn new(queue: Arc<Queue>) -> Self {
        Self { queue, done: false }
    }

    /// The next batch, the oldest `max` at most; `None` once the queue is
    /// empty, and the writer is then done.
    pub(super) fn next(&mut self, max: usize) -> Option<Vec<Pending>> {
        let mut state = self.queue.state.lock().expect("CA store queue");
        if state.pending.is_empty() {
            state.writing = false;
            self.done = true;
            return None;
        }
        let n = state.pending.len().min(max);
        Some(state.pending.drain(..n).collect())
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = match self.queue.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        state.pending.clear();
        state.writing = false;
    }
}

/// Sends each issuance of `batch` its outcome, in order.
pub(super) fn answer(batch: Vec<Pending>, outcomes: Vec<Result<Recorded, StoreError>>) {
    for (pending, outcome) in batch.into_iter().zip(outcomes) {
        // The request may have timed out and gone; nothing to tell.
        let _ = pending.reply.send(outcome);
    }
}
