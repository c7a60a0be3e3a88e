//! One request through the gateway: find the upstream by path, verify
//! the agent's token for its audience, read and check the request, have
//! the broker decide the tool call, and forward what was decided with
//! the upstream's own credential in place of the agent's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use mayfly_verify::layer::{Scheme, credentials, unauthorized, unauthorized_dpop};
use mayfly_verify::{DpopRequest, VerifiedToken, Verifier, VerifyError};
use serde_json::Value;

use crate::config::Protocol;
use crate::credential::UpstreamCredential;
use crate::decide::{Allowed, Call, Decider};
use crate::mcp::{self, Kind};
use crate::refusal::{Refusal, code, json_response};
use crate::report::Reporter;
use crate::route::Routes;
use crate::sessions::{self, Sessions};
use crate::tls::HttpClient;

/// Errors of a streamed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every answer.
pub type Body = BoxBody<Bytes, BoxError>;

/// The header an agent names an approval in.
pub const APPROVAL_HEADER: &str = "mayfly-approval";

/// Most bytes of an upstream's `tools/list` answer the gateway reads to
/// filter it.
const MAX_LIST: usize = 8 * 1024 * 1024;

/// Headers that belong to one connection (RFC 9110 §7.6.1), never
/// forwarded either way.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// One upstream, ready to serve.
pub struct Upstream {
    /// Its name.
    pub name: String,
    /// What it speaks.
    pub protocol: Protocol,
    /// Its path on the gateway.
    pub path: String,
    /// Where requests go.
    pub url: Uri,
    /// Checks agents' tokens for its audience.
    pub verifier: Verifier,
    /// What the gateway presents to it.
    pub credential: UpstreamCredential,
    /// The client to it.
    pub http: HttpClient,
    /// How long it may take.
    pub timeout: Duration,
    /// For HTTP: its routes.
    pub routes: Option<Routes>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("url", &self.url)
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

/// Everything a request needs.
#[derive(Debug)]
pub struct State {
    /// The origin agents address.
    pub public_url: String,
    /// Most bytes of a request body.
    pub max_body: usize,
    /// The upstreams.
    pub upstreams: Vec<Upstream>,
    /// The broker.
    pub decider: Decider,
    /// Where outcomes go.
    pub reporter: Reporter,
    /// MCP sessions and the tasks that opened them.
    pub sessions: Sessions,
    /// The page where an approval is decided (`{id}` for its id).
    pub approval_url: Option<String>,
}

/// A verified agent request.
struct Agent {
    token: String,
    verified: VerifiedToken,
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

fn boxed(resp: Response<Full<Bytes>>) -> Response<Body> {
    resp.map(|b| b.map_err(|e| match e {}).boxed())
}

fn from_string(resp: Response<String>) -> Response<Body> {
    resp.map(full)
}

impl State {
    fn upstream(&self, path: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| match u.protocol {
            Protocol::Mcp => path == u.path,
            Protocol::Http => path
                .strip_prefix(u.path.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
        })
    }
}

/// Answers one request.
pub fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: Option<Arc<Vec<u8>>>,
    ambiguous: bool,
) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
    if ambiguous {
        // A request on this connection framed its body two ways, or
        // folded a header (RFC 9112 §6.3, §5.2): servers disagree on such
        // requests, so none of the connection's go on.
        let r = Refusal::bad_request(
            "ambiguous_request",
            code::INVALID_REQUEST,
            "a request on this connection has both Content-Length and Transfer-Encoding, \
             or a header folded over lines",
        );
        return Box::pin(std::future::ready(boxed(r.problem())));
    }
    Box::pin(answer_request(state, req, peer))
}

