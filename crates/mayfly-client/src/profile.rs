//! Profiles written by `mayfly dev init`: a directory with `profile.toml`
//! (broker URL, CA bundle, default agent and operator identities) and
//! `identities/<name>/svid.{pem,key}`. The CLI and the load generator find
//! the broker and an identity this way.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{ClientConfig, ClientError};

/// The directory `mayfly dev up` uses and clients look for by default.
pub const DEFAULT_PROFILE: &str = ".mayfly-dev";

/// Which default identity of a profile to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The profile's agent (Broker API calls).
    Agent,
    /// The profile's operator (Admin API calls).
    Operator,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    broker: String,
    ca: PathBuf,
    agent: String,
    operator: String,
}

/// Why a profile could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// `profile.toml` is missing or unreadable.
    #[error("cannot read profile {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// `profile.toml` is not a profile.
    #[error("invalid profile {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// The parse error.
        reason: String,
    },
    /// The identity name is not a plain directory name.
    #[error("identity {0:?} must be a directory name under identities/")]
    BadIdentity(String),
    /// No such identity in the profile.
    #[error(
        "identity {name:?} not found in {dir}; make one with `mayfly dev identity --dir {profile} spiffe://…`"
    )]
    NoIdentity {
        /// The name asked for.
        name: String,
        /// Where it was looked for.
        dir: String,
        /// The profile directory.
        profile: String,
    },
    /// A file of the identity could not be read.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// What to override in a profile (each `None` takes the profile's value).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Broker URL.
    pub broker: Option<String>,
    /// CA bundle.
    pub ca: Option<PathBuf>,
    /// Certificate.
    pub cert: Option<PathBuf>,
    /// Private key.
    pub key: Option<PathBuf>,
    /// Identity directory name under `identities/`.
    pub identity: Option<String>,
}

/// The connection for `role` from the profile in `dir`, with `over` taking
/// precedence.
pub fn from_profile(
    dir: &Path,
    role: Role,
    over: &Overrides,
) -> Result<ClientConfig, ProfileError> {
    let file = dir.join("profile.toml");
    let path = file.display().to_string();
    let text = std::fs::read_to_string(&file).map_err(|source| ProfileError::Read {
        path: path.clone(),
        source,
    })?;
    let profile: ProfileFile = toml::from_str(&text).map_err(|e| ProfileError::Invalid {
        path,
        reason: e.to_string(),
    })?;
    let name = over.identity.clone().unwrap_or_else(|| match role {
        Role::Agent => profile.agent.clone(),
        Role::Operator => profile.operator.clone(),
    });
    if name.contains('/') || name.starts_with('.') {
        return Err(ProfileError::BadIdentity(name));
    }
    let idir = dir.join("identities").join(&name);
    if !idir.is_dir() {
        return Err(ProfileError::NoIdentity {
            name,
            dir: dir.join("identities").display().to_string(),
            profile: dir.display().to_string(),
        });
    }
    let broker = over.broker.clone().unwrap_or(profile.broker);
    let ca = over.ca.clone().unwrap_or_else(|| dir.join(&profile.ca));
    let cert = over.cert.clone().unwrap_or_else(|| idir.join("svid.pem"));
    let key = over.key.clone().unwrap_or_else(|| idir.join("svid.key"));
    Ok(ClientConfig::from_files(&broker, ca, cert, key)?)
}
