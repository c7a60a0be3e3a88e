//! The Mayfly gateway: a reverse proxy in front of MCP servers and HTTP
//! APIs that decides every tool call an agent makes.
//!
//! For each request it
//! 1. finds the upstream by path (`[[upstreams]]` in `gateway.toml`);
//! 2. verifies the agent's Mayfly token for that upstream's audience, as
//!    [`mayfly_verify`] does: signature, `iss`, `aud`, time, DPoP or
//!    certificate binding, and revocation from the live feed (failing
//!    closed when the feed is silent);
//! 3. reads the request strictly: one JSON-RPC message for MCP, a route
//!    with its parameters, query and JSON body for HTTP;
//! 4. asks the broker (`mayfly.v1.Gateway/AuthorizeCall`, as the
//!    gateway's own SVID) about the tool call, which Cedar decides on its
//!    arguments and the broker records before it answers; a call that
//!    needs an operator's approval is held open up to `approval_wait`;
//! 5. forwards exactly what was decided, without the agent's token and
//!    proof, with the upstream's own credential (an API key from a file,
//!    an OAuth client's token, or a token exchanged at the broker).
//!
//! An MCP `tools/list` answer shows only the tools the token may call at
//! all. Depends on mayfly-verify, mayfly-core, mayfly-client and the
//! proto; never on the broker.

#![forbid(unsafe_code)]
// A `Refusal` (what a client is told) is returned by value on the cold
// path of a request that has allocated far more already.
#![allow(clippy::result_large_err)]

pub mod config;
pub mod credential;
pub mod decide;
mod framing;
pub mod mcp;
pub mod proxy;
pub mod refusal;
pub mod report;
pub mod route;
mod server;
pub mod sessions;
pub mod tls;

pub use config::{ConfigError, GatewayConfig};
pub use server::{Running, StartError, start};
