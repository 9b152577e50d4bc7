//! Bounds on the futures the data path keeps per connection and per
//! request, as istio/ztunnel's `assertions` module keeps them: a future's
//! size is what every open connection or in-flight request costs, and it
//! grows silently when a change makes an `.await` hold more across it
//! (rustc #62958: an async fn keeps a by-value argument next to the local
//! it moves into). The tests beside each future (`inbound`, `outbound`)
//! take its size from the function's type, without building one.
//!
//! The sizes are of the build the tests run (debug); each bound is a little
//! above the size measured when it was set, which its comment gives. Over
//! the bound: find what grew before raising it. Far under: lower it, so
//! that it keeps guarding.

/// The size of the future (or any value) `f` returns, without calling it.
pub(crate) fn returned_2<A, B, R>(_: impl FnOnce(A, B) -> R) -> usize {
    size_of::<R>()
}

/// [`returned_2`] for three arguments.
pub(crate) fn returned_3<A, B, C, R>(_: impl FnOnce(A, B, C) -> R) -> usize {
    size_of::<R>()
}

/// [`returned_3`] for four arguments.
pub(crate) fn returned_4<A, B, C, D, R>(_: impl FnOnce(A, B, C, D) -> R) -> usize {
    size_of::<R>()
}

/// Asserts that `size` is within `min..=max` bytes.
#[track_caller]
pub(crate) fn assert_between(what: &str, size: usize, min: usize, max: usize) {
    println!("{what}: {size} bytes (bound {min}..={max})");
    assert!(
        size <= max,
        "{what} is {size} bytes, over its bound of {max}: find what grew before raising it"
    );
    assert!(
        size >= min,
        "{what} is {size} bytes, well under its bound of {max}: lower the bound to {size} + a little"
    );
}
