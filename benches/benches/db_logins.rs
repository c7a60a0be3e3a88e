//! Database logins against a real PostgreSQL (`initdb`/`pg_ctl` on a free
//! port) and an in-process broker (embedded store, audit on), in one run:
//!
//! 1. logins issued per second through the broker (`IssueDatabaseCredential`,
//!    8 in flight) next to the same statements run bare by one client
//!    (CREATE ROLE with its SCRAM verifier + GRANT), and a bare
//!    CREATE ROLE + DROP ROLE loop, interleaved in rounds;
//! 2. the time from `CompleteTask` returning to the login being refused
//!    by PostgreSQL (p50/p99 of `DB_REFUSED` runs);
//! 3. revoking `DB_MASS` logins (10,000 by default) by completing their
//!    task: how long until none can log in and until the last is dropped,
//!    and `GetTask` latency before and during (the broker still serving);
//! 4. as many roles dropped by a bare `DROP ROLE` loop, for the rate's
//!    peer.
//!
//! `cargo bench -p mayfly-benches --bench db_logins` (`DB_MASS=2000` for a
//! quicker run).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_client::{Client, NewTask, pb};
use mayfly_testkit::{ORDERS_MANAGER_PASSWORD, PgServer, TestBroker};

const ORDERS: &str = "postgres://orders";
const POLICIES: &str = r#"
@id("bench-tasks")
permit (principal, action == Mayfly::Action::"start_task", resource);

@id("bench-logins")
permit (principal, action == Mayfly::Action::"issue_database_login",
        resource == Mayfly::Audience::"postgres://orders");
"#;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn manager(pg: &PgServer) -> tokio_postgres::Client {
    let url = pg.url("mayfly_manager", ORDERS_MANAGER_PASSWORD, "orders");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// `n` bare CREATE ROLE (+ GRANT) by one client; with `drop`, each is
