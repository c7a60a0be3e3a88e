//! A development PKI: a self-signed trust-bundle CA, a broker server
//! certificate, and X.509-SVIDs for agents and operators. `mayfly dev init`
//! and the tests use it; production brings certificates from SPIRE or its
//! own CA.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mayfly_core::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::fsutil::{create_private_dir, write_new_private, write_public};

/// Why the dev PKI could not be made or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevPkiError {
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Cert(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The directory already holds a dev setup.
    #[error("{0} already exists; pick another --dir or remove it")]
    Exists(PathBuf),
    /// An identity name is unusable.
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DevPkiError + '_ {
    move |source| DevPkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A certificate with its private key, both PEM.
#[derive(Clone)]
pub struct Credential {
    /// The certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key; wiped when dropped.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"…")
            .finish()
    }
}

fn random_serial() -> SerialNumber {
    crate::issuer::random_serial().0
}

/// Validity from a minute ago (clock skew) for `valid_for`.
pub fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + valid_for;
}

/// A dev certificate authority that signs SVIDs and server certificates.
pub struct DevCa {
    /// The CA certificate, which is the whole trust bundle.
    cert_pem: String,
    /// Signs with the CA's key.
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new self-signed CA (ECDSA P-256) for `td`, valid for a year.
    pub fn generate(td: &TrustDomain) -> Result<Self, DevPkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Mayfly development");
        dn.push(DnType::CommonName, format!("Mayfly dev CA for {td}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(td.id_string().as_str().try_into()?)];
        params.serial_number = Some(random_serial());
        validity(&mut params, Duration::from_secs(365 * 24 * 3600));
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// Loads a CA from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, DevPkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate: the trust bundle clients and the broker use.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    /// Signs `params` for a fresh P-256 key. Tests use this for malformed
    /// certificates; use [`issue_svid`](Self::issue_svid) otherwise.
    pub fn sign(&self, params: &CertificateParams) -> Result<Credential, DevPkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credential {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// The parameters of an X.509-SVID for `id`: one URI SAN, CA:false,
    /// digitalSignature, client and server auth.
    pub fn svid_params(
        id: &SpiffeId,
        valid_for: Duration,
    ) -> Result<CertificateParams, DevPkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Mayfly development");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.serial_number = Some(random_serial());
        validity(&mut params, valid_for);
        Ok(params)
    }

    /// An X.509-SVID for `id`.
    pub fn issue_svid(
        &self,
        id: &SpiffeId,
        valid_for: Duration,
    ) -> Result<Credential, DevPkiError> {
        self.sign(&Self::svid_params(id, valid_for)?)
    }

    /// A TLS server certificate for the broker, for DNS names and IPs.
    pub fn issue_server(
        &self,
        names: &[&str],
        valid_for: Duration,
    ) -> Result<Credential, DevPkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "mayfly broker");
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*n).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        validity(&mut params, valid_for);
        self.sign(&params)
    }
}

/// Default ports of a dev broker.
pub const DEV_GRPC_ADDR: &str = "127.0.0.1:8710";
/// Default HTTP (JWKS, metadata, health) address of a dev broker.
pub const DEV_HTTP_ADDR: &str = "127.0.0.1:8711";
/// How long dev identities live.
pub const DEV_IDENTITY_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// What `mayfly dev init` made.
#[derive(Debug, Clone)]
pub struct DevLayout {
    /// The directory.
    pub dir: PathBuf,
    /// The broker configuration.
    pub config: PathBuf,
    /// The CLI profile.
    pub profile: PathBuf,
    /// The operator identity.
    pub operator: SpiffeId,
    /// The agent identity.
    pub agent: SpiffeId,
}

/// The directory name under `identities/` for an identity: its path with
/// `/` replaced by `-` (`spiffe://td/agent/demo` → `agent-demo`).
pub fn identity_dir_name(id: &SpiffeId) -> String {
    id.path().trim_start_matches('/').replace('/', "-")
}

/// Writes an identity's SVID and key under `dir/identities/<name>/`.
pub fn write_identity(dir: &Path, ca: &DevCa, id: &SpiffeId) -> Result<PathBuf, DevPkiError> {
    let idir = dir.join("identities").join(identity_dir_name(id));
    if idir.exists() {
        return Err(DevPkiError::Exists(idir));
    }
    create_private_dir(&idir).map_err(io_err(&idir))?;
    let cred = ca.issue_svid(id, DEV_IDENTITY_LIFETIME)?;
    let cert = idir.join("svid.pem");
    write_public(&cert, cred.cert_pem.as_bytes()).map_err(io_err(&cert))?;
    let key = idir.join("svid.key");
    write_new_private(&key, cred.key_pem.as_bytes()).map_err(io_err(&key))?;
    Ok(idir)
}

