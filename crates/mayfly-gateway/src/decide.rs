//! The broker's side of each call: the gateway asks `AuthorizeCall` (as
//! its own SVID, over mTLS) and forwards only what it allowed. A call
//! whose policy asks for an operator's approval is held open while the
//! gateway asks again, up to `approval_wait`; past that the agent is told
//! the approval's id, and the gateway remembers it for that exact call
//! (token, tool, arguments), so that the agent's plain retry uses it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::StatusCode;
use mayfly_client::{Client, ClientConfig};
use mayfly_core::{Arguments, Tool};
use mayfly_proto::v1 as pb;
use tonic::transport::Channel;

use crate::config::BrokerConfig;
use crate::refusal::{Refusal, code};

/// How often a held call asks whether its approval was decided.
const APPROVAL_POLL: Duration = Duration::from_millis(200);

/// Most pending approvals remembered for retries; beyond that an agent
/// retries with the id it was told.
const REMEMBERED: usize = 10_000;

/// How long a remembered approval is kept (an approval lives at most as
/// long as the broker's approval TTL, an hour by default).
const REMEMBER_FOR: Duration = Duration::from_secs(3600);

/// A call as far as approvals go: the token's lease, the tool, and the
/// arguments' SHA-256.
type CallKey = (String, String, String);

/// One tool call to decide.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The verified token's lease (`jti`).
    pub lease_id: &'a str,
    /// `<upstream>/<tool>`.
    pub tool: &'a Tool,
    /// Its arguments, parsed strictly.
    pub arguments: &'a Arguments,
    /// For an HTTP route: its method and template.
    pub route: Option<(&'a str, &'a str)>,
    /// An approval the agent names (`Mayfly-Approval`, or the MCP
    /// request's `_meta`).
    pub approval_id: Option<&'a str>,
}

/// A call the broker allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The decision's id, to report the call's outcome under.
    pub call_id: String,
    /// The policies that allowed it.
    pub policy_id: String,
    /// The approval it used.
    pub approval_id: Option<String>,
}

/// The decision half of the gateway.
#[derive(Debug)]
pub struct Decider {
    channel: Channel,
    client: pb::gateway_client::GatewayClient<Channel>,
    timeout: Duration,
    approval_wait: Duration,
    /// Pending approvals by (lease, tool, arguments' SHA-256).
    waiting: Mutex<HashMap<CallKey, (String, Instant)>>,
}

/// What one question to the broker gave.
enum Answer {
    Allowed(Allowed),
    /// An approval is pending: its id.
    Pending(String),
}

impl Decider {
    /// Connects to the broker as the gateway's SVID.
    pub async fn connect(broker: &BrokerConfig, approval_wait: Duration) -> Result<Self, String> {
        let config = ClientConfig::from_files(&broker.url, &broker.ca, &broker.cert, &broker.key)
            .map_err(|e| e.to_string())?;
        let client = Client::connect(&config)
            .await
            .map_err(|e| format!("cannot reach the broker at {}: {e}", broker.url))?;
        Ok(Self {
            channel: client.channel(),
            client: pb::gateway_client::GatewayClient::new(client.channel()),
            timeout: broker.timeout,
            approval_wait,
            waiting: Mutex::new(HashMap::new()),
        })
    }

