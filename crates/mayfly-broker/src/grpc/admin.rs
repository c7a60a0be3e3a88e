//! `mayfly.v1.Admin`: the operators' API. Every RPC first checks that the
//! caller is an operator.

use std::sync::Arc;

use mayfly_core::{Approval, ApprovalId, LeaseId, SpiffeId, TaskId, Timestamp};
use mayfly_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{
    approval_to_proto, caller, field, lease_kind_from_proto, lease_state_from_proto,
    lease_to_proto, task_state_from_proto, task_to_proto,
};
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::service::{Service, parse_note};
use crate::store::{LeaseFilter, PageRequest, TaskFilter};

/// Default and largest page sizes.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

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
        self.svc.require_operator(&caller)?;
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

fn optional<T, E: std::fmt::Display>(
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

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
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
        let lease = self.svc.get_lease(&id).await?;
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
            .revoke_lease(&op, &id, parse_note(&r.note)?)
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
        let revoked = self.svc.revoke_task(&op, &id, parse_note(&r.note)?).await?;
        Ok(Response::new(revoke_response(revoked)))
    }

    async fn revoke_agent(
        &self,
        request: Request<pb::RevokeAgentRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let op = self.operator(&request)?;
        let r = request.get_ref();
        let agent = field("agent_id", &r.agent_id, SpiffeId::new)?;
        let revoked = self
            .svc
            .revoke_agent(&op, &agent, parse_note(&r.note)?)
            .await?;
        Ok(Response::new(revoke_response(revoked)))
    }

    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        self.operator(&request)?;
        let r = request.into_inner();
        let page = self
            .svc
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
        let task = self.svc.get_task(&a.task_id).await.ok();
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
            .decide_approval(&op, &id, approve, parse_note(&r.reason)?)
            .await?;
        Ok(Response::new(self.with_task(&approval).await))
    }
}

fn revoke_response(revoked: Vec<LeaseId>) -> pb::RevokeResponse {
    pb::RevokeResponse {
        revoked_leases: revoked.iter().map(|l| l.to_string()).collect(),
    }
}