/// A new issuing CA for task certificates of `td` under `ca` (CA:true,
/// path length 0, keyCertSign and cRLSign): what `[ca]` names, or the next
/// CA to schedule with `mayfly ca install`.
pub fn issuing_ca(
    ca: &DevCa,
    td: &TrustDomain,
    valid_for: Duration,
) -> Result<Credential, DevPkiError> {
    ca.sign(&crate::issuer::issuing_ca_params(td, valid_for)?)
}

/// Loads the dev CA written by [`init`] in `dir`.
pub fn load_ca(dir: &Path) -> Result<DevCa, DevPkiError> {
    let cert_path = dir.join("bundle.pem");
    let key_path = dir.join("ca.key");
    let cert = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
    let key = Zeroizing::new(std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?);
    DevCa::from_pem(&cert, &key)
}

/// Creates a complete dev setup in `dir`: CA, broker certificate, an
/// operator and an agent identity, `mayfly.toml` and `profile.toml`.
pub fn init(dir: &Path, td: &TrustDomain) -> Result<DevLayout, DevPkiError> {
    let config = dir.join("mayfly.toml");
    if config.exists() {
        return Err(DevPkiError::Exists(config));
    }
    create_private_dir(dir).map_err(io_err(dir))?;
    let ca = DevCa::generate(td)?;
    let bundle = dir.join("bundle.pem");
    write_public(&bundle, ca.cert_pem().as_bytes()).map_err(io_err(&bundle))?;
    let ca_key = dir.join("ca.key");
    write_new_private(&ca_key, ca.key_pem().as_bytes()).map_err(io_err(&ca_key))?;

    // The broker's issuing CA for task certificates, under the dev root.
    let issuing = issuing_ca(&ca, td, Duration::from_secs(365 * 24 * 3600))?;
    let issuing_cert = dir.join("issuing-ca.pem");
    write_public(&issuing_cert, issuing.cert_pem.as_bytes()).map_err(io_err(&issuing_cert))?;
    let issuing_key = dir.join("issuing-ca.key");
    write_new_private(&issuing_key, issuing.key_pem.as_bytes()).map_err(io_err(&issuing_key))?;

    let server = ca.issue_server(&["localhost", "127.0.0.1", "::1"], DEV_IDENTITY_LIFETIME)?;
    let server_cert = dir.join("server.pem");
    write_public(&server_cert, server.cert_pem.as_bytes()).map_err(io_err(&server_cert))?;
    let server_key = dir.join("server.key");
    write_new_private(&server_key, server.key_pem.as_bytes()).map_err(io_err(&server_key))?;

    let operator = SpiffeId::new(&format!("spiffe://{td}/operator/admin"))
        .map_err(|e| DevPkiError::Invalid(e.to_string()))?;
    let agent = SpiffeId::new(&format!("spiffe://{td}/agent/demo"))
        .map_err(|e| DevPkiError::Invalid(e.to_string()))?;
    let gateway = SpiffeId::new(&format!("spiffe://{td}/gateway/dev"))
        .map_err(|e| DevPkiError::Invalid(e.to_string()))?;
    write_identity(dir, &ca, &operator)?;
    write_identity(dir, &ca, &agent)?;
    let gateway_dir = write_identity(dir, &ca, &gateway)?;

    let policies = dir.join("policies");
    create_private_dir(&policies).map_err(io_err(&policies))?;
    let policy_file = policies.join("mayfly.cedar");
    write_public(&policy_file, dev_policies(td).as_bytes()).map_err(io_err(&policy_file))?;
    // The example tool policies, for the dev agents.
    let tools = policies.join("tools.toml");
    write_public(
        &tools,
        include_str!("../../../deploy/policies/tools.toml").as_bytes(),
    )
    .map_err(io_err(&tools))?;
    let tool_policies = policies.join("tools.cedar");
    let text = include_str!("../../../deploy/policies/tools.cedar").replace(
        "spiffe://prod.example.com/agents",
        &format!("spiffe://{td}/agent"),
    );
    write_public(&tool_policies, text.as_bytes()).map_err(io_err(&tool_policies))?;

    let text = dev_config(td);
    write_public(&config, text.as_bytes()).map_err(io_err(&config))?;
    let profile = dir.join("profile.toml");
    let profile_text = format!(
        "# CLI profile for this dev broker: `mayfly --profile {dir}` (the default when\n\
         # ./.mayfly-dev exists). Broker calls use the agent identity, Admin calls\n\
         # the operator identity; `--identity NAME` picks another under identities/.\n\
         broker = \"https://localhost:{grpc_port}\"\n\
         ca = \"bundle.pem\"\n\
         agent = \"{agent_dir}\"\n\
         operator = \"{op_dir}\"\n",
        dir = dir.display(),
        grpc_port = port_of(DEV_GRPC_ADDR),
        agent_dir = identity_dir_name(&agent),
        op_dir = identity_dir_name(&operator),
    );
    write_public(&profile, profile_text.as_bytes()).map_err(io_err(&profile))?;
    let gateway_config = dir.join("gateway.toml");
    let gateway_text = dev_gateway_config(&gateway_dir, dir);
    write_public(&gateway_config, gateway_text.as_bytes()).map_err(io_err(&gateway_config))?;
    Ok(DevLayout {
        dir: dir.to_owned(),
        config,
        profile,
        operator,
        agent,
    })
}

