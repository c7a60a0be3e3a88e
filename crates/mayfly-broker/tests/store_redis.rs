//! The store contract suite against the Redis backend, each test on its own
//! real `redis-server`.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use mayfly_broker::store::{LeaseStore, RedisStore, RedisTarget};
use mayfly_testkit::RedisServer;

async fn fresh() -> (Arc<dyn LeaseStore>, RedisServer) {
    let server = RedisServer::start();
    let target = RedisTarget::Url {
        url: server.url(),
        ca_pem: None,
    };
    let store = RedisStore::new(target, "mayfly", Duration::from_secs(3600)).unwrap();
    (Arc::new(store), server)
}

mayfly_broker::store_contract_tests!(fresh());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_reap_each_lease_exactly_once() {
    use std::collections::BTreeSet;

    use mayfly_broker::store::contract::{agent, lease, task};
    use mayfly_core::{LeaseStatus, Timestamp};

    let server = RedisServer::start();
    let replica = || {
        let target = RedisTarget::Url {
            url: server.url(),
            ca_pem: None,
        };
        Arc::new(RedisStore::new(target, "mayfly", Duration::from_secs(3600)).unwrap())
    };
    let (a, b) = (replica(), replica());
    let t = task(&agent("reaped"), 600);
    a.start_task(&t).await.unwrap();
    let mut ids = BTreeSet::new();
    for _ in 0..300 {
        let l = lease(&t, 10);
        a.issue(&l, t.created_at).await.unwrap();
        ids.insert(l.id);
    }
    let now = t.created_at.plus(Duration::from_secs(10));
    let reap = |s: Arc<RedisStore>| async move {
        let mut got = Vec::new();
        loop {
            let out = s.reap(now, Duration::from_secs(3600), 40).await.unwrap();
            if out.expired.is_empty() {
                return got;
            }
            got.extend(out.expired);
        }
    };
    let (ra, rb) = tokio::join!(tokio::spawn(reap(a.clone())), tokio::spawn(reap(b.clone())));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let all: Vec<_> = ra.iter().chain(&rb).cloned().collect();
    assert_eq!(
        all.len(),
        300,
        "each lease reported once: {} + {}",
        ra.len(),
        rb.len()
    );
    assert_eq!(all.into_iter().collect::<BTreeSet<_>>(), ids);
    for id in ids.iter().take(5) {
        assert_eq!(
            b.get_lease(id).await.unwrap().unwrap().status,
            LeaseStatus::Expired
        );
    }
    assert!(Timestamp::now() < t.expires_at);
}
