//! The Broker (agent) API over mTLS: every RPC, TTL rules, token claims
//! checked by a stock JWT library, and the task guard.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mayfly_client::{NewTask, pb};
use mayfly_testkit::TestBroker;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn start_get_issue_complete() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;

    let mut req = start_request(
        "summarise ticket 42",
        &[API],
        &["read:files", "write:files"],
    );
    req.context.insert("ticket".into(), "42".into());
    let task = agent.broker().start_task(req).await.unwrap().into_inner();
    assert_eq!(task.task_id.len(), 22, "128 random bits, base64url");
    assert!(
        task.task_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_eq!(task.agent_id, "spiffe://example.org/agent/demo");
    assert_eq!(task.state, pb::TaskState::Active as i32);
    assert_eq!(task.context.get("ticket").map(String::as_str), Some("42"));
    let lifetime = secs(&task.expires_at) - secs(&task.created_at);
    assert_eq!(lifetime, 15 * 60, "default task TTL");

    let got = agent
        .broker()
        .get_task(pb::GetTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, task);

    let issued = issue(&agent, &task.task_id).await;
    assert_eq!(issued.token_type, "Bearer");
    let claims = validate(&broker, &issued.token, API).await;
    assert_eq!(claims["sub"], "spiffe://example.org/agent/demo");
    assert_eq!(claims["client_id"], "spiffe://example.org/agent/demo");
    assert_eq!(claims["aud"], API);
    assert_eq!(claims["jti"], issued.lease_id.as_str());
    assert_eq!(claims["task_id"], task.task_id.as_str());
    assert_eq!(claims["scope"], "read:files");
    assert_eq!(claims["exp"].as_i64().unwrap(), secs(&issued.expires_at));
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300,
        "default token TTL"
    );
    assert!(claims.get("cnf").is_none(), "unbound by default");
    assert!(claims.get("intent").is_none() && !issued.token.contains("summarise"));

    let lease = lease(&op, &issued.lease_id).await;
    assert_eq!(lease.kind, pb::LeaseKind::Jwt as i32);
    assert_eq!(lease.state, pb::LeaseState::Active as i32);
    assert_eq!(lease.task_id, task.task_id);

    let done = agent.complete_task(&task.task_id).await.unwrap();
    assert_eq!(
        done.revoked_leases,
        vec![task.task_id.clone(), issued.lease_id.clone()]
    );
    let ended = done.task.unwrap();
    assert_eq!(ended.state, pb::TaskState::Completed as i32);
    assert_eq!(
        ended.revocation_reason,
        pb::RevocationReason::TaskCompleted as i32
    );
    let lease = crate::common::lease(&op, &issued.lease_id).await;
    assert_eq!(lease.state, pb::LeaseState::Revoked as i32);
    assert_eq!(
        lease.revocation_reason,
        pb::RevocationReason::TaskCompleted as i32
    );
    assert_eq!(lease.revoked_by, "spiffe://example.org/agent/demo");

    assert_status(
        agent
            .issue_token(token_request(&task.task_id, API, &["read:files"]))
            .await,
        Code::FailedPrecondition,
        "is completed",
    );
    assert_status(
        agent.complete_task(&task.task_id).await,
        Code::FailedPrecondition,
        "is completed",
    );
}

#[tokio::test]
async fn ttls_are_clamped_and_stated() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;

    // Task: asking for a day gets the 8 h maximum.
    let mut req = start_request("long", &[API, TOOLS], &["read:files"]);
    req.ttl_seconds = 24 * 3600;
    let task = agent.broker().start_task(req).await.unwrap().into_inner();
    assert_eq!(secs(&task.expires_at) - secs(&task.created_at), 8 * 3600);

    // Token: an hour is capped by the deciding rule (demo-read: 10 m) …
    let mut t = token_request(&task.task_id, TOOLS, &["read:files"]);
    t.ttl_seconds = 3600;
    let issued = agent.issue_token(t).await.unwrap();
    let claims = validate(&broker, &issued.token, TOOLS).await;
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600
    );

    // … a write scope is decided by demo-write (5 m) …
    let mut req = start_request("write", &[API], &["write:files"]);
    req.ttl_seconds = 3600;
    let wtask = agent.broker().start_task(req).await.unwrap().into_inner();
    let mut t = token_request(&wtask.task_id, API, &["write:files"]);
    t.ttl_seconds = 3600;
    let issued = agent.issue_token(t).await.unwrap();
    let claims = validate(&broker, &issued.token, API).await;
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300
    );

    // … and a short task caps its tokens at its own expiry.
    let mut req = start_request("short", &[API], &["read:files"]);
    req.ttl_seconds = 30;
    let short = agent.broker().start_task(req).await.unwrap().into_inner();
    let issued = issue(&agent, &short.task_id).await;
    assert!(secs(&issued.expires_at) <= secs(&short.expires_at));
    assert!(secs(&issued.expires_at) >= secs(&short.expires_at) - 1);
}

