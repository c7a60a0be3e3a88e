//! How the CLI finds the broker and which identity it presents: the SPIFFE
//! Workload API (`--workload-api`, `SPIFFE_ENDPOINT_SOCKET`), a workload
//! token (`--workload-token`, `MAYFLY_TOKEN_FILE`) for an agent without a
//! certificate, explicit flags (or `MAYFLY_*` variables), else a profile
//! directory written by `mayfly dev init` (`--profile`, `MAYFLY_PROFILE`,
//! or `./.mayfly-dev`).

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
    /// Take the X.509-SVID (and the bundle the broker is checked against)
    /// from this SPIFFE Workload API, e.g. unix:///run/spire/agent.sock,
    /// following its rotations, instead of --ca/--cert/--key.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", global = true)]
    pub workload_api: Option<String>,
    /// Prove yourself with the workload token in this file (a Kubernetes
    /// projected service-account token, a JWT-SVID, an OIDC token of an
    /// issuer the broker trusts) instead of a certificate; the broker's CA
    /// comes from --ca or the profile. Operator commands need a
    /// certificate.
    #[arg(long, env = "MAYFLY_TOKEN_FILE", global = true)]
    pub workload_token: Option<PathBuf>,
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

    /// Connects with the identity `role` needs: a workload token or the
    /// Workload API when one is named, else from files or the profile.
    pub async fn connect(&self, role: Role) -> anyhow::Result<Client> {
        // Certificate files given explicitly win over the convention's
        // environment variable.
        let files = self.cert.is_some() && self.key.is_some();
        if let Some(path) = self.workload_token.as_ref().filter(|_| !files) {
            let token = mayfly_client::read_token_file(path)?;
            let (broker, ca_pem) = match (&self.broker, &self.ca) {
                (Some(b), Some(ca)) => (
                    b.clone(),
                    std::fs::read(ca)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", ca.display()))?,
                ),
                _ => {
                    let c = self.resolve(role)?;
                    (c.broker, c.ca_pem)
                }
            };
            return Ok(Client::connect_with_token(&broker, &ca_pem, &token).await?);
        }
        if let Some(endpoint) = self.workload_api.as_ref().filter(|_| !files) {
            let broker = match &self.broker {
                Some(b) => b.clone(),
                None => self.resolve(role)?.broker,
            };
            return Ok(Client::connect_workload_api(&broker, Some(endpoint)).await?);
        }
        let config = self.resolve(role)?;
        Ok(Client::connect(&config).await?)
    }
}
