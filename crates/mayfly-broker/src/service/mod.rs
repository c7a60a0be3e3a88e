//! The broker's request handling, independent of gRPC: authorization, TTLs,
//! envelopes, ownership, approvals, signing, and the store calls that make
//! each step atomic. The gRPC services and the HTTPS routes are thin
//! wrappers over the parts of [`Service`]:
//!
//! - [`Tasks`] (`tasks.rs`): start, delegate, complete, context changes,
//!   and deciding again what a task holds;
//! - [`Issuance`] (`pipeline.rs`, `credentials.rs`): the one path every
//!   credential takes (decide, approval gate, mint, record, decide again)
//!   and the kinds that take it (tokens, certificates); introspection;
//!   `exchange.rs` is the kind a service exchanges a task's token for;
//! - [`Approvals`] (`approvals.rs`): operators' decisions, agents' waiting;
//! - [`Admin`] (`admin.rs`): operators' listing, revocation and locks.
//!
//! What they share (store, policy, recorder, recent task reads) and the
//! steps they share are in `shared.rs`; the validated requests and what is
//! handed back in `requests.rs`; `task_cache.rs` keeps recent task reads,
//! so an issue is one store call.

mod admin;
mod approvals;
mod calls;
mod credentials;
mod exchange;
mod logins;
mod pipeline;
mod requests;
mod shared;
mod task_cache;
mod tasks;

pub use requests::{
    CertificateRequest, DatabaseLoginRequest, ExchangeRequest, Issued, IssuedCertificate,
    IssuedDatabaseLogin, IssuedToken, Minted, NewDelegation, NewTask, TaskCertificate,
    TokenRequest,
};
pub use task_cache::TaskCache;

use std::sync::Arc;
use std::time::Duration;

use mayfly_core::{
    AccessTokenClaims, ActorClaim, Approval, ApprovalId, Binding, CallId, Lease, LeaseId, Policy,
    SpiffeId, SpiffeIdPattern, Tool, scope_string, status_list,
};
use tokio::sync::Notify;

use crate::cause::Cause;
use crate::config::{Gateway, IntrospectionGrant, Lifetimes, ResourceServer};
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::issuer::{AccessToken, CaRing, JwtSigner};
use crate::ratelimit::RateLimiter;
use crate::recorder::Recorder;
use crate::status::StatusAllocator;
use crate::store::LeaseStore;
use shared::Shared;

pub use mayfly_core::limits::{MAX_NOTE_BYTES, MAX_TTL as ABSURD_TTL};

/// Parses a requested TTL in seconds: 0 means "the default".
pub fn requested_ttl(field: &str, secs: u64) -> Result<Option<Duration>, BrokerError> {
    let d = Duration::from_secs(secs);
    if d > ABSURD_TTL {
        return Err(BrokerError::Invalid(format!(
            "{field} {secs} is absurd (more than a year); ask for what the work needs, or 0 for the default"
        )));
    }
    Ok((secs > 0).then_some(d))
}

/// A token binding to `caller`'s client certificate; refused for a caller
/// without one (proven by a workload token): the token could not be bound
/// to anything it holds.
pub fn bind_to_certificate(caller: &Caller) -> Result<Binding, BrokerError> {
    match caller.cert_thumbprint() {
        Some(x5t_s256) => Ok(Binding::Certificate {
            x5t_s256: x5t_s256.to_owned(),
        }),
        None => Err(BrokerError::Invalid(format!(
            "this caller authenticated with a workload token from {}, not a client certificate, \
             so its tokens cannot be bound to one: ask for a DPoP-bound token (or an unbound one)",
            caller.proof.name()
        ))),
    }
}

/// Parses an operator's free text (`note`, `reason`), naming `field` in
/// the error.
pub fn parse_note(field: &str, note: &str) -> Result<Option<String>, BrokerError> {
    if note.is_empty() {
        return Ok(None);
    }
    if note.len() > MAX_NOTE_BYTES || note.chars().any(char::is_control) {
        return Err(BrokerError::Invalid(format!(
            "{field} must be at most {MAX_NOTE_BYTES} bytes without control characters"
        )));
    }
    Ok(Some(note.to_owned()))
}

