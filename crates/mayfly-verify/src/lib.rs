//! Verifies Mayfly credentials in downstream services. Depends on
//! `mayfly-core` (and the generated feed client), never on the broker.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use mayfly_verify::{Verifier, VerifierConfig};
//!
//! let ca = std::fs::read(".mayfly-dev/bundle.pem")?;
//! let config = VerifierConfig::new("https://localhost:8711", "https://api.example.com", ca)
//!     .with_feed(
//!         "https://localhost:8710",
//!         std::fs::read(".mayfly-dev/identities/api-downstream/svid.pem")?,
//!         std::fs::read(".mayfly-dev/identities/api-downstream/svid.key")?,
//!     );
//! let verifier = Verifier::connect(config).await?;
//! let token = "eyJ…";
//! match verifier.verify(token, None).await {
//!     Ok(t) if t.has_scope("read:tickets") => { /* serve */ }
//!     Ok(_) => { /* 403 insufficient_scope */ }
//!     Err(e) => { /* 401 invalid_token: e says which check failed */ }
//! }
//! # Ok(()) }
//! ```
//!
//! Ready-made integration: [`layer::VerifyLayer`] (tower, works with axum)
//! and [`interceptor`] (tonic). [`Verifier::task_identity`] reads the agent
//! and task from a task certificate and refuses it once revoked.

#![forbid(unsafe_code)]

mod cert;
mod config;
mod error;
mod feed;
pub mod interceptor;
mod jwks;
pub mod layer;
mod material;
mod report;
mod resource;
mod status;
mod verifier;

pub use cert::{PeerCertError, TaskIdentity, parse_task_certificate};
pub use config::{FeedConfig, MAX_LEEWAY, VerifierConfig};
pub use error::VerifyError;
pub use jwks::{Jwks, JwksError, JwksKey};
pub use material::TrustError;
pub use report::RequestReports;
pub use resource::ResourceMetadata;
pub use status::StatusListConfig;
pub use verifier::{DpopRequest, VerifiedToken, Verifier, cert_thumbprint};