/// Where the dev gateway listens, and the billing MCP server of
/// `examples/gateway` it fronts.
pub const DEV_GATEWAY_ADDR: &str = "127.0.0.1:8730";
/// The example billing MCP server's port.
pub const DEV_BILLING_PORT: u16 = 8793;

/// `gateway.toml` for the dev gateway, whose identity is in `identity`.
fn dev_gateway_config(identity: &Path, dir: &Path) -> String {
    let id_dir = identity.strip_prefix(dir).unwrap_or(identity).display();
    format!(
        r#"# The dev tool-call gateway, written by `mayfly dev init`:
#     mayfly gateway --config .mayfly-dev/gateway.toml
# It fronts the billing MCP server of examples/gateway (`python
# examples/gateway/billing.py --port {billing}`); the broker decides each
# call (policies/tools.cedar). Relative paths are relative to this file.
# docs/guides/gateway.md has every key.

# A call that needs an operator's approval is answered at once with the
# approval's id; the agent's retry of the same call uses it once granted.
approval_wait = "0s"

[listen]
addr = "{listen}"

[broker]
url = "https://localhost:{grpc}"
issuer = "https://localhost:{http}"
ca = "bundle.pem"
cert = "{id_dir}/svid.pem"
key = "{id_dir}/svid.key"

[[upstreams]]
name = "billing"
protocol = "mcp"
path = "/billing/mcp"
# Agents' tokens for it carry this audience (the broker's [[gateways]]
# entry says the same).
audience = "https://tools.example.com"
url = "http://127.0.0.1:{billing}/mcp"
"#,
        listen = DEV_GATEWAY_ADDR,
        grpc = port_of(DEV_GRPC_ADDR),
        http = port_of(DEV_HTTP_ADDR),
        billing = DEV_BILLING_PORT,
    )
}

fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap_or(addr)
}

fn dev_policies(td: &TrustDomain) -> String {
    include_str!("dev_policies.cedar").replace("TRUST_DOMAIN", td.as_str())
}

fn dev_config(td: &TrustDomain) -> String {
    format!(
        r#"# Mayfly broker configuration written by `mayfly dev init`.
# Relative paths are relative to this file. docs/guides/configuration.md
# has every key.

trust_domain = "{td}"
# The `iss` of every token; validators fetch {{issuer}}/.well-known/jwks.json.
issuer = "https://localhost:{http_port}"
data_dir = "data"
store = "embedded"
# SPIFFE IDs allowed to call the Admin API (exact, or a prefix ending in /*).
operators = ["spiffe://{td}/operator/*"]

# Cedar policies decide every request (see policies/mayfly.cedar); edit them
# and the broker reloads them, keeping the old set if the new one is invalid.
[policy]
dir = "policies"

[listen]
grpc = "{grpc}"
http = "{http}"

[tls]
cert = "server.pem"
key = "server.key"
trust_bundle = "bundle.pem"

# The issuing CA for task certificates (an intermediate under the bundle's root).
[ca]
cert = "issuing-ca.pem"
key = "issuing-ca.key"

[tokens]
algorithm = "ES256"
default_ttl = "5m"
max_ttl = "15m"

[certificates]
default_ttl = "10m"
max_ttl = "1h"
crl_validity = "10m"

# Shared Signals receivers on this host may take SETs over plain http.
[ssf]
allow_loopback_http = true

[tasks]
default_ttl = "15m"
max_ttl = "8h"

[reaper]
interval = "1s"
retention = "24h"

# Who may ask for what. The first rule that matches the agent and covers every
# requested audience and scope decides; anything else is denied.
# Resource servers that may introspect tokens (RFC 7662, mTLS), and for which
# audiences.
[[introspection]]
clients = ["spiffe://{td}/api/*"]
audiences = ["https://api.example.com", "https://tools.example.com"]

# The dev tool-call gateway (gateway.toml): it asks the broker about each
# call agents make through it to the billing upstream, whose tokens carry
# the tools audience.
[[gateways]]
id = "spiffe://{td}/gateway/dev"
upstreams = {{ billing = "https://tools.example.com" }}

# The services that receive tokens for each dev API. Only a token's
# recipient may exchange it for the next hop (RFC 8693); policy sees the
# entry's name as context.resource_server.
[[resource_servers]]
name = "api"
clients = ["spiffe://{td}/api/downstream", "spiffe://{td}/api/files", "spiffe://{td}/api/tickets"]
audiences = ["https://api.example.com"]

[[resource_servers]]
name = "tools"
clients = ["spiffe://{td}/api/tools", "spiffe://{td}/api/mcp"]
audiences = ["https://tools.example.com"]
"#,
        http_port = port_of(DEV_HTTP_ADDR),
        grpc = DEV_GRPC_ADDR,
        http = DEV_HTTP_ADDR,
    )
}
