//! Checks Mayfly credentials in downstream services. Depends on
//! `mayfly-core`, never on the broker.
//!
//! [`task_identity`] reads a peer certificate that the TLS layer has already
//! validated against the trust bundle and says which agent presents it and
//! for which task.

#![forbid(unsafe_code)]

mod cert;

pub use cert::{PeerCertError, TaskIdentity, task_identity};
