//! The Mayfly broker: agents authenticate with an X.509-SVID over mTLS gRPC,
//! open tasks and receive task-bound, short-lived credentials, each tracked
//! as a lease; operators list and revoke leases; validators fetch the JWKS.
//!
//! The public surface is what a program embedding or testing the broker
//! needs: [`Broker`] (built from a [`Config`], then served), [`Cause`]
//! (what store and trail errors carry), the lease
//! [`store`] seam and its backends, the audit trail's sinks ([`audit`]),
//! the [`recorder`] every decision goes through, the [`issuer`]'s keys and
//! CA, the development PKI ([`dev`]), and what `mayfly config check`
//! runs ([`check`]). Everything else is private;
//! docs/ARCHITECTURE.md maps it:
//! - `server` assembles everything from checked settings and serves both
//!   ports until `shutdown` says stop; `connections`
//!   admits, times out and drains them; `identity` turns a peer
//!   certificate into a typed caller;
//! - `grpc` holds the thin Broker, Admin and Revocations services over
//!   `service` (request handling: policy, TTLs, envelopes, ownership, the
//!   credential pipeline);
//! - `feed`, `crl`, `http`, `health`, `metrics`, `policy`, `ratelimit` and
//!   `reaper` are the feed, the CRL, the HTTPS routes, health checks,
//!   `/metrics`, policy reloads, per-agent limits and expiry; `tls` and
//!   `reload` keep the TLS material and the watchers' timing;
//! - `failpoint` holds the crash points crash tests stop the process at
//!   (empty unless built with the test-only `failpoints` feature).

#![forbid(unsafe_code)]

pub mod audit;
mod auth;
mod cause;
pub mod check;
pub mod config;
mod connections;
mod crl;
pub mod dev;
mod error;
mod failpoint;
#[cfg(not(feature = "test-hooks"))]
mod federation;
/// Public for benches and tests only (the `test-hooks` feature).
#[cfg(feature = "test-hooks")]
pub mod federation;
mod feed;
mod fsutil;
mod grpc;
mod health;
mod http;
mod identity;
pub mod issuer;
mod logins;
mod metrics;
mod policy;
mod ratelimit;
mod reaper;
pub mod recorder;
mod redis_conn;
mod reload;
mod server;
mod service;
mod shutdown;
mod signals;
mod status;
pub mod store;
mod tls;
mod workload;

pub use cause::Cause;
pub use config::Config;
pub use connections::MAX_REFUSED_TOKENS;
pub use server::{Broker, StartError};
