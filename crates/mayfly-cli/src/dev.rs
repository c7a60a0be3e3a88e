//! `mayfly serve` and `mayfly dev …`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use mayfly_broker::{Broker, Config, dev};
use mayfly_core::{SpiffeId, TrustDomain};

use crate::conn::DEFAULT_PROFILE;

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Write a dev CA, broker certificate, operator and agent identities, and
    /// a mayfly.toml that uses them.
    Init {
        /// Directory to create.
        #[arg(long, default_value = DEFAULT_PROFILE)]
        dir: PathBuf,
        /// Trust domain of every identity.
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
    },
    /// Mint one more agent or operator identity from the dev CA.
    Identity {
        /// Directory made by `mayfly dev init`.
        #[arg(long, default_value = DEFAULT_PROFILE)]
        dir: PathBuf,
        /// The SPIFFE ID, e.g. spiffe://example.org/agent/bob.
        spiffe_id: String,
    },
    /// `dev init` into ./.mayfly-dev if absent, then serve.
    Up {
        /// Directory to use.
        #[arg(long, default_value = DEFAULT_PROFILE)]
        dir: PathBuf,
        /// Trust domain for a new setup.
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
    },
}

pub async fn run(cmd: DevCommand) -> anyhow::Result<()> {
    match cmd {
        DevCommand::Init { dir, trust_domain } => {
            let layout = init(&dir, &trust_domain)?;
            println!("wrote a dev setup to {}", layout.dir.display());
            println!("  operator: {}", layout.operator);
            println!("  agent:    {}", layout.agent);
            println!(
                "run the broker with: mayfly serve --config {}",
                layout.config.display()
            );
            println!(
                "and the tool-call gateway with: mayfly gateway --config {}",
                layout.dir.join("gateway.toml").display()
            );
            Ok(())
        }
        DevCommand::Identity { dir, spiffe_id } => {
            let id = SpiffeId::new(&spiffe_id).with_context(|| format!("{spiffe_id:?}"))?;
            let ca = dev::load_ca(&dir)?;
            let ca_td = TrustDomain::new(&config_td(&dir)?)?;
            anyhow::ensure!(
                id.is_member_of(&ca_td),
                "{id} is not in the dev trust domain {ca_td}"
            );
            let idir = dev::write_identity(&dir, &ca, &id)?;
            println!(
                "wrote {} (use --identity {})",
                idir.display(),
                dev::identity_dir_name(&id)
            );
            Ok(())
        }
        DevCommand::Up { dir, trust_domain } => {
            crate::init_logs();
            if !dir.join("mayfly.toml").exists() {
                let layout = init(&dir, &trust_domain)?;
                tracing::info!(dir = %layout.dir.display(), "created dev setup");
            }
            eprintln!(
                "mayfly dev broker: gRPC {} (mTLS), HTTPS {}; the CLI uses {} by default",
                dev::DEV_GRPC_ADDR,
                dev::DEV_HTTP_ADDR,
                dir.display()
            );
            serve(&dir.join("mayfly.toml")).await
        }
    }
}

fn init(dir: &Path, td: &str) -> anyhow::Result<dev::DevLayout> {
    let td = TrustDomain::new(td).with_context(|| format!("trust domain {td:?}"))?;
    Ok(dev::init(dir, &td)?)
}

fn config_td(dir: &Path) -> anyhow::Result<String> {
    let config = Config::load(&dir.join("mayfly.toml"))?;
    Ok(config.trust_domain.to_string())
}

/// Runs the broker until Ctrl-C or SIGTERM.
pub async fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let grpc = tokio::net::TcpListener::bind(config.listen.grpc)
        .await
        .with_context(|| format!("cannot listen on {} (listen.grpc)", config.listen.grpc))?;
    let http = tokio::net::TcpListener::bind(config.listen.http)
        .await
        .with_context(|| format!("cannot listen on {} (listen.http)", config.listen.http))?;
    let mut broker = Broker::build(config.clone())?;
    if let Some(addr) = config.listen.health {
        let health = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (listen.health)"))?;
        broker = broker.with_health_listener(health);
    }
    tracing::info!(grpc = %config.listen.grpc, http = %config.listen.http, health = ?config.listen.health, "listening");
    broker.serve(grpc, http, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
