//! Redis memory per live lease: `INFO memory` before and after recording
//! 100,000 JWT leases (1,000 tasks of 100 leases), through the real store.
//!
//! `cargo bench -p mayfly-benches --bench redis_memory`

#![allow(clippy::unwrap_used, missing_docs)]

use mayfly_broker::store::CredentialStore;
use mayfly_broker::store::TaskStore;
use std::time::{Duration, Instant};

use mayfly_broker::store::{RedisStore, RedisTarget};
use mayfly_testkit::RedisServer;
use mayfly_testkit::contract::{agent, lease, task};

const TASKS: usize = 1_000;
const LEASES_PER_TASK: usize = 100;

fn used_memory(server: &RedisServer) -> u64 {
    let info = server.cli(&["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO memory has used_memory")
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = RedisServer::start();
    let target = RedisTarget::Url {
        url: server.url(),
        ca_pem: None,
    };
    let store = RedisStore::new(target, "mayfly", Duration::from_secs(24 * 3600)).unwrap();
    let before = used_memory(&server);
    let started = Instant::now();
    rt.block_on(async {
        for i in 0..TASKS {
            let t = task(&agent(&format!("agent-{}", i % 50)), 3600);
            store.start_task(&t).await.unwrap();
            let mut pending = Vec::new();
            for _ in 0..LEASES_PER_TASK {
                pending.push(lease(&t, 600));
            }
            let now = t.created_at;
            let issues = pending.iter().map(|l| store.issue(l, now));
            for r in futures::future::join_all(issues).await {
                r.unwrap();
            }
        }
    });
    let elapsed = started.elapsed();
    let after = used_memory(&server);
    let leases = (TASKS * LEASES_PER_TASK + TASKS) as u64;
    println!(
        "redis used_memory: {before} -> {after} bytes for {leases} leases ({TASKS} tasks): {} bytes per lease",
        (after - before) / leases
    );
    println!(
        "recorded in {:.1} s ({:.0} leases/s through the store, 100 in flight per task)",
        elapsed.as_secs_f64(),
        leases as f64 / elapsed.as_secs_f64()
    );
}
