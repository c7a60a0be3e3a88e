//! The gRPC edge: one file per service, each RPC = authenticate → convert the
//! proto request into a domain request → call [`Service`](crate::service::Service)
//! → convert back. Nothing here decides anything.

mod admin;
mod broker;
mod edge;
mod gateway;
mod requests;
mod revocations;
mod status;

pub use crate::auth::TokenAuthLayer;
pub use admin::AdminApi;
pub use broker::BrokerApi;
pub use edge::GrpcEdgeLayer;
pub use gateway::GatewayApi;
pub use requests::RequestsApi;
pub use revocations::RevocationsApi;

use mayfly_core::{
    Approval, ApprovalRequest, ApprovalState, ApprovalStatus, Lease, LeaseKind, LeaseState,
    LeaseStatus, RevocationReason, Task, TaskRecord, TaskState, Timestamp,
};
use mayfly_proto::v1 as pb;
use tonic::{Request, Status};

use crate::error::BrokerError;
use crate::identity::{AuthError, Caller};

/// The authenticated caller of a request, or `UNAUTHENTICATED` saying why
/// not. A certificate that expired after the connection was opened no longer
/// counts.
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let peer = req
        .extensions()
        .get::<crate::connections::PeerInfo>()
        .ok_or(BrokerError::Unauthenticated(AuthError::NoCertificate))?;
    crate::auth::caller_of(peer, Timestamp::now())
        .map_err(|e| BrokerError::Unauthenticated(e).into())
}

/// Parses a field with `parse`, naming the field in the error.
pub fn field<T, E: std::error::Error + Send + Sync + 'static>(
    name: &str,
    value: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, BrokerError> {
    parse(value).map_err(|e| BrokerError::invalid_field(name, e))
}

pub(crate) fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    let ms = t.as_millis();
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

pub(crate) fn reason_to_proto(r: RevocationReason) -> pb::RevocationReason {
    match r {
        RevocationReason::TaskCompleted => pb::RevocationReason::TaskCompleted,
        RevocationReason::TaskRevoked => pb::RevocationReason::TaskRevoked,
        RevocationReason::ContextChanged => pb::RevocationReason::ContextChanged,
        RevocationReason::Operator => pb::RevocationReason::Operator,
        RevocationReason::AgentRevoked => pb::RevocationReason::AgentRevoked,
        RevocationReason::ParentRevoked => pb::RevocationReason::ParentRevoked,
        RevocationReason::TokenRevoked => pb::RevocationReason::TokenRevoked,
    }
}

pub(crate) fn task_state_to_proto(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Active => pb::TaskState::Active,
        TaskState::Completed => pb::TaskState::Completed,
        TaskState::Revoked => pb::TaskState::Revoked,
        TaskState::Expired => pb::TaskState::Expired,
    }
}

pub(crate) fn task_state_from_proto(v: i32) -> Result<Option<TaskState>, BrokerError> {
    match pb::TaskState::try_from(v) {
        Ok(pb::TaskState::Unspecified) => Ok(None),
        Ok(pb::TaskState::Active) => Ok(Some(TaskState::Active)),
        Ok(pb::TaskState::Completed) => Ok(Some(TaskState::Completed)),
        Ok(pb::TaskState::Revoked) => Ok(Some(TaskState::Revoked)),
        Ok(pb::TaskState::Expired) => Ok(Some(TaskState::Expired)),
        Err(_) => Err(BrokerError::Invalid(format!(
            "state: unknown task state {v}"
        ))),
    }
}

pub(crate) fn lease_state_to_proto(s: LeaseState) -> pb::LeaseState {
    match s {
        LeaseState::Active => pb::LeaseState::Active,
        LeaseState::Revoked => pb::LeaseState::Revoked,
        LeaseState::Expired => pb::LeaseState::Expired,
    }
}