async fn answer_request(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: Option<Arc<Vec<u8>>>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let Some(up) = state.upstream(&path) else {
        return boxed(
            Refusal::new(
                StatusCode::NOT_FOUND,
                "no_upstream",
                code::INVALID_REQUEST,
                format!("no upstream at {path}"),
            )
            .problem(),
        );
    };
    let agent = match verify(&state, up, &req, peer.as_deref().map(Vec::as_slice)).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let result = match up.protocol {
        Protocol::Mcp => mcp_request(&state, up, req, &agent).await,
        Protocol::Http => api_request(&state, up, req, &agent).await,
    };
    match result {
        Ok(resp) => resp,
        Err(r) => boxed(r.problem()),
    }
}

/// Verifies the token of `req` for `up`'s audience: the agent, or the
/// 401 (503 when the gateway cannot verify now) to send.
async fn verify(
    state: &State,
    up: &Upstream,
    req: &Request<Incoming>,
    peer: Option<&[u8]>,
) -> Result<Agent, Response<Body>> {
    let Some((scheme, token)) = credentials(req) else {
        return Err(from_string(unauthorized(None)));
    };
    let verified = match scheme {
        Scheme::Bearer => up.verifier.verify(token, peer).await,
        Scheme::Dpop => {
            let mut proofs = req.headers().get_all("dpop").iter();
            let proof = match (proofs.next().map(HeaderValue::to_str), proofs.next()) {
                (Some(Ok(p)), None) => p,
                _ => "",
            };
            let url = format!("{}{}", state.public_url, req.uri().path());
            let request = DpopRequest {
                proof,
                method: req.method().as_str(),
                url: &url,
            };
            up.verifier.verify_dpop(token, request, peer).await
        }
    };
    match verified {
        Ok(verified) => Ok(Agent {
            token: token.to_owned(),
            verified,
        }),
        Err(e) => {
            tracing::info!(upstream = %up.name, error = %e, "refused a token");
            let dpop = scheme == Scheme::Dpop || e == VerifyError::DpopRequired;
            Err(from_string(if dpop {
                unauthorized_dpop(&e)
            } else {
                unauthorized(Some(&e))
            }))
        }
    }
}

/// The request's body, at most `max` bytes.
async fn read_body(body: Incoming, max: usize) -> Result<Bytes, Refusal> {
    match Limited::new(body, max).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            code::INVALID_REQUEST,
            format!("the body is over {max} bytes"),
        )),
        Err(e) => Err(Refusal::bad_request(
            "invalid_request",
            code::INVALID_REQUEST,
            format!("the body could not be read: {e}"),
        )),
    }
}

/// The approval an agent names in the `Mayfly-Approval` header.
fn approval_header(parts: &Parts) -> Result<Option<String>, Refusal> {
    let mut values = parts.headers.get_all(APPROVAL_HEADER).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(v), None) => v.to_str().map(|s| Some(s.to_owned())).map_err(|_| {
            Refusal::bad_request(
                "invalid_request",
                code::INVALID_REQUEST,
                "bad Mayfly-Approval",
            )
        }),
        _ => Err(Refusal::bad_request(
            "invalid_request",
            code::INVALID_REQUEST,
            "Mayfly-Approval given twice",
        )),
    }
}

