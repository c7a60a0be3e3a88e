//! `gateway.toml`: where the gateway listens, how it reaches the broker,
//! and the upstreams it fronts. Every check that can be made before the
//! first request is made at load, so a gateway that starts has a
//! configuration it can keep.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mayfly_core::{Tool, check_upstream};
use serde::{Deserialize, Deserializer};

/// Most bytes of an agent's request body (a JSON-RPC message or an API
/// call's JSON) the gateway reads by default.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where agents connect.
    pub listen: Listen,
    /// The broker that decides.
    pub broker: BrokerConfig,
    /// How long a call that needs an operator's approval is held open
    /// waiting for it before the agent is told to retry with the
    /// approval's id. Zero answers at once.
    #[serde(default = "default_approval_wait", deserialize_with = "duration")]
    pub approval_wait: Duration,
    /// Most bytes of a request body.
    #[serde(default = "default_max_body")]
    pub max_body: usize,
    /// A page where an operator decides an approval, `{id}` standing for
    /// its id. With it, an MCP client that takes URL elicitations (MCP
    /// 2025-11-25) is told to open it for a call waiting on an approval.
    pub approval_url: Option<String>,
    /// The upstreams, each under its own path.
    #[serde(default, rename = "upstreams")]
    pub upstreams: Vec<UpstreamConfig>,
}

fn default_approval_wait() -> Duration {
    Duration::from_secs(30)
}

fn default_max_body() -> usize {
    DEFAULT_MAX_BODY
}

/// Where agents connect, and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// `host:port`.
    pub addr: SocketAddr,
    /// The origin agents address (`https://gateway.example.com`): the URL
    /// a DPoP proof names is this and the request's path. Defaults to
    /// `https://localhost:PORT` (`http://` without TLS).
    pub public_url: Option<String>,
    /// The gateway's server certificate chain and key (PEM). Without
    /// them the gateway speaks plain HTTP, which it allows on a loopback
    /// address only.
    pub cert: Option<PathBuf>,
    /// The key of `cert`.
    pub key: Option<PathBuf>,
    /// Where to serve `/metrics` (plain HTTP; none by default).
    pub metrics: Option<SocketAddr>,
    /// Ask agents for a client certificate (verified against the broker's
    /// trust bundle), for tokens bound to one (RFC 8705).
    #[serde(default)]
    pub client_certificates: bool,
}

/// The broker, and the gateway's identity to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// The broker's gRPC URL, `https://host:port`.
    pub url: String,
    /// The broker's issuer (its HTTPS URL): tokens' `iss`, and the JWKS.
    pub issuer: String,
    /// PEM bundle of the trust domain: the broker's certificate, and
    /// agents' client certificates.
    pub ca: PathBuf,
    /// The gateway's X.509-SVID (PEM, leaf first), listed in the broker's
    /// `[[gateways]]`.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// A decision the broker has not given in this long is a refusal.
    #[serde(default = "default_decision_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// The revocation feed counts as dead after this long without a
    /// message; calls are then refused.
    #[serde(default = "default_feed_silence", deserialize_with = "duration")]
    pub feed_max_silence: Duration,
}

fn default_decision_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_feed_silence() -> Duration {
    Duration::from_secs(15)
}

/// What an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// An MCP server (Streamable HTTP): every `tools/call` is decided.
    Mcp,
    /// An HTTP API whose routes are mapped to tools.
    Http,
}

/// One upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Its name, the first part of its tools' names (`billing` in
    /// `billing/pay_invoice`), as the broker's `[[gateways]]` lists it.
    pub name: String,
    /// `mcp` or `http`.
    pub protocol: Protocol,
    /// Where agents reach it on the gateway: for MCP the endpoint's path
    /// (`/billing/mcp`), for HTTP a prefix (`/payments`) before the
    /// routes.
    pub path: String,
    /// The audience agents' tokens for it carry.
    pub audience: String,
    /// Where the gateway forwards: for MCP the server's endpoint URL, for
    /// HTTP the API's base URL (the route's path is appended).
    pub url: String,
    /// PEM CA bundle for an `https` upstream (default: the system's).
    pub ca: Option<PathBuf>,
    /// An upstream that has not answered in this long gets a 504.
    #[serde(default = "default_upstream_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// What the gateway presents to it (none by default).
    #[serde(default)]
    pub credential: CredentialConfig,
    /// For HTTP: the routes, each a tool. Others are refused.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(60)
}

