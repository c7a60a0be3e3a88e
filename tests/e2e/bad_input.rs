//! Every malformed or hostile request gets a clear status that says what was
//! wrong, and leaves no state behind.

use std::collections::HashMap;

use mayfly_client::pb;
use mayfly_testkit::TestBroker;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn start_task_rejects_bad_requests() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let b = || agent.broker();

    let mut r = start_request("", &[API], &[]);
    assert_status(
        b().start_task(r.clone()).await,
        Code::InvalidArgument,
        "intent is empty",
    );
    r.intent = "x".repeat(4097);
    assert_status(
        b().start_task(r.clone()).await,
        Code::InvalidArgument,
        "intent is 4097 bytes",
    );
    r.intent = "ok".into();
    r.context = (0..65)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect::<HashMap<_, _>>();
    assert_status(
        b().start_task(r.clone()).await,
        Code::InvalidArgument,
        "at most 64",
    );
    r.context = HashMap::from([("bad key".to_owned(), "v".to_owned())]);
    assert_status(
        b().start_task(r.clone()).await,
        Code::InvalidArgument,
        "context key",
    );
    r.context.clear();
    r.audiences = vec![];
    assert_status(
        b().start_task(r.clone()).await,
        Code::InvalidArgument,
        "at least one audience",
    );
    r.audiences = vec![String::new()];
    assert_status(
        b().start_task(r.clone()).await,
        Code::InvalidArgument,
        "audience is empty",
    );
    r.audiences = vec![API.into()];
    r.scopes = vec!["read files".into()];
    assert_status(
        b().start_task(r.clone()).await,
        Code::InvalidArgument,
        "scope \"read files\" is invalid",
    );
    r.scopes = vec!["read:\u{1}files".into()];
    assert_status(
        b().start_task(r.clone()).await,
        Code::InvalidArgument,
        "is invalid",
    );
    r.scopes = vec!["read:files".into()];
    r.ttl_seconds = u64::MAX;
    assert_status(
        b().start_task(r.clone()).await,
        Code::InvalidArgument,
        "absurd",
    );
    r.ttl_seconds = 0;
    r.audiences = vec!["https://evil.example.com".into()];
    assert_status(
        b().start_task(r.clone()).await,
        Code::PermissionDenied,
        "start_task https://evil.example.com",
    );

    let all = all_leases(&broker.operator().await, pb::ListLeasesRequest::default()).await;
    assert!(
        all.is_empty(),
        "refused requests left state behind: {all:?}"
    );
}

#[tokio::test]
async fn issue_token_rejects_bad_requests() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let bob = broker.client_as("spiffe://example.org/agent/bob").await;
    let op = broker.operator().await;
    let task = agent
        .broker()
        .start_task(start_request("t", &[API], &["read:files"]))
        .await
        .unwrap()
        .into_inner();
    let id = task.task_id.as_str();

    assert_status(
        agent
            .issue_token(token_request("not-an-id", API, &[]))
            .await,
        Code::InvalidArgument,
        "task_id",
    );
    assert_status(
        agent
            .issue_token(token_request("AAAAAAAAAAAAAAAAAAAAAA", API, &[]))
            .await,
        Code::NotFound,
        "not found",
    );
    assert_status(
        agent.issue_token(token_request(id, "", &[])).await,
        Code::InvalidArgument,
        "audience",
    );
    assert_status(
        agent
            .issue_token(token_request(id, TOOLS, &["read:files"]))
            .await,
        Code::PermissionDenied,
        "audience \"https://tools.example.com\" outside the task's envelope",
    );
    assert_status(
        agent
            .issue_token(token_request(id, API, &["read:files", "write:files"]))
            .await,
        Code::PermissionDenied,
        "scopes [\"write:files\"] outside the task's envelope",
    );
    assert_status(
        agent
            .issue_token(token_request(id, API, &["two words"]))
            .await,
        Code::InvalidArgument,
        "scope",
    );
    assert_status(
        agent
            .issue_token(token_request(id, API, &["tab\there"]))
            .await,
        Code::InvalidArgument,
        "scope",
    );
    let mut absurd = token_request(id, API, &[]);
    absurd.ttl_seconds = 10_000_000_000;
    assert_status(
        agent.issue_token(absurd).await,
        Code::InvalidArgument,
        "absurd",
    );

    // Someone else's task does not exist for bob, whatever he tries.
    let unknown = format!("task {id} not found");
    assert_status(
        bob.issue_token(token_request(id, API, &[])).await,
        Code::NotFound,
        &unknown,
    );
    assert_status(
        bob.broker()
            .get_task(pb::GetTaskRequest { task_id: id.into() })
            .await,
        Code::NotFound,
        &unknown,
    );
    assert_status(bob.complete_task(id).await, Code::NotFound, &unknown);

    // Only the task's own lease exists: no refused call recorded anything.
    let all = all_leases(&op, pb::ListLeasesRequest::default()).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].lease_id, task.task_id);
    assert_eq!(
        all[0].state,
        pb::LeaseState::Active as i32,
        "bob's complete did nothing"
    );
}

