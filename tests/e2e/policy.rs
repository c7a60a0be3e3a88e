//! Cedar policies at request time: denials name the policy, approvals are
//! single-use and bound to the request, context changes revoke what is no
//! longer allowed (and the feed says so), reloads keep the old set when the
//! new one is invalid, and issuance is rate limited per agent.

use std::collections::HashMap;
use std::time::Duration;

use mayfly_client::{Client, RefusalKind, pb};
use mayfly_testkit::TestBroker;
use tonic::Code;

use crate::common::*;

async fn task_with(agent: &Client, context: &[(&str, &str)], scopes: &[&str]) -> pb::Task {
    let mut req = start_request("policy", &[API], scopes);
    req.context = context
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<HashMap<_, _>>();
    agent.broker().start_task(req).await.unwrap().into_inner()
}

#[tokio::test]
async fn a_denial_names_the_deciding_policy_never_its_text() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let mut req = start_request(
        "export the customer table",
        &[API],
        &["read:files", "export:files"],
    );
    req.context
        .insert("data_sensitivity".into(), "restricted".into());
    let err = agent.broker().start_task(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("denied by policy \"dev-no-export-of-restricted-data\""),
        "{}",
        err.message()
    );
    assert!(
        !err.message().contains("getTag") && !err.message().contains("context."),
        "{}",
        err.message()
    );
    // Clients need not parse the message: metadata names the error and
    // the policy.
    let meta = |key: &str| {
        err.metadata()
            .get(key)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(meta("mayfly-error").as_deref(), Some("denied"));
    assert_eq!(
        meta("mayfly-policy-id").as_deref(),
        Some("dev-no-export-of-restricted-data")
    );

    // The same envelope on public data is allowed, but no permit covers an
    // export token: the default deny names no policy.
    let task = task_with(
        &agent,
        &[("data_sensitivity", "public")],
        &["read:files", "export:files"],
    )
    .await;
    let err = agent
        .issue_token(token_request(&task.task_id, API, &["export:files"]))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied);
    assert_eq!(
        err.message,
        format!("denied: no policy permits spiffe://example.org/agent/demo to issue_token {API}")
    );
    // Typed from the metadata: `mayfly-error: denied`, no policy id.
    assert_eq!(err.name, "denied");
    assert_eq!(err.kind, RefusalKind::Denied { policy_id: None });
    // Reads are allowed and capped by @max_ttl("10m").
    let mut t = token_request(&task.task_id, API, &["read:files"]);
    t.ttl_seconds = 3600;
    let read = agent.issue_token(t).await.unwrap();
    let claims = validate(&broker, &read.token, API).await;
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_single_use_and_bound_to_the_request() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let task = task_with(
        &agent,
        &[("environment", "production")],
        &["read:files", "write:files"],
    )
    .await;
    let write = token_request(&task.task_id, API, &["write:files"]);

    // Policy asks for approval: no token, a pending approval instead.
    let pending = agent.issue_token(write.clone()).await.unwrap();
    assert!(pending.token.is_empty() && pending.lease_id.is_empty());
    let approval = pending.approval.unwrap();
    assert_eq!(approval.state, pb::ApprovalState::Pending as i32);
    assert_eq!(approval.policy_id, "dev-write-production");
    assert_eq!(approval.scopes, vec!["write:files".to_owned()]);
    let id = approval.approval_id.clone();
    let with = |mut r: pb::IssueTokenRequest| {
        r.approval_id = id.clone();
        r
    };
    assert_status(
        agent.issue_token(with(write.clone())).await,
        Code::FailedPrecondition,
        "is pending",
    );
    let listed = op
        .admin()
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.approvals.len(), 1);
    assert_eq!(listed.approvals[0].task_intent, "policy");
    assert_eq!(
        listed.approvals[0]
            .task_context
            .get("environment")
            .map(String::as_str),
        Some("production")
    );
    // An agent may not decide; an operator approves.
    assert_status(
        agent
            .admin()
            .approve(pb::DecideApprovalRequest {
                approval_id: id.clone(),
                reason: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "not an operator",
    );
    let approved = op
        .admin()
        .approve(pb::DecideApprovalRequest {
            approval_id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approved.decided_by, "spiffe://example.org/operator/admin");
    let waited = agent
        .broker()
        .wait_approval(pb::WaitApprovalRequest {
            approval_id: id.clone(),
            wait_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(waited.state, pb::ApprovalState::Approved as i32);

    // Someone else cannot use it; a different request cannot use it.
    let bob = broker.client_as("spiffe://example.org/agent/bob").await;
    assert_status(
        bob.issue_token(with(write.clone())).await,
        Code::NotFound,
        "not found",
    );
    let mut longer = with(write.clone());
    longer.ttl_seconds = 60;
    assert_status(
        agent.issue_token(longer).await,
        Code::PermissionDenied,
        "different request",
    );
    let both = with(token_request(
        &task.task_id,
        API,
        &["read:files", "write:files"],
    ));
    assert_status(
        agent.issue_token(both).await,
        Code::PermissionDenied,
        "different request",
    );

    // Exactly the approved request, once.
    let token = agent.issue_token(with(write.clone())).await.unwrap();
    assert!(token.approval.is_none());
    let claims = validate(&broker, &token.token, API).await;
    assert_eq!(claims["scope"], "write:files");
    assert_status(
        agent.issue_token(with(write.clone())).await,
        Code::FailedPrecondition,
        "is consumed",
    );

    // A denial is final and says why.
    let again = agent
        .issue_token(write.clone())
        .await
        .unwrap()
        .approval
        .unwrap();
    op.admin()
        .deny(pb::DecideApprovalRequest {
            approval_id: again.approval_id.clone(),
            reason: "not during the freeze".into(),
        })
        .await
        .unwrap();
    let mut denied = write.clone();
    denied.approval_id = again.approval_id.clone();
    assert_status(
        agent.issue_token(denied).await,
        Code::PermissionDenied,
        "is denied",
    );
    assert_status(
        op.admin()
            .approve(pb::DecideApprovalRequest {
                approval_id: again.approval_id,
                reason: String::new(),
            })
            .await,
        Code::FailedPrecondition,
        "is denied",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_change_revokes_exactly_what_is_no_longer_allowed() {
    let broker = TestBroker::start_with(|c| c.feed.heartbeat = Duration::from_millis(200)).await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let task = task_with(
        &agent,
        &[("environment", "staging")],
        &["read:files", "write:files"],
    )
    .await;
    let read = agent
        .issue_token(token_request(&task.task_id, API, &["read:files"]))
        .await
        .unwrap();
    let write = agent
        .issue_token(token_request(&task.task_id, API, &["write:files"]))
        .await
        .unwrap();
    assert!(write.approval.is_none(), "writes are automatic in staging");

    let validator = broker
        .client_with(
            &broker
                .ca()
                .issue_svid(
                    &"spiffe://example.org/api/validator".parse().unwrap(),
                    Duration::from_secs(600),
                )
                .unwrap(),
        )
        .await
        .unwrap();
    let mut feed = pb::revocations_client::RevocationsClient::new(validator.channel())
        .watch_revocations(pb::WatchRequest { from_cursor: 0 })
        .await
        .unwrap()
        .into_inner();

    // Moving to production: writes now need an approval they did not have.
    let changed = agent
        .broker()
        .update_task_context(pb::UpdateTaskContextRequest {
            task_id: task.task_id.clone(),
            set: HashMap::from([("environment".to_owned(), "production".to_owned())]),
            remove: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.revoked_leases, vec![write.lease_id.clone()]);
    assert_eq!(
        changed
            .task
            .unwrap()
            .context
            .get("environment")
            .map(String::as_str),
        Some("production")
    );
    let w = lease(&op, &write.lease_id).await;
    assert_eq!(w.state, pb::LeaseState::Revoked as i32);
    assert_eq!(
        w.revocation_reason,
        pb::RevocationReason::ContextChanged as i32
    );
    assert_eq!(
        lease(&op, &read.lease_id).await.state,
        pb::LeaseState::Active as i32
    );
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), feed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if !e.heartbeat {
            assert_eq!(e.lease_id, write.lease_id);
            assert_eq!(e.reason, pb::RevocationReason::ContextChanged as i32);
            break;
        }
    }

    // Restricted data with export in the envelope: the task itself goes.
    let export = task_with(&agent, &[], &["read:files", "export:files"]).await;
    let r = agent
        .issue_token(token_request(&export.task_id, API, &["read:files"]))
        .await
        .unwrap();
    let changed = agent
        .broker()
        .update_task_context(pb::UpdateTaskContextRequest {
            task_id: export.task_id.clone(),
            set: HashMap::from([("data_sensitivity".to_owned(), "restricted".to_owned())]),
            remove: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        changed.revoked_leases,
        vec![export.task_id.clone(), r.lease_id.clone()]
    );
    assert_eq!(changed.task.unwrap().state, pb::TaskState::Revoked as i32);

    // Bad changes are refused and change nothing.
    let bad = agent
        .broker()
        .update_task_context(pb::UpdateTaskContextRequest {
            task_id: task.task_id.clone(),
            set: HashMap::from([("bad key".to_owned(), "x".to_owned())]),
            remove: vec![],
        })
        .await;
    assert_status(bad, Code::InvalidArgument, "context key");
    let bob = broker.client_as("spiffe://example.org/agent/bob").await;
    let theirs = bob
        .broker()
        .update_task_context(pb::UpdateTaskContextRequest {
            task_id: task.task_id.clone(),
            set: HashMap::new(),
            remove: vec!["environment".into()],
        })
        .await;
    assert_status(theirs, Code::NotFound, "not found");
    assert_eq!(
        lease(&op, &read.lease_id).await.state,
        pb::LeaseState::Active as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_old_policies_and_a_good_one_reevaluates() {
    let broker =
        TestBroker::start_with(|c| c.policy.reload_interval = Duration::from_millis(100)).await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let dir = broker.config.policy.dir.clone();
    let original = std::fs::read_to_string(dir.join("mayfly.cedar")).unwrap();
    let task = task_with(&agent, &[], &["read:files"]).await;
    let before = agent
        .issue_token(token_request(&task.task_id, API, &["read:files"]))
        .await
        .unwrap();

    // An invalid file: the broker keeps deciding with the old set.
    std::fs::write(
        dir.join("broken.cedar"),
        "@id(\"broken\")\npermit(principal, action, resource) when { context.nope };\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent
        .issue_token(token_request(&task.task_id, API, &["read:files"]))
        .await
        .unwrap();
    assert_eq!(
        lease(&op, &before.lease_id).await.state,
        pb::LeaseState::Active as i32
    );

    // A valid set without the read permit: reads stop, live reads are revoked.
    std::fs::remove_file(dir.join("broken.cedar")).unwrap();
    let without_read = mayfly_testkit::dev_policies_without(&broker.config, "dev-read");
    assert_ne!(without_read, original);
    std::fs::write(dir.join("mayfly.cedar"), without_read).unwrap();
    let mut revoked = false;
    for _ in 0..50 {
        if lease(&op, &before.lease_id).await.state == pb::LeaseState::Revoked as i32 {
            revoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(revoked, "the reload re-evaluated the live read token");
    assert_eq!(
        lease(&op, &before.lease_id).await.revocation_reason,
        pb::RevocationReason::ContextChanged as i32
    );
    assert_status(
        agent
            .issue_token(token_request(&task.task_id, API, &["read:files"]))
            .await,
        Code::PermissionDenied,
        "no policy permits",
    );
}

#[tokio::test]
async fn issuance_is_rate_limited_per_agent() {
    let broker = TestBroker::start_with(|c| {
        c.rate_limit.per_second = 1.0;
        c.rate_limit.burst = 2.0;
    })
    .await;
    let agent = broker.agent().await;
    let task = start(&agent).await;
    issue(&agent, &task.task_id).await;
    issue(&agent, &task.task_id).await;
    let err = agent
        .issue_token(token_request(&task.task_id, API, &["read:files"]))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::ResourceExhausted, "{}", err.message);
    assert!(err.message.contains("retry in"), "{}", err.message);
    // From `retry-after: 1`.
    assert_eq!(
        err.kind,
        RefusalKind::RateLimited {
            retry_after: Duration::from_secs(1)
        }
    );
    // Another agent has its own bucket.
    let bob = broker.client_as("spiffe://example.org/agent/bob").await;
    let t = bob
        .broker()
        .start_task(start_request("b", &[API], &["read:files"]))
        .await
        .unwrap()
        .into_inner();
    issue(&bob, &t.task_id).await;
    // And the bucket refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    issue(&agent, &task.task_id).await;
}