/// The upstream's own credential, added to every forwarded request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CredentialConfig {
    /// Nothing.
    #[default]
    None,
    /// A header whose value is read from a file (an API key): `name`
    /// and the file.
    Header {
        /// The header (`Authorization`, `X-Api-Key`).
        name: String,
        /// The file holding the value; surrounding whitespace is dropped.
        file: PathBuf,
        /// Written before the value (`"Bearer "`).
        #[serde(default)]
        prefix: String,
    },
    /// OAuth 2.0 client credentials (RFC 6749 §4.4): a token fetched
    /// from `token_url` and kept until shortly before it expires, sent as
    /// `Authorization: Bearer`.
    OauthClient {
        /// The authorization server's token endpoint.
        token_url: String,
        /// The client id.
        client_id: String,
        /// The file holding the client secret.
        secret_file: PathBuf,
        /// Scopes to ask for.
        #[serde(default)]
        scopes: Vec<String>,
        /// PEM CA bundle for the token endpoint (default: the system's).
        ca: Option<PathBuf>,
    },
    /// A Mayfly token for `audience`, obtained by exchanging the agent's
    /// (RFC 8693) at the broker as the gateway, inside the task's
    /// envelope, and sent as `Authorization: Bearer`.
    Exchange {
        /// The upstream's own audience.
        audience: String,
        /// Scopes to ask for (default: none beyond what policy grants).
        #[serde(default)]
        scopes: Vec<String>,
    },
}

/// An HTTP route that is a tool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `GET`, `POST`, …
    pub method: String,
    /// A template under the upstream's path: `/v1/payments/{id}`. Its
    /// parameters are arguments.
    pub path: String,
    /// The tool's name at the upstream.
    pub tool: String,
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration (30s, 5m): {e}")))
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or a key is wrong.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value is wrong.
    #[error("{0}")]
    Invalid(String),
}

