//! A tiny ticket API that trusts only Mayfly tokens: `GET /tickets` needs
//! `read:tickets`, `POST /tickets` needs `write:tickets`. Tokens are checked
//! by `mayfly-verify` (JWKS, RFC 8725 checks, this audience) and revocations
//! arrive over the broker's feed, so a revoked token stops working at once.
//!
//! ```sh
//! mayfly dev identity spiffe://example.org/api/downstream
//! cargo run -p downstream-api
//! ```
//!
//! It serves plain HTTP on loopback for the walkthrough; put TLS in front of
//! it in earnest (bound tokens need the client certificate, see
//! `mayfly_verify::layer::PeerCertificate`).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Json, Router};
use clap::Parser;
use mayfly_verify::layer::{VerifyLayer, require_scope};
use mayfly_verify::{VerifiedToken, Verifier, VerifierConfig};
use serde_json::{Value, json};

/// Command line.
#[derive(Debug, Parser)]
struct Args {
    /// A `mayfly dev init` directory (CA bundle, broker address, identities).
    #[arg(long, default_value = ".mayfly-dev")]
    profile: PathBuf,
    /// This service's identity under the profile's identities/.
    #[arg(long, default_value = "api-downstream")]
    identity: String,
    /// The broker's issuer URL (its HTTPS side port).
    #[arg(long, default_value = "https://localhost:8711")]
    issuer: String,
    /// This service's audience.
    #[arg(long, default_value = "https://api.example.com")]
    audience: String,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8790")]
    listen: String,
}

#[derive(serde::Deserialize)]
struct Profile {
    broker: String,
    ca: PathBuf,
}

type Tickets = Arc<Mutex<Vec<Value>>>;

async fn list(
    State(tickets): State<Tickets>,
    Extension(t): Extension<VerifiedToken>,
) -> Result<Json<Value>, Response> {
    require_scope(&t, "read:tickets")?;
    let all = tickets.lock().map(|t| t.clone()).unwrap_or_default();
    Ok(Json(
        json!({"agent": t.agent.as_str(), "task": t.task_id.as_str(), "tickets": all}),
    ))
}

async fn create(
    State(tickets): State<Tickets>,
    Extension(t): Extension<VerifiedToken>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, Response> {
    require_scope(&t, "write:tickets")?;
    let ticket =
        json!({"title": body["title"], "by": t.agent.as_str(), "task": t.task_id.as_str()});
    if let Ok(mut all) = tickets.lock() {
        all.push(ticket.clone());
    }
    Ok(Json(ticket))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let profile_file = args.profile.join("profile.toml");
    let profile: Profile = toml::from_str(
        &std::fs::read_to_string(&profile_file)
            .with_context(|| format!("cannot read {}", profile_file.display()))?,
    )?;
    let id_dir = args.profile.join("identities").join(&args.identity);
    let read =
        |p: PathBuf| std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()));
    let config = VerifierConfig::new(
        &args.issuer,
        &args.audience,
        read(args.profile.join(&profile.ca))?,
    )
    .with_feed(
        &profile.broker,
        read(id_dir.join("svid.pem"))?,
        read(id_dir.join("svid.key"))?,
    );
    let verifier = Verifier::connect(config)
        .await
        .context("cannot reach the broker's JWKS")?;
    anyhow::ensure!(
        verifier
            .wait_for_feed(std::time::Duration::from_secs(5))
            .await,
        "the revocation feed did not answer (is `{}` allowed to watch?)",
        args.identity
    );
    let tickets: Tickets = Arc::default();
    let app = Router::new()
        .route("/tickets", get(list).post(create))
        .layer(VerifyLayer::new(verifier))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(tickets);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!(listen = %args.listen, audience = %args.audience, "downstream API serving");
    axum::serve(listener, app).await?;
    Ok(())
}
