//! The upstream's own credential, which the agent never holds: an OAuth
//! client's token fetched and kept by the gateway, and a Mayfly token for
//! the upstream's audience exchanged for the agent's at the broker.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use common::{API, Bench, Extra, GATEWAY, TOOLS, send};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mayfly_broker::config::ResourceServerConfig;
use mayfly_core::SpiffeIdPattern;
use serde_json::{Value, json};

const CLIENT_ID: &str = "gateway ledger";
const SECRET: &str = "s3cr=t:with&odd chars";

/// An OAuth 2.0 authorization server's token endpoint, as RFC 6749 §4.4
/// (client credentials), §2.3.1 (HTTP Basic, the id and the secret
/// form-encoded) and §5.1/§5.2 (the answers) define it: written here from
/// the RFC, since no such server runs in the test environment.
struct TokenEndpoint {
    addr: std::net::SocketAddr,
    issued: Arc<AtomicUsize>,
    tokens: Arc<Mutex<Vec<String>>>,
}

async fn token_endpoint() -> TokenEndpoint {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let issued = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let (n, list) = (issued.clone(), tokens.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (n, list) = (n.clone(), list.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (n, list) = (n.clone(), list.clone());
                    async move {
                        let expected = format!(
                            "Basic {}",
                            STANDARD.encode(format!(
                                "{}:{}",
                                form_urlencoded::byte_serialize(CLIENT_ID.as_bytes())
                                    .collect::<String>(),
                                form_urlencoded::byte_serialize(SECRET.as_bytes())
                                    .collect::<String>()
                            ))
                        );
                        let authorized = req.method() == http::Method::POST
                            && req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                == Some(expected.as_str());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let form: Vec<(String, String)> = form_urlencoded::parse(&body)
                            .map(|(k, v)| (k.into_owned(), v.into_owned()))
                            .collect();
                        let grant = form
                            .iter()
                            .any(|(k, v)| k == "grant_type" && v == "client_credentials");
                        let (status, answer) = if !authorized {
                            (StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}))
                        } else if !grant {
                            (
                                StatusCode::BAD_REQUEST,
                                json!({"error": "unsupported_grant_type"}),
                            )
                        } else {
                            let i = n.fetch_add(1, Ordering::SeqCst);
                            let token = format!("ledger-token-{i}");
                            list.lock().unwrap().push(token.clone());
                            (
                                StatusCode::OK,
                                json!({"access_token": token, "token_type": "Bearer", "expires_in": 3600}),
                            )
                        };
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .header("cache-control", "no-store")
                                .body(Full::new(Bytes::from(answer.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    TokenEndpoint {
        addr,
        issued,
        tokens,
    }
}

fn get(url: &str, token: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())
        .unwrap()
}

/// The upstreams `ledger` (an OAuth client's token) and `reports` (an
/// exchanged token), both HTTP APIs in front of the bench's plain
/// upstream, and the broker set up for them.
fn extra(token_url: &str, secret_file: &str) -> Extra {
    Extra {
        top_toml: String::new(),
        gateway_toml: format!(
            r#"
[[upstreams]]
name = "ledger"
protocol = "http"
path = "/ledger"
audience = "{API}"
url = "http://PLAIN"
credential = {{ kind = "oauth_client", token_url = "{token_url}", client_id = "{CLIENT_ID}", secret_file = "{secret_file}", scopes = ["ledger:read"] }}

[[upstreams.routes]]
method = "GET"
path = "/v1/balance/{{account}}"
tool = "balance"

[[upstreams]]
name = "reports"
protocol = "http"
path = "/reports"
audience = "{API}"
url = "http://PLAIN"
credential = {{ kind = "exchange", audience = "{TOOLS}", scopes = ["read:billing"] }}

[[upstreams.routes]]
method = "GET"
path = "/v1/reports/{{id}}"
tool = "report"
"#
        ),
        broker: Box::new(|c| {
            let g = c.gateways.last_mut().unwrap();
            g.upstreams.insert("ledger".into(), API.into());
            g.upstreams.insert("reports".into(), API.into());
            // The gateway receives agents' tokens for the API, so it may
            // exchange them (RFC 8693).
            c.resource_servers.push(ResourceServerConfig {
                name: "gateway".into(),
                clients: vec![SpiffeIdPattern::new(GATEWAY).unwrap()],
                audiences: vec![API.into()],
            });
        }),
    }
}

fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tokens_are_fetched_or_exchanged_by_the_gateway_alone() {
    let endpoint = token_endpoint().await;
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("ledger.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let bench = Bench::start_with(
        "0s",
        extra(
            &format!("http://{}/token", endpoint.addr),
            secret_file.to_str().unwrap(),
        ),
    )
    .await;
    let url = bench.url();
    let (task, token) = bench.task_token(API).await;
    let t = token.token.as_str();
    let mut agent_saw = String::new();

    // OAuth: one token, fetched once, kept for the calls after.
    for account in ["acc-1", "acc-2"] {
        let (status, headers, body) =
            send(get(&format!("{url}/ledger/v1/balance/{account}"), t)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        agent_saw.push_str(&format!("{headers:?} {body}"));
    }
    assert_eq!(endpoint.issued.load(Ordering::SeqCst), 1);
    let ledger_token = endpoint.tokens.lock().unwrap()[0].clone();
    let seen = bench.plain.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(
            s.headers["authorization"],
            format!("Bearer {ledger_token}").as_str()
        );
    }

    // Exchange: a Mayfly token for the tools audience, of the same task,
    // naming the gateway as the actor, kept for the agent token's calls.
    for id in ["r-1", "r-2"] {
        let (status, headers, body) = send(get(&format!("{url}/reports/v1/reports/{id}"), t)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        agent_saw.push_str(&format!("{headers:?} {body}"));
    }
    let seen = bench.plain.seen();
    assert_eq!(seen.len(), 4);
    let exchanged = seen[2].headers["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(seen[3].headers["authorization"], exchanged.as_str());
    let exchanged = exchanged.strip_prefix("Bearer ").unwrap();
    assert_ne!(exchanged, t);
    let c = claims(exchanged);
    assert_eq!(c["aud"], TOOLS);
    assert_eq!(c["task_id"], task.as_str());
    assert_eq!(c["act"]["sub"], GATEWAY);
    assert_eq!(c["scope"], "read:billing");
    assert!(
        c.get("cnf").is_none(),
        "the upstream cannot check a binding: {c}"
    );

    // The agent saw neither upstream credential, and the agent's own
    // token never went upstream.
    assert!(!agent_saw.contains(&ledger_token));
    assert!(!agent_saw.contains(exchanged));
    assert!(!bench.plain.everything().contains(t));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upstream_credential_stops_the_call() {
    let endpoint = token_endpoint().await;
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("ledger.secret");
    std::fs::write(&secret_file, "not-the-secret").unwrap();
    let bench = Bench::start_with(
        "0s",
        extra(
            &format!("http://{}/token", endpoint.addr),
            secret_file.to_str().unwrap(),
        ),
    )
    .await;
    let (_, token) = bench.task_token(API).await;
    let (status, _, body) = send(get(
        &format!("{}/ledger/v1/balance/acc-1", bench.url()),
        &token.token,
    ))
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["mayfly_error"], "upstream_credential_refused");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("invalid_client")
    );
    assert!(!body.contains("not-the-secret"));
    assert_eq!(endpoint.issued.load(Ordering::SeqCst), 0);
    assert!(bench.plain.seen().is_empty());
}