#[tokio::test]
async fn update_task_context_bounds_set_and_remove_and_writes_nothing_when_refused() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let task = start(&agent).await;
    let update = |set: HashMap<String, String>, remove: Vec<String>| pb::UpdateTaskContextRequest {
        task_id: task.task_id.clone(),
        set,
        remove,
    };
    let trail_before = audit_lines(&op).await;
    let many: Vec<String> = (0..10_000).map(|i| format!("k{i}")).collect();
    let cases: Vec<(HashMap<String, String>, Vec<String>, &str)> = vec![
        (
            HashMap::new(),
            many,
            "remove has 10000 keys; at most 64 are allowed",
        ),
        (HashMap::new(), vec!["k".repeat(5000)], "context key \"kkkk"),
        (
            HashMap::new(),
            vec!["bad\u{7}key".into()],
            "context key \"bad\\u{7}key\" is invalid",
        ),
        (
            HashMap::new(),
            vec![String::new()],
            "context key \"\" is invalid",
        ),
        (
            (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
            vec![],
            "set has 65 keys; at most 64 are allowed",
        ),
        (
            HashMap::from([("environment".to_owned(), "prod".to_owned())]),
            vec!["environment".into()],
            "context key \"environment\" is both set and removed",
        ),
        (
            HashMap::from([("k".to_owned(), "v\u{0}".to_owned())]),
            vec![],
            "context value for \"k\" is invalid",
        ),
    ];
    for (set, remove, needle) in cases {
        assert_status(
            agent
                .broker()
                .update_task_context(update(set, remove))
                .await,
            Code::InvalidArgument,
            needle,
        );
    }
    // Nothing changed: same revision-free context, no new audit record.
    let got = agent
        .broker()
        .get_task(pb::GetTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.context, task.context);
    assert_eq!(audit_lines(&op).await, trail_before);
    // Within the bounds it works: 64 removals of absent keys are fine.
    let ok: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
    agent
        .broker()
        .update_task_context(update(HashMap::new(), ok))
        .await
        .unwrap();
}

/// How many records the audit trail holds.
async fn audit_lines(op: &mayfly_client::Client) -> usize {
    audit_trail(op).await.len()
}

#[tokio::test]
async fn admin_fields_are_bounded() {
    let broker = TestBroker::start().await;
    let op = broker.operator().await;
    let long = "x".repeat(513);
    assert_status(
        op.admin()
            .revoke_agent(pb::RevokeAgentRequest {
                agent_id: "spiffe://example.org/agent/demo".into(),
                note: long.clone(),
            })
            .await,
        Code::InvalidArgument,
        "note must be at most 512 bytes",
    );
    assert_status(
        op.admin()
            .revoke_agent(pb::RevokeAgentRequest {
                agent_id: format!("spiffe://example.org/{}", "a".repeat(2100)),
                note: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "agent_id: SPIFFE ID or trust domain is too long",
    );
    assert_status(
        op.admin()
            .list_leases(pb::ListLeasesRequest {
                page_size: 1001,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "page_size 1001 exceeds 1000",
    );
    let read = |r: pb::ReadAuditRequest| {
        let mut admin = op.admin();
        async move { admin.read_audit(r).await.map(|_| ()) }
    };
    assert_status(
        read(pb::ReadAuditRequest {
            after_cursor: "9".repeat(65),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "after_cursor is 65 bytes",
    );
    assert_status(
        read(pb::ReadAuditRequest {
            last: Some(100_001),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "last must be at most 100000",
    );
}

#[tokio::test]
async fn an_oversized_message_is_resource_exhausted() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let mut r = start_request("big", &[API], &["read:files"]);
    r.intent = "x".repeat(300 * 1024);
    assert_status(
        agent.broker().start_task(r).await,
        Code::ResourceExhausted,
        "request message is",
    );
    // The connection stays usable for the next, valid request.
    start(&agent).await;
}
