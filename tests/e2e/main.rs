//! End-to-end tests: a real broker on ephemeral ports, real mTLS, the client
//! crate, and a stock JWT library. One binary, to link once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin_api;
mod audit;
mod auth;
mod bad_input;
mod broker_api;
mod ca_rotation;
mod certs;
mod common;
mod connections;
mod databases;
mod delegation;
mod durability;
mod federation;
mod feed;
mod flood;
mod gateway;
mod health;
mod http;
mod keys;
mod metrics;
mod oauth;
mod policy;
mod race;
mod reload;
mod replicas;
mod workload_api;