/// An MCP request.
async fn mcp_request(
    state: &State,
    up: &Upstream,
    req: Request<Incoming>,
    agent: &Agent,
) -> Result<Response<Body>, Refusal> {
    let (parts, body) = req.into_parts();
    let session = session_of(&parts)?;
    let task = agent.verified.task_id.as_str();
    if let Some(id) = &session
        && let Err(r) = state.sessions.check(&up.name, id, task)
    {
        let mut resp = r.rpc_response(&Value::Null);
        *resp.status_mut() = r.status;
        return Ok(boxed(resp));
    }
    match parts.method {
        Method::POST => {}
        // The server's stream: nothing to decide.
        Method::GET => return forward(up, &parts, None, up.url.clone(), agent).await,
        // The end of a session.
        Method::DELETE => {
            let resp = forward(up, &parts, None, up.url.clone(), agent).await?;
            if let Some(id) = &session
                && resp.status().is_success()
            {
                state.sessions.forget(&up.name, id);
            }
            return Ok(resp);
        }
        _ => {
            return Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                code::INVALID_REQUEST,
                "an MCP endpoint takes POST, GET and DELETE",
            ));
        }
    }
    let bytes = read_body(body, state.max_body).await?;
    let message = match mcp::read(&bytes, &up.name, state.max_body) {
        Ok(m) => m,
        Err(r) => {
            let mut resp = r.rpc_response(&mcp::id_of(&bytes));
            *resp.status_mut() = r.status;
            return Ok(boxed(resp));
        }
    };
    let body = Bytes::from(message.body);
    match message.kind {
        Kind::CallTool {
            id,
            tool,
            arguments,
            approval_id,
        } => {
            let approval_id = match approval_id {
                Some(a) => Some(a),
                None => approval_header(&parts)?,
            };
            let call = Call {
                lease_id: agent.verified.lease_id.as_str(),
                tool: &tool,
                arguments: &arguments,
                route: None,
                approval_id: approval_id.as_deref(),
            };
            let allowed = match decide(state, up, agent, call).await {
                Ok(a) => a,
                Err(mut r) => {
                    // A client that takes URL elicitations is pointed at
                    // the page where the approval is decided.
                    if let (Some(url), Some(approval), Some(sid)) =
                        (&state.approval_url, &r.approval_id, &session)
                        && r.error == "approval_pending"
                        && state.sessions.url_elicitation(&up.name, sid)
                    {
                        r.elicitation_url = Some(url.replace("{id}", approval));
                        r.rpc_code = code::URL_ELICITATION_REQUIRED;
                    }
                    return Ok(boxed(r.rpc_response(&id)));
                }
            };
            let target = up.url.clone();
            forward_decided(
                state,
                up,
                &parts,
                Some(body),
                target,
                agent,
                &allowed,
                &tool,
            )
            .await
        }
        Kind::ListTools { id } => {
            let resp = forward(up, &parts, Some(body), up.url.clone(), agent).await?;
            Ok(filter_list(state, up, agent, resp, &id).await)
        }
        Kind::Initialize { url_elicitation } => {
            let resp = forward(up, &parts, Some(body), up.url.clone(), agent).await?;
            if let Some(id) = resp
                .headers()
                .get(sessions::HEADER)
                .and_then(|v| v.to_str().ok())
            {
                state.sessions.bind(&up.name, id, task, url_elicitation);
            }
            Ok(resp)
        }
        Kind::Other => forward(up, &parts, Some(body), up.url.clone(), agent).await,
    }
}

/// The MCP session a request names, if one.
fn session_of(parts: &Parts) -> Result<Option<String>, Refusal> {
    let mut values = parts.headers.get_all(sessions::HEADER).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(v), None) => v.to_str().map(|s| Some(s.to_owned())).map_err(|_| {
            Refusal::bad_request(
                "invalid_request",
                code::INVALID_REQUEST,
                "bad Mcp-Session-Id",
            )
        }),
        _ => Err(Refusal::bad_request(
            "invalid_request",
            code::INVALID_REQUEST,
            "Mcp-Session-Id given twice",
        )),
    }
}

