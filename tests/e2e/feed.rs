//! The revocation feed over gRPC and RFC 7662 introspection over mTLS.

use std::time::Duration;

use mayfly_client::pb;
use mayfly_core::SpiffeId;
use mayfly_testkit::{Credential, TestBroker, https_post_form};
use serde_json::Value;
use tonic::Code;

use crate::common::*;

fn identity(broker: &TestBroker, id: &str) -> Credential {
    broker
        .ca()
        .issue_svid(&SpiffeId::new(id).unwrap(), Duration::from_secs(3600))
        .unwrap()
}

async fn watch(
    broker: &TestBroker,
    who: &str,
    from: u64,
) -> Result<tonic::Streaming<pb::RevocationEvent>, tonic::Status> {
    let client = broker.client_with(&identity(broker, who)).await.unwrap();
    let channel = client.channel();
    pb::revocations_client::RevocationsClient::new(channel)
        .watch_revocations(pb::WatchRequest { from_cursor: from })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_watcher_gets_every_live_revocation_then_heartbeats() {
    let broker = TestBroker::start_with(|c| c.feed.heartbeat = Duration::from_millis(200)).await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let task = start(&agent).await;
    let a = issue(&agent, &task.task_id).await;
    let b = issue(&agent, &task.task_id).await;
    op.admin()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: a.lease_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap();

    let mut stream = watch(&broker, "spiffe://example.org/api/validator", 0)
        .await
        .unwrap();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.heartbeat);
    assert_eq!(first.lease_id, a.lease_id);
    assert_eq!(first.kind, pb::LeaseKind::Jwt as i32);
    assert_eq!(first.reason, pb::RevocationReason::Operator as i32);
    assert_eq!(secs(&first.expires_at), secs(&a.expires_at));
    let hb = stream.message().await.unwrap().unwrap();
    assert!(hb.heartbeat, "replay done, then a heartbeat");
    assert_eq!(hb.cursor, first.cursor);

    // Live: completing the task sends the task and the other token.
    agent.complete_task(&task.task_id).await.unwrap();
    let mut live = Vec::new();
    while live.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if !e.heartbeat {
            assert!(e.cursor > first.cursor);
            live.push(e.lease_id);
        }
    }
    assert_eq!(live, vec![task.task_id.clone(), b.lease_id.clone()]);

    // Resuming from the first cursor skips what was seen.
    let mut resumed = watch(&broker, "spiffe://example.org/api/validator", first.cursor)
        .await
        .unwrap();
    let next = resumed.message().await.unwrap().unwrap();
    assert_eq!(next.lease_id, task.task_id);
}

