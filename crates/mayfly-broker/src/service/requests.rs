//! The service's validated requests, and what it hands back.

use std::time::Duration;

use mayfly_core::{
    Approval, ApprovalId, Audience, Binding, Envelope, Intent, Lease, Scopes, SpiffeId,
    TaskContext, TaskId,
};

use crate::issuer::{AccessToken, CsrKey};

/// A validated `StartTask`.
#[derive(Debug)]
pub struct NewTask {
    /// What the task is for.
    pub intent: Intent,
    /// Facts for policy.
    pub context: TaskContext,
    /// Audiences and scopes it may need.
    pub envelope: Envelope,
    /// Requested lifetime; `None` for the default.
    pub ttl: Option<Duration>,
}

/// A validated `DelegateTask`.
#[derive(Debug)]
pub struct NewDelegation {
    /// The caller's task to delegate from.
    pub parent: TaskId,
    /// The agent that will own the new task.
    pub delegate: SpiffeId,
    /// What the new task is for.
    pub intent: Intent,
    /// Its audiences and scopes: within the parent's.
    pub envelope: Envelope,
    /// Requested lifetime; `None` for the default.
    pub ttl: Option<Duration>,
}

/// A validated `IssueToken`.
#[derive(Debug)]
pub struct TokenRequest {
    /// Under which task.
    pub task_id: TaskId,
    /// For which API.
    pub audience: Audience,
    /// With which scopes.
    pub scopes: Scopes,
    /// Requested lifetime; `None` for the default. Approvals are bound to
    /// it as asked.
    pub ttl: Option<Duration>,
    /// What the token is to be bound to (a certificate binding only for a
    /// caller with one: [`bind_to_certificate`](super::bind_to_certificate)).
    pub binding: Binding,
    /// Collects an approved request.
    pub approval_id: Option<ApprovalId>,
}

/// A validated `IssueDatabaseCredential`.
#[derive(Debug)]
pub struct DatabaseLoginRequest {
    /// Under which task.
    pub task_id: TaskId,
    /// Which database (`[[databases]]` name), the login's audience.
    pub database: Audience,
    /// What the login is granted: scopes the database defines.
    pub scopes: Scopes,
    /// Requested lifetime; `None` for the default. Approvals are bound to
    /// it as asked.
    pub ttl: Option<Duration>,
    /// Collects an approved request.
    pub approval_id: Option<ApprovalId>,
}

/// A validated token exchange (RFC 8693): a service that received
/// `subject_token` asks for a token for `audience`.
pub struct ExchangeRequest {
    /// The token being exchanged: a bearer secret, never printed.
    pub subject_token: String,
    /// The new token's audience.
    pub audience: Audience,
    /// Its scopes; `None` for the subject token's.
    pub scopes: Option<Scopes>,
    /// What it is to be bound to.
    pub binding: Binding,
}

impl std::fmt::Debug for ExchangeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeRequest")
            .field("subject_token", &"…")
            .field("audience", &self.audience)
            .field("scopes", &self.scopes)
            .field("binding", &self.binding)
            .finish()
    }
}

/// A validated `SignCertificate`.
#[derive(Debug)]
pub struct CertificateRequest {
    /// Under which task.
    pub task_id: TaskId,
    /// The CSR's public key, checked.
    pub key: CsrKey,
    /// Requested lifetime; `None` for the default. Approvals are bound to
    /// it as asked.
    pub ttl: Option<Duration>,
    /// Collects an approved request.
    pub approval_id: Option<ApprovalId>,
}

/// A credential and its lease, as recorded.
#[derive(Debug)]
pub struct Minted<C> {
    /// What the caller gets.
    pub credential: C,
    /// Its lease, as recorded.
    pub lease: Lease,
}

/// An issued token (the compact JWS) and its lease.
pub type IssuedToken = Minted<AccessToken>;

/// A signed certificate and its lease (with the serial).
pub type IssuedCertificate = Minted<TaskCertificate>;

/// A database login and its lease.
pub type IssuedDatabaseLogin = Minted<mayfly_secrets::Login>;

/// A task certificate as handed out.
#[derive(Debug)]
pub struct TaskCertificate {
    /// The leaf, PEM.
    pub certificate_pem: String,
    /// The issuing CA and intermediates, PEM.
    pub chain_pem: String,
    /// The leaf's SPIFFE ID: `<agent>/task/<task_id>`.
    pub spiffe_id: SpiffeId,
}

/// A credential, or the approval it waits for.
#[derive(Debug)]
pub enum Issued<T> {
    /// Issued.
    Credential(T),
    /// Policy requires an operator's approval first.
    Pending(Box<Approval>),
}
