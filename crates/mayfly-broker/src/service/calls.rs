//! Tool calls: a gateway asks about each call an agent makes with a task's
//! token, and is told to forward it or not. The broker checks that the
//! caller is a gateway fronting the tool's upstream, that the token's
//! lease is live and was issued for that upstream's audience, and that its
//! task is active; policy then decides on the tool and its arguments
//! (`Action::CallTool`), as the token's holder, with the token's scopes
//! and binding. The decision is in the trail before it is answered: an
//! allowed call whose record cannot be written is refused.

use mayfly_audit::Event;
use mayfly_core::{
    Action, ApprovalId, ApprovalRequest, ApprovalState, Arguments, Binding, CallId, Lease, LeaseId,
    LeaseKind, LeaseState, PolicyRequest, Route, TaskFacts, TaskRecord, Timestamp, Tool,
};

use super::shared::Gate;
use super::{CallDecision, CallOutcome, CallRequest, ServedRequest, ToolCalls};
use crate::config::ResourceServer;
use crate::error::BrokerError;
use crate::identity::Caller;

/// Most tools one list asks about.
const MAX_LISTED: usize = 1024;

/// Most outcomes one report holds.
pub const MAX_OUTCOMES: usize = 256;

/// Longest error an outcome carries.
const MAX_OUTCOME_ERROR: usize = 256;

impl ToolCalls {
    /// Decides `req`, asked by `caller`, and records the decision.
    pub async fn authorize(
        &self,
        caller: &Caller,
        req: CallRequest,
    ) -> Result<CallDecision, BrokerError> {
        let now = Timestamp::now();
        let (lease, task) = self
            .admit(caller, &req.lease_id, req.tool.upstream(), now)
            .await?;
        let shared = &self.shared;
        let task = &task.task;
        let principal = lease.holder();
        let denied = || {
            caller
                .record(Event::ToolCallDenied)
                .task(task)
                .lease(&lease.id)
                .tool_call(&req.tool, &req.arguments)
        };
        let binding = binding_of(&lease);
        let decision = shared.policy.decide(&PolicyRequest {
            principal,
            proof: &lease.authenticated_by,
            action: Action::CallTool {
                tool: &req.tool,
                arguments: &req.arguments,
                route: req
                    .route
                    .as_ref()
                    .map(|(method, template)| Route { method, template }),
                scopes: &lease.scopes,
                binding: &binding,
            },
            task: TaskFacts::of(task),
            ttl: now.until(lease.expires_at),
            now,
        });
        let permit = shared.permit_or_record(decision, denied).await?;
        let arguments_sha256 = req.arguments.sha256_hex();
        let request = ApprovalRequest::ToolCall {
            tool: req.tool.clone(),
            arguments_sha256: arguments_sha256.clone(),
        };
        let requested = caller
            .record(Event::ApprovalRequested)
            .task(task)
            .lease(&lease.id);
        let gate = shared
            .approval_gate(
                task,
                &permit,
                request,
                req.approval_id.as_ref(),
                requested,
                now,
            )
            .await;
        let used = match gate {
            Ok(Gate::Proceed(used)) => used,
            Ok(Gate::Pending(approval)) => {
                return Ok(CallDecision {
                    allowed: false,
                    policy_id: permit.policy_id,
                    arguments_sha256,
                    approval: Some(approval),
                    approval_id: None,
                    call_id: None,
                });
            }
            // An approval still pending decides nothing yet: the gateway
            // waiting on it asks again, and nothing is recorded until it
            // is decided.
            Err(
                e @ BrokerError::ApprovalUnusable {
                    state: ApprovalState::Pending,
                    ..
                },
            ) => return Err(e),
            // An approval given that cannot serve this call is a refusal
            // of the call.
            Err(e) if req.approval_id.is_some() => {
                return Err(shared.record_denial(e, denied()).await);
            }
            Err(e) => return Err(e),
        };
        let mut record = caller
            .record(Event::ToolCallAllowed)
            .task(task)
            .lease(&lease.id)
            .tool_call(&req.tool, &req.arguments)
            .decided("allow", Some(&permit.policy_id));
        record.approval_id = used.as_ref().map(ToString::to_string);
        let call_id = CallId::generate();
        record.call_id = Some(call_id.to_string());
        // The call goes ahead only once its decision is in the trail.
        shared.recorder.record(record).await?;
        tracing::info!(
            target: "mayfly::decision",
            event = "tool_call_allowed",
            gateway = %caller.id,
            agent = %principal,
            task_id = %task.id,
            lease_id = %lease.id,
            tool = %req.tool,
            policy = %permit.policy_id,
        );
        Ok(CallDecision {
            allowed: true,
            policy_id: permit.policy_id,
            arguments_sha256,
            approval: None,
            approval_id: used,
            call_id: Some(call_id),
        })
    }

