//! [`race`]: a connection against its watchdogs, the watchdogs polled only
//! when they woke the task themselves.
//!
//! Why not `tokio::select!`: a select polls every branch each time its task
//! wakes, and a connection's task wakes several times a request (the
//! caller's bytes, the service's answer, the writes). Its watchdogs (the
//! drain, the idle timer, the lapsed credential) were polled on each of
//! those wake-ups, ~1,500 instructions a request on the HTTP/1.1 inbound
//! (callgrind, benches/results/analysis.md), to learn each time that
//! nothing had happened. Here they get a waker of their own and are polled
//! only after it fired.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Which of the two raced futures finished first, with its output.
pub(crate) enum First<M, S> {
    /// The main future (polled on every wake-up).
    Main(M),
    /// The side future (polled only after it woke the task).
    Side(S),
}

/// Races `main`, polled whenever the task is, against `side`, polled on
/// the first poll and then only after `side` itself woke the task.
pub(crate) fn race<'a, M, S>(main: Pin<&'a mut M>, side: Pin<&'a mut S>) -> Race<'a, M, S>
where
    M: Future + ?Sized,
    S: Future + ?Sized,
{
    let flag = Arc::new(SideWoken {
        woken: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    Race {
        main,
        side,
        waker: Waker::from(flag.clone()),
        flag,
    }
}

/// The future [`race`] returns.
pub(crate) struct Race<'a, M: ?Sized, S: ?Sized> {
    main: Pin<&'a mut M>,
    side: Pin<&'a mut S>,
    flag: Arc<SideWoken>,
    /// `flag` as the waker `side` is polled with.
    waker: Waker,
}

/// Set by the side future's waker, which then wakes the task.
struct SideWoken {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for SideWoken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<M, S> Future for Race<'_, M, S>
where
    M: Future + ?Sized,
    S: Future + ?Sized,
{
    type Output = First<M::Output, S::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(out) = this.main.as_mut().poll(cx) {
            return Poll::Ready(First::Main(out));
        }
        // Registered before the flag is read: a wake-up between the two
        // finds the task's current waker.
        this.flag.task.register(cx.waker());
        if this.flag.woken.swap(false, Ordering::AcqRel) {
            let mut side_cx = Context::from_waker(&this.waker);
            if let Poll::Ready(out) = this.side.as_mut().poll(&mut side_cx) {
                return Poll::Ready(First::Side(out));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_main_future_wins_when_it_finishes_first() {
        let main = std::pin::pin!(async { 1 });
        let side = std::pin::pin!(std::future::pending::<()>());
        assert!(matches!(race(main, side).await, First::Main(1)));
    }

    /// The side future is polled again when its own waker fires (here a
    /// timer's), although the main future never wakes the task.
    #[tokio::test]
    async fn the_side_future_is_polled_when_it_wakes() {
        let main = std::pin::pin!(std::future::pending::<()>());
        let side = std::pin::pin!(tokio::time::sleep(Duration::from_millis(10)));
        assert!(matches!(race(main, side).await, First::Side(())));
    }

    /// Wake-ups of the main future do not poll the side one.
    #[tokio::test]
    async fn main_wake_ups_leave_the_side_future_alone() {
        let polls = std::cell::Cell::new(0);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let main = std::pin::pin!(async {
            let mut n = 0;
            while let Some(x) = rx.recv().await {
                n += x;
            }
            n
        });
        let side = std::pin::pin!(std::future::poll_fn(|_| {
            polls.set(polls.get() + 1);
            Poll::<()>::Pending
        }));
        let sender = async {
            for i in 0..10 {
                tx.send(i).unwrap();
                tokio::task::yield_now().await;
            }
            drop(tx);
        };
        let (first, ()) = tokio::join!(race(main, side), sender);
        assert!(matches!(first, First::Main(45)));
        assert_eq!(polls.get(), 1, "polled once, on the first poll");
    }
}