#[tokio::test]
async fn only_configured_workloads_may_watch() {
    let broker = TestBroker::start_with(|c| {
        c.feed.watchers = Some(vec!["spiffe://example.org/api/*".parse().unwrap()]);
    })
    .await;
    assert!(
        watch(&broker, "spiffe://example.org/api/validator", 0)
            .await
            .is_ok()
    );
    match watch(&broker, "spiffe://example.org/agent/demo", 0).await {
        Err(s) => {
            assert_eq!(s.code(), Code::PermissionDenied);
            assert!(
                s.message().contains("may not watch the revocation feed"),
                "{}",
                s.message()
            );
        }
        Ok(_) => panic!("an agent outside feed.watchers may not watch"),
    }
    let anon = broker.anonymous_client().await;
    let err = pb::revocations_client::RevocationsClient::new(anon.channel())
        .watch_revocations(pb::WatchRequest { from_cursor: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

async fn introspect(
    broker: &TestBroker,
    who: Option<&Credential>,
    token: &str,
) -> (u16, Option<String>, Value) {
    let form = format!("token={token}&token_type_hint=access_token");
    let (status, www, body) = https_post_form(
        &format!("{}/introspect", broker.http_url()),
        &broker.bundle_pem(),
        who,
        &form,
    )
    .await;
    (
        status,
        www,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_answers_only_for_live_tokens_of_the_callers_audiences() {
    let broker = TestBroker::start_with(|c| {
        c.introspection = vec![mayfly_broker::config::IntrospectionConfig {
            clients: vec!["spiffe://example.org/api/files".parse().unwrap()],
            audiences: vec![API.into()],
        }];
    })
    .await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let files = identity(&broker, "spiffe://example.org/api/files");
    let mut req = start_request("introspect", &[API, TOOLS], &["read:files"]);
    req.ttl_seconds = 600;
    let task = agent.broker().start_task(req).await.unwrap().into_inner();
    let mut tr = token_request(&task.task_id, API, &["read:files"]);
    tr.bind_to_client_cert = true;
    let t = agent.issue_token(tr).await.unwrap();

    let (status, _, body) = introspect(&broker, Some(&files), &t.token).await;
    assert_eq!(status, 200);
    assert_eq!(body["active"], true);
    assert_eq!(body["sub"], "spiffe://example.org/agent/demo");
    assert_eq!(body["client_id"], "spiffe://example.org/agent/demo");
    assert_eq!(body["aud"], API);
    assert_eq!(body["scope"], "read:files");
    assert_eq!(body["jti"], t.lease_id.as_str());
    assert_eq!(body["task_id"], task.task_id.as_str());
    assert_eq!(body["exp"].as_i64().unwrap(), secs(&t.expires_at));
    assert!(body["cnf"]["x5t#S256"].is_string());

    let inactive = serde_json::json!({"active": false});
    // Another audience than the caller's.
    let other = agent
        .issue_token(token_request(&task.task_id, TOOLS, &["read:files"]))
        .await
        .unwrap();
    assert_eq!(
        introspect(&broker, Some(&files), &other.token).await.2,
        inactive
    );
    // Garbage, and a forged payload on a real signature.
    assert_eq!(
        introspect(&broker, Some(&files), "garbage").await.2,
        inactive
    );
    let parts: Vec<&str> = t.token.split('.').collect();
    let forged = format!("{}.{}x.{}", parts[0], parts[1], parts[2]);
    assert_eq!(introspect(&broker, Some(&files), &forged).await.2, inactive);
    // Revoked.
    op.admin()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: t.lease_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        introspect(&broker, Some(&files), &t.token).await.2,
        inactive
    );

    // Callers: none, or one not allowed to introspect.
    let (status, _, body) = introspect(&broker, None, &other.token).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");
    let demo = identity(&broker, "spiffe://example.org/agent/demo");
    let (status, _, body) = introspect(&broker, Some(&demo), &other.token).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "unauthorized_client");
    // An empty token is no token (RFC 6749 §3.1): a malformed request.
    let (status, _, body) = introspect(&broker, Some(&files), "").await;
    assert_eq!(
        (status, &body["error"]),
        (400, &serde_json::json!("invalid_request"))
    );
}

/// A token signed with the broker's own key (as a stolen key or a bug
/// would sign it) whose audience, scopes, expiry or binding differ from
/// its lease's is inactive: introspection answers from the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_compares_the_token_with_its_lease() {
    use jsonwebtoken::{EncodingKey, Header};
    let broker = TestBroker::start_with(|c| {
        c.introspection = vec![mayfly_broker::config::IntrospectionConfig {
            clients: vec!["spiffe://example.org/api/files".parse().unwrap()],
            audiences: vec!["https://*".into()],
        }];
    })
    .await;
    let agent = broker.agent().await;
    let files = identity(&broker, "spiffe://example.org/api/files");
    let task = start(&agent).await;
    let t = issue(&agent, &task.task_id).await;
    let claims: Value = claims_unverified(&t.token);
    let header = jsonwebtoken::decode_header(&t.token).unwrap();
    let pem = std::fs::read(broker.config.data_dir.join("jwt-es256.key")).unwrap();
    let resign = |c: &Value| {
        let mut h = Header::new(jsonwebtoken::Algorithm::ES256);
        h.typ = header.typ.clone();
        h.kid = header.kid.clone();
        jsonwebtoken::encode(&h, c, &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap()
    };
    // Re-signed unchanged: active (the forgery itself is sound).
    assert_eq!(
        introspect(&broker, Some(&files), &resign(&claims)).await.2["active"],
        true
    );
    let mut widened = claims.clone();
    widened["scope"] = "read:files write:files".into();
    let mut moved = claims.clone();
    moved["aud"] = TOOLS.into();
    let mut longer = claims.clone();
    longer["exp"] = (claims["exp"].as_i64().unwrap() + 600).into();
    let mut bound = claims.clone();
    bound["cnf"] = serde_json::json!({"x5t#S256": "zf6AEiCtVfOn9YoojIS7WAaVlDf-HkzY6xajYQVszzY"});
    for (what, c) in [
        ("scope", widened),
        ("aud", moved),
        ("exp", longer),
        ("cnf", bound),
    ] {
        let (status, _, body) = introspect(&broker, Some(&files), &resign(&c)).await;
        assert_eq!(
            (status, &body),
            (200, &serde_json::json!({"active": false})),
            "{what}"
        );
    }
}