/// What the service is built from.
#[derive(Debug)]
pub struct Setup {
    /// Where leases and tasks live.
    pub store: Arc<dyn LeaseStore>,
    /// Decides every request (reloadable).
    pub policy: Arc<dyn Policy>,
    /// Where every decision is recorded.
    pub recorder: Recorder,
    /// Counters for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Woken after every revocation.
    pub revoked: Arc<Notify>,
    /// The identity the broker acts as on its own.
    pub broker_id: SpiffeId,
    /// Who may call the Admin API.
    pub operators: Vec<SpiffeIdPattern>,
    /// Every lifetime applied.
    pub lifetimes: Lifetimes,
    /// Signs tokens.
    pub signer: Arc<JwtSigner>,
    /// `iss` of every token.
    pub issuer: String,
    /// The issuing CAs that sign task certificates, when configured.
    pub ca: Option<Arc<CaRing>>,
    /// Per-agent issuance limit.
    pub rate: RateLimiter,
    /// Who may introspect tokens.
    pub introspection: Vec<IntrospectionGrant>,
    /// Who receives tokens of which audiences (and may exchange them).
    pub resource_servers: Vec<ResourceServer>,
    /// The gateways that may ask about tool calls.
    pub gateways: Vec<Gateway>,
    /// The databases logins are made in (`[[databases]]`).
    pub databases: Vec<Arc<dyn mayfly_secrets::Engine>>,
}

/// The broker's request handling, in four parts that share the store,
/// policy and the recorder.
#[derive(Debug)]
pub struct Service {
    /// Tasks: open, delegate, complete, change, decide again.
    tasks: Tasks,
    /// Credentials: tokens and certificates, and introspection.
    issuance: Issuance,
    /// Approvals: operators decide, agents wait.
    approvals: Approvals,
    /// What operators do besides approving.
    admin: Admin,
    /// Tool calls, for gateways.
    calls: ToolCalls,
    /// The same shared state the parts hold, for the accessors below.
    shared: Arc<Shared>,
}

/// Tasks: open, delegate, complete, change context, decide again.
#[derive(Debug)]
pub struct Tasks {
    shared: Arc<Shared>,
    /// Task lifetimes and the delegation depth.
    lifetimes: Lifetimes,
}

/// Credentials: the pipeline and its kinds, and introspection.
#[derive(Debug)]
pub struct Issuance {
    shared: Arc<Shared>,
    /// Signs and checks tokens.
    tokens: TokenSigner,
    /// The issuing CAs that sign task certificates, when configured.
    ca: Option<Arc<CaRing>>,
    /// Credential lifetimes and how long an approval lives.
    lifetimes: Lifetimes,
    /// Per-agent issuance limit.
    rate: RateLimiter,
    /// Who may introspect tokens.
    introspection: Vec<IntrospectionGrant>,
    /// The databases logins are made in.
    databases: Vec<Arc<dyn mayfly_secrets::Engine>>,
}

/// What tokens are signed and checked with: what a kind mints with, and
/// no more of the pipeline than that.
#[derive(Debug)]
pub(super) struct TokenSigner {
    /// Signs tokens.
    signer: Arc<JwtSigner>,
    /// `iss` of every token.
    issuer: String,
    /// Each token's index in the Token Status List.
    indexes: StatusAllocator,
}

impl TokenSigner {
    /// A fresh status-list index, for a token about to be minted.
    pub(super) async fn status_index(&self) -> Result<u64, BrokerError> {
        Ok(self.indexes.next().await?)
    }

    /// Signs the token `lease` records: its audience, scopes, times, id,
    /// holder (`client_id`), task and binding (`cnf`) from the lease, for
    /// the work of `sub` with the actor chain `act`.
    pub(super) fn sign_lease(
        &self,
        lease: &Lease,
        sub: String,
        act: Option<ActorClaim>,
    ) -> Result<AccessToken, BrokerError> {
        let aud = lease.audience().ok_or_else(|| {
            BrokerError::Internal(Cause::msg(format!(
                "lease {} of a token has no audience",
                lease.id
            )))
        })?;
        let claims = AccessTokenClaims {
            iss: self.issuer.clone(),
            sub,
            aud: aud.to_string(),
            exp: lease.expires_at.as_secs(),
            iat: lease.issued_at.as_secs(),
            nbf: lease.issued_at.as_secs(),
            jti: lease.id.to_string(),
            client_id: lease.holder().to_string(),
            scope: (!lease.scopes.is_empty()).then(|| scope_string(&lease.scopes)),
            task_id: lease.task_id.to_string(),
            cnf: lease.binding().and_then(Binding::confirmation),
            act,
            status: lease
                .status_index()
                .map(|idx| status_list::status_claim(&self.issuer, idx)),
        };
        self.signer
            .sign(&claims)
            .map_err(|e| BrokerError::Internal(Cause::of(e)))
    }

    /// The claims of `token` if this broker signed it (a key it holds, its
    /// `iss`); its lifetime is for the caller to judge.
    pub(super) fn verify(&self, token: &str) -> Option<AccessTokenClaims> {
        self.signer.verify(token).filter(|c| c.iss == self.issuer)
    }
}

