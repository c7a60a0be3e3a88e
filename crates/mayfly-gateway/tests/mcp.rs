//! MCP through the gateway: every `tools/call` is decided by the broker on
//! its arguments, `tools/list` shows only what the token may call, the
//! agent's token never reaches the server, and an approval unlocks one
//! exact call once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Bench, TOOLS, call, message, records_of, rpc, send};
use http::StatusCode;
use mayfly_client::pb;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_decided_on_their_arguments_and_lists_filtered() {
    let bench = Bench::start("0s").await;
    let url = bench.url();
    let (_task, token) = bench.task_token(TOOLS).await;
    let t = token.token.as_str();

    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let (status, headers, body) = send(rpc(&url, t, init)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["mcp-session-id"], "session-1");

    // The list: not the forbidden tool, nor a name no call could use.
    let (status, headers, body) = send(rpc(
        &url,
        t,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let names: Vec<String> = message(&body)["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["read_invoice", "pay_invoice"]);

    // Allowed calls go on, as decided.
    let (_, _, body) = send(rpc(
        &url,
        t,
        &call(2, "read_invoice", json!({"invoice_id": "inv-7"})),
    ))
    .await;
    assert_eq!(
        message(&body)["result"]["content"][0]["text"],
        "did \"read_invoice\""
    );
    let (_, _, body) = send(rpc(
        &url,
        t,
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"arguments":{ "amount" : 100, "invoice_id":"inv-7"},"name":"pay_invoice"}}"#,
    ))
    .await;
    assert!(message(&body)["result"].is_object(), "{body}");

    // Refused calls: a JSON-RPC error naming why, and nothing forwarded.
    let (status, _, body) = send(rpc(&url, t, &call(4, "delete_records", json!({})))).await;
    assert_eq!(status, StatusCode::OK);
    let m = message(&body);
    assert_eq!(m["id"], 4);
    assert_eq!(m["error"]["code"], -32060, "{m}");
    assert_eq!(m["error"]["data"]["mayfly_error"], "denied");
    let (_, _, body) = send(rpc(
        &url,
        t,
        &call(
            5,
            "pay_invoice",
            json!({"invoice_id": "inv-7", "amount": "lots"}),
        ),
    ))
    .await;
    assert!(message(&body)["error"].is_object(), "{body}");

    let seen = bench.mcp.seen();
    let methods: Vec<String> = seen
        .iter()
        .map(|s| {
            let m: serde_json::Value = serde_json::from_str(&s.body).unwrap();
            format!(
                "{} {}",
                m["method"].as_str().unwrap_or(""),
                m["params"]["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        methods,
        [
            "initialize ",
            "tools/list ",
            "tools/call read_invoice",
            "tools/call pay_invoice"
        ]
    );
    // What the server got is the call as decided, in canonical form, and
    // never the agent's token.
    assert_eq!(
        seen[3].body,
        r#"{"id":3,"jsonrpc":"2.0","method":"tools/call","params":{"arguments":{"amount":100,"invoice_id":"inv-7"},"name":"pay_invoice"}}"#
    );
    assert!(!bench.mcp.everything().contains(t));
    assert!(
        seen.iter()
            .all(|s| s.headers.get("authorization").is_none())
    );

    // Each decision is in the trail under the token; each allowed call's
    // outcome follows it, under the same call id.
    let allowed = records_of(&bench.operator, "tool_call_allowed", 2).await;
    let outcomes = records_of(&bench.operator, "tool_call_outcome", 2).await;
    for (a, o) in allowed.iter().zip(&outcomes) {
        assert_eq!(a["lease_id"], token.lease_id.as_str());
        assert_eq!(o["lease_id"], token.lease_id.as_str());
        assert_eq!(a["call_id"], o["call_id"]);
        assert_eq!(a["tool"], o["tool"]);
        assert_eq!(o["status"], 200);
        assert_eq!(o["caller"], common::GATEWAY);
    }
    let denied = records_of(&bench.operator, "tool_call_denied", 1).await;
    assert_eq!(denied[0]["tool"], "billing/delete_records");
    assert_eq!(denied[0]["policy"], "t-no-deletes");
    assert!(denied[0].get("call_id").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_payment_waits_for_approval_and_passes_once() {
    let bench = Bench::start("20s").await;
    let url = bench.url();
    let (task, token) = bench.task_token(TOOLS).await;
    let t = token.token.clone();
    let pay = call(
        1,
        "pay_invoice",
        json!({"invoice_id": "inv-9", "amount": 250}),
    );

    // The call is held open while an operator looks.
    let held = tokio::spawn(send(rpc(&url, &t, &pay)));
    let approval = loop {
        let pending = bench
            .operator
            .admin()
            .list_approvals(pb::ListApprovalsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .approvals;
        if let Some(a) = pending.into_iter().find(|a| a.task_id == task) {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(approval.tool, "billing/pay_invoice");
    assert_eq!(approval.arguments_sha256.len(), 64);
    assert!(bench.mcp.seen().is_empty(), "forwarded before approval");
    bench
        .operator
        .admin()
        .approve(pb::DecideApprovalRequest {
            approval_id: approval.approval_id.clone(),
            reason: "invoice checked".into(),
        })
        .await
        .unwrap();
    let (status, _, body) = held.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(message(&body)["result"].is_object(), "{body}");
    assert_eq!(bench.mcp.seen().len(), 1);

    // Once: the same call again needs a new approval. This gateway waits
    // 20 s; stop waiting by denying it.
    let again = tokio::spawn(send(rpc(&url, &t, &pay)));
    let second = loop {
        let pending = bench
            .operator
            .admin()
            .list_approvals(pb::ListApprovalsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .approvals;
        if let Some(a) = pending
            .into_iter()
            .find(|a| a.task_id == task && a.approval_id != approval.approval_id)
        {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    bench
        .operator
        .admin()
        .deny(pb::DecideApprovalRequest {
            approval_id: second.approval_id.clone(),
            reason: "paid already".into(),
        })
        .await
        .unwrap();
    let (_, _, body) = again.await.unwrap();
    let m = message(&body);
    assert_eq!(m["error"]["data"]["mayfly_error"], "approval_denied", "{m}");
    assert!(
        m["error"]["message"]
            .as_str()
            .unwrap()
            .contains("paid already")
    );
    assert_eq!(bench.mcp.seen().len(), 1, "the denied call went on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_wait_the_agent_is_told_the_approval_and_its_retry_uses_it() {
    let bench = Bench::start("0s").await;
    let url = bench.url();
    let (_task, token) = bench.task_token(TOOLS).await;
    let t = token.token.as_str();
    let pay = call(
        1,
        "pay_invoice",
        json!({"invoice_id": "inv-9", "amount": 250}),
    );

    let (_, _, body) = send(rpc(&url, t, &pay)).await;
    let m = message(&body);
    assert_eq!(m["error"]["code"], -32061, "{m}");
    let id = m["error"]["data"]["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A retry before the decision: still waiting, on the same approval.
    let (_, _, body) = send(rpc(&url, t, &pay)).await;
    assert_eq!(message(&body)["error"]["data"]["approval_id"], id.as_str());
    bench
        .operator
        .admin()
        .approve(pb::DecideApprovalRequest {
            approval_id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    // A different call does not ride on it.
    let other = call(
        2,
        "pay_invoice",
        json!({"invoice_id": "inv-9", "amount": 9000}),
    );
    let (_, _, body) = send(rpc(&url, t, &other)).await;
    assert_ne!(message(&body)["error"]["data"]["approval_id"], id.as_str());
    // The plain retry of the approved call passes.
    let (_, _, body) = send(rpc(&url, t, &pay)).await;
    assert!(message(&body)["result"].is_object(), "{body}");
    assert_eq!(bench.mcp.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_serves_only_the_task_that_opened_it() {
    let bench = Bench::start("0s").await;
    let url = bench.url();
    let (_, mine) = bench.task_token(TOOLS).await;
    let (_, theirs) = bench.task_token(TOOLS).await;
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let (_, headers, _) = send(rpc(&url, &mine.token, init)).await;
    let session = headers["mcp-session-id"].to_str().unwrap().to_owned();
    let in_session = |token: &str| {
        let mut req = rpc(
            &url,
            token,
            &call(1, "read_invoice", json!({"invoice_id": "i"})),
        );
        req.headers_mut()
            .insert("mcp-session-id", session.parse().unwrap());
        req
    };
    // Another task's token in this session: as if there were none.
    let (status, _, body) = send(in_session(&theirs.token)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        message(&body)["error"]["data"]["mayfly_error"],
        "session_not_found"
    );
    assert_eq!(bench.mcp.seen().len(), 1, "only the initialize went on");
    let (status, _, body) = send(in_session(&mine.token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(message(&body)["result"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_takes_url_elicitations_is_pointed_at_the_approval() {
    let bench = Bench::start_with(
        "0s",
        common::Extra {
            top_toml: r#"approval_url = "https://console.example.com/approvals/{id}""#.into(),
            ..Default::default()
        },
    )
    .await;
    let url = bench.url();
    let (_, token) = bench.task_token(TOOLS).await;
    let t = token.token.as_str();
    let pay = call(
        1,
        "pay_invoice",
        json!({"invoice_id": "inv-9", "amount": 250}),
    );
    let init = |url_elicitation: bool| {
        let capabilities = if url_elicitation {
            json!({"elicitation": {"url": {}}})
        } else {
            json!({})
        };
        json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion":"2025-11-25","capabilities":capabilities,
            "clientInfo":{"name":"t","version":"1"}}})
        .to_string()
    };
    for takes_urls in [true, false] {
        let (_, headers, _) = send(rpc(&url, t, &init(takes_urls))).await;
        let session = headers["mcp-session-id"].to_str().unwrap().to_owned();
        let mut req = rpc(&url, t, &pay);
        req.headers_mut()
            .insert("mcp-session-id", session.parse().unwrap());
        let (_, _, body) = send(req).await;
        let e = &message(&body)["error"];
        let approval = e["data"]["approval_id"].as_str().unwrap();
        if takes_urls {
            assert_eq!(e["code"], -32042, "{e}");
            let elicitation = &e["data"]["elicitations"][0];
            assert_eq!(elicitation["mode"], "url");
            assert_eq!(elicitation["elicitationId"], approval);
            assert_eq!(
                elicitation["url"],
                format!("https://console.example.com/approvals/{approval}")
            );
        } else {
            assert_eq!(e["code"], -32061, "{e}");
            assert!(e["data"].get("elicitations").is_none());
        }
    }
    assert!(
        bench
            .mcp
            .seen()
            .iter()
            .all(|s| !s.body.contains("tools/call"))
    );
}