pub(crate) fn lease_state_from_proto(v: i32) -> Result<Option<LeaseState>, BrokerError> {
    match pb::LeaseState::try_from(v) {
        Ok(pb::LeaseState::Unspecified) => Ok(None),
        Ok(pb::LeaseState::Active) => Ok(Some(LeaseState::Active)),
        Ok(pb::LeaseState::Revoked) => Ok(Some(LeaseState::Revoked)),
        Ok(pb::LeaseState::Expired) => Ok(Some(LeaseState::Expired)),
        Err(_) => Err(BrokerError::Invalid(format!(
            "state: unknown lease state {v}"
        ))),
    }
}

pub(crate) fn lease_kind_from_proto(v: i32) -> Result<Option<LeaseKind>, BrokerError> {
    match pb::LeaseKind::try_from(v) {
        Ok(pb::LeaseKind::Unspecified) => Ok(None),
        Ok(pb::LeaseKind::Task) => Ok(Some(LeaseKind::Task)),
        Ok(pb::LeaseKind::Jwt) => Ok(Some(LeaseKind::Jwt)),
        Ok(pb::LeaseKind::X509) => Ok(Some(LeaseKind::X509)),
        Ok(pb::LeaseKind::DatabaseLogin) => Ok(Some(LeaseKind::DatabaseLogin)),
        Err(_) => Err(BrokerError::Invalid(format!(
            "kind: unknown lease kind {v}"
        ))),
    }
}

pub(crate) fn lease_kind_to_proto(k: LeaseKind) -> pb::LeaseKind {
    match k {
        LeaseKind::Task => pb::LeaseKind::Task,
        LeaseKind::Jwt => pb::LeaseKind::Jwt,
        LeaseKind::X509 => pb::LeaseKind::X509,
        LeaseKind::DatabaseLogin => pb::LeaseKind::DatabaseLogin,
    }
}

fn approval_state_to_proto(s: ApprovalState) -> pb::ApprovalState {
    match s {
        ApprovalState::Pending => pb::ApprovalState::Pending,
        ApprovalState::Approved => pb::ApprovalState::Approved,
        ApprovalState::Denied => pb::ApprovalState::Denied,
        ApprovalState::Consumed => pb::ApprovalState::Consumed,
        ApprovalState::Expired => pb::ApprovalState::Expired,
    }
}

/// An approval as the API shows it; `task` adds the intent and context an
/// operator judges by.
pub fn approval_to_proto(a: &Approval, task: Option<&Task>, now: Timestamp) -> pb::Approval {
    let (kind, audience, scopes, bind, key_sha256, ttl_seconds) = match &a.request {
        ApprovalRequest::Token {
            audience,
            scopes,
            ttl_seconds,
            bind,
            dpop_jkt: _,
        } => (
            pb::LeaseKind::Jwt,
            audience.to_string(),
            scopes.iter().map(|s| s.to_string()).collect(),
            *bind,
            String::new(),
            *ttl_seconds,
        ),
        ApprovalRequest::Certificate {
            key_sha256,
            ttl_seconds,
        } => (
            pb::LeaseKind::X509,
            String::new(),
            Vec::new(),
            false,
            key_sha256.clone(),
            *ttl_seconds,
        ),
        ApprovalRequest::DatabaseLogin {
            database,
            scopes,
            ttl_seconds,
        } => (
            pb::LeaseKind::DatabaseLogin,
            database.to_string(),
            scopes.iter().map(|s| s.to_string()).collect(),
            false,
            String::new(),
            *ttl_seconds,
        ),
        ApprovalRequest::ToolCall { .. } => (
            pb::LeaseKind::Unspecified,
            String::new(),
            Vec::new(),
            false,
            String::new(),
            0,
        ),
    };
    let (tool, arguments_sha256) = match &a.request {
        ApprovalRequest::ToolCall {
            tool,
            arguments_sha256,
        } => (tool.to_string(), arguments_sha256.clone()),
        _ => (String::new(), String::new()),
    };
    let (decided_by, decided_at, reason) = match &a.status {
        ApprovalStatus::Pending => (String::new(), None, String::new()),
        ApprovalStatus::Approved { by, at, reason }
        | ApprovalStatus::Consumed { by, at, reason }
        | ApprovalStatus::Denied { by, at, reason } => (
            by.to_string(),
            Some(timestamp(*at)),
            reason.clone().unwrap_or_default(),
        ),
    };
    pb::Approval {
        approval_id: a.id.to_string(),
        agent_id: a.agent.to_string(),
        task_id: a.task_id.to_string(),
        task_intent: task
            .map(|t| t.intent.as_str().to_owned())
            .unwrap_or_default(),
        task_context: task
            .map(|t| t.context.entries().clone().into_iter().collect())
            .unwrap_or_default(),
        kind: kind.into(),
        audience,
        scopes,
        bind_to_client_cert: bind,
        dpop_jkt: match &a.request {
            ApprovalRequest::Token { dpop_jkt, .. } => dpop_jkt.clone().unwrap_or_default(),
            _ => String::new(),
        },
        tool,
        arguments_sha256,
        key_sha256,
        ttl_seconds,
        state: approval_state_to_proto(a.state_at(now)).into(),
        policy_id: a.policy_id.clone(),
        created_at: Some(timestamp(a.created_at)),
        expires_at: Some(timestamp(a.expires_at)),
        decided_by,
        decided_at,
        reason,
    }
}

