//! `mayfly.v1.Admin`: the operators' API. Every RPC first checks that the
//! caller is an operator.

use std::sync::Arc;
use std::time::Duration;

use mayfly_core::{
    AgentLock, Approval, ApprovalId, LeaseId, MAX_LOCK_REASON_BYTES, SpiffeId, TaskId, Timestamp,
};
use mayfly_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    approval_to_proto, caller, field, lease_kind_from_proto, lease_state_from_proto,
    lease_to_proto, task_state_from_proto, task_to_proto, timestamp,
};
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::service::{Service, parse_note, requested_ttl};
use crate::store::{LeaseFilter, PageRequest, TaskFilter};

use mayfly_core::limits::{
    DEFAULT_PAGE_SIZE as DEFAULT_PAGE, MAX_AUDIT_CURSOR_BYTES, MAX_AUDIT_LAST,
    MAX_PAGE_SIZE as MAX_PAGE,
};
/// Most audit records in one streamed batch.
const AUDIT_BATCH: usize = 500;
/// How often a following reader looks for new audit records.
const AUDIT_POLL: Duration = Duration::from_millis(200);

/// The Admin service over [`Service`].
#[derive(Debug, Clone)]
pub struct AdminApi {
    svc: Arc<Service>,
}

impl AdminApi {
    /// Wraps the service.
    pub fn new(svc: Arc<Service>) -> Self {
        Self { svc }
    }

    fn operator<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let caller = caller(request)?;
        self.svc.admin().require_operator(&caller)?;
        Ok(caller)
    }
}

fn page(size: u32, token: &str) -> Result<PageRequest, BrokerError> {
    if size > MAX_PAGE {
        return Err(BrokerError::Invalid(format!(
            "page_size {size} exceeds {MAX_PAGE}"
        )));
    }
    let after = if token.is_empty() {
        None
    } else {
        // Page tokens are the last id of the previous page.
        Some(field("page_token", token, LeaseId::new)?.to_string())
    };
    Ok(PageRequest {
        after,
        limit: if size == 0 { DEFAULT_PAGE } else { size } as usize,
    })
}

fn optional<T, E: std::error::Error + Send + Sync + 'static>(
    name: &str,
    value: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<Option<T>, BrokerError> {
    if value.is_empty() {
        Ok(None)
    } else {
        field(name, value, parse).map(Some)
    }
}