    /// Records what became of calls `caller` forwarded: each under its
    /// lease's task. The whole report is refused if `caller` is not a
    /// gateway, fronts not a tool's upstream, or names a lease the broker
    /// does not know.
    pub async fn report(
        &self,
        caller: &Caller,
        outcomes: Vec<CallOutcome>,
    ) -> Result<usize, BrokerError> {
        if outcomes.len() > MAX_OUTCOMES {
            return Err(BrokerError::Invalid(format!(
                "outcomes: at most {MAX_OUTCOMES} in one report"
            )));
        }
        let gateway = self.gateway(caller)?;
        let mut records = Vec::with_capacity(outcomes.len());
        for o in &outcomes {
            if !gateway.upstreams.contains_key(o.tool.upstream()) {
                return Err(BrokerError::NotUpstream {
                    gateway: caller.id.clone(),
                    upstream: o.tool.upstream().to_owned(),
                });
            }
            let lease = self
                .shared
                .store
                .get_lease(&o.lease_id)
                .await?
                .ok_or_else(|| BrokerError::LeaseNotFound(o.lease_id.clone()))?;
            let mut record = caller.record(Event::ToolCallOutcome).lease(&lease.id);
            record.agent = Some(lease.agent.to_string());
            record.task_id = Some(lease.task_id.to_string());
            record.tool = Some(o.tool.to_string());
            record.call_id = Some(o.call_id.to_string());
            record.status = Some(o.status);
            record.latency_us = Some(o.latency_us);
            record.reason = o.error.as_ref().map(|e| {
                let mut e = e.clone();
                if e.len() > MAX_OUTCOME_ERROR {
                    let mut cut = MAX_OUTCOME_ERROR;
                    while !e.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    e.truncate(cut);
                }
                e
            });
            records.push(record);
        }
        let n = records.len();
        let recorder = &self.shared.recorder;
        futures_util::future::try_join_all(records.into_iter().map(|r| recorder.record(r))).await?;
        Ok(n)
    }

    /// Records the requests a validating service (`caller`) served with
    /// tokens it received: each under its lease's task. The whole report
    /// is refused if one names a lease the broker does not know, or one
    /// `caller` is not a recipient of (`[[resource_servers]]`).
    pub async fn served(
        &self,
        caller: &Caller,
        requests: Vec<ServedRequest>,
    ) -> Result<usize, BrokerError> {
        if requests.len() > MAX_OUTCOMES {
            return Err(BrokerError::Invalid(format!(
                "requests: at most {MAX_OUTCOMES} in one report"
            )));
        }
        let mut records = Vec::with_capacity(requests.len());
        for r in &requests {
            let lease = self
                .shared
                .store
                .get_lease(&r.lease_id)
                .await?
                .ok_or_else(|| BrokerError::LeaseNotFound(r.lease_id.clone()))?;
            let audience = lease
                .audience()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default();
            if ResourceServer::find(&self.shared.resource_servers, &caller.id, &audience).is_none()
            {
                return Err(BrokerError::NotReporter {
                    caller: caller.id.clone(),
                    audience,
                });
            }
            let mut record = caller.record(Event::RequestServed).lease(&lease.id);
            record.agent = Some(lease.agent.to_string());
            record.task_id = Some(lease.task_id.to_string());
            record.method = Some(r.method.clone());
            record.route = Some(r.route.clone());
            record.status = Some(r.status);
            record.latency_us = Some(r.latency_us);
            record.decision = Some(
                if r.refused_because.is_some() {
                    "refused"
                } else {
                    "accepted"
                }
                .to_owned(),
            );
            record.reason.clone_from(&r.refused_because);
            records.push(record);
        }
        let n = records.len();
        let recorder = &self.shared.recorder;
        futures_util::future::try_join_all(records.into_iter().map(|r| recorder.record(r))).await?;
        Ok(n)
    }

    /// The gateway `caller` is, proven by its certificate.
    fn gateway(&self, caller: &Caller) -> Result<&crate::config::Gateway, BrokerError> {
        self.gateways
            .iter()
            .find(|g| g.id == caller.id && caller.cert_thumbprint().is_some())
            .ok_or_else(|| BrokerError::NotGateway(caller.id.clone()))
    }