/// A task as the API shows it, with its state at `now`.
pub fn task_to_proto(r: &TaskRecord, now: Timestamp) -> pb::Task {
    let t = &r.task;
    let state = r.state_at(now);
    let revocation = r.revocation();
    let ended_at = match (revocation, state) {
        (Some(rev), _) => Some(timestamp(rev.at)),
        (None, TaskState::Expired) => Some(timestamp(t.expires_at)),
        _ => None,
    };
    pb::Task {
        task_id: t.id.to_string(),
        agent_id: t.agent.to_string(),
        intent: t.intent.as_str().to_owned(),
        context: t.context.entries().clone().into_iter().collect(),
        envelope: Some(pb::Envelope {
            audiences: t
                .envelope
                .audiences()
                .iter()
                .map(|a| a.to_string())
                .collect(),
            scopes: t.envelope.scopes().iter().map(|s| s.to_string()).collect(),
        }),
        state: task_state_to_proto(state).into(),
        created_at: Some(timestamp(t.created_at)),
        expires_at: Some(timestamp(t.expires_at)),
        revocation_reason: revocation.map_or(0, |r| reason_to_proto(r.reason).into()),
        ended_at,
        parent_task_id: t
            .parent
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        delegated_by: t.delegated_by.iter().map(ToString::to_string).collect(),
    }
}

/// A lease as the API shows it, with its state at `now`.
pub fn lease_to_proto(l: &Lease, now: Timestamp) -> pb::Lease {
    let revocation = match &l.status {
        LeaseStatus::Revoked(r) => Some(r),
        _ => None,
    };
    pb::Lease {
        lease_id: l.id.to_string(),
        kind: l
            .kind()
            .map_or(pb::LeaseKind::Unspecified, lease_kind_to_proto)
            .into(),
        agent_id: l.agent.to_string(),
        task_id: l.task_id.to_string(),
        audience: l.audience().map(|a| a.to_string()).unwrap_or_default(),
        scopes: l.scopes.iter().map(|s| s.to_string()).collect(),
        issued_at: Some(timestamp(l.issued_at)),
        expires_at: Some(timestamp(l.expires_at)),
        state: lease_state_to_proto(l.state_at(now)).into(),
        revocation_reason: revocation.map_or(0, |r| reason_to_proto(r.reason).into()),
        revoked_at: revocation.map(|r| timestamp(r.at)),
        revoked_by: revocation.map(|r| r.by.to_string()).unwrap_or_default(),
        cert_thumbprint: l.cert_thumbprint().unwrap_or_default().to_owned(),
        serial: l.serial().unwrap_or_default().to_owned(),
    }
}
