//! The Redis audit sink on a real `redis-server`: two replicas writing at
//! once still make one chain, it reads back by cursor, and credential
//! leases recorded through two replicas are written with their records or
//! not at all. (The recording contract on one replica is in the store
//! contract suite.)

#![allow(clippy::unwrap_used)]

use mayfly_broker::store::CredentialStore;
use mayfly_broker::store::RecordStore;
use mayfly_broker::store::TaskStore;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use mayfly_broker::audit::{AuditError, AuditRecord, AuditSink, Event, verify};
use mayfly_broker::recorder::Recorder;
use mayfly_broker::store::{
    LeaseFilter, PageRequest, RecordError, RedisSink, RedisStore, RedisTarget, StoreError,
};
use mayfly_core::{LeaseId, RevocationReason, SpiffeId, TaskState};
use mayfly_testkit::RedisServer;
use mayfly_testkit::contract::{agent, lease, revoke, task};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_write_one_chain() {
    let server = RedisServer::start();
    let ((_store_a, log_a, a), (_store_b, log_b, b)) = (joint(&server), joint(&server));
    let op = SpiffeId::new("spiffe://example.org/operator/admin").unwrap();
    let mut writers = Vec::new();
    for i in 0..200 {
        let log = if i % 2 == 0 {
            log_a.clone()
        } else {
            log_b.clone()
        };
        let op = op.clone();
        writers.push(tokio::spawn(async move {
            log.record(AuditRecord::new(Event::LeaseRevoked, &op).reason(format!("r{i}")))
                .await
        }));
    }
    for w in writers {
        w.await.unwrap().unwrap();
    }

    // Read it all back in pages through either replica.
    let mut lines = Vec::new();
    let mut cursor = String::new();
    loop {
        let (page, next) = b.read(&cursor, 64).await.unwrap();
        if page.is_empty() {
            break;
        }
        lines.extend(page);
        cursor = next;
    }
    assert_eq!(lines.len(), 200);
    let v = verify(lines.into_iter().map(Ok::<_, String>)).unwrap();
    assert_eq!(v.head.seq, 200);
    let reasons: std::collections::BTreeSet<String> = b
        .read("", 1000)
        .await
        .unwrap()
        .0
        .iter()
        .map(|l| {
            serde_json::from_str::<AuditRecord>(l)
                .unwrap()
                .reason
                .unwrap()
        })
        .collect();
    assert_eq!(reasons.len(), 200, "every record is there once");

    // The last n records, and cursors the stream never handed out.
    let all = b.read("", 1000).await.unwrap().0;
    for n in [0, 1, 5, 200, 300] {
        let from = a.cursor_before_last(n).await.unwrap();
        let (last, _) = a.read(&from, 1000).await.unwrap();
        assert_eq!(last, all[all.len().saturating_sub(n)..], "last {n}");
    }
    for bad in ["x", "1-", "-1", "1-2-3", "12a-0"] {
        assert!(
            matches!(a.read(bad, 1).await, Err(AuditError::BadCursor(_))),
            "{bad}"
        );
    }
}

