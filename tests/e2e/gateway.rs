//! The Gateway API: a gateway listed in `[[gateways]]` asks about each
//! tool call an agent makes with a task's token; the broker decides on the
//! tool and its arguments, records the decision, and binds approvals to
//! the exact call.

use mayfly_broker::config::GatewayConfig;
use mayfly_client::{Client, Refusal, pb};
use mayfly_core::SpiffeId;
use mayfly_testkit::TestBroker;
use tonic::Code;

use crate::common::{API, TOOLS, assert_status, audit_trail, start_request, token_request};

const GATEWAY: &str = "spiffe://example.org/gateway/billing";

const TOOLS_TOML: &str = r#"
[billing.read_invoice]
invoice_id = "string"

[billing.pay_invoice]
invoice_id = "string"
amount = "decimal"

[billing.delete_records]
"#;

const TOOLS_CEDAR: &str = r#"
@id("t-reads")
permit (principal in Mayfly::Path::"spiffe://example.org/agent",
        action == Mayfly::Action::"billing/read_invoice", resource);

@id("t-small-payments")
permit (principal in Mayfly::Path::"spiffe://example.org/agent",
        action == Mayfly::Action::"billing/pay_invoice", resource)
when { context.arguments.amount.lessThanOrEqual(decimal("100.0")) };

@id("t-large-payments")
@approval("required")
permit (principal in Mayfly::Path::"spiffe://example.org/agent",
        action == Mayfly::Action::"billing/pay_invoice", resource)
when { context.arguments.amount.greaterThan(decimal("100.0")) };

@id("t-no-deletes")
forbid (principal, action == Mayfly::Action::"billing/delete_records", resource);
"#;

/// A broker with the billing tools, and a gateway fronting them as the
/// upstream `billing`, whose tokens are for the dev tools audience.
async fn broker() -> TestBroker {
    TestBroker::start_with(|c| {
        std::fs::write(c.policy.dir.join("tools.toml"), TOOLS_TOML).unwrap();
        std::fs::write(c.policy.dir.join("tools.cedar"), TOOLS_CEDAR).unwrap();
        c.gateways.push(GatewayConfig {
            id: SpiffeId::new(GATEWAY).unwrap(),
            upstreams: [("billing".to_owned(), TOOLS.to_owned())].into(),
        });
    })
    .await
}

type Gateway = pb::gateway_client::GatewayClient<tonic::transport::Channel>;

fn gateway_of(client: &Client) -> Gateway {
    pb::gateway_client::GatewayClient::new(client.channel())
}

fn call(lease: &str, tool: &str, arguments: &str) -> pb::AuthorizeCallRequest {
    pb::AuthorizeCallRequest {
        lease_id: lease.into(),
        tool: tool.into(),
        arguments: arguments.into(),
        ..Default::default()
    }
}

/// A task of the dev agent with a read token for the tools audience: the
/// task's id and the token's lease id.
async fn token(agent: &Client, audience: &str) -> (String, String) {
    let task = agent
        .broker()
        .start_task(start_request(
            "pay invoices",
            &[API, TOOLS],
            &["read:billing"],
        ))
        .await
        .unwrap()
        .into_inner();
    let token = agent
        .broker()
        .issue_token(token_request(&task.task_id, audience, &["read:billing"]))
        .await
        .unwrap()
        .into_inner();
    (task.task_id, token.lease_id)
}

