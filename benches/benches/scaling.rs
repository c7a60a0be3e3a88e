//! Scaling, per store backend (embedded with fsync; Redis with
//! `appendfsync always` on a real `redis-server`):
//!
//! - the store's write rate (32 writers, one lease per write) with no live
//!   leases and again with N live leases (default 1,000,000), and the ratio;
//! - ending a task that holds 10,000 leases (what CompleteTask does in the
//!   store, in one transaction or script);
//! - embedded only: reopening the store with N leases (what a broker
//!   restart waits for before it is ready), and the file size.
//!
//! `cargo bench -p mayfly-benches --bench scaling [-- LEASES [CACHE_MIB [embedded|redis]]]`

#![allow(clippy::unwrap_used, missing_docs)]

use mayfly_broker::store::CredentialStore;
use mayfly_broker::store::Upkeep;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mayfly_broker::store::{EmbeddedStore, LeaseStore, RedisStore, RedisTarget};
use mayfly_core::{RevocationReason, Task};
use mayfly_testkit::RedisServer;
use mayfly_testkit::contract::{agent, lease, revoke, task};

type Store = Arc<dyn LeaseStore>;

/// Leases per task while filling.
const PER_TASK: usize = 1000;
/// Lifetime of everything written, so nothing expires during a run.
const TTL: u64 = 6 * 3600;

async fn started(store: &Store, name: &str) -> Task {
    let t = task(&agent(name), TTL + 60);
    store.start_task(&t).await.unwrap();
    t
}

/// Lease writes per second with `writers` concurrent writers for `d`.
async fn write_rate(store: &Store, writers: usize, d: Duration) -> f64 {
    let t = Arc::new(started(store, "rate").await);
    let (done, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (store, t, done, stop) = (store.clone(), t.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    store.issue(&lease(&t, TTL), t.created_at).await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Writes `n` live leases (tasks of [`PER_TASK`]) with 256 writers.
async fn fill(store: &Store, n: usize) -> Duration {
    let start = Instant::now();
    let chunks = n.div_ceil(PER_TASK);
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..256)
        .map(|w| {
            let (store, next) = (store.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < chunks {
                    let t = started(&store, &format!("fill-{}", w % 64)).await;
                    for _ in 0..PER_TASK {
                        store.issue(&lease(&t, TTL), t.created_at).await.unwrap();
                    }
                }
            })
        })
        .collect();
    let mut last = Instant::now();
    for w in workers {
        w.await.unwrap();
        if last.elapsed() > Duration::from_secs(10) {
            eprintln!("  filling… {:.0} s", start.elapsed().as_secs_f64());
            last = Instant::now();
        }
    }
    start.elapsed()
}

/// Ends a task holding 10,000 leases; how long the store takes.
async fn end_big_task(store: &Store) -> Duration {
    let t = Arc::new(started(store, "big").await);
    let issued: Vec<_> = (0..64)
        .map(|_| {
            let (store, t) = (store.clone(), t.clone());
            tokio::spawn(async move {
                for _ in 0..10_000 / 64 + 1 {
                    store.issue(&lease(&t, TTL), t.created_at).await.unwrap();
                }
            })
        })
        .collect();
    for i in issued {
        i.await.unwrap();
    }
    let req = revoke(
        RevocationReason::TaskCompleted,
        RevocationReason::TaskCompleted,
        t.created_at,
    );
    let start = Instant::now();
    let revoked = store.end_task(&t.id, &req).await.unwrap();
    let took = start.elapsed();
    assert!(revoked.len() > 10_000, "{} revoked", revoked.len());
    took
}

async fn measure(label: &str, store: &Store, n: usize) {
    let d = Duration::from_secs(3);
    let empty = write_rate(store, 32, d).await;
    let filled_in = fill(store, n).await;
    let live = store.active_count().await.unwrap();
    let full = write_rate(store, 32, d).await;
    let end = end_big_task(store).await;
    println!(
        "{label:<9} writes/s empty {empty:>8.0}   with {live} live leases {full:>8.0}   ratio {:.2}",
        full / empty
    );
    println!(
        "{label:<9} filled {n} leases in {:.1} s ({:.0}/s, 256 writers)",
        filled_in.as_secs_f64(),
        n as f64 / filled_in.as_secs_f64()
    );
    println!(
        "{label:<9} ending a task with 10,000 leases: {:.1} ms",
        end.as_secs_f64() * 1000.0
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    // The embedded store's page cache, MiB (default: the broker's).
    let cache = args
        .get(1)
        .and_then(|a| a.parse::<usize>().ok())
        .map_or(mayfly_broker::store::EMBEDDED_CACHE_BYTES, |m| m << 20);
    // One backend only, when named.
    let only = args.get(2).map(String::as_str);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if only != Some("redis") {
            embedded(n, cache).await;
        }
        if only == Some("embedded") {
            return;
        }
        let server = RedisServer::start();
        let target = RedisTarget::Url {
            url: server.url(),
            ca_pem: None,
        };
        let store: Store =
            Arc::new(RedisStore::new(target, "mayfly", Duration::from_secs(24 * 3600)).unwrap());
        measure("redis", &store, n).await;
    });
}

/// The embedded store's figures, and its reopening with `n` leases.
async fn embedded(n: usize, cache: usize) {
    // On the real disk (under target/), not a tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("scaling.redb");
    let store: Store = Arc::new(EmbeddedStore::open_with_cache(&path, cache).unwrap());
    println!("embedded  page cache {} MiB", cache >> 20);
    measure("embedded", &store, n).await;
    drop(store);
    let size = std::fs::metadata(&path).unwrap().len();
    let start = Instant::now();
    let store = EmbeddedStore::open(&path).unwrap();
    store.check().await.unwrap();
    let live = store.active_count().await.unwrap();
    println!(
        "embedded  reopened with {live} live leases in {:.0} ms (file {} MiB)",
        start.elapsed().as_secs_f64() * 1000.0,
        size >> 20
    );
}
