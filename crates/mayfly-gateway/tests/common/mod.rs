//! The gateway's test bench: a broker (in process, over real mTLS) with
//! the billing tools and their policies, the gateway in front of two
//! upstreams that record everything they are sent (an MCP server that
//! speaks JSON-RPC over Streamable HTTP, and an HTTP API that demands an
//! API key), and an agent holding a task's token.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mayfly_broker::config::GatewayConfig as BrokerGateway;
use mayfly_client::{Client, pb};
use mayfly_core::SpiffeId;
use mayfly_gateway::{GatewayConfig, Running};
use mayfly_testkit::TestBroker;
use serde_json::{Value, json};

pub const GATEWAY: &str = "spiffe://example.org/gateway/billing";
/// The dev policies let the agent have tokens for these.
pub const TOOLS: &str = "https://tools.example.com";
pub const API: &str = "https://api.example.com";
/// The API key only the gateway holds.
pub const API_KEY: &str = "sk-live-4f1c9e0d2b7a";

pub const TOOLS_TOML: &str = r#"
[billing.read_invoice]
invoice_id = "string"

[billing.pay_invoice]
invoice_id = "string"
amount = "decimal"

[billing.delete_records]

[payments.pay]
id = "string"
amount = "decimal"

[ledger.balance]
account = "string"

[reports.report]
id = "string"
"#;

pub const TOOLS_CEDAR: &str = r#"
@id("t-reads")
permit (principal in Mayfly::Path::"spiffe://example.org/agent",
        action == Mayfly::Action::"billing/read_invoice", resource);

@id("t-small-payments")
permit (principal in Mayfly::Path::"spiffe://example.org/agent",
        action in [Mayfly::Action::"billing/pay_invoice", Mayfly::Action::"payments/pay"], resource)
when { context.arguments.amount.lessThanOrEqual(decimal("100.0")) };

@id("t-large-payments")
@approval("required")
permit (principal in Mayfly::Path::"spiffe://example.org/agent",
        action == Mayfly::Action::"billing/pay_invoice", resource)
when { context.arguments.amount.greaterThan(decimal("100.0")) };

@id("t-ledger-and-reports")
permit (principal in Mayfly::Path::"spiffe://example.org/agent",
        action in [Mayfly::Action::"ledger/balance", Mayfly::Action::"reports/report"], resource);

// The gateway may exchange an agent's token for the API for one for the
// tools, for the reports upstream.
@id("t-gateway-exchange")
permit (principal == Mayfly::Agent::"spiffe://example.org/gateway/billing",
        action == Mayfly::Action::"exchange_token",
        resource == Mayfly::Audience::"https://tools.example.com")
when { context.resource_server == "gateway" };

@id("t-no-deletes")
forbid (principal, action == Mayfly::Action::"billing/delete_records", resource);
"#;

/// What an upstream was sent.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: String,
}

/// An upstream that records every request.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Every request it saw, as one text (for grepping).
    pub fn everything(&self) -> String {
        self.seen()
            .iter()
            .map(|s| format!("{} {} {:?} {}", s.method, s.uri, s.headers, s.body))
            .collect()
    }
}

type Answer = fn(&Seen) -> Response<Full<Bytes>>;

async fn serve(answer: Answer) -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let s = Seen {
                            method: parts.method,
                            uri: parts.uri.to_string(),
                            headers: parts.headers,
                            body: String::from_utf8_lossy(&body).into_owned(),
                        };
                        log.lock().unwrap().push(s.clone());
                        Ok::<_, std::convert::Infallible>(answer(&s))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Upstream { addr, seen }
}

fn json_answer(
    status: StatusCode,
    body: &Value,
    headers: &[(&str, &str)],
) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