fn refusal(s: tonic::Status) -> Refusal {
    s.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_decided_on_their_arguments_and_recorded() {
    let broker = broker().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let mut gw = gateway_of(&broker.client_as(GATEWAY).await);
    let (task, lease) = token(&agent, TOOLS).await;

    // The list shows the tools some call of which policy allows, in the
    // order asked: not the forbidden one, nor one tools.toml lacks.
    let list = |tools: &[&str]| pb::ListCallableRequest {
        lease_id: lease.clone(),
        upstream: "billing".into(),
        tools: tools.iter().map(|t| t.to_string()).collect(),
    };
    let listed = gw
        .list_callable(list(&[
            "pay_invoice",
            "delete_records",
            "refund",
            "read_invoice",
        ]))
        .await
        .unwrap()
        .into_inner()
        .tools;
    assert_eq!(listed, ["pay_invoice", "read_invoice"]);
    assert_status(
        gw.list_callable(list(&["read invoice"]))
            .await
            .map_err(refusal),
        Code::InvalidArgument,
        "not a plain identifier",
    );

    let read = gw
        .authorize_call(call(
            &lease,
            "billing/read_invoice",
            r#"{"invoice_id": "inv-7781"}"#,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(read.allowed);
    assert_eq!(read.policy_id, "t-reads");
    // SHA-256 of the canonical form {"invoice_id":"inv-7781"}.
    let canonical = r#"{"invoice_id":"inv-7781"}"#;
    let want = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    let want: String = want.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(read.arguments_sha256, want);

    let small = gw
        .authorize_call(call(
            &lease,
            "billing/pay_invoice",
            r#"{"invoice_id": "inv-7781", "amount": 99.5}"#,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(small.allowed);
    assert_eq!(small.policy_id, "t-small-payments");

    // A large payment waits for an operator, who approves that exact call.
    let large_args = r#"{"invoice_id": "inv-7781", "amount": 2500}"#;
    let large = gw
        .authorize_call(call(&lease, "billing/pay_invoice", large_args))
        .await
        .unwrap()
        .into_inner();
    assert!(!large.allowed);
    let approval = large.approval.expect("a pending approval");
    assert_eq!(approval.tool, "billing/pay_invoice");
    assert_eq!(approval.arguments_sha256, large.arguments_sha256);
    assert_eq!(approval.task_id, task);
    // Approved for 2500, it does not carry another amount.
    op.admin()
        .approve(pb::DecideApprovalRequest {
            approval_id: approval.approval_id.clone(),
            reason: "invoice checked".into(),
        })
        .await
        .unwrap();
    let with = |args: &str| pb::AuthorizeCallRequest {
        approval_id: approval.approval_id.clone(),
        ..call(&lease, "billing/pay_invoice", args)
    };
    assert_status(
        gw.authorize_call(with(r#"{"invoice_id": "inv-7781", "amount": 9000}"#))
            .await
            .map_err(refusal),
        Code::PermissionDenied,
        "different request",
    );
    let paid = gw
        .authorize_call(with(large_args))
        .await
        .unwrap()
        .into_inner();
    assert!(paid.allowed);
    assert_eq!(paid.approval_id, approval.approval_id);
    // Once only.
    assert_status(
        gw.authorize_call(with(large_args)).await.map_err(refusal),
        Code::FailedPrecondition,
        "consumed",
    );

    let deleted = gw
        .authorize_call(call(&lease, "billing/delete_records", "{}"))
        .await
        .map_err(refusal)
        .unwrap_err();
    assert_eq!(deleted.code, Code::PermissionDenied);
    assert_eq!(deleted.name, "denied");
    assert!(
        deleted.message.contains("t-no-deletes"),
        "{}",
        deleted.message
    );

    // The trail holds each decision with the tool and the arguments'
    // hash, never the arguments.
    let trail = audit_trail(&op).await;
    let calls: Vec<serde_json::Value> = trail
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["tool"].is_string())
        .collect();
    let events: Vec<&str> = calls.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        [
            "tool_call_allowed",
            "tool_call_allowed",
            "approval_requested",
            "tool_call_denied",
            "tool_call_allowed",
            "tool_call_denied",
            "tool_call_denied",
        ]
    );
    assert!(calls.iter().all(|r| {
        r["lease_id"] == lease.as_str()
            && r["task_id"] == task.as_str()
            && r["caller"] == GATEWAY
            && r["arguments_sha256"]
                .as_str()
                .is_some_and(|h| h.len() == 64)
    }));
    assert_eq!(calls[0]["arguments_sha256"], want.as_str());
    assert!(
        !trail
            .iter()
            .any(|l| l.contains("inv-7781") || l.contains("2500")),
        "arguments reached the trail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_refused_where_it_does_not_belong() {
    let broker = broker().await;
    let agent = broker.agent().await;
    let mut gw = gateway_of(&broker.client_as(GATEWAY).await);
    let (task, lease) = token(&agent, TOOLS).await;
    let read = |lease: &str| call(lease, "billing/read_invoice", r#"{"invoice_id": "i"}"#);

    // Only a listed gateway asks: not the agent, not another workload.
    for who in [
        agent.clone(),
        broker.client_as("spiffe://example.org/gateway/other").await,
    ] {
        let r = gateway_of(&who)
            .authorize_call(read(&lease))
            .await
            .map_err(refusal);
        let r = r.unwrap_err();
        assert_eq!(
            (r.code, r.name.as_str()),
            (Code::PermissionDenied, "not_gateway")
        );
    }
    // Only for an upstream it fronts.
    let r = gw
        .authorize_call(call(&lease, "payroll/read_invoice", "{}"))
        .await
        .map_err(refusal)
        .unwrap_err();
    assert_eq!(
        (r.code, r.name.as_str()),
        (Code::PermissionDenied, "not_upstream")
    );
    // A token for another audience.
    let (_, api_lease) = token(&agent, API).await;
    assert_status(
        gw.authorize_call(read(&api_lease)).await.map_err(refusal),
        Code::InvalidArgument,
        "is not a token for https://tools.example.com",
    );
    // A task's own lease is not a token.
    assert_status(
        gw.authorize_call(read(&task)).await.map_err(refusal),
        Code::InvalidArgument,
        "is not a token",
    );
    assert_status(
        gw.authorize_call(read("AAAAAAAAAAAAAAAAAAAAAA"))
            .await
            .map_err(refusal),
        Code::NotFound,
        "not found",
    );
    // Hostile input, refused before anything is decided.
    for (tool, args, needle) in [
        (
            "billing/read_invoice",
            r#"{"invoice_id": "a", "invoice_id": "b"}"#,
            "repeat the key",
        ),
        (
            "billing/read_invoice",
            &format!("{{\"a\":{}{}}}", "[".repeat(64), "]".repeat(64)),
            "nest deeper",
        ),
        ("billing/read_invoice", "[1]", "must be a JSON object"),
        ("billing/read invoice", "{}", "not a plain identifier"),
        ("billing/read_invoice\n", "{}", "not a plain identifier"),
        ("billing/refund", "{}", "not declared"),
    ] {
        let r = gw
            .authorize_call(call(&lease, tool, args))
            .await
            .map_err(refusal);
        let code = if needle == "not declared" {
            Code::PermissionDenied
        } else {
            Code::InvalidArgument
        };
        assert_status(r, code, needle);
    }
    // After the task completes, its token makes no call.
    agent
        .broker()
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.clone(),
        })
        .await
        .unwrap();
    assert_status(
        gw.authorize_call(read(&lease)).await.map_err(refusal),
        Code::FailedPrecondition,
        "revoked",
    );
}
