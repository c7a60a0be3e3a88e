//! The store contract suite against the embedded (redb) backend, and its
//! durability across a reopen.

#![allow(clippy::unwrap_used)]

use mayfly_broker::store::CredentialStore;
use mayfly_broker::store::RevocationLog;
use mayfly_broker::store::TaskStore;
use std::sync::Arc;

use mayfly_broker::audit::FileSink;
use mayfly_broker::store::EmbeddedStore;
use mayfly_testkit::contract::{self, Backend};

/// A fresh store recording to a trail file beside it (as `[audit] sink =
/// "file"`).
async fn fresh() -> (Backend, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let trail = FileSink::open(&dir.path().join("audit.jsonl")).unwrap();
    let store = EmbeddedStore::open(&dir.path().join("leases.redb"))
        .unwrap()
        .recording_to(Arc::new(trail));
    let failing = EmbeddedStore::open(&dir.path().join("failing.redb"))
        .unwrap()
        .recording_to(contract::unwritable());
    let backend = Backend {
        store: Arc::new(store),
        failing: Arc::new(failing),
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

/// The audit outbox: records written with their leases in one transaction
/// reach the trail exactly once, whatever stopped the broker in between.
mod outbox {
    use mayfly_broker::store::CredentialStore;
    use mayfly_broker::store::RecordStore;
    use mayfly_broker::store::TaskStore;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use mayfly_broker::audit::{AuditError, AuditRecord, AuditSink, Event, FileSink, Head, verify};
    use mayfly_broker::store::{EmbeddedStore, LeaseWrite, RecordBatch, RecordError};
    use mayfly_core::{Lease, LeaseState, LeaseStatus, SpiffeId, Task, Timestamp};
    use mayfly_testkit::contract::{agent, lease, task};

    /// A file trail that can be made to fail, as a full disk would.
    #[derive(Debug)]
    struct Flaky {
        file: FileSink,
        failing: AtomicBool,
    }

    #[async_trait]
    impl AuditSink for Flaky {
        async fn append(&self, records: &[AuditRecord]) -> Result<(), AuditError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(AuditError::Failed(mayfly_broker::Cause::msg("disk full")));
            }
            self.file.append(records).await
        }

        fn chain_head(&self) -> Option<Head> {
            self.file.chain_head()
        }

        async fn read(
            &self,
            cursor: &str,
            limit: usize,
        ) -> Result<(Vec<String>, String), AuditError> {
            self.file.read(cursor, limit).await
        }

        async fn cursor_before_last(&self, n: usize) -> Result<String, AuditError> {
            self.file.cursor_before_last(n).await
        }
    }

    fn broker() -> SpiffeId {
        SpiffeId::new("spiffe://example.org/mayfly/broker").unwrap()
    }

    fn issued(l: &Lease) -> AuditRecord {
        AuditRecord::new(Event::TokenIssued, &l.agent)
            .task_id(&l.task_id)
            .lease(&l.id)
    }

    /// Records one credential each for `leases`.
    async fn record(
        store: &EmbeddedStore,
        leases: &[Lease],
        now: Timestamp,
    ) -> Vec<Result<(), RecordError>> {
        let records: Vec<AuditRecord> = leases.iter().map(issued).collect();
        let writes: Vec<Option<LeaseWrite>> = leases
            .iter()
            .map(|l| {
                Some(LeaseWrite::Credential {
                    lease: l.clone(),
                    now,
                })
            })
            .collect();
        let by = broker();
        let batch = RecordBatch {
            records: &records,
            leases: &writes,
            undo_by: &by,
        };
        store.record(&batch).await
    }

    /// The trail's records, checked as one chain.
    fn trail(path: &Path) -> Vec<AuditRecord> {
        let text = std::fs::read_to_string(path).unwrap();
        verify(text.lines().map(|l| Ok::<_, String>(l.to_owned()))).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn lease_ids(records: &[AuditRecord], event: Event) -> Vec<String> {
        records
            .iter()
            .filter(|r| r.event == event)
            .filter_map(|r| r.lease_id.clone())
            .collect()
    }

    /// The store in `dir` with task `t`, recording to `trail`.
    async fn opened(dir: &Path, t: &Task, trail: Arc<dyn AuditSink>) -> EmbeddedStore {
        let store = EmbeddedStore::open(&dir.join("s.redb"))
            .unwrap()
            .recording_to(trail);
        if store.get_task(&t.id).await.unwrap().is_none() {
            store.start_task(t).await.unwrap();
        }
        store
    }

    /// A broker stopped after the append, before the next batch removed
    /// the records from the outbox: reopened, the trail is seen to hold
    /// them, and they are not written again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_the_trail_already_holds_are_not_shipped_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let t = task(&agent("a"), 3600);
        let now = t.created_at;
        let (one, two) = (lease(&t, 60), lease(&t, 60));
        {
            let sink = Arc::new(FileSink::open(&path).unwrap());
            let store = opened(dir.path(), &t, sink).await;
            let out = record(&store, &[one.clone(), two.clone()], now).await;
            assert!(out.iter().all(Result::is_ok), "{out:?}");
        }
        // Still in the outbox, already in the trail: shipped at start,
        // once.
        let sink = Arc::new(FileSink::open(&path).unwrap());
        let store = opened(dir.path(), &t, sink).await;
        store.ship_pending().await.unwrap();
        let three = lease(&t, 60);
        let out = record(&store, std::slice::from_ref(&three), now).await;
        assert!(out.iter().all(Result::is_ok), "{out:?}");
        let records = trail(&path);
        assert_eq!(
            lease_ids(&records, Event::TokenIssued),
            [&one, &two, &three].map(|l| l.id.to_string())
        );
    }

    /// A trail that fails after the commit: the agent gets the trail's
    /// error, the credentials are revoked again, nothing more is issued
    /// (nothing is even written) until the trail takes records, and then
    /// the backlog goes first, each record once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_trail_stops_issuing_and_its_backlog_is_shipped_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let t = task(&agent("a"), 3600);
        let now = t.created_at;
        let sink = Arc::new(Flaky {
            file: FileSink::open(&path).unwrap(),
            failing: AtomicBool::new(false),
        });
        let store = opened(dir.path(), &t, sink.clone()).await;
        let first = lease(&t, 60);
        assert!(record(&store, std::slice::from_ref(&first), now).await[0].is_ok());

        sink.failing.store(true, Ordering::SeqCst);
        let lost = lease(&t, 60);
        let out = record(&store, std::slice::from_ref(&lost), now).await;
        assert!(
            matches!(&out[..], [Err(RecordError::Audit(e))] if e.to_string().contains("disk full")),
            "{out:?}"
        );
        let undone = store.get_lease(&lost.id).await.unwrap().unwrap();
        match &undone.status {
            LeaseStatus::Revoked(r) => assert_eq!(r.by, broker()),
            other => panic!("a credential not handed out is left {other:?}"),
        }
        // While the trail fails: refused before anything is written.
        let refused = lease(&t, 60);
        let out = record(&store, std::slice::from_ref(&refused), now).await;
        assert!(matches!(&out[..], [Err(RecordError::Audit(_))]), "{out:?}");
        assert!(store.get_lease(&refused.id).await.unwrap().is_none());

        // Recovered: the backlog first, then the new batch.
        sink.failing.store(false, Ordering::SeqCst);
        let next = lease(&t, 60);
        let out = record(&store, std::slice::from_ref(&next), now).await;
        assert!(out[0].is_ok(), "{out:?}");
        assert_eq!(
            store
                .get_lease(&next.id)
                .await
                .unwrap()
                .unwrap()
                .state_at(now),
            LeaseState::Active
        );
        let records = trail(&path);
        assert_eq!(
            lease_ids(&records, Event::TokenIssued),
            [&first, &lost, &next].map(|l| l.id.to_string())
        );
        let revoked: Vec<&AuditRecord> = records
            .iter()
            .filter(|r| r.event == Event::LeaseRevoked)
            .collect();
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].revoked, [lost.id.to_string()]);
        assert_eq!(revoked[0].caller.as_deref(), Some(broker().as_str()));

        // Reopened, nothing is shipped twice.
        drop(store);
        let store = opened(dir.path(), &t, sink).await;
        store.ship_pending().await.unwrap();
        assert_eq!(trail(&path).len(), records.len());
    }

    /// A trail that is not the one the outbox was shipped to (an older
    /// copy put back, records edited) stops issuing, naming why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trail_that_does_not_match_the_outbox_stops_issuing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let t = task(&agent("a"), 3600);
        let now = t.created_at;
        let ours = lease(&t, 60);
        {
            let sink = Arc::new(FileSink::open(&path).unwrap());
            let store = opened(dir.path(), &t, sink).await;
            assert!(record(&store, std::slice::from_ref(&ours), now).await[0].is_ok());
        }
        // Another trail of the same length, with another record.
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(dir.path().join("audit.jsonl.head")).unwrap();
        let other = Arc::new(FileSink::open(&path).unwrap());
        other.append(&[issued(&lease(&t, 60))]).await.unwrap();

        let store = opened(dir.path(), &t, other).await;
        let e = store.ship_pending().await.unwrap_err().to_string();
        assert!(
            e.contains("does not match the lease store's outbox") && e.contains("seq 1"),
            "{e}"
        );
        let refused = lease(&t, 60);
        let out = record(&store, std::slice::from_ref(&refused), now).await;
        assert!(matches!(&out[..], [Err(RecordError::Audit(_))]), "{out:?}");
        assert!(store.get_lease(&refused.id).await.unwrap().is_none());
        assert_eq!(trail(&path).len(), 1);
    }
}
