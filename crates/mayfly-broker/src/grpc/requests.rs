//! `mayfly.v1.Requests`: services that validate tokens report the
//! requests the tokens came with.

use std::sync::Arc;

use mayfly_core::LeaseId;
use mayfly_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::caller;
use crate::error::BrokerError;
use crate::service::{ServedRequest, Service};

/// Longest method, route or reason a report carries.
const MAX_FIELD: usize = 512;

/// The Requests API over the service.
#[derive(Debug, Clone)]
pub struct RequestsApi {
    svc: Arc<Service>,
}

impl RequestsApi {
    /// Wraps the service.
    pub fn new(svc: Arc<Service>) -> Self {
        Self { svc }
    }
}

#[tonic::async_trait]
impl pb::requests_server::Requests for RequestsApi {
    async fn report_requests(
        &self,
        request: Request<pb::ReportRequestsRequest>,
    ) -> Result<Response<pb::ReportRequestsResponse>, Status> {
        let caller = caller(&request)?;
        let served = request
            .into_inner()
            .requests
            .iter()
            .map(served_of)
            .collect::<Result<Vec<_>, BrokerError>>()?;
        let recorded = self.svc.calls().served(&caller, served).await?;
        Ok(Response::new(pb::ReportRequestsResponse {
            recorded: u32::try_from(recorded).unwrap_or(u32::MAX),
        }))
    }
}

/// One report, checked: plain text of bounded length, a real status.
fn served_of(r: &pb::ServedRequest) -> Result<ServedRequest, BrokerError> {
    let text = |name: &str, v: &str| {
        if v.len() > MAX_FIELD || v.chars().any(char::is_control) {
            Err(BrokerError::Invalid(format!(
                "{name}: at most {MAX_FIELD} bytes of plain text"
            )))
        } else {
            Ok(v.to_owned())
        }
    };
    let status = u16::try_from(r.status)
        .ok()
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| {
            BrokerError::Invalid(format!("status {} is not an HTTP status", r.status))
        })?;
    if r.accepted != r.refused_because.is_empty() {
        return Err(BrokerError::Invalid(
            "refused_because: set exactly when the token was not accepted".into(),
        ));
    }
    Ok(ServedRequest {
        lease_id: LeaseId::new(&r.lease_id)
            .map_err(|e| BrokerError::invalid_field("lease_id", e))?,
        method: text("method", &r.method)?,
        route: text("route", &r.route)?,
        refused_because: Some(text("refused_because", &r.refused_because)?)
            .filter(|s| !s.is_empty()),
        status,
        latency_us: r.latency_us,
    })
}
