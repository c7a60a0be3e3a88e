//! A lease and its audit record exist together or not at all across a
//! crash at any point. The real `mayfly serve` (built with the test-only
//! `failpoints` feature, which this crate's dev-dependency turns on) is
//! stopped where it hurts most, by a failpoint (`MAYFLY_FAILPOINT`) or by
//! SIGKILL while agents open tasks and issue; after a restart every token
//! lease has exactly one `token_issued` record and every task lease one
//! `task_started` record, every such record its lease, and `mayfly audit
//! verify` accepts the trail. On the embedded store (its file
//! trail) and on Redis (its own trail, the one a Redis store may have).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mayfly_broker::store::RecordStore;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mayfly_broker::dev;
use mayfly_broker::store::{
    EmbeddedStore, LeaseFilter, LeaseStore, PageRequest, RedisStore, RedisTarget,
};
use mayfly_client::{Client, ClientConfig, NewTask};
use mayfly_core::{LeaseKind, Timestamp, TrustDomain};
use mayfly_testkit::RedisServer;

const API: &str = "https://api.example.com";

/// A free port on 127.0.0.1, for a broker that restarts on the same one.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A dev setup whose broker runs as its own process, again and again.
struct Setup {
    _tmp: tempfile::TempDir,
    layout: dev::DevLayout,
    grpc: u16,
    http: u16,
    /// The Redis the leases live in, if not the embedded store.
    redis: Option<RedisServer>,
    runs: usize,
}

impl Setup {
    fn new(redis: Option<RedisServer>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let layout = dev::init(&tmp.path().join("dev"), &td).unwrap();
        let (grpc, http) = (free_port(), free_port());
        let mut text = std::fs::read_to_string(&layout.config).unwrap();
        text = text
            .replace(dev::DEV_GRPC_ADDR, &format!("127.0.0.1:{grpc}"))
            .replace(dev::DEV_HTTP_ADDR, &format!("127.0.0.1:{http}"))
            .replace(
                &format!("localhost:{}", port_of(dev::DEV_HTTP_ADDR)),
                &format!("localhost:{http}"),
            );
        if let Some(r) = &redis {
            text = text.replace("store = \"embedded\"", &format!("store = \"{}\"", r.url()));
        }
        // Agents issue in bursts here.
        text.push_str("\n[rate_limit]\nper_second = 0.0\n");
        std::fs::write(&layout.config, text).unwrap();
        Self {
            _tmp: tmp,
            layout,
            grpc,
            http,
            redis,
            runs: 0,
        }
    }

    /// Starts `mayfly serve`, with `failpoint` chosen if any; its output
    /// goes to a log file per run.
    fn serve(&mut self, failpoint: Option<&str>) -> Child {
        loop {
            let mut child = self.spawn(failpoint);
            // Free ports are found by binding and letting go, so another
            // test may have taken one since: then move to fresh ones.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let lost = loop {
                if child.try_wait().unwrap().is_some() {
                    break self.log().contains("Address already in use");
                }
                let up = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
                if (up(self.grpc) && up(self.http)) || std::time::Instant::now() > deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if !lost {
                return child;
            }
            let (grpc, http) = (free_port(), free_port());
            let text = std::fs::read_to_string(&self.layout.config)
                .unwrap()
                .replace(&format!(":{}\"", self.grpc), &format!(":{grpc}\""))
                .replace(&format!(":{}\"", self.http), &format!(":{http}\""));
            std::fs::write(&self.layout.config, text).unwrap();
            (self.grpc, self.http) = (grpc, http);
        }
    }

