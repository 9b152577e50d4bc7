//! Per-route authorization policy.
