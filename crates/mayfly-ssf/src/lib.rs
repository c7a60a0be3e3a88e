//! Shared Signals for Mayfly: the broker as an OpenID Shared Signals
//! Framework 1.0 transmitter of CAEP 1.0 events.
//!
//! Every revocation becomes a signed Security Event Token (RFC 8417) for
//! each stream that asked for it: CAEP `session-revoked` for a token,
//! `credential-change` (`revoke`) for a certificate or a database login.
//! Its subject names the lease (the session), the agent (the user) and the
//! task. A receiver owns its streams and picks what they carry by subject:
//! an agent's SPIFFE ID, or an audience (a token's, a database's name).
//!
//! This crate holds what a transmitter decides, with no I/O of its own:
//! - [`model`]: streams as stored and as the management API shows them,
//!   and the checks every request body passes;
//! - [`event`]: a revocation as the broker reports it, whether a stream
//!   wants it, and the SET it becomes;
//! - [`transmit`]: each stream's progress, the answer to a poll, and
//!   [`push`] the push loop.
//!
//! The broker stores the streams ([`transmit::Streams`]), gives the
//! revocation log ([`transmit::Events`]) and signs ([`transmit::Signer`]),
//! and serves the management API.

#![forbid(unsafe_code)]

pub mod event;
pub mod model;
pub mod push;
pub mod transmit;

pub use event::{Credential, Revoked, Set, verification_set};
pub use model::{
    ApiError, Delivery, NewStream, PushPolicy, Stream, StreamStatus, Subject, metadata,
};
pub use transmit::{Entry, Events, Failure, PollRequest, Progress, Signer, Streams, Transmitter};

/// `spec_version` of SSF 1.0.
pub const SPEC_VERSION: &str = "1_0";
/// Push delivery (RFC 8935).
pub const PUSH: &str = "urn:ietf:rfc:8935";
/// Poll delivery (RFC 8936).
pub const POLL: &str = "urn:ietf:rfc:8936";
/// CAEP: a session (here, a token) was revoked.
pub const SESSION_REVOKED: &str =
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
/// CAEP: a credential (here, a certificate or a database login) changed.
pub const CREDENTIAL_CHANGE: &str =
    "https://schemas.openid.net/secevent/caep/event-type/credential-change";
/// SSF: the answer to a receiver's verification request.
pub const VERIFICATION: &str = "https://schemas.openid.net/secevent/ssf/event-type/verification";
/// The header `typ` of every SET.
pub const SET_TYPE: &str = "secevent+jwt";
/// The media type a SET is pushed as.
pub const SET_MEDIA_TYPE: &str = "application/secevent+jwt";
/// The events a stream can carry.
pub const EVENTS_SUPPORTED: &[&str] = &[SESSION_REVOKED, CREDENTIAL_CHANGE];