    fn spawn(&mut self, failpoint: Option<&str>) -> Child {
        self.runs += 1;
        let log = self.layout.dir.join(format!("serve-{}.log", self.runs));
        let log = std::fs::File::create(log).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_mayfly"));
        c.args(["serve", "--config"])
            .arg(&self.layout.config)
            .env_remove("MAYFLY_FAILPOINT")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log.try_clone().unwrap());
        if let Some(point) = failpoint {
            c.env("MAYFLY_FAILPOINT", point);
        }
        c.spawn().expect("mayfly serve starts")
    }

    /// The log of the latest run, for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(self.layout.dir.join(format!("serve-{}.log", self.runs)))
            .unwrap_or_default()
    }

    /// The dev agent's client, once the broker takes connections.
    async fn agent(&self) -> Option<Client> {
        let id = self.layout.dir.join("identities/agent-demo");
        let config = ClientConfig::from_files(
            &format!("https://localhost:{}", self.grpc),
            self.layout.dir.join("bundle.pem"),
            id.join("svid.pem"),
            id.join("svid.key"),
        )
        .unwrap();
        Client::connect(&config).await.ok()
    }

    /// Waits until the broker opens a task: it is up, and (its recorder
    /// ships what the store held before its first batch) its trail is
    /// level with its store.
    async fn ready(&self, child: &mut Child) -> Client {
        for _ in 0..600 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("mayfly serve exited with {status}:\n{}", self.log());
            }
            if let Some(agent) = self.agent().await
                && let Ok(task) = agent.start_task(task()).await
            {
                task.detach();
                return agent;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("mayfly serve never answered:\n{}", self.log());
    }

    /// The data directory's audit file.
    fn trail_file(&self) -> PathBuf {
        self.layout.dir.join("data/audit.jsonl")
    }

    /// Every token lease and every task lease in the store, and every
    /// line of the trail, read with the broker stopped.
    async fn contents(&self) -> (Leases, Vec<String>) {
        match &self.redis {
            None => {
                let store = EmbeddedStore::open(&self.layout.dir.join("data/leases.redb")).unwrap();
                let leases = Leases::of(&store).await;
                let mut lines = Vec::new();
                for f in mayfly_broker::audit::segment_files(&self.trail_file()).unwrap() {
                    let text = std::fs::read_to_string(f).unwrap();
                    lines.extend(text.lines().map(str::to_owned));
                }
                (leases, lines)
            }
            Some(r) => {
                let target = RedisTarget::Url {
                    url: r.url(),
                    ca_pem: None,
                };
                let store = RedisStore::new(target, "mayfly", Duration::from_secs(86_400)).unwrap();
                let leases = Leases::of(&store).await;
                let trail = store.trail();
                let (mut lines, mut cursor) = (Vec::new(), String::new());
                loop {
                    let (page, next) = trail.read(&cursor, 1000).await.unwrap();
                    if page.is_empty() {
                        break;
                    }
                    lines.extend(page);
                    cursor = next;
                }
                (leases, lines)
            }
        }
    }

    /// The trail checked as the operator checks it.
    fn audit_verify(&self, lines: &[String]) {
        let file = match &self.redis {
            None => self.trail_file(),
            Some(_) => {
                let f = self.layout.dir.join("exported.jsonl");
                std::fs::write(&f, format!("{}\n", lines.join("\n"))).unwrap();
                f
            }
        };
        let out = Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .args(["audit", "verify"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mayfly audit verify {}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Checks, with the broker stopped: each token lease and each task
    /// lease has exactly one record, no record names a lease the store
    /// lacks, no record is there twice, and the chain verifies. Returns
    /// how many tokens and tasks.
    async fn check(&self) -> (usize, usize) {
        let (leases, lines) = self.contents().await;
        let records: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        one_record_each(&leases.tokens, &records, "token_issued", "lease_id");
        one_record_each(&leases.tasks, &records, "task_started", "task_id");
        self.audit_verify(&lines);
        (leases.tokens.len(), leases.tasks.len())
    }
}

/// Checks that each of `leases` has exactly one `event` record, naming it
/// in `field`, and that every such record names one of them.
fn one_record_each(
    leases: &BTreeSet<String>,
    records: &[serde_json::Value],
    event: &str,
    field: &str,
) {
    let mut recorded: BTreeMap<String, usize> = BTreeMap::new();
    for r in records.iter().filter(|r| r["event"] == event) {
        *recorded
            .entry(r[field].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let twice: Vec<&String> = recorded
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(twice.is_empty(), "{event} recorded twice: {twice:?}");
    let unrecorded: Vec<&String> = leases
        .iter()
        .filter(|l| !recorded.contains_key(*l))
        .collect();
    assert!(
        unrecorded.is_empty(),
        "leases without {event}: {unrecorded:?}"
    );
    let orphans: Vec<&String> = recorded.keys().filter(|id| !leases.contains(*id)).collect();
    assert!(orphans.is_empty(), "{event} without a lease: {orphans:?}");
}

fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap()
}

fn task() -> NewTask {
    NewTask::new("crash test", [API]).scope("read:files")
}

/// The ids of a store's token leases and task leases (a task's lease has
/// the task's id).
struct Leases {
    tokens: BTreeSet<String>,
    tasks: BTreeSet<String>,
}

impl Leases {
    async fn of(store: &dyn LeaseStore) -> Self {
        Self {
            tokens: ids(store, LeaseKind::Jwt).await,
            tasks: ids(store, LeaseKind::Task).await,
        }
    }
}

/// Every lease of `kind` in `store`.
async fn ids(store: &dyn LeaseStore, kind: LeaseKind) -> BTreeSet<String> {
    let filter = LeaseFilter {
        kind: Some(kind),
        ..LeaseFilter::default()
    };
    let mut out = BTreeSet::new();
    let mut page = PageRequest {
        after: None,
        limit: 500,
    };
    loop {
        let got = store
            .list_leases(&filter, &page, Timestamp::now())
            .await
            .unwrap();
        out.extend(got.items.into_iter().map(|l| l.id.to_string()));
        match got.next {
            Some(next) => page.after = Some(next),
            None => return out,
        }
    }
}

/// Sends SIGTERM and waits: the broker drains and exits.
fn stop(child: &mut Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    child.wait().unwrap();
}

/// Issues one token with the failpoint chosen: the broker dies there, the
/// agent gets no token; after a restart the lease and its record are
/// there once each.
async fn a_crash_at(setup: &mut Setup, point: &str) {
    let mut child = setup.serve(Some(point));
    let agent = setup.ready(&mut child).await;
    let task = agent.start_task(task()).await.unwrap();
    let issued = task.issue_token(API, ["read:files"]).await;
    assert!(issued.is_err(), "the broker answered past {point}");
    let status = child.wait().unwrap();
    assert!(!status.success(), "{status}");
    assert!(
        setup.log().contains(&format!("failpoint {point} reached")),
        "{}",
        setup.log()
    );
    task.detach();

    let mut child = setup.serve(None);
    setup.ready(&mut child).await;
    stop(&mut child);
    assert_eq!(
        setup.check().await,
        (1, 3),
        "{point}: the one token lease and its record; the task it was issued under and \
         each run's first"
    );
}

/// Opens one task with the failpoint chosen: the broker dies there, the
/// agent gets no task; after a restart the task lease and its record are
/// there once each.
async fn a_task_crash_at(setup: &mut Setup, point: &str) {
    let mut child = setup.serve(Some(point));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if let Some(agent) = setup.agent().await
            && let Ok(task) = agent.start_task(task()).await
        {
            task.detach();
            panic!("the broker answered past {point}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "{status}");
    assert!(
        setup.log().contains(&format!("failpoint {point} reached")),
        "{}",
        setup.log()
    );

    let mut child = setup.serve(None);
    setup.ready(&mut child).await;
    stop(&mut child);
    assert_eq!(
        setup.check().await,
        (0, 2),
        "{point}: the crashed task and the next run's, each with its record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_crash_after_the_commit_or_the_append_loses_and_doubles_nothing() {
    for point in ["after_lease_commit", "after_trail_append"] {
        let mut setup = Setup::new(None);
        a_crash_at(&mut setup, point).await;
    }
    for point in ["after_task_commit", "after_task_trail_append"] {
        let mut setup = Setup::new(None);
        a_task_crash_at(&mut setup, point).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_crash_after_the_script_loses_nothing() {
    let mut setup = Setup::new(Some(RedisServer::start()));
    a_crash_at(&mut setup, "after_lease_commit").await;
    let mut setup = Setup::new(Some(RedisServer::start()));
    a_task_crash_at(&mut setup, "after_task_commit").await;
}

/// Agents open tasks and issue as fast as they can until told to stop:
/// three tokens a task, so a kill finds tasks opening as well as tokens.
fn issuers(agent: &Client, n: usize, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (agent, stop) = (agent.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(task) = agent.start_task(task()).await else {
                        return;
                    };
                    let mut issued = 0;
                    while issued < 3 && task.issue_token(API, ["read:files"]).await.is_ok() {
                        issued += 1;
                    }
                    task.detach();
                    if issued < 3 {
                        return;
                    }
                }
            })
        })
        .collect()
}

/// A pseudo-random delay up to `max_ms`, from the clock's nanoseconds.
fn random_ms(max_ms: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u64::from(nanos) % max_ms
}

/// Ten times: eight agents issue, the broker is SIGKILLed at a random
/// moment, restarted; no lease without its record, no record twice, one
/// chain across every crash.
async fn kill_under_load(setup: &mut Setup) {
    let mut tokens = 0;
    for run in 0..10 {
        let mut child = setup.serve(None);
        let agent = setup.ready(&mut child).await;
        let stop_issuing = Arc::new(AtomicBool::new(false));
        let workers = issuers(&agent, 8, &stop_issuing);
        tokio::time::sleep(Duration::from_millis(200 + random_ms(800))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        stop_issuing.store(true, Ordering::Relaxed);
        for w in workers {
            w.await.unwrap();
        }
        let mut child = setup.serve(None);
        setup.ready(&mut child).await;
        stop(&mut child);
        let (now, opened) = setup.check().await;
        assert!(
            now > tokens,
            "run {run}: no token was issued before the kill"
        );
        eprintln!(
            "run {run}: {} tokens issued before the kill; {opened} tasks in all",
            now - tokens
        );
        tokens = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_kill_9_under_load_leaves_every_lease_with_one_record() {
    kill_under_load(&mut Setup::new(None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill_9_under_load_leaves_every_lease_with_one_record() {
    kill_under_load(&mut Setup::new(Some(RedisServer::start()))).await;
}

/// The file trail cannot be written with Redis leases: refused at start,
/// naming why.
#[test]
fn a_file_trail_with_the_redis_store_is_refused() {
    let setup = Setup::new(Some(RedisServer::start()));
    let text = std::fs::read_to_string(&setup.layout.config).unwrap();
    std::fs::write(
        &setup.layout.config,
        format!("{text}\n[audit]\nsink = \"file\"\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["serve", "--config"])
        .arg(&setup.layout.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sink = \"file\" cannot be used with store = \"redis\""),
        "{err}"
    );
}

/// A database login whose lease ended while the broker died between
/// making it unusable (NOLOGIN, sessions ended) and dropping it: the
/// login stays refused, and the restarted broker finishes the drop. The
/// login is made with `mayfly db login --env`, as an agent would, and
/// checked with psql.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_disabling_and_dropping_a_login_is_finished_after_restart() {
    use mayfly_testkit::{ORDERS_MANAGER_PASSWORD, PgServer, psql};
    const ORDERS: &str = "postgres://orders";
    let pg = PgServer::orders();
    // A login-shaped role no lease accounts for (its hold lost with a
    // store): the sweep drops it.
    let orphan = "mayfly_0123456789abcdef01234567";
    pg.psql("orders", &format!("CREATE ROLE {orphan} LOGIN"))
        .unwrap();
    let mut setup = Setup::new(None);
    let pw = setup.layout.dir.join("orders-manager.password");
    std::fs::write(&pw, format!("{ORDERS_MANAGER_PASSWORD}\n")).unwrap();
    let mut text = std::fs::read_to_string(&setup.layout.config).unwrap();
    text.push_str(&format!(
        "\n[[databases]]\nname = \"{ORDERS}\"\n\
         url = \"postgres://mayfly_manager@127.0.0.1:{}/orders\"\n\
         password_file = \"{}\"\n\
         [databases.scopes]\n\"db:read\" = [\"GRANT orders_reader TO {{role}}\"]\n",
        pg.port(),
        pw.display()
    ));
    std::fs::write(&setup.layout.config, text).unwrap();
    std::fs::write(
        setup.layout.dir.join("policies/orders.cedar"),
        format!(
            "@id(\"orders-tasks\")\n\
             permit (principal, action == Mayfly::Action::\"start_task\", \
             resource == Mayfly::Audience::\"{ORDERS}\");\n\n\
             @id(\"orders-logins\")\n\
             permit (principal, action == Mayfly::Action::\"issue_database_login\", \
             resource == Mayfly::Audience::\"{ORDERS}\");\n"
        ),
    )
    .unwrap();

    let mut child = setup.serve(Some("after_login_disabled"));
    let agent = setup.ready(&mut child).await;
    let swept = |pg: &PgServer| {
        pg.psql(
            "orders",
            &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{orphan}'"),
        )
        .unwrap()
            == "0"
    };
    for _ in 0..100 {
        if swept(&pg) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(swept(&pg), "the orphan was not swept:\n{}", setup.log());
    let task = agent
        .start_task(NewTask::new("read orders", [ORDERS]).scope("db:read"))
        .await
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args([
            "db",
            "login",
            "--env",
            "--task",
            task.id(),
            "--database",
            ORDERS,
        ])
        .args(["--scope", "db:read", "--identity", "agent-demo"])
        .arg("--profile")
        .arg(&setup.layout.dir)
        .arg("--broker")
        .arg(format!("https://localhost:{}", setup.grpc))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mayfly db login: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env: BTreeMap<String, String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect();
    let dsn = format!(
        "postgres://{}:{}@{}:{}/{}",
        env["PGUSER"], env["PGPASSWORD"], env["PGHOST"], env["PGPORT"], env["PGDATABASE"]
    );
    assert_eq!(psql(&dsn, "SELECT amount FROM orders").unwrap(), "50");
    let user = env["PGUSER"].clone();
    let roles = |pg: &PgServer| {
        pg.psql(
            "orders",
            &format!("SELECT rolcanlogin FROM pg_roles WHERE rolname = '{user}'"),
        )
        .unwrap()
    };

    // Completing the task revokes the login; the dropper disables it and
    // the broker dies before the drop.
    let _ = task.complete().await;
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(
        !status.success(),
        "the broker did not stop at the failpoint"
    );
    assert_eq!(
        roles(&pg),
        "f",
        "the login was not disabled before the crash"
    );
    assert!(
        psql(&dsn, "SELECT 1").is_err(),
        "a disabled login logged in"
    );

    // Restarted without the failpoint, the broker finishes the drop.
    let mut child = setup.serve(None);
    let _agent = setup.ready(&mut child).await;
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !roles(&pg).is_empty() {
        assert!(
            std::time::Instant::now() < until,
            "the drop was not finished after restart:\n{}",
            setup.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(&mut child);
    let (_, lines) = setup.contents().await;
    let dropped: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("database_login_dropped") && l.contains(&user))
        .collect();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert!(dropped[0].contains("task_completed"), "{}", dropped[0]);
    assert!(
        lines.iter().any(|l| l.contains("database_login_dropped")
            && l.contains(orphan)
            && l.contains("\"orphan\"")),
        "the orphan's drop was not recorded"
    );
    // The manager shares the prefix and is never swept.
    assert_eq!(
        pg.psql(
            "orders",
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'mayfly_manager'"
        )
        .unwrap(),
        "t"
    );
    assert!(!lines.iter().any(|l| l.contains(&env["PGPASSWORD"])));
}