#[tokio::test]
async fn broker_max_ttl_caps_tokens() {
    let broker = TestBroker::start_with(|c| {
        c.tokens.max_ttl = Duration::from_secs(120);
        c.tokens.default_ttl = Duration::from_secs(60);
    })
    .await;
    let agent = broker.agent().await;
    let task = start(&agent).await;
    let mut t = token_request(&task.task_id, API, &["read:files"]);
    t.ttl_seconds = 900;
    let issued = agent.issue_token(t).await.unwrap();
    let claims = validate(&broker, &issued.token, API).await;
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        120
    );
    let issued = issue(&agent, &task.task_id).await;
    let claims = validate(&broker, &issued.token, API).await;
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        60
    );
}

#[tokio::test]
async fn bound_token_carries_the_client_cert_thumbprint() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let task = start(&agent).await;
    let mut t = token_request(&task.task_id, API, &["read:files"]);
    t.bind_to_client_cert = true;
    let issued = agent.issue_token(t).await.unwrap();
    let claims = validate(&broker, &issued.token, API).await;

    // RFC 8705: base64url(SHA-256(DER of the certificate used on the call)).
    let pem = std::fs::read(broker.path("identities/agent-demo/svid.pem")).unwrap();
    let der = pem_to_der(&pem);
    let want = URL_SAFE_NO_PAD.encode(sha256_by_openssl(&der));
    assert_eq!(claims["cnf"]["x5t#S256"], want.as_str());
    let lease = lease(&broker.operator().await, &issued.lease_id).await;
    assert_eq!(lease.cert_thumbprint, want);
}

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).unwrap();
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// SHA-256 by an independent implementation: the `openssl` command.
fn sha256_by_openssl(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-binary"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

#[tokio::test]
async fn task_guard_completes_on_drop() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let guard = agent
        .start_task(NewTask::new("guarded", [API]).scope("read:files"))
        .await
        .unwrap();
    let token = guard.issue_token(API, ["read:files"]).await.unwrap();
    let id = guard.id().to_owned();
    drop(guard);
    // The guard completes the task in the background; wait for it.
    let mut state = 0;
    for _ in 0..100 {
        state = lease(&op, &token.lease_id).await.state;
        if state == pb::LeaseState::Revoked as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state, pb::LeaseState::Revoked as i32);
    let task = lease(&op, &id).await;
    assert_eq!(
        task.revocation_reason,
        pb::RevocationReason::TaskCompleted as i32
    );
}

#[tokio::test]
async fn tasks_expire_and_then_issue_nothing() {
    let broker = TestBroker::start_with(|c| c.reaper.interval = Duration::from_millis(100)).await;
    let agent = broker.agent().await;
    let mut req = start_request("brief", &[API], &["read:files"]);
    // Long enough to issue on a loaded machine (other tests flood the
    // broker's ports meanwhile); the wait then runs to the stated expiry.
    req.ttl_seconds = 3;
    let task = agent.broker().start_task(req).await.unwrap().into_inner();
    let issued = issue(&agent, &task.task_id).await;
    let expires = task.expires_at.as_ref().unwrap();
    let expires_ms = expires.seconds * 1000 + i64::from(expires.nanos / 1_000_000);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Past the expiry, and a reaper pass (100 ms) or several after it.
    let wait = (expires_ms - now_ms).max(0) as u64 + 600;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let got = agent
        .broker()
        .get_task(pb::GetTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, pb::TaskState::Expired as i32);
    let lease = lease(&broker.operator().await, &issued.lease_id).await;
    assert_eq!(lease.state, pb::LeaseState::Expired as i32);
    assert_status(
        agent
            .issue_token(token_request(&task.task_id, API, &["read:files"]))
            .await,
        Code::FailedPrecondition,
        "is expired",
    );
}
