//! How the CLI finds the broker and which identity it presents: explicit
//! flags (or `MAYFLY_*` variables), else a profile directory written by
//! `mayfly dev init` (`--profile`, `MAYFLY_PROFILE`, or `./.mayfly-dev`).

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;
pub use mayfly_client::profile::{DEFAULT_PROFILE, Role};
use mayfly_client::profile::{Overrides, from_profile};
use mayfly_client::{Client, ClientConfig};

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
        let over = Overrides {
            broker: self.broker.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            identity: self.identity.clone(),
        };
        Ok(from_profile(&dir, role, &over)?)
    }

    /// Connects with the identity `role` needs.
    pub async fn connect(&self, role: Role) -> anyhow::Result<Client> {
        let config = self.resolve(role)?;
        Ok(Client::connect(&config).await?)
    }
}