/// Approvals: operators approve or deny, agents wait for the decision.
/// Tool calls: what gateways ask ([`ToolCalls::authorize`]).
#[derive(Debug)]
pub struct ToolCalls {
    shared: Arc<Shared>,
    gateways: Vec<Gateway>,
}

/// A tool call a gateway asks about.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// The token's lease (its `jti`).
    pub lease_id: LeaseId,
    /// The tool.
    pub tool: mayfly_core::Tool,
    /// Its arguments.
    pub arguments: mayfly_core::Arguments,
    /// For an HTTP route: method and template.
    pub route: Option<(String, String)>,
    /// An approval granted for exactly this call.
    pub approval_id: Option<ApprovalId>,
}

/// What a gateway is told.
#[derive(Debug, Clone)]
pub struct CallDecision {
    /// Forward the call; `false`: it waits for `approval`.
    pub allowed: bool,
    /// The deciding policies.
    pub policy_id: String,
    /// SHA-256 (hex) of the arguments' canonical form.
    pub arguments_sha256: String,
    /// The approval the call waits for.
    pub approval: Option<Box<Approval>>,
    /// The approval it was allowed on.
    pub approval_id: Option<ApprovalId>,
    /// The allowed call's id, for its outcome.
    pub call_id: Option<CallId>,
}

/// A request a token came with, as the service that validated it reports
/// it.
#[derive(Debug, Clone)]
pub struct ServedRequest {
    /// The token's lease.
    pub lease_id: LeaseId,
    /// The HTTP method and route (template or path).
    pub method: String,
    pub route: String,
    /// `None` when accepted, else the check that refused the token.
    pub refused_because: Option<String>,
    /// The answer's status.
    pub status: u16,
    /// Microseconds to the answer.
    pub latency_us: u64,
}

/// What became of a forwarded call, as its gateway reports it.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    /// The decision's id.
    pub call_id: CallId,
    /// The token's lease.
    pub lease_id: LeaseId,
    /// The tool.
    pub tool: Tool,
    /// The upstream's HTTP status (0: none).
    pub status: u16,
    /// Microseconds to the upstream's answer.
    pub latency_us: u64,
    /// Why there was no answer.
    pub error: Option<String>,
}

#[derive(Debug)]
pub struct Approvals {
    shared: Arc<Shared>,
}

/// What operators do: list, revoke, lock agents out.
#[derive(Debug)]
pub struct Admin {
    shared: Arc<Shared>,
    /// Who may call the Admin API.
    operators: Vec<SpiffeIdPattern>,
}

impl Service {
    /// The service, its parts sharing `setup`'s store, policy and recorder.
    pub fn new(setup: Setup) -> Self {
        let indexes = StatusAllocator::new(setup.store.clone());
        let shared = Arc::new(Shared {
            store: setup.store,
            policy: setup.policy,
            recorder: setup.recorder,
            metrics: setup.metrics,
            revoked: setup.revoked,
            task_cache: TaskCache::default(),
            broker_id: setup.broker_id,
            resource_servers: setup.resource_servers,
            approval_ttl: setup.lifetimes.approval_ttl,
        });
        Self {
            tasks: Tasks {
                shared: shared.clone(),
                lifetimes: setup.lifetimes.clone(),
            },
            issuance: Issuance {
                shared: shared.clone(),
                tokens: TokenSigner {
                    signer: setup.signer,
                    issuer: setup.issuer,
                    indexes,
                },
                ca: setup.ca,
                lifetimes: setup.lifetimes,
                rate: setup.rate,
                introspection: setup.introspection,
                databases: setup.databases,
            },
            approvals: Approvals {
                shared: shared.clone(),
            },
            admin: Admin {
                shared: shared.clone(),
                operators: setup.operators,
            },
            calls: ToolCalls {
                shared: shared.clone(),
                gateways: setup.gateways,
            },
            shared,
        }
    }

    /// Tasks.
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Credentials and introspection.
    pub fn issuance(&self) -> &Issuance {
        &self.issuance
    }

    /// Approvals.
    pub fn approvals(&self) -> &Approvals {
        &self.approvals
    }

    /// Operators' listing, revocation and locks.
    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// Tool calls, for gateways.
    pub fn calls(&self) -> &ToolCalls {
        &self.calls
    }

    /// The recorder, for the reaper and audit reads.
    pub fn recorder(&self) -> &Recorder {
        &self.shared.recorder
    }

    /// The counters, for `/metrics`.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.shared.metrics
    }

    /// The identity the broker acts as on its own.
    pub fn broker_id(&self) -> &SpiffeId {
        &self.shared.broker_id
    }

    /// The store, for readiness checks and the reaper.
    pub fn store(&self) -> &Arc<dyn LeaseStore> {
        &self.shared.store
    }
}
