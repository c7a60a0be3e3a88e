//! The Admin (operator) API: listing with filters and pages, revocation of a
//! lease, a task and an agent, and who may call it.

use mayfly_client::pb;
use mayfly_testkit::TestBroker;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn list_leases_filters_and_pages() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let bob = broker.client_as("spiffe://example.org/agent/bob").await;
    let op = broker.operator().await;

    let t1 = start(&agent).await;
    let mut mine = vec![t1.task_id.clone()];
    for _ in 0..5 {
        mine.push(issue(&agent, &t1.task_id).await.lease_id);
    }
    let tb = bob
        .broker()
        .start_task(start_request("bob", &[API], &["read:files"]))
        .await
        .unwrap()
        .into_inner();
    let lb = issue(&bob, &tb.task_id).await;

    let page = op
        .admin()
        .list_leases(pb::ListLeasesRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.leases.len(), 2);
    assert!(!page.next_page_token.is_empty());
    let all = all_leases(
        &op,
        pb::ListLeasesRequest {
            page_size: 3,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all.len(), 8);

    let by_task = all_leases(
        &op,
        pb::ListLeasesRequest {
            task_id: t1.task_id.clone(),
            ..Default::default()
        },
    )
    .await;
    let mut got: Vec<String> = by_task.iter().map(|l| l.lease_id.clone()).collect();
    got.sort();
    mine.sort();
    assert_eq!(got, mine);

    let by_agent = all_leases(
        &op,
        pb::ListLeasesRequest {
            agent_id: "spiffe://example.org/agent/bob".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_agent.len(), 2);
    assert!(by_agent.iter().any(|l| l.lease_id == lb.lease_id));

    let tasks_only = all_leases(
        &op,
        pb::ListLeasesRequest {
            kind: pb::LeaseKind::Task as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(tasks_only.len(), 2);

    let tasks = op
        .admin()
        .list_tasks(pb::ListTasksRequest {
            agent_id: "spiffe://example.org/agent/bob".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].task_id, tb.task_id);
    assert_eq!(tasks[0].intent, "bob");

    assert_status(
        op.admin()
            .list_leases(pb::ListLeasesRequest {
                page_size: 5000,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "page_size",
    );
    assert_status(
        op.admin()
            .list_leases(pb::ListLeasesRequest {
                page_token: "garbage".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "page_token",
    );
}

#[tokio::test]
async fn revoke_lease_task_and_agent() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let bob = broker.client_as("spiffe://example.org/agent/bob").await;
    let op = broker.operator().await;

    // One lease.
    let t1 = start(&agent).await;
    let a = issue(&agent, &t1.task_id).await;
    let b = issue(&agent, &t1.task_id).await;
    let r = op
        .admin()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: a.lease_id.clone(),
            note: "leaked in a log".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked_leases, vec![a.lease_id.clone()]);
    let la = lease(&op, &a.lease_id).await;
    assert_eq!(la.state, pb::LeaseState::Revoked as i32);
    assert_eq!(la.revocation_reason, pb::RevocationReason::Operator as i32);
    assert_eq!(la.revoked_by, "spiffe://example.org/operator/admin");
    assert_eq!(
        lease(&op, &b.lease_id).await.state,
        pb::LeaseState::Active as i32
    );
    assert_status(
        op.admin()
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: a.lease_id.clone(),
                note: String::new(),
            })
            .await,
        Code::FailedPrecondition,
        "already revoked",
    );

    // A task: its lease reason is operator, its credentials' task_revoked.
    let r = op
        .admin()
        .revoke_task(pb::RevokeTaskRequest {
            task_id: t1.task_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.revoked_leases,
        vec![t1.task_id.clone(), b.lease_id.clone()]
    );
    assert_eq!(
        lease(&op, &b.lease_id).await.revocation_reason,
        pb::RevocationReason::TaskRevoked as i32
    );
    let got = agent
        .broker()
        .get_task(pb::GetTaskRequest {
            task_id: t1.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, pb::TaskState::Revoked as i32);
    assert_status(
        agent
            .issue_token(token_request(&t1.task_id, API, &[]))
            .await,
        Code::FailedPrecondition,
        "is revoked",
    );

    // An agent: every live task and lease of it, nobody else's.
    let t2 = start(&agent).await;
    let t3 = start(&agent).await;
    let c = issue(&agent, &t2.task_id).await;
    let d = issue(&agent, &t3.task_id).await;
    let tb = bob
        .broker()
        .start_task(start_request("bob", &[API], &["read:files"]))
        .await
        .unwrap()
        .into_inner();
    let lb = issue(&bob, &tb.task_id).await;
    let r = op
        .admin()
        .revoke_agent(pb::RevokeAgentRequest {
            agent_id: "spiffe://example.org/agent/demo".into(),
            note: "compromised".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = r.revoked_leases.clone();
    got.sort();
    let mut want = vec![
        t2.task_id.clone(),
        t3.task_id.clone(),
        c.lease_id.clone(),
        d.lease_id.clone(),
    ];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(
        lease(&op, &c.lease_id).await.revocation_reason,
        pb::RevocationReason::AgentRevoked as i32
    );
    assert_eq!(
        lease(&op, &lb.lease_id).await.state,
        pb::LeaseState::Active as i32
    );
    assert_status(
        op.admin()
            .revoke_agent(pb::RevokeAgentRequest {
                agent_id: "not-a-spiffe-id".into(),
                note: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "agent_id",
    );
    assert_status(
        op.admin()
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: lb.lease_id.clone(),
                note: "bad\u{7}note".into(),
            })
            .await,
        Code::InvalidArgument,
        "note",
    );
    assert_eq!(
        lease(&op, &lb.lease_id).await.state,
        pb::LeaseState::Active as i32,
        "refused call changed nothing"
    );
}

#[tokio::test]
async fn only_operators_may_call_admin() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let other_op = broker.client_as("spiffe://example.org/operator/bob").await;
    let lookalike = broker.client_as("spiffe://example.org/operators/eve").await;

    assert_status(
        agent
            .admin()
            .list_leases(pb::ListLeasesRequest::default())
            .await,
        Code::PermissionDenied,
        "not an operator",
    );
    assert_status(
        lookalike
            .admin()
            .list_tasks(pb::ListTasksRequest::default())
            .await,
        Code::PermissionDenied,
        "not an operator",
    );
    assert_status(
        agent
            .admin()
            .revoke_agent(pb::RevokeAgentRequest {
                agent_id: "spiffe://example.org/agent/demo".into(),
                note: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "not an operator",
    );
    // `spiffe://example.org/operator/*` covers every operator below it.
    other_op
        .admin()
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn exact_operator_patterns() {
    let broker = TestBroker::start_with(|c| {
        c.operators = vec!["spiffe://example.org/operator/admin".parse().unwrap()];
    })
    .await;
    broker
        .operator()
        .await
        .admin()
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap();
    let bob = broker.client_as("spiffe://example.org/operator/bob").await;
    assert_status(
        bob.admin()
            .list_leases(pb::ListLeasesRequest::default())
            .await,
        Code::PermissionDenied,
        "not an operator",
    );
}

#[tokio::test]
async fn revoking_an_unknown_agent_says_so_and_a_lock_can_come_first() {
    let broker = TestBroker::start().await;
    let op = broker.operator().await;
    let stranger = "spiffe://example.org/agent/never-seen";
    assert_status(
        op.admin()
            .revoke_agent(pb::RevokeAgentRequest {
                agent_id: stranger.into(),
                note: String::new(),
            })
            .await,
        Code::NotFound,
        "has no task or credential on record",
    );
    // A known agent with nothing live: an empty answer, not NOT_FOUND.
    let agent = broker.agent().await;
    let t = start(&agent).await;
    agent.complete_task(&t.task_id).await.unwrap();
    let r = op
        .admin()
        .revoke_agent(pb::RevokeAgentRequest {
            agent_id: "spiffe://example.org/agent/demo".into(),
            note: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.revoked_leases.is_empty());

    // Locked before it ever showed up, for an hour: it gets nothing.
    let lock = op
        .admin()
        .lock_agent(pb::LockAgentRequest {
            agent_id: stranger.into(),
            reason: "decommissioned".into(),
            ttl_seconds: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(lock.revoked_leases.is_empty());
    assert!(lock.lock.unwrap().expires_at.is_some());
    let client = broker.client_as(stranger).await;
    assert_status(
        client
            .broker()
            .start_task(start_request("x", &[API], &["read:files"]))
            .await,
        Code::PermissionDenied,
        "(decommissioned): no new task or credential until",
    );
    // Bad lock requests: no reason, a task identity, not an operator.
    for (agent_id, reason, needle) in [
        (stranger, "", "reason is required"),
        (
            "spiffe://example.org/agent/demo/task/AAAAAAAAAAAAAAAAAAAAAA",
            "x",
            "is a task certificate's identity",
        ),
        (stranger, "bad\nreason", "without control characters"),
    ] {
        assert_status(
            op.admin()
                .lock_agent(pb::LockAgentRequest {
                    agent_id: agent_id.into(),
                    reason: reason.into(),
                    ttl_seconds: 0,
                })
                .await,
            Code::InvalidArgument,
            needle,
        );
    }
    assert_status(
        agent
            .admin()
            .lock_agent(pb::LockAgentRequest {
                agent_id: stranger.into(),
                reason: "x".into(),
                ttl_seconds: 0,
            })
            .await,
        Code::PermissionDenied,
        "is not an operator",
    );
}