impl GatewayConfig {
    /// Reads and checks `path`; relative paths in it are relative to it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve(base);
        config.check()?;
        Ok(config)
    }

    /// Makes every relative path relative to `base`.
    pub fn resolve(&mut self, base: &Path) {
        let at = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for p in [
            &mut self.broker.ca,
            &mut self.broker.cert,
            &mut self.broker.key,
        ] {
            at(p);
        }
        for p in [&mut self.listen.cert, &mut self.listen.key]
            .into_iter()
            .flatten()
        {
            at(p);
        }
        for u in &mut self.upstreams {
            if let Some(p) = &mut u.ca {
                at(p);
            }
            match &mut u.credential {
                CredentialConfig::Header { file, .. } => at(file),
                CredentialConfig::OauthClient {
                    secret_file, ca, ..
                } => {
                    at(secret_file);
                    if let Some(p) = ca {
                        at(p);
                    }
                }
                CredentialConfig::None | CredentialConfig::Exchange { .. } => {}
            }
        }
    }

    /// The origin agents address, when the gateway listens on `port`.
    pub fn public_url(&self, port: u16) -> String {
        match &self.listen.public_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let scheme = if self.listen.cert.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://localhost:{port}")
            }
        }
    }

    /// Checks what can be checked without the network.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        match (&self.listen.cert, &self.listen.key) {
            (Some(_), Some(_)) => {}
            (None, None) if self.listen.addr.ip().is_loopback() => {
                if self.listen.client_certificates {
                    return bad(
                        "listen.client_certificates needs TLS: set listen.cert and listen.key"
                            .into(),
                    );
                }
            }
            (None, None) => {
                return bad(format!(
                    "listen.addr {} is not a loopback address: agents' tokens would cross the \
                     network in clear; set listen.cert and listen.key",
                    self.listen.addr
                ));
            }
            _ => return bad("listen.cert and listen.key go together".into()),
        }
        if let Some(u) = &self.listen.public_url
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            return bad(format!("listen.public_url {u:?} is not an http(s) origin"));
        }
        if !self.broker.url.starts_with("https://") || !self.broker.issuer.starts_with("https://") {
            return bad("broker.url and broker.issuer are https URLs".into());
        }
        if let Some(u) = &self.approval_url
            && (!(u.starts_with("https://") || u.starts_with("http://")) || !u.contains("{id}"))
        {
            return bad(format!(
                "approval_url {u:?} is an http(s) URL with {{id}} where the approval's id goes"
            ));
        }
        if self.max_body == 0 {
            return bad("max_body must be above zero".into());
        }
        if self.upstreams.is_empty() {
            return bad("no [[upstreams]]: the gateway would front nothing".into());
        }
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        for u in &self.upstreams {
            check_upstream(&u.name)
                .map_err(|e| ConfigError::Invalid(format!("upstream {:?}: {e}", u.name)))?;
            if !names.insert(u.name.as_str()) {
                return bad(format!("upstream {} is listed twice", u.name));
            }
            u.check()?;
            if !paths.insert(u.path.as_str()) {
                return bad(format!("two upstreams share the path {}", u.path));
            }
        }
        for a in &self.upstreams {
            for b in &self.upstreams {
                if a.name != b.name && b.path.starts_with(&format!("{}/", a.path)) {
                    return bad(format!(
                        "upstream {}'s path {} is under upstream {}'s {}",
                        b.name, b.path, a.name, a.path
                    ));
                }
            }
        }
        Ok(())
    }
}

impl UpstreamConfig {
    fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("upstream {}: {m}", self.name)));
        if !self.path.starts_with('/')
            || self.path.len() < 2
            || self.path.ends_with('/')
            || self.path.contains("//")
            || self.path.contains(['?', '#', '{', '}', '%'])
            || self.path.split('/').any(|s| s == "." || s == "..")
        {
            return bad(format!(
                "path {:?} is a plain absolute path without a trailing slash (/billing/mcp)",
                self.path
            ));
        }
        if !(self.url.starts_with("https://") || self.url.starts_with("http://"))
            || self.url.parse::<http::Uri>().is_err()
        {
            return bad(format!("url {:?} is not an http(s) URL", self.url));
        }
        if self.audience.is_empty() {
            return bad("audience is empty".into());
        }
        match (self.protocol, self.routes.is_empty()) {
            (Protocol::Mcp, false) => return bad("routes are for HTTP upstreams".into()),
            (Protocol::Http, true) => {
                return bad("an HTTP upstream needs [[upstreams.routes]]".into());
            }
            _ => {}
        }
        if let CredentialConfig::Header { name, prefix, .. } = &self.credential {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return bad(format!("credential header {name:?} is not a header name"));
            }
            if prefix.chars().any(char::is_control) {
                return bad("credential prefix holds a control character".into());
            }
        }
        let mut tools = HashSet::new();
        for r in &self.routes {
            if http::Method::from_bytes(r.method.as_bytes()).is_err()
                || r.method != r.method.to_ascii_uppercase()
            {
                return bad(format!("route method {:?} is not an HTTP method", r.method));
            }
            if !r.path.starts_with('/') {
                return bad(format!("route path {:?} does not start with /", r.path));
            }
            Tool::new(&self.name, &r.tool)
                .map_err(|e| ConfigError::Invalid(format!("upstream {}: {e}", self.name)))?;
            if !tools.insert((r.method.as_str(), r.path.as_str())) {
                return bad(format!("route {} {} is listed twice", r.method, r.path));
            }
        }
        Ok(())
    }
}
