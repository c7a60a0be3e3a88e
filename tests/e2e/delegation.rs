//! Delegation: every hop narrower than the one before and within the depth
//! limit, tokens naming the chain in nested `act` claims, and a task's
//! whole subtree ending with it (and the revocation feed saying so).

use std::collections::BTreeSet;
use std::time::Duration;

use mayfly_client::{Client, pb};
use mayfly_testkit::TestBroker;
use serde_json::Value;
use tonic::Code;

use crate::common::*;

const DEMO: &str = "spiffe://example.org/agent/demo";
const BOB: &str = "spiffe://example.org/agent/bob";
const CAROL: &str = "spiffe://example.org/agent/carol";
const DAVE: &str = "spiffe://example.org/agent/dave";

fn delegation(
    parent: &str,
    to: &str,
    audiences: &[&str],
    scopes: &[&str],
    ttl_seconds: u64,
) -> pb::DelegateTaskRequest {
    pb::DelegateTaskRequest {
        parent_task_id: parent.into(),
        delegate_id: to.into(),
        intent: format!("work for {to}"),
        audiences: audiences.iter().map(|s| s.to_string()).collect(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl_seconds,
    }
}

async fn delegate(from: &Client, req: pb::DelegateTaskRequest) -> Result<pb::Task, tonic::Status> {
    from.broker()
        .delegate_task(req)
        .await
        .map(tonic::Response::into_inner)
}

/// demo -> bob -> carol, each task with `read:files` on the API.
async fn chain(demo: &Client, bob: &Client) -> (pb::Task, pb::Task, pb::Task) {
    let root = start(demo).await;
    let b = delegate(
        demo,
        delegation(&root.task_id, BOB, &[API], &["read:files"], 0),
    )
    .await
    .unwrap();
    let c = delegate(
        bob,
        delegation(&b.task_id, CAROL, &[API], &["read:files"], 0),
    )
    .await
    .unwrap();
    (root, b, c)
}

/// The `act` chain of a token's claims, outermost first.
fn actors(claims: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut act = &claims["act"];
    while let Some(sub) = act["sub"].as_str() {
        out.push(sub.to_owned());
        act = &act["act"];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hop_is_narrower_and_tokens_name_the_chain() {
    let broker = TestBroker::start().await;
    let demo = broker.agent().await;
    let bob = broker.client_as(BOB).await;
    let carol = broker.client_as(CAROL).await;
    let mut root_req = start_request(
        "release 1.2",
        &[API, TOOLS],
        &["read:files", "read:docs", "write:files"],
    );
    root_req.ttl_seconds = 1800;
    let root = demo
        .broker()
        .start_task(root_req)
        .await
        .unwrap()
        .into_inner();

    // Wider than the parent: refused, naming what exceeds it.
    assert_status(
        delegate(
            &demo,
            delegation(&root.task_id, BOB, &[API], &["read:files", "admin:all"], 0),
        )
        .await,
        Code::PermissionDenied,
        r#"scopes ["admin:all"] exceed the parent task's envelope"#,
    );
    assert_status(
        delegate(
            &demo,
            delegation(&root.task_id, BOB, &["https://billing.example.com"], &[], 0),
        )
        .await,
        Code::PermissionDenied,
        r#"audiences ["https://billing.example.com"] exceed"#,
    );
    // Only from one's own task, only within the trust domain, only as
    // policy allows.
    assert_status(
        delegate(
            &bob,
            delegation(&root.task_id, CAROL, &[API], &["read:files"], 0),
        )
        .await,
        Code::NotFound,
        "not found",
    );
    assert_status(
        delegate(
            &demo,
            delegation(&root.task_id, "spiffe://other.org/agent/x", &[API], &[], 0),
        )
        .await,
        Code::InvalidArgument,
        "not in trust domain example.org",
    );
    assert_status(
        delegate(
            &demo,
            delegation(
                &root.task_id,
                "spiffe://example.org/operator/admin",
                &[API],
                &[],
                0,
            ),
        )
        .await,
        Code::PermissionDenied,
        "no policy permits spiffe://example.org/agent/demo to delegate spiffe://example.org/operator/admin",
    );

    // demo -> bob -> carol, each narrower.
    let b = delegate(
        &demo,
        delegation(&root.task_id, BOB, &[API], &["read:files", "read:docs"], 0),
    )
    .await
    .unwrap();
    assert_eq!(b.agent_id, BOB);
    assert_eq!(b.parent_task_id, root.task_id);
    assert_eq!(b.delegated_by, vec![DEMO.to_owned()]);
    assert_eq!(b.context, root.context, "the parent's context carries over");
    assert!(secs(&b.expires_at) <= secs(&root.expires_at));
    // The new task is the delegate's: it sees it, the delegator does not.
    bob.broker()
        .get_task(pb::GetTaskRequest {
            task_id: b.task_id.clone(),
        })
        .await
        .unwrap();
    let c = delegate(
        &bob,
        delegation(&b.task_id, CAROL, &[API], &["read:files"], 7 * 24 * 3600),
    )
    .await
    .unwrap();
    assert_eq!(c.delegated_by, vec![DEMO.to_owned(), BOB.to_owned()]);
    assert!(
        secs(&c.expires_at) <= secs(&b.expires_at),
        "a long TTL is capped at the parent's expiry"
    );
    // The second hop is held to the first hop's envelope, not the root's.
    assert_status(
        delegate(
            &carol,
            delegation(&c.task_id, DAVE, &[API], &["read:docs"], 0),
        )
        .await,
        Code::PermissionDenied,
        r#"scopes ["read:docs"] exceed"#,
    );
    assert_status(
        carol
            .issue_token(token_request(&c.task_id, API, &["read:docs"]))
            .await,
        Code::PermissionDenied,
        "outside the task's envelope",
    );

    // sub is the root owner; act nests the delegates, current outermost.
    let token = |client: &Client, task: &str| {
        let (client, task) = (client.clone(), task.to_owned());
        async move {
            client
                .issue_token(token_request(&task, API, &["read:files"]))
                .await
                .unwrap()
                .token
        }
    };
    let at_carol = validate(&broker, &token(&carol, &c.task_id).await, API).await;
    assert_eq!(at_carol["sub"], DEMO);
    assert_eq!(at_carol["client_id"], CAROL);
    assert_eq!(at_carol["task_id"], c.task_id.as_str());
    assert_eq!(actors(&at_carol), [CAROL, BOB]);
    let at_bob = validate(&broker, &token(&bob, &b.task_id).await, API).await;
    assert_eq!(
        (at_bob["sub"].as_str(), actors(&at_bob)),
        (Some(DEMO), vec![BOB.to_owned()])
    );
    let at_demo = validate(&broker, &token(&demo, &root.task_id).await, API).await;
    assert!(at_demo.get("act").is_none(), "{at_demo}");
    assert_eq!(at_demo["sub"], DEMO);
}

#[tokio::test]
async fn the_depth_limit_holds() {
    let broker = TestBroker::start_with(|c| c.tasks.max_delegation_depth = 2).await;
    let demo = broker.agent().await;
    let bob = broker.client_as(BOB).await;
    let carol = broker.client_as(CAROL).await;
    let (_, _, c) = chain(&demo, &bob).await;
    assert_eq!(c.delegated_by.len(), 2);
    assert_status(
        delegate(
            &carol,
            delegation(&c.task_id, DAVE, &[API], &["read:files"], 0),
        )
        .await,
        Code::PermissionDenied,
        "delegation depth limit reached: the task is already 2 delegation(s) from its root and at most 2 are allowed",
    );
    // Nothing was created.
    let op = broker.operator().await;
    let children = op
        .admin()
        .list_tasks(pb::ListTasksRequest {
            parent_task_id: c.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(children.tasks.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_takes_its_whole_subtree_with_it() {
    let broker = TestBroker::start_with(|c| c.feed.heartbeat = Duration::from_millis(200)).await;
    let demo = broker.agent().await;
    let bob = broker.client_as(BOB).await;
    let carol = broker.client_as(CAROL).await;
    let op = broker.operator().await;
    let (root, b, c) = chain(&demo, &bob).await;
    let root_token = issue(&demo, &root.task_id).await;
    let b_token = issue(&bob, &b.task_id).await;
    let c_token = issue(&carol, &c.task_id).await;
    let sibling = start(&demo).await;
    let sibling_token = issue(&demo, &sibling.task_id).await;

    let validator = broker.client_as("spiffe://example.org/api/validator").await;
    let mut feed = pb::revocations_client::RevocationsClient::new(validator.channel())
        .watch_revocations(pb::WatchRequest { from_cursor: 0 })
        .await
        .unwrap()
        .into_inner();

    // The operator revokes the root: everything below goes, as parent_revoked.
    let revoked = op
        .admin()
        .revoke_task(pb::RevokeTaskRequest {
            task_id: root.task_id.clone(),
            note: "wrong release".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revoked_leases;
    let want: BTreeSet<String> = [
        &root.task_id,
        &root_token.lease_id,
        &b.task_id,
        &b_token.lease_id,
        &c.task_id,
        &c_token.lease_id,
    ]
    .into_iter()
    .cloned()
    .collect();
    assert_eq!(revoked.iter().cloned().collect::<BTreeSet<_>>(), want);
    for (id, reason) in [
        (&root_token.lease_id, pb::RevocationReason::TaskRevoked),
        (&b.task_id, pb::RevocationReason::ParentRevoked),
        (&b_token.lease_id, pb::RevocationReason::ParentRevoked),
        (&c.task_id, pb::RevocationReason::ParentRevoked),
        (&c_token.lease_id, pb::RevocationReason::ParentRevoked),
    ] {
        let l = lease(&op, id).await;
        assert_eq!(l.state, pb::LeaseState::Revoked as i32, "{id}");
        assert_eq!(l.revocation_reason, reason as i32, "{id}");
    }
    assert_eq!(
        lease(&op, &sibling_token.lease_id).await.state,
        pb::LeaseState::Active as i32
    );
    // The grandchild's token is refused from now on.
    assert_status(
        carol
            .issue_token(token_request(&c.task_id, API, &["read:files"]))
            .await,
        Code::FailedPrecondition,
        "is revoked",
    );

    // The feed shows every one, the grandchild's credential included.
    let mut seen = BTreeSet::new();
    while seen != want {
        let e = tokio::time::timeout(Duration::from_secs(5), feed.message())
            .await
            .expect("the feed shows the subtree")
            .unwrap()
            .unwrap();
        if !e.heartbeat {
            if e.lease_id == c_token.lease_id {
                assert_eq!(e.reason, pb::RevocationReason::ParentRevoked as i32);
            }
            seen.insert(e.lease_id);
        }
    }

    // Completing a middle task ends what was delegated from it only.
    let (root, b, c) = chain(&demo, &bob).await;
    let done = bob.complete_task(&b.task_id).await.unwrap();
    assert_eq!(
        done.revoked_leases.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([b.task_id.clone(), c.task_id.clone()])
    );
    assert_eq!(
        lease(&op, &root.task_id).await.state,
        pb::LeaseState::Active as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_context_change_re_decides_its_delegations() {
    const POLICIES: &str = r#"
@id("open")
permit (principal, action == Mayfly::Action::"start_task", resource);

@id("reads")
permit (principal, action == Mayfly::Action::"issue_token", resource)
when { ["read"].containsAll(context.scope_prefixes) };

@id("delegate-outside-production")
permit (principal, action == Mayfly::Action::"delegate", resource)
unless {
  context.task.hasTag("environment") &&
  context.task.getTag("environment") == "production"
};
"#;
    let broker = TestBroker::start_with(|c| mayfly_testkit::use_policies(c, POLICIES)).await;
    let demo = broker.agent().await;
    let bob = broker.client_as(BOB).await;
    let op = broker.operator().await;
    let root = start(&demo).await;
    let b = delegate(
        &demo,
        delegation(&root.task_id, BOB, &[API], &["read:files"], 0),
    )
    .await
    .unwrap();
    let b_token = issue(&bob, &b.task_id).await;
    let root_token = issue(&demo, &root.task_id).await;

    let changed = demo
        .broker()
        .update_task_context(pb::UpdateTaskContextRequest {
            task_id: root.task_id.clone(),
            set: [("environment".to_owned(), "production".to_owned())].into(),
            remove: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    // The delegation is no longer allowed: the child and its token go; the
    // parent's own read token is still allowed.
    assert_eq!(
        changed
            .revoked_leases
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([b.task_id.clone(), b_token.lease_id.clone()])
    );
    let child = lease(&op, &b.task_id).await;
    assert_eq!(
        child.revocation_reason,
        pb::RevocationReason::ContextChanged as i32
    );
    assert_eq!(
        lease(&op, &root_token.lease_id).await.state,
        pb::LeaseState::Active as i32
    );
    // And no new delegation from a production task.
    assert_status(
        delegate(
            &demo,
            delegation(&root.task_id, BOB, &[API], &["read:files"], 0),
        )
        .await,
        Code::PermissionDenied,
        "no policy permits",
    );
}
