//! CompleteTask racing IssueToken on the same task: after CompleteTask
//! returns, no lease of the task is active, and every token that was handed
//! out has a revoked lease.

use mayfly_client::{RefusalKind, pb};
use mayfly_testkit::TestBroker;
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_task_racing_issue_token() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    for _round in 0..5 {
        let task = start(&agent).await;
        let mut issuers = Vec::new();
        for _ in 0..32 {
            let (agent, id) = (agent.clone(), task.task_id.clone());
            issuers.push(tokio::spawn(async move {
                agent
                    .issue_token(token_request(&id, API, &["read:files"]))
                    .await
            }));
        }
        tokio::task::yield_now().await;
        let done = agent.complete_task(&task.task_id).await.unwrap();
        let mut handed_out = Vec::new();
        for h in issuers {
            match h.await.unwrap() {
                Ok(t) => handed_out.push(t.lease_id),
                Err(s) => {
                    assert_eq!(s.code, Code::FailedPrecondition, "{}", s.message);
                    assert_eq!(s.kind, RefusalKind::TaskEnded, "{s}");
                    assert!(s.message.contains("is completed"), "{}", s.message);
                }
            }
        }
        for id in &handed_out {
            let l = lease(&op, id).await;
            assert_eq!(l.state, pb::LeaseState::Revoked as i32, "{id}");
            assert!(done.revoked_leases.contains(id) || l.state == pb::LeaseState::Revoked as i32);
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