/// A minimal MCP server (Streamable HTTP, JSON responses; tools/list
/// answered as an SSE stream, as servers may).
fn mcp_answer(s: &Seen) -> Response<Full<Bytes>> {
    let msg: Value = serde_json::from_str(&s.body).unwrap_or(Value::Null);
    let id = msg["id"].clone();
    match msg["method"].as_str() {
        Some("initialize") => json_answer(
            StatusCode::OK,
            &json!({"jsonrpc":"2.0","id":id,"result":{
                "protocolVersion":"2025-11-25","capabilities":{"tools":{}},
                "serverInfo":{"name":"billing","version":"1"}}}),
            &[("mcp-session-id", "session-1")],
        ),
        Some("tools/list") => {
            let tools = json!({"jsonrpc":"2.0","id":id,"result":{"tools":[
                {"name":"read_invoice","inputSchema":{"type":"object"}},
                {"name":"pay_invoice","inputSchema":{"type":"object"}},
                {"name":"delete_records","inputSchema":{"type":"object"}},
                {"name":"odd name","inputSchema":{"type":"object"}}]}});
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Full::new(Bytes::from(format!(
                    "event: message\ndata: {tools}\n\n"
                ))))
                .unwrap()
        }
        Some("tools/call") => json_answer(
            StatusCode::OK,
            &json!({"jsonrpc":"2.0","id":id,"result":{"content":[
                {"type":"text","text":format!("did {}", msg["params"]["name"])}]}}),
            &[],
        ),
        Some(_) if id.is_null() => Response::builder()
            .status(StatusCode::ACCEPTED)
            .body(Full::default())
            .unwrap(),
        _ => json_answer(
            StatusCode::OK,
            &json!({"jsonrpc":"2.0","id":id,"result":{}}),
            &[],
        ),
    }
}

/// An HTTP API that serves only requests carrying its key.
fn api_answer(s: &Seen) -> Response<Full<Bytes>> {
    if s.headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(API_KEY) {
        return json_answer(StatusCode::UNAUTHORIZED, &json!({"error":"bad key"}), &[]);
    }
    json_answer(
        StatusCode::OK,
        &json!({"paid": true, "path": s.uri, "body": s.body}),
        &[],
    )
}

/// An HTTP API that answers every request 200 (what it requires is
/// checked by the test, on what it saw).
fn plain_answer(s: &Seen) -> Response<Full<Bytes>> {
    json_answer(StatusCode::OK, &json!({"path": s.uri}), &[])
}

/// What a test adds to the bench: more of the gateway's configuration
/// (`PLAIN` in it stands for the address of the bench's plain upstream),
/// and a change to the broker's.
pub struct Extra {
    /// Top-level keys of the gateway's configuration.
    pub top_toml: String,
    pub gateway_toml: String,
    pub broker: Box<dyn FnOnce(&mut mayfly_broker::config::Config) + Send>,
}

impl Default for Extra {
    fn default() -> Self {
        Self {
            top_toml: String::new(),
            gateway_toml: String::new(),
            broker: Box::new(|_| {}),
        }
    }
}

/// Everything a gateway test needs.
pub struct Bench {
    pub broker: TestBroker,
    pub gateway: Option<Running>,
    pub mcp: Upstream,
    pub api: Upstream,
    /// Answers everything; for the tests' own upstreams.
    pub plain: Upstream,
    pub agent: Client,
    pub operator: Client,
    pub dir: tempfile::TempDir,
}

impl Bench {
    /// The bench with the gateway holding calls up to `approval_wait`
    /// for an approval.
    pub async fn start(approval_wait: &str) -> Self {
        Self::start_with(approval_wait, Extra::default()).await
    }

