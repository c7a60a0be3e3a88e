//! Several broker replicas on one real Redis: shared state, cross-replica
//! revocation, the complete/issue race across replicas, and Redis outages.

use mayfly_broker::store::CredentialStore;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mayfly_client::{RefusalKind, pb};
use mayfly_testkit::{RedisServer, TestBroker, https_get};
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_tasks_leases_and_revocations() {
    let redis = RedisServer::start();
    let a = TestBroker::start_on_redis(&redis.url()).await;
    let b = a.replica().await;
    let (agent_a, agent_b) = (a.agent().await, b.agent().await);
    let (op_a, op_b) = (a.operator().await, b.operator().await);

    let task = start(&agent_a).await;
    let got = agent_b
        .broker()
        .get_task(pb::GetTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, task);

    // Issued through B, validated against A's JWKS: the replicas share the key.
    let t1 = issue(&agent_b, &task.task_id).await;
    let t2 = issue(&agent_a, &task.task_id).await;
    validate(&a, &t1.token, API).await;
    validate(&b, &t2.token, API).await;

    // Revoked through A, seen revoked through B at once.
    op_a.admin()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: t1.lease_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap();
    let seen = lease(&op_b, &t1.lease_id).await;
    assert_eq!(seen.state, pb::LeaseState::Revoked as i32);
    assert_eq!(seen.revoked_by, "spiffe://example.org/operator/admin");

    // Completed through B: nothing of the task is active anywhere.
    let done = agent_b.complete_task(&task.task_id).await.unwrap();
    assert_eq!(
        done.revoked_leases,
        vec![task.task_id.clone(), t2.lease_id.clone()]
    );
    for op in [&op_a, &op_b] {
        let active = all_leases(
            op,
            pb::ListLeasesRequest {
                task_id: task.task_id.clone(),
                state: pb::LeaseState::Active as i32,
                ..Default::default()
            },
        )
        .await;
        assert!(active.is_empty());
    }
    assert_status(
        agent_a
            .issue_token(token_request(&task.task_id, API, &[]))
            .await,
        Code::FailedPrecondition,
        "is completed",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_on_one_replica_racing_issue_on_both() {
    let redis = RedisServer::start();
    let a = TestBroker::start_on_redis(&redis.url()).await;
    let b = a.replica().await;
    let (agent_a, agent_b) = (a.agent().await, b.agent().await);
    let op = a.operator().await;
    for _round in 0..5 {
        let task = start(&agent_a).await;
        let mut issuers = Vec::new();
        for i in 0..32 {
            let agent = if i % 2 == 0 {
                agent_a.clone()
            } else {
                agent_b.clone()
            };
            let id = task.task_id.clone();
            issuers.push(tokio::spawn(async move {
                agent
                    .issue_token(token_request(&id, API, &["read:files"]))
                    .await
            }));
        }
        tokio::task::yield_now().await;
        agent_b.complete_task(&task.task_id).await.unwrap();
        let mut handed_out = Vec::new();
        for h in issuers {
            match h.await.unwrap() {
                Ok(t) => handed_out.push(t.lease_id),
                Err(s) => assert_eq!(s.code, Code::FailedPrecondition, "{}", s.message),
            }
        }
        for id in &handed_out {
            assert_eq!(
                lease(&op, id).await.state,
                pb::LeaseState::Revoked as i32,
                "{id}"
            );
        }
        let active = all_leases(
            &op,
            pb::ListLeasesRequest {
                task_id: task.task_id.clone(),
                state: pb::LeaseState::Active as i32,
                ..Default::default()
            },
        )
        .await;
        assert!(active.is_empty(), "{active:?}");
    }
}

/// Sets `environment` on a task through `agent`.
async fn set_environment(agent: &mayfly_client::Client, task: &str, env: &str) {
    agent
        .broker()
        .update_task_context(pb::UpdateTaskContextRequest {
            task_id: task.to_owned(),
            set: [("environment".to_owned(), env.to_owned())].into(),
            remove: vec![],
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_change_through_one_replica_decides_the_next_issue_on_the_other() {
    let redis = RedisServer::start();
    let a = TestBroker::start_on_redis(&redis.url()).await;
    let b = a.replica().await;
    let (agent_a, agent_b) = (a.agent().await, b.agent().await);
    let mut req = start_request("replicas", &[API], &["read:files", "write:files"]);
    req.context = [("environment".to_owned(), "staging".to_owned())].into();
    let task = agent_a.broker().start_task(req).await.unwrap().into_inner();
    let id = task.task_id.clone();

    // B issues under staging (automatic), so it has read the task.
    let first = agent_b.issue_token(write_request(&id)).await.unwrap();
    assert!(first.approval.is_none() && !first.token.is_empty());

    // Production through A: B's next write is decided on production and
    // needs an approval, although B last saw staging.
    set_environment(&agent_a, &id, "production").await;
    let gated = agent_b.issue_token(write_request(&id)).await.unwrap();
    assert!(
        gated.token.is_empty(),
        "a write in production needs approval"
    );
    let approval = gated.approval.expect("an approval is pending");
    assert_eq!(approval.state, pb::ApprovalState::Pending as i32);

    // Back to staging through A: B, which last saw production, issues the
    // write at once instead of opening another approval.
    set_environment(&agent_a, &id, "staging").await;
    let again = agent_b.issue_token(write_request(&id)).await.unwrap();
    assert!(again.approval.is_none() && !again.token.is_empty());
    assert_eq!(
        claims_unverified(&again.token)["scope"].as_str(),
        Some("write:files")
    );
}

/// A newer replica on the same Redis may record a kind of lease this
/// build does not know. This broker shows it, never takes it for a
/// credential, and revokes it on a context change rather than keep what
/// it cannot decide again. (The "newer replica" is the store API with a
/// lease of an unknown kind, written as any replica writes one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_an_unknown_kind_is_revoked_on_a_context_change() {
    use mayfly_broker::store::{RedisStore, RedisTarget};
    use mayfly_core::{Lease, LeaseDetail, LeaseId, LeaseStatus, TaskId, Timestamp};

    let redis = RedisServer::start();
    let broker = TestBroker::start_on_redis(&redis.url()).await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let task = start(&agent).await;
    let token = issue(&agent, &task.task_id).await;

    let newer = RedisStore::new(
        RedisTarget::Url {
            url: redis.url(),
            ca_pem: None,
        },
        "mayfly",
        Duration::from_secs(3600),
    )
    .unwrap();
    let now = Timestamp::now();
    let unknown = Lease {
        id: LeaseId::generate(),
        detail: LeaseDetail::Unrecognised {
            kind: "db_login".into(),
        },
        agent: "spiffe://example.org/agent/demo".parse().unwrap(),
        task_id: TaskId::new(&task.task_id).unwrap(),
        scopes: Default::default(),
        issued_at: now.floor_secs(),
        expires_at: now.plus(Duration::from_secs(120)),
        status: LeaseStatus::Active,
        task_revision: 0,
        approval: None,
        authenticated_by: mayfly_core::Proof::Certificate,
    };
    newer.issue(&unknown, now).await.unwrap();
    let shown = lease(&op, unknown.id.as_str()).await;
    assert_eq!(shown.kind, pb::LeaseKind::Unspecified as i32);
    assert_eq!(shown.state, pb::LeaseState::Active as i32);

    // A change every policy still allows: the token stays, the lease this
    // broker cannot decide again goes.
    let changed = agent
        .broker()
        .update_task_context(pb::UpdateTaskContextRequest {
            task_id: task.task_id.clone(),
            set: [("ticket".to_owned(), "42".to_owned())].into(),
            remove: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.revoked_leases, vec![unknown.id.to_string()]);
    let gone = lease(&op, unknown.id.as_str()).await;
    assert_eq!(gone.state, pb::LeaseState::Revoked as i32);
    assert_eq!(
        gone.revocation_reason,
        pb::RevocationReason::ContextChanged as i32
    );
    assert_eq!(
        lease(&op, &token.lease_id).await.state,
        pb::LeaseState::Active as i32
    );
}

fn write_request(task: &str) -> pb::IssueTokenRequest {
    token_request(task, API, &["write:files"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_and_recovers() {
    let mut redis = RedisServer::start();
    let broker = TestBroker::start_on_redis(&redis.url()).await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let ca = broker.bundle_pem();
    let task = start(&agent).await;
    let before = issue(&agent, &task.task_id).await;
    assert_eq!(
        https_get(&format!("{}/readyz", broker.http_url()), &ca)
            .await
            .0,
        200
    );

    redis.kill();
    let t0 = Instant::now();
    let r = agent
        .issue_token(token_request(&task.task_id, API, &["read:files"]))
        .await;
    let issue_took = t0.elapsed();
    assert_status(r, Code::Unavailable, "nothing was issued");
    let t0 = Instant::now();
    let r = agent
        .broker()
        .start_task(start_request("during outage", &[API], &["read:files"]))
        .await;
    let start_took = t0.elapsed();
    assert_status(r, Code::Unavailable, "nothing was issued");
    assert!(
        issue_took < Duration::from_secs(2),
        "IssueToken took {issue_took:?}"
    );
    assert!(
        start_took < Duration::from_secs(2),
        "StartTask took {start_took:?}"
    );
    let (status, body) = https_get(&format!("{}/readyz", broker.http_url()), &ca).await;
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains("127.0.0.1"), "no store detail leaks: {body}");
    let (status, jwks) =
        https_get(&format!("{}/.well-known/jwks.json", broker.http_url()), &ca).await;
    assert_eq!(status, 200);
    assert!(jwks.contains("\"keys\""));
    println!(
        "outage: IssueToken answered UNAVAILABLE in {issue_took:?}, StartTask in {start_took:?}"
    );

    redis.restart();
    let t0 = Instant::now();
    let mut recovered = None;
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(t) = agent
            .issue_token(token_request(&task.task_id, API, &["read:files"]))
            .await
        {
            recovered = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = recovered.expect("the broker recovers without a restart");
    println!(
        "recovery: first IssueToken succeeded {:?} after redis restarted",
        t0.elapsed()
    );
    assert_eq!(
        https_get(&format!("{}/readyz", broker.http_url()), &ca)
            .await
            .0,
        200
    );

    // Exactly the task, the token before and the token after: nothing was
    // recorded while Redis was down. A token stored just after the restart
    // whose audit record could not yet be written was revoked at once.
    let (live, dead): (Vec<pb::Lease>, Vec<pb::Lease>) =
        all_leases(&op, pb::ListLeasesRequest::default())
            .await
            .into_iter()
            .partition(|l| l.state == pb::LeaseState::Active as i32);
    let live: BTreeSet<String> = live.into_iter().map(|l| l.lease_id).collect();
    assert_eq!(
        live,
        [task.task_id.clone(), before.lease_id, after.lease_id].into()
    );
    for l in dead {
        assert_eq!(l.kind, pb::LeaseKind::Jwt as i32, "{l:?}");
        assert_eq!(
            l.revocation_reason,
            pb::RevocationReason::Operator as i32,
            "{l:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_loses_and_resurrects_nothing() {
    let mut redis = RedisServer::start();
    let a = TestBroker::start_on_redis(&redis.url()).await;
    let b = a.replica().await;
    let (agent_a, agent_b) = (a.agent().await, b.agent().await);
    let op = a.operator().await;
    let task = start(&agent_a).await;

    // Some leases are revoked before the crash; they must stay revoked.
    let mut revoked = Vec::new();
    for _ in 0..5 {
        let t = issue(&agent_b, &task.task_id).await;
        op.admin()
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: t.lease_id.clone(),
                note: String::new(),
            })
            .await
            .unwrap();
        revoked.push(t.lease_id);
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loads = Vec::new();
    for i in 0..8 {
        let agent = if i % 2 == 0 {
            agent_a.clone()
        } else {
            agent_b.clone()
        };
        let (id, stop) = (task.task_id.clone(), stop.clone());
        loads.push(tokio::spawn(async move {
            let (mut got, mut refused) = (Vec::new(), 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match agent
                    .issue_token(token_request(&id, API, &["read:files"]))
                    .await
                {
                    Ok(t) => got.push(t),
                    Err(s) => {
                        assert_eq!(s.code, Code::Unavailable, "{}", s.message);
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (got, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    redis.kill();
    // Longer than one call's bound (1.5 s), so the crash is felt: a
    // shorter outage is ridden out by calls waiting for the reconnect.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    redis.restart();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let (mut received, mut refused) = (Vec::new(), 0);
    for l in loads {
        let (got, r) = l.await.unwrap();
        received.extend(got);
        refused += r;
    }
    assert!(refused > 0, "the crash was felt");
    assert!(received.len() > 10, "load ran before and after the crash");
    for t in &received {
        let claims = claims_unverified(&t.token);
        assert_eq!(claims["jti"], t.lease_id.as_str());
        let l = lease(&op, &t.lease_id).await;
        assert_eq!(
            l.state,
            pb::LeaseState::Active as i32,
            "every credential handed out has its lease"
        );
    }
    for id in &revoked {
        assert_eq!(
            lease(&op, id).await.state,
            pb::LeaseState::Revoked as i32,
            "none resurrected"
        );
    }
    println!(
        "mid-load crash: {} tokens received, {refused} refusals, all leases present",
        received.len()
    );
}

/// An operator locks a compromised agent through replica A: everything it
/// holds is revoked, and it gets no task and no credential through either
/// replica (the production path: leases recorded with their audit records)
/// until unlocked; the agent is told who locked it and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_agent_gets_nothing_on_any_replica_until_unlocked() {
    let redis = RedisServer::start();
    let a = TestBroker::start_on_redis(&redis.url()).await;
    let b = a.replica().await;
    let (agent_a, agent_b) = (a.agent().await, b.agent().await);
    let (op_a, op_b) = (a.operator().await, b.operator().await);
    let demo = "spiffe://example.org/agent/demo";
    let task = start(&agent_a).await;
    let token = issue(&agent_b, &task.task_id).await;

    let locked = op_a
        .admin()
        .lock_agent(pb::LockAgentRequest {
            agent_id: demo.into(),
            reason: "key found in a public repository".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let got: BTreeSet<String> = locked.revoked_leases.into_iter().collect();
    assert_eq!(
        got,
        BTreeSet::from([task.task_id.clone(), token.lease_id.clone()])
    );
    let lock = locked.lock.unwrap();
    assert_eq!(lock.locked_by, "spiffe://example.org/operator/admin");
    assert!(lock.expires_at.is_none());

    let needle =
        "is locked by spiffe://example.org/operator/admin (key found in a public repository)";
    for agent in [&agent_a, &agent_b] {
        assert_status(
            agent
                .broker()
                .start_task(start_request("again", &[API], &["read:files"]))
                .await,
            Code::PermissionDenied,
            needle,
        );
        // Under the task it opened before (cached by replica A), too.
        assert_status(
            agent
                .issue_token(token_request(&task.task_id, API, &["read:files"]))
                .await,
            Code::PermissionDenied,
            needle,
        );
    }
    // Both replicas list the lock; nothing of the agent is active.
    for op in [&op_a, &op_b] {
        let locks = op
            .admin()
            .list_agent_locks(pb::ListAgentLocksRequest {})
            .await
            .unwrap()
            .into_inner()
            .locks;
        assert_eq!(locks.len(), 1);
        assert_eq!(locks[0].agent_id, demo);
    }
    let active = all_leases(
        &op_b,
        pb::ListLeasesRequest {
            agent_id: demo.into(),
            state: pb::LeaseState::Active as i32,
            ..Default::default()
        },
    )
    .await;
    assert!(active.is_empty(), "{active:?}");

    // Unlocked through B: the agent works again through A.
    op_b.admin()
        .unlock_agent(pb::UnlockAgentRequest {
            agent_id: demo.into(),
            note: "key rotated".into(),
        })
        .await
        .unwrap();
    assert_status(
        op_a.admin()
            .unlock_agent(pb::UnlockAgentRequest {
                agent_id: demo.into(),
                note: String::new(),
            })
            .await,
        Code::NotFound,
        "is not locked",
    );
    let again = start(&agent_a).await;
    issue(&agent_b, &again.task_id).await;
}

/// The issue's sequence: StartTask, kill -9 Redis, restart it, IssueToken,
/// five quiet seconds, StartTask. Every call after the restart succeeds:
/// each of the broker's Redis connections (store, audit trail) is checked
/// before it carries a request and replaced if Redis restarted under it,
/// whether the call is safe to repeat (StartTask) or not (CompleteTask).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_calls_after_a_redis_restart_succeed() {
    let mut redis = RedisServer::start();
    let broker = TestBroker::start_on_redis(&redis.url()).await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let task = start(&agent).await;

    redis.kill();
    redis.restart();
    let token = issue(&agent, &task.task_id).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let second = start(&agent).await;

    // Again, with nothing in between, and calls that must not be sent twice.
    redis.kill();
    redis.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.complete_task(&second.task_id).await.unwrap();
    op.admin()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: token.lease_id.clone(),
            note: "after restart".into(),
        })
        .await
        .unwrap();
    // The trail reads back whole: nothing was lost or written twice.
    let events: Vec<String> = audit_trail(&op)
        .await
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(r).unwrap();
            v["event"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        events,
        [
            "task_started",
            "token_issued",
            "task_started",
            "task_completed",
            "lease_revoked"
        ]
    );
}

/// The per-agent rate limit is one across replicas: a burst spent through
/// one replica leaves nothing to take through the other, which says when
/// to retry; another agent has its own bucket, and it refills for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_is_one_across_replicas() {
    let redis = RedisServer::start();
    let a = TestBroker::start_on_redis_with(&redis.url(), |c| {
        c.rate_limit.per_second = 2.0;
        c.rate_limit.burst = 3.0;
    })
    .await;
    let b = a.replica().await;
    let (agent_a, agent_b) = (a.agent().await, b.agent().await);
    let task = start(&agent_a).await;
    issue(&agent_a, &task.task_id).await;
    issue(&agent_b, &task.task_id).await;
    issue(&agent_a, &task.task_id).await;
    for agent in [&agent_b, &agent_a] {
        let err = agent
            .issue_token(token_request(&task.task_id, API, &["read:files"]))
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::ResourceExhausted, "{}", err.message);
        assert!(
            matches!(err.kind, RefusalKind::RateLimited { retry_after } if retry_after >= Duration::from_secs(1)),
            "{:?}",
            err.kind
        );
    }
    // The key is the agent's: one per agent in Redis, on the server's clock.
    let keys = redis.cli(&["--scan", "--pattern", "mayfly:rate:*"]);
    assert_eq!(
        keys.trim(),
        "mayfly:rate:spiffe://example.org/agent/demo",
        "{keys}"
    );
    let bob = b.client_as("spiffe://example.org/agent/bob").await;
    let t = bob
        .broker()
        .start_task(start_request("b", &[API], &["read:files"]))
        .await
        .unwrap()
        .into_inner();
    issue(&bob, &t.task_id).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    issue(&agent_b, &task.task_id).await;
}
