//! A client for the Mayfly broker, used by agent runtimes and the `mayfly`
//! CLI. It speaks gRPC over mTLS with the caller's X.509-SVID, or, for an
//! agent without one, over server-authenticated TLS with a workload token
//! the broker trusts ([`Client::connect_with_token`]).
//!
//!
//! Its calls refuse with a typed [`Refusal`], read from the broker's
//! `mayfly-error` metadata (a policy's denial with its id, a rate limit
//! with when to retry, a task that ended, …); the raw gRPC clients
//! ([`Client::broker`], [`Client::admin`]) return the status itself,
//! which converts with `Refusal::from`.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use mayfly_client::{Client, ClientConfig, NewTask};
//!
//! let config = ClientConfig::from_files(
//!     "https://localhost:8710",
//!     ".mayfly-dev/bundle.pem",
//!     ".mayfly-dev/identities/agent-demo/svid.pem",
//!     ".mayfly-dev/identities/agent-demo/svid.key",
//! )?;
//! let client = Client::connect(&config).await?;
//! let task = client
//!     .start_task(NewTask::new("summarise ticket 42", ["https://api.example.com"]).scope("read:tickets"))
//!     .await?;
//! let token = task.issue_token("https://api.example.com", ["read:tickets"]).await?;
//! // … call the API with `token.token` …
//! task.complete().await?; // revokes every credential of the task
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

pub mod profile;
mod refusal;
pub mod workload;

pub use refusal::{Refusal, RefusalKind};

pub use mayfly_proto::Timestamp;
pub use mayfly_proto::v1 as pb;
use pb::admin_client::AdminClient;
use pb::broker_client::BrokerClient;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use zeroize::Zeroizing;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The broker address is not a usable URL.
    #[error("broker address {0:?} is not a valid https:// URL")]
    BadUrl(String),
    /// The SPIFFE Workload API gave no usable SVID or bundle.
    #[error("SPIFFE Workload API: {0}")]
    WorkloadApi(String),
    /// A workload token that cannot travel in a header.
    #[error("the workload token is not a compact JWT (printable ASCII)")]
    BadToken,
    /// Connecting or the TLS handshake failed.
    #[error("cannot connect to the broker at {url}: {reason}")]
    Connect {
        /// The broker URL.
        url: String,
        /// The error chain.
        reason: String,
    },
}

/// Where the broker is and which identity to present.
#[derive(Clone)]
pub struct ClientConfig {
    /// `https://host:port` of the broker's gRPC port.
    pub broker: String,
    /// PEM of the CA(s) that issued the broker's server certificate.
    pub ca_pem: Vec<u8>,
    /// PEM of the caller's X.509-SVID (leaf first).
    pub cert_pem: Vec<u8>,
    /// PEM of the SVID's private key; wiped on drop.
    pub key_pem: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("broker", &self.broker)
            .field("key_pem", &"…")
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The workload token in `path` (surrounding whitespace dropped, as a
/// file written with a trailing newline has it), for
/// [`Client::connect_with_token`].
pub fn read_token_file(path: impl AsRef<Path>) -> Result<String, ClientError> {
    let path = path.as_ref();
    let bytes = read(path)?;
    String::from_utf8(bytes)
        .map(|t| t.trim().to_owned())
        .map_err(|_| ClientError::BadToken)
}

impl ClientConfig {
    /// Reads the CA bundle, SVID and key from files.
    pub fn from_files(
        broker: &str,
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            broker: broker.to_owned(),
            ca_pem: read(ca.as_ref())?,
            cert_pem: read(cert.as_ref())?,
            key_pem: Zeroizing::new(read(key.as_ref())?),
        })
    }
}

/// Formats an error with its sources, so "transport error" says why.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A connection to the broker. Cheap to clone (one HTTP/2 channel).
#[derive(Debug, Clone)]
pub struct Client {
    /// The channel new calls use; replaced when the SVID rotates
    /// (`workload`), while calls already made finish on the old one.
    channel: std::sync::Arc<std::sync::RwLock<Channel>>,
    /// Follows the Workload API when the SVID comes from it; stops when
    /// the last clone of the client is dropped.
    _rotation: Option<std::sync::Arc<workload::Rotation>>,
    /// Sent on every Broker call of a caller without a certificate.
    bearer: Bearer,
}