/// dropped again at once. Returns per second.
async fn bare(client: &tokio_postgres::Client, n: usize, round: usize, drop: bool) -> f64 {
    let started = Instant::now();
    for i in 0..n {
        let role = format!("bare_{round}_{i}_{}", u8::from(drop));
        let verifier = postgres_protocol::password::scram_sha_256(
            b"bench-password-of-43-characters-xxxxxxxxxx",
        );
        let mut sql = format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{verifier}' VALID UNTIL '2100-01-01' CONNECTION LIMIT 5"
        );
        if drop {
            sql.push_str(&format!("; DROP ROLE {role}"));
        } else {
            sql.push_str(&format!("; GRANT orders_reader TO {role}"));
        }
        client.batch_execute(&sql).await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn open_task(agent: &Client, ttl: Duration) -> String {
    agent
        .start_task(NewTask::new("bench", [ORDERS]).scope("db:read").ttl(ttl))
        .await
        .unwrap()
        .detach()
        .task_id
}

fn login_request(task: &str) -> pb::IssueDatabaseCredentialRequest {
    pb::IssueDatabaseCredentialRequest {
        task_id: task.to_owned(),
        database: ORDERS.to_owned(),
        scopes: vec!["db:read".to_owned()],
        ttl_seconds: 0,
        approval_id: String::new(),
    }
}

/// `n` logins through the broker, `in_flight` at once. Returns per second.
async fn through_broker(agent: &Client, task: &str, n: usize, in_flight: usize) -> f64 {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..in_flight {
        let (agent, task, next) = (agent.clone(), task.to_owned(), next.clone());
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                agent
                    .broker()
                    .issue_database_credential(login_request(&task))
                    .await
                    .unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn refused(dsn: &str) -> bool {
    tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .is_err()
}

async fn roles_left(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'mayfly\\_%' AND rolname <> 'mayfly_manager'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// How many of the broker's logins can still log in.
async fn can_log_in(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'mayfly\\_%' \
             AND rolname <> 'mayfly_manager' AND rolcanlogin",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mass = env_usize("DB_MASS", 10_000);
    let refused_runs = env_usize("DB_REFUSED", 50);
    let pg = PgServer::orders();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("manager.pw");
    std::fs::write(&pw, ORDERS_MANAGER_PASSWORD).unwrap();
    let entry = format!(
        "name = \"{ORDERS}\"\nurl = \"postgres://mayfly_manager@127.0.0.1:{}/orders\"\n\
         password_file = \"{}\"\npool = 8\n[scopes]\n\"db:read\" = [\"GRANT orders_reader TO {{role}}\"]\n",
        pg.port(),
        pw.display()
    );
    rt.block_on(async {
        let broker = TestBroker::start_with(|c| {
            mayfly_testkit::use_policies(c, POLICIES);
            c.databases.push(toml::from_str(&entry).unwrap());
            c.tokens.max_ttl = Duration::from_secs(3600);
            c.tokens.default_ttl = Duration::from_secs(3600);
        })
        .await;
        let agent = broker.agent().await;
        let admin = manager(&pg).await;

        // 1. Throughput, interleaved rounds.
        println!("round  broker logins/s (8 in flight)  bare CREATE+GRANT/s  bare CREATE+DROP/s  broker/bare");
        let task = open_task(&agent, Duration::from_secs(3600)).await;
        for round in 0..3 {
            let b = through_broker(&agent, &task, 300, 8).await;
            let g = bare(&admin, 300, round, false).await;
            let d = bare(&admin, 300, round, true).await;
            println!("{round:>5}  {b:>29.0}  {g:>19.0}  {d:>18.0}  {:>11.2}", b / g);
        }
        agent.complete_task(&task).await.unwrap();
        while roles_left(&admin).await > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // 2. CompleteTask returning -> the login refused.
        let mut waits = Vec::new();
        for _ in 0..refused_runs {
            let task = open_task(&agent, Duration::from_secs(600)).await;
            let login = agent
                .broker()
                .issue_database_credential(login_request(&task))
                .await
                .unwrap()
                .into_inner();
            assert!(!refused(&login.dsn).await);
            agent.complete_task(&task).await.unwrap();
            let done = Instant::now();
            while !refused(&login.dsn).await {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            waits.push(done.elapsed());
        }
        waits.sort();
        println!(
            "CompleteTask -> login refused ({refused_runs} runs): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(percentile(&waits, 0.5)),
            ms(percentile(&waits, 0.99)),
            ms(waits[waits.len() - 1])
        );

        // 3. Revoking `mass` logins while the broker serves GetTask.
        let task = open_task(&agent, Duration::from_secs(3600)).await;
        let issued = Instant::now();
        through_broker(&agent, &task, mass, 8).await;
        println!("issued {mass} logins in {:.1} s", issued.elapsed().as_secs_f64());
        let probe = open_task(&agent, Duration::from_secs(3600)).await;
        let sample = |agent: Client, probe: String, until: Arc<std::sync::atomic::AtomicBool>| async move {
            let mut lat = Vec::new();
            while !until.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                agent
                    .broker()
                    .get_task(pb::GetTaskRequest { task_id: probe.clone() })
                    .await
                    .unwrap();
                lat.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            lat.sort();
            lat
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let idle = tokio::spawn(sample(agent.clone(), probe.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let idle = idle.await.unwrap();

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = tokio::spawn(sample(agent.clone(), probe.clone(), stop.clone()));
        let started = Instant::now();
        agent.complete_task(&task).await.unwrap();
        let answered = started.elapsed();
        let mut all_shut = None;
        while roles_left(&admin).await > 0 {
            if all_shut.is_none() && can_log_in(&admin).await == 0 {
                all_shut = Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let all_dropped = started.elapsed();
        let all_shut = all_shut.unwrap_or(all_dropped);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let busy = busy.await.unwrap();
        println!(
            "revoking {mass} logins: CompleteTask answered in {:.1} ms; none could log in after {:.1} s; every login dropped after {:.1} s ({:.0}/s)",
            ms(answered),
            all_shut.as_secs_f64(),
            all_dropped.as_secs_f64(),
            mass as f64 / all_dropped.as_secs_f64()
        );
        println!(
            "GetTask meanwhile: p50 {:.2} ms, p99 {:.2} ms ({} calls); idle before: p50 {:.2} ms, p99 {:.2} ms ({} calls)",
            ms(percentile(&busy, 0.5)),
            ms(percentile(&busy, 0.99)),
            busy.len(),
            ms(percentile(&idle, 0.5)),
            ms(percentile(&idle, 0.99)),
            idle.len()
        );

        // 4. The same number of roles dropped bare by one client (made
        // bare first, with the same grant): the peer of the rate above.
        for i in 0..mass {
            admin
                .batch_execute(&format!(
                    "CREATE ROLE bare_mass_{i} LOGIN; GRANT orders_reader TO bare_mass_{i}"
                ))
                .await
                .unwrap();
        }
        let started = Instant::now();
        for i in 0..mass {
            admin
                .batch_execute(&format!("DROP ROLE bare_mass_{i}"))
                .await
                .unwrap();
        }
        let bare = mass as f64 / started.elapsed().as_secs_f64();
        println!(
            "bare DROP ROLE of {mass} roles by one client: {bare:.0}/s; the broker's revocation ÷ bare: {:.2}",
            mass as f64 / all_dropped.as_secs_f64() / bare
        );
    });
}
