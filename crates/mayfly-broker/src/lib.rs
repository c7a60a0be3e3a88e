//! The Mayfly broker: agents authenticate with an X.509-SVID over mTLS gRPC,
//! open tasks and receive task-bound, short-lived credentials, each tracked
//! as a lease; operators list and revoke leases; validators fetch the JWKS.
//!
//! Layout:
//! - [`config`] — `mayfly.toml`.
//! - [`server`] — assembles everything and serves both ports.
//! - [`connections`] — admission, handshake, idle timeouts, draining.
//! - [`identity`] — peer certificate → typed [`identity::Caller`].
//! - [`grpc`] — the thin Broker and Admin services.
//! - [`service`] — request handling (policy, TTLs, envelopes, ownership).
//! - [`issuer`] — signing keys and the JWT signer.
//! - [`store`] — the lease store seam and its backends (the contract suite they pass is in the testkit).
//! - [`recorder`] — every decision's audit record, and each credential's lease with it, through the store.
//! - [`audit`] — the trail's sinks (file, Redis stream, stdout, off).
//! - [`reaper`] — expiry and clean-up.
//! - [`http`] — JWKS, metadata, health.
//! - [`dev`] — the development PKI behind `mayfly dev init`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
mod connections;
pub mod crl;
pub mod dev;
pub mod error;
pub mod feed;
mod fsutil;
pub mod grpc;
pub mod health;
pub mod http;
pub mod identity;
pub mod issuer;
pub mod metrics;
pub mod policy;
pub mod ratelimit;
pub mod reaper;
pub mod recorder;
mod redis_conn;
pub mod server;
pub mod service;
mod stop;
pub mod store;
pub mod tls;

pub use config::Config;
pub use server::{Broker, StartError};
