//! The store contract suite against the Redis backend, each test on its own
//! real `redis-server`.

#![allow(clippy::unwrap_used)]

use mayfly_broker::store::CredentialStore;
use mayfly_broker::store::TaskStore;
use mayfly_broker::store::Upkeep;
use std::sync::Arc;
use std::time::Duration;

use mayfly_broker::store::{RedisStore, RedisTarget};
use mayfly_testkit::RedisServer;
use mayfly_testkit::contract::{self, Backend};

/// A store on `server` under `prefix`, recording to its own trail.
fn on(server: &RedisServer, prefix: &str) -> RedisStore {
    let target = RedisTarget::Url {
        url: server.url(),
        ca_pem: None,
    };
    RedisStore::new(target, prefix, Duration::from_secs(3600)).unwrap()
}

/// A fresh store recording to its own trail in the same Redis (as
/// `[audit] sink = "redis"`): leases and records in one script.
async fn fresh() -> (Backend, RedisServer) {
    let server = RedisServer::start();
    let backend = Backend {
        store: Arc::new(on(&server, "mayfly")),
        failing: Arc::new(on(&server, "failing").recording_to(contract::unwritable())),
    };
    (backend, server)
}

mayfly_testkit::store_contract_tests!(fresh());

/// The Redis store with a trail outside it (`[audit] sink = "stdout"`; a
/// file stands in here so the records can be read back, though the broker
/// refuses a file trail with this store): leases first, then records; the
/// recording contract holds the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_with_a_file_trail_keeps_the_contract() {
    use mayfly_broker::audit::FileSink;

    let with_file = async || {
        let (backend, server) = fresh().await;
        let dir = tempfile::tempdir().unwrap();
        let trail = Arc::new(FileSink::open(&dir.path().join("audit.jsonl")).unwrap());
        let store = Arc::new(on(&server, "file").recording_to(trail));
        (Backend { store, ..backend }, (server, dir))
    };
    let (backend, _guard) = with_file().await;
    contract::record_writes_each_lease_with_its_record_or_neither(backend).await;
    let (backend, _guard) = with_file().await;
    contract::concurrent_records_keep_leases_and_trail_in_step(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_reap_each_lease_exactly_once() {
    use std::collections::BTreeSet;

    use mayfly_core::{LeaseStatus, Timestamp};
    use mayfly_testkit::contract::{agent, lease, task};

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
            got.extend(out.expired.into_iter().map(|e| e.id));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_sentinel_failover() {
    use mayfly_core::LeaseState;
    use mayfly_testkit::contract::{agent, lease, task};

    let primary = RedisServer::start();
    // Two replicas: after the failover one is the new primary and the other
    // acknowledges its writes.
    let replica = RedisServer::start_replica_of(&primary);
    let other = RedisServer::start_replica_of(&primary);
    let sentinel = RedisServer::start_sentinel(&primary, "mayfly");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for r in [&replica, &other] {
        while !r
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
        {
            assert!(std::time::Instant::now() < deadline, "replica never synced");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let target = RedisTarget::Sentinel {
        sentinels: vec![sentinel.url()],
        master_name: "mayfly".into(),
        password: None,
        ca_pem: None,
    };
    // Every write waits for the replica, so the crash below loses nothing.
    let store = RedisStore::new(target, "mayfly", Duration::from_secs(3600))
        .unwrap()
        .with_replicas_to_ack(1);
    let t = task(&agent("failover"), 600);
    store.start_task(&t).await.unwrap();
    let before = lease(&t, 60);
    store.issue(&before, t.created_at).await.unwrap();

    // The primary crashes; the Sentinel promotes the replica.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let known = |s: String| {
        s.contains(&replica.port().to_string()) && s.contains(&other.port().to_string())
    };
    while !known(sentinel.cli(&["SENTINEL", "REPLICAS", "mayfly"])) {
        assert!(
            std::time::Instant::now() < deadline,
            "sentinel never saw the replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut primary = primary;
    primary.kill();
    while !sentinel
        .cli(&["SENTINEL", "FAILOVER", "mayfly"])
        .contains("OK")
    {
        assert!(std::time::Instant::now() < deadline, "failover refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted =
        |s: &str| s.contains(&replica.port().to_string()) || s.contains(&other.port().to_string());
    while !promoted(&sentinel.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mayfly"])) {
        assert!(
            std::time::Instant::now() < deadline,
            "failover did not complete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The store finds the new primary by itself; calls fail (UNAVAILABLE)
    // until it has.
    let after = lease(&t, 60);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match store.issue(&after, t.created_at).await {
            Ok(()) => break,
            Err(e) => {
                assert!(attempts < 50, "no recovery after failover: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let got = store.get_lease(&before.id).await.unwrap().unwrap();
    assert_eq!(
        got.state_at(t.created_at),
        LeaseState::Active,
        "replicated before failover"
    );
    assert!(store.get_lease(&after.id).await.unwrap().is_some());
    assert_eq!(
        replica
            .cli(&["EXISTS", &format!("mayfly:{{{}}}:lease:{}", t.id, after.id)])
            .trim(),
        "1"
    );
}

#[tokio::test]
async fn writes_fail_closed_without_the_replicas_they_need() {
    use mayfly_broker::store::StoreError;
    use mayfly_testkit::contract::{agent, task};

    let server = RedisServer::start();
    let target = RedisTarget::Url {
        url: server.url(),
        ca_pem: None,
    };
    let store = RedisStore::new(target, "mayfly", Duration::from_secs(3600))
        .unwrap()
        .with_replicas_to_ack(1);
    let t = task(&agent("lonely"), 600);
    match store.start_task(&t).await {
        Err(StoreError::Unavailable(m)) => {
            assert!(m.to_string().contains("0 of 1 required replicas"), "{m}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_indexed_by_an_earlier_layout_are_found_and_purged() {
    use mayfly_testkit::contract::{agent, lease, task};

    let (Backend { store, .. }, server) = fresh().await;
    let t = task(&agent("old"), 100);
    store.start_task(&t).await.unwrap();
    let l = lease(&t, 50);
    store.issue(&l, t.created_at).await.unwrap();
    // As an earlier version indexed it: `L:T:A` in the leases zset and the
    // agent's leases zset, nothing in the id -> task hash.
    let member = format!("{}:{}:{}", l.id, t.id, t.agent);
    server.cli(&["HDEL", "mayfly:lease-tasks", l.id.as_str()]);
    server.cli(&["ZADD", "mayfly:leases", "0", &member]);
    server.cli(&[
        "ZADD",
        &format!("mayfly:agent:{}:leases", t.agent),
        "0",
        &member,
    ]);
    let found = store.get_lease(&l.id).await.unwrap().unwrap();
    assert_eq!(found.task_id, t.id);

    // Purged with its task, from the old indexes too.
    let after = t.expires_at.plus(Duration::from_secs(3600));
    for _ in 0..10 {
        store
            .reap(after, Duration::from_secs(3600), 100)
            .await
            .unwrap();
    }
    assert!(store.get_task(&t.id).await.unwrap().is_none());
    assert!(store.get_lease(&l.id).await.unwrap().is_none());
    for key in [
        "mayfly:leases".to_owned(),
        format!("mayfly:agent:{}:leases", t.agent),
    ] {
        assert_eq!(server.cli(&["ZCARD", &key]).trim(), "0", "{key}");
    }
    assert_eq!(server.cli(&["HLEN", "mayfly:lease-tasks"]).trim(), "0");
}

/// A service's index of the tokens it exchanged for lapses with the last
/// of them (kept as long as their lease hashes), not forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_token_index_lapses_with_its_last_token() {
    use mayfly_testkit::contract::{agent, exchanged, task};

    let (Backend { store, .. }, server) = fresh().await;
    let t = task(&agent("a"), 600);
    store.start_task(&t).await.unwrap();
    let svc = agent("svc");
    let key = format!("mayfly:actor:{svc}:leases");
    let (short, long) = (exchanged(&t, &svc, 60), exchanged(&t, &svc, 300));
    store.issue(&long, t.created_at).await.unwrap();
    store.issue(&short, t.created_at).await.unwrap();
    let pttl = |k: &str| -> i64 { server.cli(&["PTTL", k]).trim().parse().unwrap() };
    let lease_key = format!("mayfly:{{{}}}:lease:{}", t.id, long.id);
    let (index, lease) = (pttl(&key), pttl(&lease_key));
    assert!(index > 0, "the index has no expiry: {index}");
    // Both were set from the long token's keep-until, a moment apart.
    assert!(
        (index - lease).abs() < 5_000,
        "index {index} ms, lease {lease} ms"
    );
}

/// A store whose connection sat idle while Redis was killed and restarted:
/// its next call, even one that is never sent twice (ending a task), goes
/// out on a fresh connection and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_checked_and_replaced_after_a_restart() {
    use mayfly_core::RevocationReason;
    use mayfly_testkit::contract::{agent, lease, revoke, task};

    let mut server = RedisServer::start();
    let target = RedisTarget::Url {
        url: server.url(),
        ca_pem: None,
    };
    let store = RedisStore::new(target, "mayfly", Duration::from_secs(3600)).unwrap();
    let t = task(&agent("idle"), 600);
    store.start_task(&t).await.unwrap();
    store.issue(&lease(&t, 60), t.created_at).await.unwrap();
    server.restart();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let req = revoke(
        RevocationReason::TaskRevoked,
        RevocationReason::TaskRevoked,
        t.created_at,
    );
    assert_eq!(store.end_task(&t.id, &req).await.unwrap().len(), 2);
}

/// A TCP proxy in front of Redis that, when armed, lets the next request
/// through and then cuts the connection before its reply comes back: the
/// write happened, the client never hears of it.
struct LossyProxy {
    addr: std::net::SocketAddr,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl LossyProxy {
    async fn start(upstream: u16) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let flag = armed.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                    .await
                    .unwrap();
                let flag = flag.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        // Armed: swallow this reply and cut the connection.
                        if flag.swap(false, Ordering::AcqRel) {
                            break;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        Self { addr, armed }
    }

    fn lose_next_reply(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Writes whose reply is lost are sent again and recognise their own first
/// run: a task and a lease are recorded once, and an audit batch is
/// appended once, not twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_reply_was_lost_is_sent_again_and_not_doubled() {
    use mayfly_broker::audit::{AuditRecord, AuditSink, Event};
    use mayfly_broker::store::RedisSink;
    use mayfly_testkit::contract::{agent, lease, task};

    let server = RedisServer::start();
    let proxy = LossyProxy::start(server.port()).await;
    let target = || RedisTarget::Url {
        url: format!("redis://{}", proxy.addr),
        ca_pem: None,
    };
    let store = RedisStore::new(target(), "mayfly", Duration::from_secs(3600)).unwrap();
    // Scripts loaded first, so the lost reply is the write's own.
    let warm = task(&agent("lossy"), 600);
    store.start_task(&warm).await.unwrap();
    store
        .issue(&lease(&warm, 60), warm.created_at)
        .await
        .unwrap();
    let t = task(&agent("lossy"), 600);
    proxy.lose_next_reply();
    store.start_task(&t).await.unwrap();
    let l = lease(&t, 60);
    proxy.lose_next_reply();
    store.issue(&l, t.created_at).await.unwrap();
    assert!(store.get_lease(&l.id).await.unwrap().is_some());
    // A genuine second start of the same task is still refused.
    assert!(store.start_task(&t).await.is_err());

    let sink = RedisSink::new(target(), "mayfly").unwrap();
    let op = mayfly_core::SpiffeId::new("spiffe://example.org/operator/admin").unwrap();
    sink.append(&[AuditRecord::new(Event::LeaseRevoked, &op)])
        .await
        .unwrap();
    proxy.lose_next_reply();
    sink.append(&[AuditRecord::new(Event::AgentRevoked, &op)])
        .await
        .unwrap();
    assert_eq!(server.cli(&["XLEN", "mayfly:audit"]).trim(), "2");
    assert_eq!(
        server.cli(&["HGET", "mayfly:audit:head", "seq"]).trim(),
        "2"
    );
}

/// A Redis that speaks only TLS and wants a password, behind a Sentinel
/// that speaks only TLS: the store finds the primary through the Sentinel
/// and reaches both over TLS, trusting the configured CA. Without that CA,
/// with a wrong password, or over plain text, nothing is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaches_the_primary_through_tls_sentinels_with_a_password() {
    use mayfly_testkit::RedisTls;
    use mayfly_testkit::contract::{agent, lease, task};

    let tls = RedisTls::new();
    let primary = RedisServer::start_tls(&tls);
    let sentinel = RedisServer::start_sentinel_tls(&primary, "mayfly", &tls);
    let ca = std::fs::read(tls.ca_path()).unwrap();
    let target = |url: String, password: &str, ca_pem: Option<Vec<u8>>| RedisTarget::Sentinel {
        sentinels: vec![url],
        master_name: "mayfly".into(),
        password: Some(password.to_owned()),
        ca_pem,
    };
    let tls_url = format!("rediss://127.0.0.1:{}", sentinel.port());
    let store = RedisStore::new(
        target(tls_url.clone(), &tls.password, Some(ca.clone())),
        "mayfly",
        Duration::from_secs(3600),
    )
    .unwrap();
    let t = task(&agent("tls"), 600);
    // The Sentinel may take a moment to have asked the primary its role.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while let Err(e) = store.start_task(&t).await {
        assert!(std::time::Instant::now() < deadline, "never reached: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let l = lease(&t, 60);
    store.issue(&l, t.created_at).await.unwrap();
    assert!(store.get_lease(&l.id).await.unwrap().is_some());

    for (what, target) in [
        ("no CA", target(tls_url.clone(), &tls.password, None)),
        (
            "a wrong password",
            target(tls_url.clone(), "wrong", Some(ca.clone())),
        ),
        (
            "plain text",
            target(
                format!("redis://127.0.0.1:{}", sentinel.port()),
                &tls.password,
                None,
            ),
        ),
    ] {
        let other = RedisStore::new(target, "mayfly", Duration::from_secs(3600)).unwrap();
        let t = task(&agent("tls"), 600);
        assert!(other.start_task(&t).await.is_err(), "{what} reached Redis");
    }
}