    /// Which of `tools` (names at `upstream`) the token `lease_id` may
    /// call with some arguments, in the order given.
    pub async fn callable(
        &self,
        caller: &Caller,
        lease_id: &LeaseId,
        upstream: &str,
        tools: &[String],
    ) -> Result<Vec<String>, BrokerError> {
        if tools.len() > MAX_LISTED {
            return Err(BrokerError::Invalid(format!(
                "tools: at most {MAX_LISTED} in one list"
            )));
        }
        let now = Timestamp::now();
        let (lease, task) = self.admit(caller, lease_id, upstream, now).await?;
        let binding = binding_of(&lease);
        let mut out = Vec::new();
        for name in tools {
            let tool =
                Tool::new(upstream, name).map_err(|e| BrokerError::invalid_field("tools", e))?;
            let decision = self.shared.policy.decide(&PolicyRequest {
                principal: lease.holder(),
                proof: &lease.authenticated_by,
                action: Action::MayCallTool {
                    tool: &tool,
                    scopes: &lease.scopes,
                    binding: &binding,
                },
                task: TaskFacts::of(&task.task),
                ttl: now.until(lease.expires_at),
                now,
            });
            if matches!(decision, mayfly_core::Decision::Permit { .. }) {
                out.push(name.clone());
            }
        }
        Ok(out)
    }

    /// The checks every gateway question passes first: `caller` is a
    /// gateway (by its certificate) fronting `upstream`, and `lease_id` is
    /// a live token for that upstream's audience under an active task.
    async fn admit(
        &self,
        caller: &Caller,
        lease_id: &LeaseId,
        upstream: &str,
        now: Timestamp,
    ) -> Result<(Lease, TaskRecord), BrokerError> {
        // A gateway proves itself with its certificate, never a token.
        let gateway = self.gateway(caller)?;
        let audience = gateway
            .upstreams
            .get(upstream)
            .ok_or_else(|| BrokerError::NotUpstream {
                gateway: caller.id.clone(),
                upstream: upstream.to_owned(),
            })?;
        let lease = self
            .shared
            .store
            .get_lease(lease_id)
            .await?
            .ok_or_else(|| BrokerError::LeaseNotFound(lease_id.clone()))?;
        let state = lease.state_at(now);
        if state != LeaseState::Active {
            return Err(BrokerError::LeaseNotActive {
                id: lease.id.clone(),
                state,
            });
        }
        if lease.kind() != Some(LeaseKind::Jwt) || lease.audience() != Some(audience) {
            return Err(BrokerError::Invalid(format!(
                "lease {} is not a token for {audience}, the audience of upstream {upstream}",
                lease.id
            )));
        }
        let task = self
            .shared
            .active_task(&lease.agent, &lease.task_id, now)
            .await?;
        Ok((lease, task))
    }
}

/// A tool call as the gateway reports it, parsed.
impl CallRequest {
    /// The call from the wire's fields: the lease id, `<upstream>/<tool>`,
    /// the arguments' JSON, an HTTP route (method and template, both or
    /// neither), and an approval id (empty for none).
    pub fn parse(
        lease_id: &str,
        tool: &str,
        arguments: &str,
        (method, route): (&str, &str),
        approval_id: &str,
        limits: &mayfly_core::ArgumentLimits,
    ) -> Result<Self, BrokerError> {
        let lease_id =
            LeaseId::new(lease_id).map_err(|e| BrokerError::invalid_field("lease_id", e))?;
        let tool = Tool::parse(tool).map_err(|e| BrokerError::invalid_field("tool", e))?;
        let arguments = Arguments::parse(arguments, limits)
            .map_err(|e| BrokerError::invalid_field("arguments", e))?;
        let route = match (method, route) {
            ("", "") => None,
            (m, r) if is_method(m) && r.starts_with('/') && !r.chars().any(char::is_control) => {
                Some((m.to_owned(), r.to_owned()))
            }
            _ => {
                return Err(BrokerError::Invalid(
                    "method and route: an HTTP method (GET, POST, …) and a route template \
                     starting with '/', both or neither"
                        .into(),
                ));
            }
        };
        let approval_id = match approval_id {
            "" => None,
            id => Some(
                ApprovalId::new(id).map_err(|e| BrokerError::invalid_field("approval_id", e))?,
            ),
        };
        Ok(Self {
            lease_id,
            tool,
            arguments,
            route,
            approval_id,
        })
    }
}

/// What the token of `lease` is bound to, as policy sees it.
fn binding_of(lease: &Lease) -> Binding {
    lease.binding().cloned().unwrap_or(Binding::Bearer)
}

fn is_method(m: &str) -> bool {
    !m.is_empty() && m.len() <= 16 && m.bytes().all(|b| b.is_ascii_uppercase())
}