/// A `tools/list` answer with only the tools the token may call; a list
/// that cannot be filtered is not shown.
async fn filter_list(
    state: &State,
    up: &Upstream,
    agent: &Agent,
    resp: Response<Body>,
    id: &Value,
) -> Response<Body> {
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"));
    let (mut parts, body) = resp.into_parts();
    let refused = |r: Refusal| boxed(r.rpc_response(id));
    // The whole answer, within the upstream's time: a stream left open
    // after the list is not waited on for ever.
    let collected = tokio::time::timeout(up.timeout, collect_at_most(body, MAX_LIST))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "not complete within {}",
                humantime::format_duration(up.timeout)
            ))
        });
    let bytes = match collected {
        Ok(b) => b,
        Err(e) => {
            return refused(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "upstream_invalid",
                code::UNAVAILABLE,
                format!("upstream {}'s tool list could not be read: {e}", up.name),
            ));
        }
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return refused(Refusal::new(
            StatusCode::BAD_GATEWAY,
            "upstream_invalid",
            code::UNAVAILABLE,
            format!("upstream {}'s tool list is not UTF-8", up.name),
        ));
    };
    let out = if sse {
        let mut events = mcp::parse_events(text);
        for event in &mut events {
            let Some(mut message) = event
                .data()
                .and_then(|d| serde_json::from_str::<Value>(&d).ok())
            else {
                continue;
            };
            if let Some(names) = mcp::listed_tools(&message, id) {
                match callable(state, up, agent, names).await {
                    Ok(keep) => mcp::keep_tools(&mut message, &keep),
                    Err(r) => return refused(r),
                }
                event.set_data(&message.to_string());
            }
        }
        mcp::write_events(&events)
    } else {
        let Ok(mut message) = serde_json::from_str::<Value>(text) else {
            return refused(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "upstream_invalid",
                code::UNAVAILABLE,
                format!("upstream {}'s tool list is not JSON", up.name),
            ));
        };
        if let Some(names) = mcp::listed_tools(&message, id) {
            match callable(state, up, agent, names).await {
                Ok(keep) => mcp::keep_tools(&mut message, &keep),
                Err(r) => return refused(r),
            }
        }
        message.to_string()
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, full(out))
}

