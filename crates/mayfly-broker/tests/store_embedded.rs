//! The store contract suite against the embedded (redb) backend, and its
//! durability across a reopen.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use mayfly_broker::store::{EmbeddedStore, LeaseStore};

async fn fresh() -> (Arc<dyn LeaseStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("leases.redb")).unwrap();
    (Arc::new(store), dir)
}

mayfly_broker::store_contract_tests!(fresh());

#[tokio::test]
async fn revocations_and_cursors_survive_a_reopen() {
    use mayfly_broker::store::RevokeRequest;
    use mayfly_broker::store::contract::{agent, lease, task};
    use mayfly_core::{LeaseState, RevocationReason, Timestamp};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.redb");
    let t = task(&agent("a"), 600);
    let l = lease(&t, 60);
    let now = t.created_at;
    let first_cursor = {
        let store = EmbeddedStore::open(&path).unwrap();
        store.start_task(&t).await.unwrap();
        store.issue(&l, now).await.unwrap();
        let req = RevokeRequest {
            reason: RevocationReason::Operator,
            child_reason: RevocationReason::Operator,
            by: agent("operator"),
            note: None,
            at: now,
        };
        store.revoke_lease(&l.id, &req).await.unwrap();
        store.revocations_since(0, 10).await.unwrap()[0].cursor
    };
    let store = EmbeddedStore::open(&path).unwrap();
    let back = store.get_lease(&l.id).await.unwrap().unwrap();
    assert_eq!(back.state_at(now), LeaseState::Revoked);
    assert_eq!(
        back.revocation().unwrap().reason,
        RevocationReason::Operator
    );
    assert!(store.get_task(&t.id).await.unwrap().is_some());
    let req = RevokeRequest {
        reason: RevocationReason::TaskCompleted,
        child_reason: RevocationReason::TaskCompleted,
        by: t.agent.clone(),
        note: None,
        at: Timestamp::from_millis(now.as_millis() + 1),
    };
    store.end_task(&t.id, &req).await.unwrap();
    let events = store.revocations_since(first_cursor, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert!(
        events[0].cursor > first_cursor,
        "cursor continues after reopen"
    );
}