    /// The connection to the broker (as the gateway).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Decides `call`: `Ok` to forward it, else what to tell the agent.
    pub async fn authorize(&self, call: Call<'_>) -> Result<Allowed, Refusal> {
        let key = (
            call.lease_id.to_owned(),
            call.tool.to_string(),
            call.arguments.sha256_hex(),
        );
        let remembered = match call.approval_id {
            Some(id) => Some(id.to_owned()),
            None => self.remembered(&key),
        };
        let answer = self.ask(&call, remembered.as_deref()).await;
        let pending = match answer {
            Ok(Answer::Allowed(a)) => {
                self.forget(&key);
                return Ok(a);
            }
            Ok(Answer::Pending(id)) => id,
            Err(r) => {
                if remembered.is_some() {
                    self.forget(&key);
                }
                return Err(r);
            }
        };
        let deadline = Instant::now() + self.approval_wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.remember(key, &pending);
                let mut r = Refusal::forbidden(
                    "approval_pending",
                    format!(
                        "{} needs an operator's approval ({pending}); retry the same call once \
                         it is granted",
                        call.tool
                    ),
                );
                r.rpc_code = code::APPROVAL_PENDING;
                r.approval_id = Some(pending);
                return Err(r);
            }
            tokio::time::sleep(APPROVAL_POLL.min(left)).await;
            match self.ask(&call, Some(&pending)).await {
                Ok(Answer::Allowed(a)) => {
                    self.forget(&key);
                    return Ok(a);
                }
                Ok(Answer::Pending(_)) => {}
                Err(r) => {
                    self.forget(&key);
                    return Err(r);
                }
            }
        }
    }

    /// Which of `tools` (names at `upstream`) the token `lease_id` may
    /// call at all.
    pub async fn callable(
        &self,
        lease_id: &str,
        upstream: &str,
        tools: Vec<String>,
    ) -> Result<Vec<String>, Refusal> {
        let mut req = tonic::Request::new(pb::ListCallableRequest {
            lease_id: lease_id.to_owned(),
            upstream: upstream.to_owned(),
            tools,
        });
        req.set_timeout(self.timeout);
        let mut client = self.client.clone();
        match client.list_callable(req).await {
            Ok(r) => Ok(r.into_inner().tools),
            Err(status) => Err(refusal_of(&status)),
        }
    }

    /// One `AuthorizeCall`.
    async fn ask(&self, call: &Call<'_>, approval_id: Option<&str>) -> Result<Answer, Refusal> {
        let (method, route) = call.route.unwrap_or(("", ""));
        let mut req = tonic::Request::new(pb::AuthorizeCallRequest {
            lease_id: call.lease_id.to_owned(),
            tool: call.tool.to_string(),
            arguments: call.arguments.canonical().to_owned(),
            method: method.to_owned(),
            route: route.to_owned(),
            approval_id: approval_id.unwrap_or_default().to_owned(),
        });
        req.set_timeout(self.timeout);
        let mut client = self.client.clone();
        match client.authorize_call(req).await {
            Ok(r) => {
                let d = r.into_inner();
                if d.allowed {
                    Ok(Answer::Allowed(Allowed {
                        call_id: d.call_id,
                        policy_id: d.policy_id,
                        approval_id: Some(d.approval_id).filter(|a| !a.is_empty()),
                    }))
                } else {
                    match d.approval {
                        Some(a) => Ok(Answer::Pending(a.approval_id)),
                        // Neither allowed nor waiting: not a decision to
                        // forward on.
                        None => Err(Refusal::forbidden(
                            "denied",
                            format!("the broker did not allow {}", call.tool),
                        )),
                    }
                }
            }
            Err(status) if is_pending(&status) => match approval_id {
                Some(id) => Ok(Answer::Pending(id.to_owned())),
                None => Err(refusal_of(&status)),
            },
            Err(status) => Err(refusal_of(&status)),
        }
    }

    fn remembered(&self, key: &CallKey) -> Option<String> {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting
            .get(key)
            .filter(|(_, at)| at.elapsed() < REMEMBER_FOR)
            .map(|(id, _)| id.clone())
    }

    fn remember(&self, key: CallKey, id: &str) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.len() >= REMEMBERED {
            waiting.retain(|_, (_, at)| at.elapsed() < REMEMBER_FOR);
        }
        if waiting.len() < REMEMBERED {
            waiting.insert(key, (id.to_owned(), Instant::now()));
        }
    }

    fn forget(&self, key: &CallKey) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.remove(key);
    }
}

/// Whether the broker said the approval presented is still pending.
fn is_pending(status: &tonic::Status) -> bool {
    let meta = |k: &str| status.metadata().get(k).and_then(|v| v.to_str().ok());
    meta("mayfly-error") == Some("approval_unusable")
        && meta("mayfly-approval-state") == Some("pending")
}

/// What the agent is told when the broker refused or could not be asked.
pub fn refusal_of(status: &tonic::Status) -> Refusal {
    let meta = |k: &str| {
        status
            .metadata()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let name = meta("mayfly-error").unwrap_or_default();
    let message = status.message();
    let mut r = match (name.as_str(), status.code()) {
        ("", tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)
        | ("unavailable" | "audit_unavailable" | "audit_broken", _) => Refusal::unavailable(
            "broker_unavailable",
            format!("the broker cannot decide this call now, so it is refused: {message}"),
        ),
        ("not_gateway" | "not_upstream", _) => Refusal::new(
            StatusCode::BAD_GATEWAY,
            &name,
            code::UNAVAILABLE,
            format!("the gateway is not set up at the broker for this upstream: {message}"),
        ),
        ("rate_limited", _) => {
            Refusal::new(StatusCode::TOO_MANY_REQUESTS, &name, code::REFUSED, message)
        }
        ("invalid", _) | ("", tonic::Code::InvalidArgument) => {
            Refusal::bad_request("invalid", code::INVALID_PARAMS, message)
        }
        ("", _) => Refusal::unavailable(
            "broker_error",
            format!("the broker's answer was not a decision: {message}"),
        ),
        (name, _) => Refusal::forbidden(name, message),
    };
    r.policy_id = meta("mayfly-policy-id");
    r.approval_id = meta("mayfly-approval-id");
    r
}