/// A channel to `broker` (an `https://` URL) over `tls`.
async fn open(broker: &str, tls: ClientTlsConfig) -> Result<Channel, ClientError> {
    if !broker.starts_with("https://") {
        return Err(ClientError::BadUrl(broker.to_owned()));
    }
    let connect_err = |e: tonic::transport::Error| ClientError::Connect {
        url: broker.to_owned(),
        reason: chain(&e),
    };
    Channel::from_shared(broker.to_owned())
        .map_err(|_| ClientError::BadUrl(broker.to_owned()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(tls)
        .map_err(connect_err)?
        .connect()
        .await
        .map_err(connect_err)
}

/// Puts `authorization: Bearer <workload token>` on each call, if the
/// client has one.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<redacted>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl Client {
    /// Connects with mTLS.
    pub async fn connect(config: &ClientConfig) -> Result<Self, ClientError> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&config.ca_pem))
            .identity(Identity::from_pem(&config.cert_pem, &*config.key_pem));
        Ok(Self::from_channel(open(&config.broker, tls).await?))
    }

    /// Connects over server-authenticated TLS (no client certificate) as
    /// the caller `token` proves: a workload token (Kubernetes, OIDC,
    /// JWT-SVID) of an issuer the broker's `[[federation]]` trusts, sent
    /// on every Broker call. A token with a `jti` serves the connections
    /// this client opens only if its issuer is not `single_use`: make a new
    /// client with a fresh token when the broker says it was already used.
    pub async fn connect_with_token(
        broker: &str,
        ca_pem: &[u8],
        token: &str,
    ) -> Result<Self, ClientError> {
        let mut bearer = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| ClientError::BadToken)?;
        bearer.set_sensitive(true);
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        let mut client = Self::from_channel(open(broker, tls).await?);
        client.bearer = Bearer(Some(bearer));
        Ok(client)
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            channel: std::sync::Arc::new(std::sync::RwLock::new(channel)),
            _rotation: None,
            bearer: Bearer::default(),
        }
    }

    /// The underlying channel, for other services (e.g. the revocation
    /// feed): the one of the current SVID.
    pub fn channel(&self) -> Channel {
        self.channel
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The raw Broker (agent) API (with the workload token on each call,
    /// if the client has one).
    pub fn broker(&self) -> BrokerClient<InterceptedService<Channel, Bearer>> {
        BrokerClient::with_interceptor(self.channel(), self.bearer.clone())
    }

    /// The raw Admin (operator) API (the broker refuses it to a caller
    /// proven by a workload token, saying so).
    pub fn admin(&self) -> AdminClient<InterceptedService<Channel, Bearer>> {
        AdminClient::with_interceptor(self.channel(), self.bearer.clone())
    }

    /// Opens a task; the returned guard completes it when the work ends.
    pub async fn start_task(&self, task: NewTask) -> Result<TaskGuard, Refusal> {
        let created = self
            .broker()
            .start_task(task.into_request())
            .await?
            .into_inner();
        Ok(TaskGuard {
            client: self.clone(),
            task: created,
            done: false,
        })
    }

    /// Issues a token under a task.
    pub async fn issue_token(
        &self,
        req: pb::IssueTokenRequest,
    ) -> Result<pb::IssuedToken, Refusal> {
        Ok(self.broker().issue_token(req).await?.into_inner())
    }

    /// Completes a task by id.
    pub async fn complete_task(&self, task_id: &str) -> Result<pb::CompleteTaskResponse, Refusal> {
        let req = pb::CompleteTaskRequest {
            task_id: task_id.to_owned(),
        };
        Ok(self.broker().complete_task(req).await?.into_inner())
    }
}

/// A TTL as whole seconds for the wire, rounded up so a short TTL is never
/// sent as 0 (which asks for the default).
pub fn ttl_seconds(ttl: Duration) -> u64 {
    ttl.as_millis()
        .div_ceil(1000)
        .try_into()
        .unwrap_or(u64::MAX)
}

/// What a new task asks for.
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    /// What the work is.
    pub intent: String,
    /// Facts for policy.
    pub context: HashMap<String, String>,
    /// Audiences the task may need.
    pub audiences: Vec<String>,
    /// Scopes the task may need.
    pub scopes: Vec<String>,
    /// Lifetime; `None` for the broker's default.
    pub ttl: Option<Duration>,
}

impl NewTask {
    /// A task with an intent and its audiences.
    pub fn new<I, A>(intent: &str, audiences: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        Self {
            intent: intent.to_owned(),
            audiences: audiences.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Adds a scope to the envelope.
    pub fn scope(mut self, scope: &str) -> Self {
        self.scopes.push(scope.to_owned());
        self
    }

    /// Adds a context entry.
    pub fn context(mut self, key: &str, value: &str) -> Self {
        self.context.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets the lifetime.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    fn into_request(self) -> pb::StartTaskRequest {
        pb::StartTaskRequest {
            intent: self.intent,
            context: self.context,
            audiences: self.audiences,
            scopes: self.scopes,
            ttl_seconds: self.ttl.map_or(0, ttl_seconds),
        }
    }
}

/// An open task. Call [`complete`](Self::complete) when the work is done; if
/// the guard is dropped first (an error path, a panic), it completes the task
/// in the background so its credentials die with the work.
#[derive(Debug)]
pub struct TaskGuard {
    client: Client,
    task: pb::Task,
    /// Set once completed, so drop does nothing.
    done: bool,
}

impl TaskGuard {
    /// The task as the broker created it.
    pub fn task(&self) -> &pb::Task {
        &self.task
    }

    /// The task id.
    pub fn id(&self) -> &str {
        &self.task.task_id
    }

    /// Issues a token for `audience` with `scopes` (default TTL, unbound).
    pub async fn issue_token<I, S>(
        &self,
        audience: &str,
        scopes: I,
    ) -> Result<pb::IssuedToken, Refusal>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.client
            .issue_token(pb::IssueTokenRequest {
                task_id: self.task.task_id.clone(),
                audience: audience.to_owned(),
                scopes: scopes.into_iter().map(Into::into).collect(),
                ttl_seconds: 0,
                bind_to_client_cert: false,
                approval_id: String::new(),
                dpop_jwk: String::new(),
            })
            .await
    }

    /// Completes the task, revoking every credential issued under it.
    pub async fn complete(mut self) -> Result<pb::CompleteTaskResponse, Refusal> {
        self.done = true;
        self.client.complete_task(&self.task.task_id).await
    }

    /// Gives up the guard without completing the task (it then ends at its
    /// expiry or by another call).
    pub fn detach(mut self) -> pb::Task {
        self.done = true;
        std::mem::take(&mut self.task)
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (client, id) = (self.client.clone(), self.task.task_id.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = client.complete_task(&id).await {
                        tracing::warn!(task_id = %id, error = %e, "completing dropped task failed");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(task_id = %id, "task guard dropped outside a runtime; task left to expire")
            }
        }
    }
}
