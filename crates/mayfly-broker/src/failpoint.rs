//! Crash points for crash tests. With the `failpoints` feature in a debug
//! build, `MAYFLY_FAILPOINT=<name>` makes the process abort at the point of
//! that name, as a power cut or `kill -9` would stop it there; in every
//! other build [`hit`] is empty and the variable is never read.
//!
//! Points of a batch of leases and their records (reached through
//! `store::after_commit` and `store::after_append`), named for what the
//! batch writes, so that a test can open a task first and crash on its
//! credential:
//! - `after_lease_commit` / `after_task_commit`: a batch that issues
//!   credentials / opens tasks has its leases and records durable in the
//!   store, nothing of them in a trail outside it yet;
//! - `after_trail_append` / `after_task_trail_append`: the embedded
//!   store's outbox records of such a batch are in the trail, still in the
//!   outbox too;
//! - `after_login_disabled`: a database login whose lease ended can no
//!   longer log in, and is not yet dropped.

/// Aborts the process here if `MAYFLY_FAILPOINT` names `point`.
#[cfg(all(feature = "failpoints", debug_assertions))]
pub(crate) fn hit(point: &str) {
    use std::sync::OnceLock;
    // Read once: the variable is the test's choice for the whole run.
    static CHOSEN: OnceLock<Option<String>> = OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| std::env::var("MAYFLY_FAILPOINT").ok());
    if chosen.as_deref() == Some(point) {
        eprintln!("mayfly: failpoint {point} reached; aborting");
        std::process::abort();
    }
}

/// Without the `failpoints` feature (or in a release build): nothing.
#[cfg(not(all(feature = "failpoints", debug_assertions)))]
#[inline(always)]
pub(crate) fn hit(_point: &str) {}
