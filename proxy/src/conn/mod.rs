//! Connection plumbing shared by every listener: bounded accept loops (the
//! one loop of [`moat_ca::listen`]), the idle watchdog, serving HTTP with
//! graceful shutdown, and TCP splicing.
//!
//! - `listener`: binding, [`Listener`] and [`accept_loop`].
//! - `activity`: idle tracking ([`Activity`], [`Tracked`], [`InFlight`]).
//! - `tick_batched`: [`TickBatched`], writes deferred to the tick's end.
//! - `server`: hyper's server builders, HTTP/2 streams on their
//!   connection's task ([`Streams`]), and [`serve_http`] with graceful close.
//! - `ended`: how a served connection ended, counted and logged
//!   ([`report`]).
//! - `relay`: TCP splicing and [`relay_plain`].
//! - `race`: a connection against its watchdogs, which are polled only
//!   when they wake the task.
//!
//! Every public item is re-exported here, so callers name `conn::X`.

mod activity;
mod ended;
mod listener;
mod race;
mod relay;
mod server;
mod tick_batched;

pub(crate) use activity::{Activity, InFlight, Tracked, raise};
pub(crate) use ended::report;
pub(crate) use listener::{Listener, Serve, bind};
pub(crate) use race::{First, race};
pub(crate) use relay::{RelayConnectError, relay_plain, splice, splice_until};
pub(crate) use server::{
    Cut, Graceful, Streams, http_server, http1_server, http2_server, serve_http, serve_http_until,
};
pub(crate) use tick_batched::TickBatched;