/// All of `body`, if it is at most `max` bytes.
async fn collect_at_most(mut body: Body, max: usize) -> Result<Bytes, String> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(format!("over {max} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// Which of `names` the token may call; names that are not plain tool
/// names can never be called through the gateway and are left out.
async fn callable(
    state: &State,
    up: &Upstream,
    agent: &Agent,
    names: Vec<String>,
) -> Result<Vec<String>, Refusal> {
    let plain: Vec<String> = names
        .into_iter()
        .filter(|n| mayfly_core::Tool::new(&up.name, n).is_ok())
        .collect();
    if plain.is_empty() {
        return Ok(plain);
    }
    state
        .decider
        .callable(agent.verified.lease_id.as_str(), &up.name, plain)
        .await
}

/// An HTTP API request.
async fn api_request(
    state: &State,
    up: &Upstream,
    req: Request<Incoming>,
    agent: &Agent,
) -> Result<Response<Body>, Refusal> {
    let (parts, body) = req.into_parts();
    let Some(routes) = &up.routes else {
        return Err(Refusal::forbidden(
            "no_route",
            "this upstream has no routes",
        ));
    };
    let rest = parts.uri.path()[up.path.len()..].to_owned();
    let bytes = read_body(body, state.max_body).await?;
    let matched = routes.matched(&parts.method, &rest, parts.uri.query(), &bytes)?;
    let approval_id = approval_header(&parts)?;
    let call = Call {
        lease_id: agent.verified.lease_id.as_str(),
        tool: &matched.route.tool,
        arguments: &matched.arguments,
        route: Some((matched.route.method.as_str(), &matched.route.template)),
        approval_id: approval_id.as_deref(),
    };
    let allowed = decide(state, up, agent, call).await?;
    let base = up.url.to_string();
    let mut target = format!("{}{rest}", base.trim_end_matches('/'));
    if let Some(q) = &matched.query {
        target.push('?');
        target.push_str(q);
    }
    let target: Uri = target.parse().map_err(|_| {
        Refusal::bad_request(
            "invalid_path",
            code::INVALID_REQUEST,
            "the path is not a URI",
        )
    })?;
    let body = matched.body.map(Bytes::from);
    forward_decided(
        state,
        up,
        &parts,
        body,
        target,
        agent,
        &allowed,
        &matched.route.tool,
    )
    .await
}

/// Asks the broker about `call`, counting the decision.
async fn decide(
    state: &State,
    up: &Upstream,
    agent: &Agent,
    call: Call<'_>,
) -> Result<Allowed, Refusal> {
    let decided = state.decider.authorize(call).await;
    let metrics = state.reporter.metrics();
    match &decided {
        Ok(_) => metrics.call(&up.name, true),
        Err(r) => {
            metrics.call(&up.name, false);
            tracing::info!(
                upstream = %up.name,
                tool = %call.tool,
                lease_id = %agent.verified.lease_id,
                error = %r.error,
                "refused a tool call"
            );
        }
    }
    decided
}

/// Forwards an allowed call, and reports its outcome.
#[allow(clippy::too_many_arguments)]
async fn forward_decided(
    state: &State,
    up: &Upstream,
    parts: &Parts,
    body: Option<Bytes>,
    target: Uri,
    agent: &Agent,
    allowed: &Allowed,
    tool: &mayfly_core::Tool,
) -> Result<Response<Body>, Refusal> {
    let started = Instant::now();
    let result = forward(up, parts, body, target, agent).await;
    let (status, error) = match &result {
        Ok(resp) => (u32::from(resp.status().as_u16()), String::new()),
        Err(r) => {
            state.reporter.metrics().upstream_error(&up.name);
            (0, r.error.clone())
        }
    };
    state.reporter.report(mayfly_proto::v1::CallOutcome {
        call_id: allowed.call_id.clone(),
        lease_id: agent.verified.lease_id.to_string(),
        tool: tool.to_string(),
        status,
        latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        error,
    });
    result
}

/// The headers an agent's request goes on with: its own, less the
/// connection's, the agent's credentials and anything the gateway sets.
fn forwarded_headers(from: &HeaderMap, credential: &UpstreamCredential) -> HeaderMap {
    let named_by_connection: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in from {
        let n = name.as_str();
        let dropped = HOP_BY_HOP.contains(&n)
            || named_by_connection.iter().any(|c| c == n)
            || *name == header::HOST
            || *name == header::AUTHORIZATION
            || *name == header::CONTENT_LENGTH
            || n == "dpop"
            || n == APPROVAL_HEADER
            || credential.header_name() == Some(name);
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The upstream's answer, less the connection's headers.
fn answer(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    let named: Vec<HeaderName> = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
        .collect();
    for n in named {
        parts.headers.remove(n);
    }
    for h in HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    Response::from_parts(parts, body.map_err(|e| -> BoxError { Box::new(e) }).boxed())
}

/// Sends the decided request to `target` at `up`.
async fn forward(
    up: &Upstream,
    parts: &Parts,
    body: Option<Bytes>,
    target: Uri,
    agent: &Agent,
) -> Result<Response<Body>, Refusal> {
    let mut headers = forwarded_headers(&parts.headers, &up.credential);
    if let Some((name, value)) = up
        .credential
        .header(&agent.token, agent.verified.lease_id.as_str())
        .await?
    {
        headers.insert(name, value);
    }
    if body.is_some() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let mut req = Request::new(Full::new(body.unwrap_or_default()));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = target;
    *req.headers_mut() = headers;
    let started = Instant::now();
    let sent = tokio::time::timeout(up.timeout, up.http.request(req)).await;
    let resp = match sent {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            tracing::warn!(upstream = %up.name, error = %e, "upstream unreachable");
            return Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                code::UNAVAILABLE,
                format!("upstream {} could not be reached", up.name),
            ));
        }
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                code::UNAVAILABLE,
                format!(
                    "upstream {} did not answer in {}",
                    up.name,
                    humantime::format_duration(up.timeout)
                ),
            ));
        }
    };
    tracing::debug!(
        upstream = %up.name,
        lease_id = %agent.verified.lease_id,
        status = resp.status().as_u16(),
        latency_us = started.elapsed().as_micros() as u64,
        "forwarded"
    );
    Ok(answer(resp))
}

/// A plain JSON answer (for the gateway's own endpoints).
pub fn json(status: StatusCode, body: &Value) -> Response<Body> {
    boxed(json_response(status, "application/json", body))
}
