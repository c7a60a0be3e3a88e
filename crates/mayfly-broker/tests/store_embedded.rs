//! The store contract suite against the embedded (redb) backend, and its
//! durability across a reopen.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use mayfly_broker::audit::FileSink;
use mayfly_broker::store::{EmbeddedStore, LeaseStore};
use mayfly_testkit::contract::Backend;

/// A fresh store, and a trail file beside it (as `[audit] sink = "file"`).
async fn fresh() -> (Backend, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("leases.redb")).unwrap();
    let trail = FileSink::open(&dir.path().join("audit.jsonl")).unwrap();
    let backend = Backend {
        store: Arc::new(store),
        trail: Arc::new(trail),
    };
    (backend, dir)
}

mayfly_testkit::store_contract_tests!(fresh());

#[tokio::test]
async fn revocations_and_cursors_survive_a_reopen() {
    use mayfly_broker::store::RevokeRequest;
    use mayfly_core::{LeaseState, RevocationReason, Timestamp};
    use mayfly_testkit::contract::{agent, lease, task};

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

/// Concurrent changes share commits; the ones that fail leave nothing
/// and do not take their batch-mates down with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_change_in_a_batch_leaves_nothing_and_spares_the_rest() {
    use mayfly_broker::store::StoreError;
    use mayfly_testkit::contract::{agent, lease, task};
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
    let t = task(&agent("a"), 3600);
    store.start_task(&t).await.unwrap();
    let taken = lease(&t, 60);
    store.issue(&taken, t.created_at).await.unwrap();
    let orphan_task = task(&agent("a"), 3600); // never started

    let mut calls = Vec::new();
    for i in 0..300 {
        let (store, t, taken, orphan) =
            (store.clone(), t.clone(), taken.clone(), orphan_task.clone());
        calls.push(tokio::spawn(async move {
            let l = match i % 3 {
                0 => lease(&t, 60),
                1 => taken.clone(),      // a duplicate id
                _ => lease(&orphan, 60), // no such task
            };
            (i % 3, l.id.clone(), store.issue(&l, t.created_at).await)
        }));
    }
    let mut good = Vec::new();
    for c in calls {
        let (kind, id, r) = c.await.unwrap();
        match kind {
            0 => {
                r.unwrap();
                good.push(id);
            }
            1 => assert!(matches!(r, Err(StoreError::Duplicate(_))), "{r:?}"),
            _ => assert!(matches!(r, Err(StoreError::TaskNotFound)), "{r:?}"),
        }
    }
    // The task, the first lease, and every good one: nothing else.
    assert_eq!(store.active_count().await.unwrap(), 2 + good.len() as u64);
    for id in &good {
        assert!(store.get_lease(id).await.unwrap().is_some());
    }
    let listed = store
        .list_leases(
            &mayfly_broker::store::LeaseFilter::default(),
            &mayfly_broker::store::PageRequest {
                after: None,
                limit: 1000,
            },
            t.created_at,
        )
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 2 + good.len());

    // Everything survives reopening: it was committed.
    drop(store);
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
    assert_eq!(store.active_count().await.unwrap(), 2 + good.len() as u64);
}