/// One replica's store, its recorder and its trail, in `server`'s Redis,
/// as the broker wires them.
fn joint(server: &RedisServer) -> (Arc<RedisStore>, Recorder, Arc<dyn AuditSink>) {
    let target = RedisTarget::Url {
        url: server.url(),
        ca_pem: None,
    };
    let store = Arc::new(RedisStore::new(target, "mayfly", Duration::from_secs(3600)).unwrap());
    let trail = store.trail();
    let broker = SpiffeId::new("spiffe://example.org/mayfly/broker").unwrap();
    let recorder = Recorder::start(store.clone(), broker, None);
    (store, recorder, trail)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_their_records_are_written_together_or_not_at_all() {
    let server = RedisServer::start();
    let (store, log, _) = joint(&server);
    let (_other_store, other_replica, _) = joint(&server);
    let owner = agent("a");
    let live = task(&owner, 600);
    let ended = task(&owner, 600);
    for t in [&live, &ended] {
        store.start_task(t).await.unwrap();
    }
    store
        .end_task(
            &ended.id,
            &revoke(
                RevocationReason::TaskCompleted,
                RevocationReason::TaskCompleted,
                ended.created_at,
            ),
        )
        .await
        .unwrap();

    // Interleaved through two replicas, so batches mix good and refused
    // leases and chain onto each other's heads.
    let mut writers = Vec::new();
    for i in 0..120 {
        let (log, t) = match i % 3 {
            0 => (other_replica.clone(), ended.clone()),
            1 => (other_replica.clone(), live.clone()),
            _ => (log.clone(), live.clone()),
        };
        let l = lease(&t, 60);
        let record = AuditRecord::new(Event::TokenIssued, &owner)
            .task(&t)
            .lease(&l.id);
        writers.push(tokio::spawn(async move {
            let got = log.record_issued(record, l.clone(), t.created_at).await;
            (l.id, got)
        }));
    }
    let (mut issued, mut refused) = (BTreeSet::new(), 0);
    for w in writers {
        match w.await.unwrap() {
            (id, Ok(())) => {
                issued.insert(id.to_string());
            }
            (_, Err(RecordError::Store(StoreError::TaskNotActive(TaskState::Completed)))) => {
                refused += 1
            }
            (_, Err(e)) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((issued.len(), refused), (80, 40));

    // The trail holds exactly the issued ones, in one intact chain, and the
    // store exactly their leases.
    let sink = RedisSink::new(
        RedisTarget::Url {
            url: server.url(),
            ca_pem: None,
        },
        "mayfly",
    )
    .unwrap();
    let lines = sink.read("", 1000).await.unwrap().0;
    verify(lines.iter().cloned().map(Ok::<_, String>)).unwrap();
    let recorded: BTreeSet<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<AuditRecord>(l)
                .unwrap()
                .lease_id
                .unwrap()
        })
        .collect();
    assert_eq!(recorded, issued);
    for id in &issued {
        let lease = store.get_lease(&LeaseId::new(id).unwrap()).await.unwrap();
        assert!(lease.is_some_and(|l| l.task_id == live.id), "{id}");
    }
    let under_ended = store
        .list_leases(
            &LeaseFilter {
                task: Some(ended.id.clone()),
                ..Default::default()
            },
            &PageRequest {
                after: None,
                limit: 100,
            },
            ended.created_at,
        )
        .await
        .unwrap();
    assert_eq!(
        under_ended.items.len(),
        1,
        "the ended task's own lease only"
    );

    // A trail key of the wrong type: neither lease nor record is written.
    server.cli(&["DEL", "mayfly:audit"]);
    server.cli(&["SET", "mayfly:audit", "not a stream"]);
    let l = lease(&live, 60);
    let record = AuditRecord::new(Event::TokenIssued, &owner).lease(&l.id);
    let got = log.record_issued(record, l.clone(), live.created_at).await;
    assert!(matches!(got, Err(RecordError::Audit(_))), "{got:?}");
    assert!(store.get_lease(&l.id).await.unwrap().is_none());
}

/// With a retention, entries older than it are trimmed from the stream
/// after a write; newer ones and the head stay, so the chain goes on.
#[tokio::test]
async fn entries_past_the_retention_are_trimmed() {
    let server = RedisServer::start();
    // An entry from 1970 (stream ids are milliseconds), as if written long ago.
    server.cli(&["XADD", "mayfly:audit", "1000-0", "r", "ancient"]);
    let target = RedisTarget::Url {
        url: server.url(),
        ca_pem: None,
    };
    let sink = RedisSink::new(target, "mayfly")
        .unwrap()
        .with_retention(Some(Duration::from_secs(24 * 3600)));
    let op = SpiffeId::new("spiffe://example.org/operator/admin").unwrap();
    sink.append(&[AuditRecord::new(Event::LeaseRevoked, &op)])
        .await
        .unwrap();
    assert_eq!(server.cli(&["XLEN", "mayfly:audit"]).trim(), "1");
    let (lines, _) = sink.read("", 10).await.unwrap();
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("\"seq\":1"), "{lines:?}");
    // Without a retention nothing is trimmed.
    server.cli(&["XADD", "other:audit", "1000-0", "r", "ancient"]);
    let keep = RedisSink::new(
        RedisTarget::Url {
            url: server.url(),
            ca_pem: None,
        },
        "other",
    )
    .unwrap();
    keep.append(&[AuditRecord::new(Event::LeaseRevoked, &op)])
        .await
        .unwrap();
    assert_eq!(server.cli(&["XLEN", "other:audit"]).trim(), "2");
}
