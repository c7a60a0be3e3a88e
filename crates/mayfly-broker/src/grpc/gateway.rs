//! `mayfly.v1.Gateway`: gateways ask about tool calls.

use std::sync::Arc;

use mayfly_core::{ArgumentLimits, CallId, LeaseId, Timestamp, Tool};
use mayfly_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{approval_to_proto, caller};
use crate::error::BrokerError;
use crate::service::{CallOutcome, CallRequest, Service};

/// The Gateway API over the service.
#[derive(Debug, Clone)]
pub struct GatewayApi {
    svc: Arc<Service>,
}

impl GatewayApi {
    /// Wraps the service.
    pub fn new(svc: Arc<Service>) -> Self {
        Self { svc }
    }
}

#[tonic::async_trait]
impl pb::gateway_server::Gateway for GatewayApi {
    async fn authorize_call(
        &self,
        request: Request<pb::AuthorizeCallRequest>,
    ) -> Result<Response<pb::CallDecision>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let req = CallRequest::parse(
            &r.lease_id,
            &r.tool,
            &r.arguments,
            (&r.method, &r.route),
            &r.approval_id,
            &ArgumentLimits::default(),
        )?;
        let d = self.svc.calls().authorize(&caller, req).await?;
        Ok(Response::new(pb::CallDecision {
            allowed: d.allowed,
            policy_id: d.policy_id,
            arguments_sha256: d.arguments_sha256,
            approval_id: d.approval_id.map(|a| a.to_string()).unwrap_or_default(),
            approval: d
                .approval
                .map(|a| approval_to_proto(&a, None, Timestamp::now())),
            call_id: d.call_id.map(|c| c.to_string()).unwrap_or_default(),
        }))
    }

    async fn list_callable(
        &self,
        request: Request<pb::ListCallableRequest>,
    ) -> Result<Response<pb::ListCallableResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let lease_id = LeaseId::new(&r.lease_id)
            .map_err(|e| crate::error::BrokerError::invalid_field("lease_id", e))?;
        let tools = self
            .svc
            .calls()
            .callable(&caller, &lease_id, &r.upstream, &r.tools)
            .await?;
        Ok(Response::new(pb::ListCallableResponse { tools }))
    }

    async fn report_outcomes(
        &self,
        request: Request<pb::ReportOutcomesRequest>,
    ) -> Result<Response<pb::ReportOutcomesResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let outcomes = r
            .outcomes
            .iter()
            .map(outcome_of)
            .collect::<Result<Vec<_>, BrokerError>>()?;
        let recorded = self.svc.calls().report(&caller, outcomes).await?;
        Ok(Response::new(pb::ReportOutcomesResponse {
            recorded: u32::try_from(recorded).unwrap_or(u32::MAX),
        }))
    }
}

/// One reported outcome, checked.
fn outcome_of(o: &pb::CallOutcome) -> Result<CallOutcome, BrokerError> {
    let status = u16::try_from(o.status)
        .ok()
        .filter(|s| *s == 0 || (100..600).contains(s))
        .ok_or_else(|| {
            BrokerError::Invalid(format!("status {} is not an HTTP status", o.status))
        })?;
    Ok(CallOutcome {
        call_id: CallId::new(&o.call_id).map_err(|e| BrokerError::invalid_field("call_id", e))?,
        lease_id: LeaseId::new(&o.lease_id)
            .map_err(|e| BrokerError::invalid_field("lease_id", e))?,
        tool: Tool::parse(&o.tool).map_err(|e| BrokerError::invalid_field("tool", e))?,
        status,
        latency_us: o.latency_us,
        error: Some(o.error.clone()).filter(|e| !e.is_empty()),
    })
}