/// Streams the trail: `first` (read already, and sent even when empty so
/// the reader has a cursor), then what follows it, until the end or, when
/// following, until the reader goes.
async fn stream_audit(
    svc: Arc<Service>,
    first: (Vec<String>, String),
    follow: bool,
    out: mpsc::Sender<Result<pb::AuditBatch, Status>>,
) {
    let (mut records, mut cursor) = first;
    let mut sent_any = false;
    loop {
        if records.is_empty() && sent_any {
            if !follow {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(AUDIT_POLL) => {}
                () = out.closed() => return,
            }
        } else {
            let batch = pb::AuditBatch {
                records,
                cursor: cursor.clone(),
            };
            if out.send(Ok(batch)).await.is_err() {
                return;
            }
            sent_any = true;
        }
        match svc.recorder().read(&cursor, AUDIT_BATCH).await {
            Ok((next, at)) => (records, cursor) = (next, at),
            Err(e) => {
                let _ = out.send(Err(BrokerError::from(e).into())).await;
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    type ReadAuditStream = ReceiverStream<Result<pb::AuditBatch, Status>>;

    async fn read_audit(
        &self,
        request: Request<pb::ReadAuditRequest>,
    ) -> Result<Response<Self::ReadAuditStream>, Status> {
        let op = self.operator(&request)?;
        let r = request.into_inner();
        if r.after_cursor.len() > MAX_AUDIT_CURSOR_BYTES {
            return Err(BrokerError::Invalid(format!(
                "after_cursor is {} bytes; a cursor is at most {MAX_AUDIT_CURSOR_BYTES}",
                r.after_cursor.len()
            ))
            .into());
        }
        if r.last.is_some_and(|n| n > MAX_AUDIT_LAST) {
            return Err(BrokerError::Invalid(format!(
                "last must be at most {MAX_AUDIT_LAST}; read the whole trail by leaving it unset"
            ))
            .into());
        }
        let cursor = match (r.after_cursor.is_empty(), r.last) {
            (false, Some(_)) => {
                return Err(
                    BrokerError::Invalid("give after_cursor or last, not both".into()).into(),
                );
            }
            (false, None) => r.after_cursor,
            (true, Some(n)) => self
                .svc
                .recorder()
                .cursor_before_last(n as usize)
                .await
                .map_err(BrokerError::from)?,
            (true, None) => String::new(),
        };
        // The first read answers for the sink (off, stdout, a bad cursor)
        // before the stream opens.
        let first = self
            .svc
            .recorder()
            .read(&cursor, AUDIT_BATCH)
            .await
            .map_err(BrokerError::from)?;
        tracing::debug!(operator = %op.id, follow = r.follow, "audit reader connected");
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(stream_audit(self.svc.clone(), first, r.follow, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_leases(
        &self,
        request: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        self.operator(&request)?;
        let r = request.into_inner();
        let filter = LeaseFilter {
            task: optional("task_id", &r.task_id, TaskId::new)?,
            agent: optional("agent_id", &r.agent_id, SpiffeId::new)?,
            state: lease_state_from_proto(r.state)?,
            kind: lease_kind_from_proto(r.kind)?,
        };
        let page = self
            .svc
            .admin()
            .list_leases(&filter, &page(r.page_size, &r.page_token)?)
            .await?;
        let now = Timestamp::now();
        Ok(Response::new(pb::ListLeasesResponse {
            leases: page.items.iter().map(|l| lease_to_proto(l, now)).collect(),
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn get_lease(
        &self,
        request: Request<pb::GetLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        self.operator(&request)?;
        let id = field("lease_id", &request.get_ref().lease_id, LeaseId::new)?;
        let lease = self.svc.admin().get_lease(&id).await?;
        Ok(Response::new(lease_to_proto(&lease, Timestamp::now())))
    }

    async fn revoke_lease(
        &self,
        request: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let op = self.operator(&request)?;
        let r = request.get_ref();
        let id = field("lease_id", &r.lease_id, LeaseId::new)?;
        let revoked = self
            .svc
            .admin()
            .revoke_lease(&op, &id, parse_note("note", &r.note)?)
            .await?;
        Ok(Response::new(revoke_response(revoked)))
    }

    async fn revoke_task(
        &self,
        request: Request<pb::RevokeTaskRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let op = self.operator(&request)?;
        let r = request.get_ref();
        let id = field("task_id", &r.task_id, TaskId::new)?;
        let revoked = self
            .svc
            .admin()
            .revoke_task(&op, &id, parse_note("note", &r.note)?)
            .await?;
        Ok(Response::new(revoke_response(revoked)))
    }

    async fn revoke_agent(
        &self,
        request: Request<pb::RevokeAgentRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let op = self.operator(&request)?;
        let r = request.get_ref();
        let agent = agent_field(&r.agent_id)?;
        let revoked = self
            .svc
            .admin()
            .revoke_agent(&op, &agent, parse_note("note", &r.note)?)
            .await?;
        Ok(Response::new(revoke_response(revoked)))
    }

    async fn lock_agent(
        &self,
        request: Request<pb::LockAgentRequest>,
    ) -> Result<Response<pb::LockAgentResponse>, Status> {
        let op = self.operator(&request)?;
        let r = request.get_ref();
        let agent = agent_field(&r.agent_id)?;
        let reason = parse_note("reason", &r.reason)?.ok_or_else(|| {
            BrokerError::Invalid(format!(
                "reason is required: say why the agent is locked (at most {MAX_LOCK_REASON_BYTES} bytes)"
            ))
        })?;
        let ttl = requested_ttl("ttl_seconds", r.ttl_seconds)?;
        let (lock, revoked) = self
            .svc
            .admin()
            .lock_agent(&op, &agent, reason, ttl)
            .await?;
        Ok(Response::new(pb::LockAgentResponse {
            lock: Some(lock_to_proto(&lock)),
            revoked_leases: revoked.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn unlock_agent(
        &self,
        request: Request<pb::UnlockAgentRequest>,
    ) -> Result<Response<pb::AgentLock>, Status> {
        let op = self.operator(&request)?;
        let r = request.get_ref();
        let agent = agent_field(&r.agent_id)?;
        let lock = self
            .svc
            .admin()
            .unlock_agent(&op, &agent, parse_note("note", &r.note)?)
            .await?;
        Ok(Response::new(lock_to_proto(&lock)))
    }

    async fn list_agent_locks(
        &self,
        request: Request<pb::ListAgentLocksRequest>,
    ) -> Result<Response<pb::ListAgentLocksResponse>, Status> {
        self.operator(&request)?;
        let locks = self.svc.admin().list_locks().await?;
        Ok(Response::new(pb::ListAgentLocksResponse {
            locks: locks.iter().map(lock_to_proto).collect(),
        }))
    }

    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        self.operator(&request)?;
        let r = request.into_inner();
        let page = self
            .svc
            .approvals()
            .list_approvals(r.all, &page(r.page_size, &r.page_token)?)
            .await?;
        let mut approvals = Vec::with_capacity(page.items.len());
        for a in &page.items {
            approvals.push(self.with_task(a).await);
        }
        Ok(Response::new(pb::ListApprovalsResponse {
            approvals,
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn approve(
        &self,
        request: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        self.decide(request, true).await
    }

    async fn deny(
        &self,
        request: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        self.decide(request, false).await
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        self.operator(&request)?;
        let r = request.into_inner();
        let filter = TaskFilter {
            agent: optional("agent_id", &r.agent_id, SpiffeId::new)?,
            state: task_state_from_proto(r.state)?,
            parent: optional("parent_task_id", &r.parent_task_id, TaskId::new)?,
        };
        let page = self
            .svc
            .admin()
            .list_tasks(&filter, &page(r.page_size, &r.page_token)?)
            .await?;
        let now = Timestamp::now();
        Ok(Response::new(pb::ListTasksResponse {
            tasks: page.items.iter().map(|t| task_to_proto(t, now)).collect(),
            next_page_token: page.next.unwrap_or_default(),
        }))
    }
}

impl AdminApi {
    /// An approval with its task's intent and context, for operators.
    async fn with_task(&self, a: &Approval) -> pb::Approval {
        let task = self.svc.admin().get_task(&a.task_id).await.ok();
        approval_to_proto(a, task.as_ref().map(|r| &r.task), Timestamp::now())
    }

    async fn decide(
        &self,
        request: Request<pb::DecideApprovalRequest>,
        approve: bool,
    ) -> Result<Response<pb::Approval>, Status> {
        let op = self.operator(&request)?;
        let r = request.get_ref();
        let id = field("approval_id", &r.approval_id, ApprovalId::new)?;
        let approval = self
            .svc
            .approvals()
            .decide_approval(&op, &id, approve, parse_note("reason", &r.reason)?)
            .await?;
        Ok(Response::new(self.with_task(&approval).await))
    }
}

/// An agent an operator acts on: an exact SPIFFE ID, never a task
/// certificate's.
fn agent_field(value: &str) -> Result<SpiffeId, BrokerError> {
    let agent = field("agent_id", value, SpiffeId::new)?;
    if agent.is_task_bound() {
        return Err(BrokerError::Invalid(format!(
            "agent_id: {agent} is a task certificate's identity, not an agent (task \
             certificates are never callers; revoke the task or its lease instead)"
        )));
    }
    Ok(agent)
}

fn lock_to_proto(l: &AgentLock) -> pb::AgentLock {
    pb::AgentLock {
        agent_id: l.agent.to_string(),
        reason: l.reason.clone(),
        locked_by: l.by.to_string(),
        locked_at: Some(timestamp(l.at)),
        expires_at: l.expires_at.map(timestamp),
    }
}

fn revoke_response(revoked: Vec<LeaseId>) -> pb::RevokeResponse {
    pb::RevokeResponse {
        revoked_leases: revoked.iter().map(|l| l.to_string()).collect(),
    }
}