    /// The bench with `extra`.
    pub async fn start_with(approval_wait: &str, extra: Extra) -> Self {
        let broker = TestBroker::start_with(|c| {
            std::fs::write(c.policy.dir.join("tools.toml"), TOOLS_TOML).unwrap();
            std::fs::write(c.policy.dir.join("tools.cedar"), TOOLS_CEDAR).unwrap();
            c.gateways.push(BrokerGateway {
                id: SpiffeId::new(GATEWAY).unwrap(),
                upstreams: [
                    ("billing".to_owned(), TOOLS.to_owned()),
                    ("payments".to_owned(), API.to_owned()),
                ]
                .into(),
            });
            (extra.broker)(c);
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let svid = broker
            .ca()
            .issue_svid(&SpiffeId::new(GATEWAY).unwrap(), Duration::from_secs(3600))
            .unwrap();
        std::fs::write(dir.path().join("svid.pem"), &svid.cert_pem).unwrap();
        std::fs::write(dir.path().join("svid.key"), svid.key_pem.as_bytes()).unwrap();
        std::fs::write(dir.path().join("bundle.pem"), broker.bundle_pem()).unwrap();
        std::fs::write(dir.path().join("api.key"), format!("{API_KEY}\n")).unwrap();
        let mcp = serve(mcp_answer).await;
        let api = serve(api_answer).await;
        let plain = serve(plain_answer).await;
        let mut toml = format!(
            r#"
approval_wait = "{approval_wait}"
{top}

[listen]
addr = "127.0.0.1:0"

[broker]
url = "{broker_url}"
issuer = "{issuer}"
ca = "bundle.pem"
cert = "svid.pem"
key = "svid.key"

[[upstreams]]
name = "billing"
protocol = "mcp"
path = "/billing/mcp"
audience = "{TOOLS}"
url = "http://{mcp}/mcp"

[[upstreams]]
name = "payments"
protocol = "http"
path = "/payments"
audience = "{API}"
url = "http://{api}/"
credential = {{ kind = "header", name = "X-Api-Key", file = "api.key" }}

[[upstreams.routes]]
method = "POST"
path = "/v1/payments/{{id}}"
tool = "pay"
"#,
            broker_url = broker.url(),
            issuer = broker.issuer(),
            mcp = mcp.addr,
            api = api.addr,
            top = extra.top_toml,
        );
        toml.push_str(&extra.gateway_toml.replace("PLAIN", &plain.addr.to_string()));
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        let config = GatewayConfig::load(&path).unwrap();
        let gateway = mayfly_gateway::start(config).await.unwrap();
        let agent = broker.agent().await;
        let operator = broker.operator().await;
        Self {
            broker,
            gateway: Some(gateway),
            mcp,
            api,
            plain,
            agent,
            operator,
            dir,
        }
    }

    /// `http://127.0.0.1:PORT` of the gateway.
    pub fn url(&self) -> String {
        format!("http://{}", self.gateway.as_ref().unwrap().addr)
    }

    /// A task of the agent with a bearer token for `audience`: the task
    /// id and the token.
    pub async fn task_token(&self, audience: &str) -> (String, pb::IssuedToken) {
        let task = self
            .agent
            .broker()
            .start_task(pb::StartTaskRequest {
                intent: "pay this month's invoices".into(),
                audiences: vec![TOOLS.into(), API.into()],
                scopes: vec!["read:billing".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let token = self
            .agent
            .broker()
            .issue_token(pb::IssueTokenRequest {
                task_id: task.task_id.clone(),
                audience: audience.into(),
                scopes: vec!["read:billing".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        (task.task_id, token)
    }
}

/// An HTTP client to the gateway.
pub fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `req`, giving the status, headers and body.
pub async fn send(req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, String) {
    let resp = client().request(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// A JSON-RPC POST to the MCP upstream with `token`.
pub fn rpc(url: &str, token: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(format!("{url}/billing/mcp"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// A `tools/call` message.
pub fn call(id: u64, tool: &str, arguments: Value) -> String {
    json!({"jsonrpc":"2.0","id":id,"method":"tools/call",
           "params":{"name":tool,"arguments":arguments}})
    .to_string()
}

/// The JSON-RPC message of a body (the first data of an SSE stream).
pub fn message(body: &str) -> Value {
    let text = body
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or(body);
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The broker's audit trail, record by record, as an operator reads it.
pub async fn audit_trail(op: &Client) -> Vec<Value> {
    let mut stream = op
        .admin()
        .read_audit(pb::ReadAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut records = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        for line in batch.records {
            records.push(serde_json::from_str(&line).unwrap());
        }
    }
    records
}

/// The trail's records of `event`, once there are `n` (outcomes are
/// reported after the call).
pub async fn records_of(op: &Client, event: &str, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let found: Vec<Value> = audit_trail(op)
            .await
            .into_iter()
            .filter(|r| r["event"] == event)
            .collect();
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("fewer than {n} {event} records");
}
