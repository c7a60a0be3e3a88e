//! How the CLI finds the broker and which identity it presents: explicit
//! flags (or `MAYFLY_*` variables), else a profile directory written by
//! `mayfly dev init` (`--profile`, `MAYFLY_PROFILE`, or `./.mayfly-dev`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use mayfly_client::{Client, ClientConfig};
use serde::Deserialize;

/// The directory `mayfly dev up` uses and the CLI looks for by default.
pub const DEFAULT_PROFILE: &str = ".mayfly-dev";

/// Connection flags shared by every client command.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Broker gRPC URL, e.g. https://localhost:8710.
    #[arg(long, env = "MAYFLY_BROKER", global = true)]
    pub broker: Option<String>,
    /// CA bundle (PEM) that issued the broker's certificate.
    #[arg(long, env = "MAYFLY_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Your X.509-SVID (PEM).
    #[arg(long, env = "MAYFLY_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Your SVID's private key (PEM).
    #[arg(long, env = "MAYFLY_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// A directory made by `mayfly dev init` (default: ./.mayfly-dev if present).
    #[arg(long, env = "MAYFLY_PROFILE", global = true)]
    pub profile: Option<PathBuf>,
    /// Identity under the profile's identities/ to use (e.g. agent-bob);
    /// default: the profile's agent for agent commands, its operator for
    /// operator commands.
    #[arg(long, env = "MAYFLY_IDENTITY", global = true)]
    pub identity: Option<String>,
}

/// Which default identity of a profile a command needs.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// Broker API calls.
    Agent,
    /// Admin API calls.
    Operator,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    broker: String,
    ca: PathBuf,
    agent: String,
    operator: String,
}

impl ConnArgs {
    fn resolve(&self, role: Role) -> anyhow::Result<ClientConfig> {
        if let (Some(broker), Some(ca), Some(cert), Some(key)) =
            (&self.broker, &self.ca, &self.cert, &self.key)
        {
            return Ok(ClientConfig::from_files(broker, ca, cert, key)?);
        }
        let dir = match &self.profile {
            Some(p) => p.clone(),
            None if Path::new(DEFAULT_PROFILE).join("profile.toml").exists() => {
                PathBuf::from(DEFAULT_PROFILE)
            }
            None => bail!(
                "no broker connection: pass --broker, --ca, --cert and --key (or MAYFLY_BROKER, \
                 MAYFLY_CA, MAYFLY_CERT, MAYFLY_KEY), or --profile DIR from `mayfly dev init`"
            ),
        };
        let file = dir.join("profile.toml");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read profile {}", file.display()))?;
        let profile: Profile =
            toml::from_str(&text).with_context(|| format!("invalid profile {}", file.display()))?;
        let name = self.identity.clone().unwrap_or_else(|| match role {
            Role::Agent => profile.agent.clone(),
            Role::Operator => profile.operator.clone(),
        });
        if name.contains('/') || name.starts_with('.') {
            bail!("--identity {name:?} must be a directory name under identities/");
        }
        let idir = dir.join("identities").join(&name);
        if !idir.is_dir() {
            bail!(
                "identity {name:?} not found in {}; make one with `mayfly dev identity --dir {} spiffe://…`",
                dir.join("identities").display(),
                dir.display()
            );
        }
        let broker = self.broker.clone().unwrap_or(profile.broker);
        let ca = self.ca.clone().unwrap_or_else(|| dir.join(&profile.ca));
        let cert = self.cert.clone().unwrap_or_else(|| idir.join("svid.pem"));
        let key = self.key.clone().unwrap_or_else(|| idir.join("svid.key"));
        Ok(ClientConfig::from_files(&broker, ca, cert, key)?)
    }

    /// Connects with the identity `role` needs.
    pub async fn connect(&self, role: Role) -> anyhow::Result<Client> {
        let config = self.resolve(role)?;
        Ok(Client::connect(&config).await?)
    }
}
