//! The Redis audit sink on a real `redis-server`: two replicas writing at
//! once still make one chain, and it reads back by cursor.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use mayfly_broker::audit::{
    AuditError, AuditLog, AuditRecord, AuditSink, Event, RedisSink, verify,
};
use mayfly_broker::store::RedisTarget;
use mayfly_core::SpiffeId;
use mayfly_testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_write_one_chain() {
    let server = RedisServer::start();
    let sink = || {
        let target = RedisTarget::Url {
            url: server.url(),
            ca_pem: None,
        };
        Arc::new(RedisSink::new(target, "mayfly").unwrap())
    };
    let (a, b) = (sink(), sink());
    let (log_a, log_b) = (AuditLog::start(a.clone()), AuditLog::start(b.clone()));
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
