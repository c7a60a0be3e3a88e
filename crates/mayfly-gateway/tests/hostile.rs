//! What must never reach an upstream: hostile requests, tokens where they
//! do not belong, calls after the task ended, calls while the broker is
//! down. Each is refused with a clear error, and the upstream sees
//! nothing. And the HTTP API: its key stays with the gateway.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{API, API_KEY, Bench, TOOLS, call, message, rpc, send};
use http::{Request, StatusCode};
use http_body_util::Full;
use mayfly_client::pb;
use mayfly_testkit::DpopKey;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `raw` bytes to the gateway, giving what it answered.
async fn raw(bench: &Bench, raw: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(bench.gateway.as_ref().unwrap().addr)
        .await
        .unwrap();
    tcp.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_never_reach_the_upstream() {
    let bench = Bench::start("0s").await;
    let url = bench.url();
    let (_, token) = bench.task_token(TOOLS).await;
    let t = token.token.as_str();
    let refused = |body: &str| {
        let m = message(body);
        assert!(m["error"].is_object(), "not refused: {body}");
        m["error"].clone()
    };

    // Arguments over the size limit, nested past the depth limit, a
    // nesting bomb, the same key twice.
    let big = call(
        1,
        "pay_invoice",
        json!({"invoice_id": "x".repeat(70_000), "amount": 1}),
    );
    let (status, _, body) = send(rpc(&url, t, &big)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let e = refused(&body);
    assert_eq!(e["code"], -32602);
    assert!(
        e["message"].as_str().unwrap().contains("over the limit"),
        "{e}"
    );
    let mut deep = json!(1);
    for _ in 0..9 {
        deep = json!([deep]);
    }
    let (_, _, body) = send(rpc(
        &url,
        t,
        &call(2, "read_invoice", json!({"invoice_id": deep})),
    ))
    .await;
    assert!(
        refused(&body)["message"]
            .as_str()
            .unwrap()
            .contains("deeper")
    );
    let bomb = format!(
        r#"{{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{{"name":"read_invoice","arguments":{{"a":{}1{}}}}}}}"#,
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let (status, _, body) = send(rpc(&url, t, &bomb)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        refused(&body)["message"]
            .as_str()
            .unwrap()
            .contains("deeper")
    );
    let dup = r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"pay_invoice","arguments":{"invoice_id":"i","amount":1,"amount":5000}}}"#;
    let (_, _, body) = send(rpc(&url, t, dup)).await;
    assert!(
        refused(&body)["message"]
            .as_str()
            .unwrap()
            .contains("amount")
    );
    // A batch, and a tool name that is not a plain identifier.
    let batch = format!("[{}]", call(5, "read_invoice", json!({"invoice_id": "i"})));
    let (_, _, body) = send(rpc(&url, t, &batch)).await;
    assert_eq!(refused(&body)["code"], -32600);
    for name in [
        "../read_invoice",
        "read_invoice\n",
        "read invoice",
        "billing/read_invoice",
    ] {
        let (_, _, body) = send(rpc(&url, t, &call(6, name, json!({})))).await;
        assert_eq!(
            refused(&body)["data"]["mayfly_error"],
            "invalid_tool",
            "{name:?}"
        );
    }
    // A body over the gateway's limit is not read to the end.
    let (status, _, _) = send(rpc(&url, t, &" ".repeat(2 * 1024 * 1024))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // A token for another audience; none; a forged one.
    let (_, api_token) = bench.task_token(API).await;
    let (status, headers, _) = send(rpc(
        &url,
        &api_token.token,
        &call(7, "read_invoice", json!({})),
    ))
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("another audience")
    );
    let mut no_token = rpc(&url, t, &call(8, "read_invoice", json!({})));
    no_token.headers_mut().remove("authorization");
    assert_eq!(send(no_token).await.0, StatusCode::UNAUTHORIZED);
    let forged = format!("{}x", &t[..t.len() - 1]);
    assert_eq!(
        send(rpc(&url, &forged, &call(9, "read_invoice", json!({}))))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    // Both Content-Length and Transfer-Encoding.
    let smuggle = call(10, "read_invoice", json!({"invoice_id": "i"}));
    let answer = raw(
        &bench,
        &format!(
            "POST /billing/mcp HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggle}\r\n0\r\n\r\n",
            smuggle.len(),
            smuggle.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A header folded over two lines (obsolete line folding), which some
    // parsers join and others split.
    let answer = raw(
        &bench,
        &format!(
            "POST /billing/mcp HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n\
             X-Note: a\r\n Mcp-Session-Id: stolen\r\nContent-Length: {}\r\n\r\n{smuggle}",
            smuggle.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    assert!(
        bench.mcp.seen().is_empty(),
        "the upstream saw: {}",
        bench.mcp.everything()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpop_proof_must_be_for_this_request() {
    let bench = Bench::start("0s").await;
    let url = bench.url();
    let key = DpopKey::new();
    let (task, _) = bench.task_token(TOOLS).await;
    let token = bench
        .agent
        .broker()
        .issue_token(pb::IssueTokenRequest {
            task_id: task,
            audience: TOOLS.into(),
            scopes: vec!["read:billing".into()],
            dpop_jwk: key.jwk().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let port = bench.gateway.as_ref().unwrap().addr.port();
    let at = |proof_url: &str| {
        let mut req = rpc(
            &url,
            &token,
            &call(1, "read_invoice", json!({"invoice_id": "i"})),
        );
        req.headers_mut()
            .insert("authorization", format!("DPoP {token}").parse().unwrap());
        req.headers_mut().insert(
            "dpop",
            key.proof("POST", proof_url, Some(&token)).parse().unwrap(),
        );
        req
    };
    let (status, headers, _) = send(at(&format!("http://localhost:{port}/payments/mcp"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_dpop_proof")
    );
    // As a bearer token, a DPoP-bound token is refused too.
    let (status, _, _) = send(rpc(&url, &token, &call(2, "read_invoice", json!({})))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(bench.mcp.seen().is_empty());
    // The proof for this very URL passes.
    let (status, _, body) = send(at(&format!("http://localhost:{port}/billing/mcp"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(message(&body)["result"].is_object(), "{body}");
    assert_eq!(bench.mcp.seen().len(), 1);
    assert!(bench.mcp.seen()[0].headers.get("dpop").is_none());
}

fn api_call(url: &str, token: &str, path: &str, body: &Value) -> Request<Full<Bytes>> {
    Request::post(format!("{url}/payments{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        // The agent's guess at the key never goes on.
        .header("x-api-key", "sk-guessed")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_api_serves_an_agent_that_never_holds_its_key() {
    let bench = Bench::start("0s").await;
    let url = bench.url();
    let (_, token) = bench.task_token(API).await;
    let t = token.token.as_str();
    let mut everything_seen = String::new();
    let mut see = |(status, headers, body): (StatusCode, http::HeaderMap, String)| {
        everything_seen.push_str(&format!("{status} {headers:?} {body}\n"));
        (status, body)
    };

    let (status, body) = see(send(api_call(
        &url,
        t,
        "/v1/payments/inv-1",
        &json!({"amount": 50}),
    ))
    .await);
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["paid"], true);
    assert_eq!(answer["path"], "/v1/payments/inv-1");

    // Refused: over the policy's amount (problem+json naming the
    // refusal), a route that is not mapped, an argument given twice.
    let (status, body) = see(send(api_call(
        &url,
        t,
        "/v1/payments/inv-1",
        &json!({"amount": 5000}),
    ))
    .await);
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["mayfly_error"], "denied");
    assert_eq!(problem["status"], 403);
    let (status, _) = see(send(api_call(&url, t, "/v1/refunds/inv-1", &json!({}))).await);
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = see(send(api_call(
        &url,
        t,
        "/v1/payments/inv-1?amount=1",
        &json!({"amount": 5000}),
    ))
    .await);
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = see(send(api_call(
        &url,
        t,
        "/v1/payments/..%2Fadmin",
        &json!({"amount": 1}),
    ))
    .await);
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let seen = bench.api.seen();
    assert_eq!(seen.len(), 1, "{}", bench.api.everything());
    let keys: Vec<_> = seen[0].headers.get_all("x-api-key").iter().collect();
    assert_eq!(keys, [API_KEY]);
    assert!(seen[0].headers.get("authorization").is_none());
    assert_eq!(seen[0].body, r#"{"amount":50}"#);
    assert!(!everything_seen.contains(API_KEY), "the agent saw the key");
    assert!(
        !everything_seen.contains("sk-live"),
        "the agent saw the key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_that_would_split_a_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, "sk-1\r\nX-Admin: yes\n").unwrap();
    let broker = mayfly_gateway::config::BrokerConfig {
        url: "https://localhost:1".into(),
        issuer: "https://localhost:1".into(),
        ca: file.clone(),
        cert: file.clone(),
        key: file.clone(),
        timeout: Duration::from_secs(1),
        feed_max_silence: Duration::from_secs(1),
    };
    let err = mayfly_gateway::credential::UpstreamCredential::load(
        &mayfly_gateway::config::CredentialConfig::Header {
            name: "X-Api-Key".into(),
            file,
            prefix: String::new(),
        },
        &broker,
    )
    .unwrap_err();
    assert!(err.contains("line break"), "{err}");
    assert!(!err.contains("sk-1"), "the error holds the key: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_end_with_the_task_and_while_the_broker_is_down() {
    let mut bench = Bench::start("0s").await;
    let url = bench.url();
    let (task, token) = bench.task_token(TOOLS).await;
    let t = token.token.clone();
    let read = || call(1, "read_invoice", json!({"invoice_id": "i"}));
    let (_, _, body) = send(rpc(&url, &t, &read())).await;
    assert!(message(&body)["result"].is_object(), "{body}");

    bench
        .agent
        .broker()
        .complete_task(pb::CompleteTaskRequest { task_id: task })
        .await
        .unwrap();
    // The very next call is refused: by the feed's revocation at the
    // gateway, or by the broker's check of the task.
    let (status, _, body) = send(rpc(&url, &t, &read())).await;
    let refused = status == StatusCode::UNAUTHORIZED || message(&body)["error"].is_object();
    assert!(refused, "{status} {body}");
    assert_eq!(bench.mcp.seen().len(), 1);

    // With the broker stopped, nothing is forwarded.
    let (_, token) = bench.task_token(TOOLS).await;
    bench.broker.stop().await;
    let (status, _, body) = send(rpc(&url, &token.token, &read())).await;
    match status {
        StatusCode::OK => {
            let e = &message(&body)["error"];
            assert_eq!(e["data"]["mayfly_error"], "broker_unavailable", "{body}");
        }
        other => assert!(
            other == StatusCode::SERVICE_UNAVAILABLE || other == StatusCode::UNAUTHORIZED,
            "{other} {body}"
        ),
    }
    assert_eq!(bench.mcp.seen().len(), 1, "{}", bench.mcp.everything());
}

/// An MCP server that answers every request with an SSE stream it sends
/// one event on and never ends.
async fn endless_upstream() -> std::net::SocketAddr {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    let (tx, rx) = tokio::sync::mpsc::channel::<
                        Result<Frame<Bytes>, std::convert::Infallible>,
                    >(1);
                    let list =
                        r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"read_invoice"}]}}"#;
                    tx.send(Ok(Frame::data(Bytes::from(format!(
                        "event: message\ndata: {list}\n\n"
                    )))))
                    .await
                    .unwrap();
                    // Kept open: the stream never ends.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        drop(tx);
                    });
                    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(body)
                            .unwrap(),
                    )
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_list_that_never_ends_is_refused_in_time() {
    let endless = endless_upstream().await;
    let bench = Bench::start_with(
        "0s",
        common::Extra {
            gateway_toml: format!(
                r#"
[[upstreams]]
name = "endless"
protocol = "mcp"
path = "/endless/mcp"
audience = "{TOOLS}"
url = "http://{endless}/mcp"
timeout = "1s"
"#
            ),
            broker: Box::new(|c| {
                let g = c.gateways.last_mut().unwrap();
                g.upstreams.insert("endless".into(), TOOLS.into());
            }),
            ..Default::default()
        },
    )
    .await;
    let (_, token) = bench.task_token(TOOLS).await;
    let req = Request::post(format!("{}/endless/mcp", bench.url()))
        .header("authorization", format!("Bearer {}", token.token))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Full::new(Bytes::from_static(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        )))
        .unwrap();
    let (_, _, body) = tokio::time::timeout(Duration::from_secs(10), send(req))
        .await
        .expect("answered, not held open");
    let e = &message(&body)["error"];
    assert_eq!(e["data"]["mayfly_error"], "upstream_invalid", "{body}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("not complete within 1s"),
        "{e}"
    );
}
